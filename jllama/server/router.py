"""Router mode: ``jllama serve --models-dir DIR`` / ``--models-preset FILE`` with no ``-m``.

llama-server 0c1e570's router (tools/server/server-models.cpp) as seen from its HTTP API: every
model of the sources is listed by GET /models with its status (unloaded / loading / loaded, and
``failed`` + ``exit_code`` after a load that died), POST /models/load and /models/unload start
and stop one, and every other endpoint is routed by the request's ``model`` (the JSON body's
field, or ``?model=`` on GET), loading it first unless --no-models-autoload (or
``?autoload=false``). At most --models-max models run at once: a request for another one waits
in a FIFO queue (requests for the same model share one entry) until the least recently used
idle model has been stopped for it; a model serving a request is never evicted.

Each model runs in its own child ``jllama serve -m FILE`` on a free loopback port, and the
router forwards the HTTP exchange byte for byte (streams chunk by chunk), as llama-server does
with child llama-servers. One process per model rather than several engines in this one,
because: a model that cannot load (a bad file, an unsupported architecture, out of memory) or
whose XLA runtime dies takes only its own process down, and the router answers for it while the
other models go on; unloading a model is the child's exit, so all its memory (weights, KV cache,
compiled executables, which JAX does not reliably hand back inside a live process) really is
returned, and GET /models never claims memory is free that is not. Children do not preallocate
device memory (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so several share one GPU.

Sources: --models-dir as llama.cpp's common/preset.cpp scans it (``NAME.gguf`` files, and
``NAME/`` subfolders holding a model plus an optional ``mmproj*.gguf``); --models-preset INI
files (``[*]`` for every model, ``[NAME]`` sections whose keys are serve's long or short flag
names without dashes: ``model``, ``mmproj``, ``c``, ...; plus ``load-on-startup`` and
``stop-timeout``; llama.cpp's LLAMA_ARG_* environment names as keys are not taken). Precedence
as llama-server: the router's own command line, then the model's section, then ``[*]``. Not
built: llama-server's Hugging Face cache as a source, downloads (POST/DELETE /models,
/models/sse). Resumable streams (X-Conversation-Id, /v1/stream) are kept here, in the router
(jllama/server/streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jllama.errors import ConfigError
from jllama.server import agent, streams
from jllama.server import cors_proxy as cp
from jllama.server import openai_schema as oa
from jllama.server.app import HttpRules, ServerSettings, check_auth, error_response, json_body
from jllama.server.openai_schema import ApiError
from jllama.server.streams import CONV_HEADER, Sessions

CHILD_HOST = "127.0.0.1"
SLEEP_PROBE_S = 0.5  # how often the router reads a loaded child's sleeping state
STOP_TIMEOUT_S = 10  # llama-server's DEFAULT_STOP_TIMEOUT: SIGTERM, then SIGKILL after this
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")
# llama-server's test hook (its suite sets it): 2 s more per load and per proxied request, so
# that a request is "busy" long enough for the queue tests to observe it
FAKE_TIMING_ENV = "LLAMA_SERVER_DEBUG_FAKE_TIMING"

# what the router forwards in neither direction: hop-by-hop headers, and those it sets itself
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
        "trailer", "host", "content-length", "date", "server"}

GET_PROXIED = ("/metrics", "/slots", "/lora-adapters")
POST_PROXIED = (
    "/props", "/completion", "/completions", "/v1/completions", "/chat/completions",
    "/v1/chat/completions", "/v1/responses", "/responses", "/v1/messages",
    "/v1/messages/count_tokens", "/infill", "/embedding", "/embeddings", "/v1/embeddings",
    "/rerank", "/reranking", "/v1/rerank", "/v1/reranking", "/tokenize", "/detokenize",
    "/apply-template", "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens",
    "/responses/input_tokens", "/v1/responses/input_tokens", "/lora-adapters",
    "/slots/{id_slot}")


def truthy(v: str) -> bool:
    return str(v).strip().lower() in ("1", "true", "on", "yes", "enabled")


# ------------------------------------------------------------------------------ sources
def scan_models_dir(path: str) -> dict[str, dict[str, str]]:
    """NAME -> {"model": FILE[, "mmproj": FILE]} as common_preset_context::load_from_models_dir:
    top-level ``*.gguf`` (projector/draft companions skipped) named by the file stem, and one
    model per subfolder (first shard of a split, else its one non-mmproj GGUF)."""
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"--models-dir {path}: does not exist or is not a directory")
    out: dict[str, dict[str, str]] = {}
    for f in sorted(d.iterdir()):
        if f.is_dir():
            model = shard = mmproj = None
            for g in sorted(f.iterdir()):
                if not g.name.endswith(".gguf"):
                    continue
                if "mmproj" in g.name:
                    mmproj = g
                elif g.name.startswith(("mtp-", "dspark-", "dflash-")):
                    continue  # speculative-draft sidecars: jllama takes drafts by flag only
                elif "-00001-of-" in g.name:
                    shard = g
                else:
                    model = g
            if shard or model:
                out[f.name] = {"model": str(shard or model)}
                if mmproj:
                    out[f.name]["mmproj"] = str(mmproj)
        elif f.name.endswith(".gguf") and "mmproj" not in f.name and not f.name.startswith(
                ("mtp-", "dspark-", "dflash-")):
            out[f.name.replace(".gguf", "")] = {"model": str(f)}
    return out


def _canonical_section(name: str) -> str:
    """common/preset.cpp's canonical_tag on a ``repo:tag`` section name: the tag upper-cased
    (its last ``-``/``.`` part alone when it has one: ``:model-q8_0`` -> ``:Q8_0``)."""
    if name in ("*", "") or ":" not in name:
        return name
    repo, tag = name.rsplit(":", 1)
    m = re.search(r"[-.]([A-Za-z0-9_]+)$", tag)
    return f"{repo}:{(m.group(1) if m else tag).upper()}"


def read_preset(path: str, flag: Callable[[str], tuple[str, bool] | None]
                ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(``[*]`` options, NAME -> options) of a llama-server preset INI. ``flag(key)`` names
    serve's flag for a key (long name, whether it takes a value), None when serve has none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--models-preset {path}: {e.strerror or e}") from None
    sections: dict[str, dict[str, str]] = {}
    cur = sections.setdefault("", {})
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(_canonical_section(line[1:-1].strip()), {})
            continue
        if "=" not in line:
            raise ConfigError(f"--models-preset {path}:{n}: expected 'key = value', got {line!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        if key == "version":
            continue
        if key in PRESET_ONLY:
            cur[key] = value
            continue
        f = flag(key)
        if f is None:
            name = next((k for k, v in sections.items() if v is cur), "")
            raise ConfigError(f"--models-preset {path}: option '{key}' not recognized in preset "
                              f"'{name or '*'}'")
        cur[f[0]] = value
    glob = sections.pop("*", {})
    top = sections.pop("", {})
    if top:  # keys above the first section: llama.cpp's default preset, i.e. global too
        glob = {**top, **glob}
    return glob, sections


# ------------------------------------------------------------------------------ models
@dataclass
class Model:
    name: str
    source: str  # "models_dir" or "preset", as llama-server's server_model_source_to_string
    options: dict[str, str]  # serve's long flag name (or a preset-only key) -> value
    aliases: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    status: str = "unloaded"
    port: int = 0
    proc: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)
    exit_code: int = 0
    last_used: float = 0.0
    req_count: int = 0
    stopping: bool = False
    loaded_info: dict = field(default_factory=dict)
    # the child sleeps (--sleep-idle-seconds): listed as "sleeping", and still running; a
    # request forwarded to it wakes it up
    sleeping: bool = False

    @property
    def running(self) -> bool:
        return self.status in ("loading", "loaded")

    @property
    def failed(self) -> bool:
        return self.status == "unloaded" and self.exit_code != 0

    @property
    def stop_timeout(self) -> float:
        try:
            return float(self.options.get("stop-timeout", STOP_TIMEOUT_S))
        except ValueError:
            return STOP_TIMEOUT_S


@dataclass
class RouterConfig:
    models_dir: str | None
    models_preset: str | None
    models_max: int = 4  # 0: no limit
    autoload: bool = True
    base_args: list[str] = field(default_factory=list)  # the router's flags every child gets
    flag: Callable[[str], tuple[str, bool] | None] = lambda key: (key, True)
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "jllama", "serve"])
    settings: ServerSettings = field(default_factory=lambda: ServerSettings(model_alias=""))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((CHILD_HOST, 0))
        return s.getsockname()[1]


class _Auth:  # check_auth reads state.settings only
    def __init__(self, settings: ServerSettings):
        self.settings = settings


class Router:
    """The models, their children and llama-server's LRU queue. All state is touched from the
    event loop only (handlers and the per-child watchers), so no lock is needed; blocking
    socket work runs in threads and reports back through the loop."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.fake_timing = bool(os.environ.get(FAKE_TIMING_ENV, "").strip())
        self.streams = Sessions()  # resumable streams (X-Conversation-Id), jllama/server/streams
        self.models: dict[str, Model] = {}
        # requests for a model that is not running: [name, n_waiters, loading] in arrival order
        self.queue: list[list] = []
        self._changed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references
        self._preexec = _die_with_parent()
        for name, opts in self._read_sources().items():
            self.models[name] = self._model(name, opts)
        startup = [m for m in self.models.values() if truthy(m.options.get("load-on-startup", ""))]
        if cfg.models_max > 0 and len(startup) > cfg.models_max:
            raise ConfigError(f"number of models to load on startup ({len(startup)}) exceeds "
                              f"models_max ({cfg.models_max})")
        self.startup = [m.name for m in startup]

    # ---------------------------------------------------------------- sources
    def _read_sources(self) -> dict[str, tuple[str, dict[str, str]]]:
        glob, presets = {}, {}
        if self.cfg.models_preset:
            glob, presets = read_preset(self.cfg.models_preset, self.cfg.flag)
        out = {}
        if self.cfg.models_dir:
            for name, opts in scan_models_dir(self.cfg.models_dir).items():
                out[name] = ("models_dir", {**glob, **opts})
        for name, opts in presets.items():
            base = out[name][1] if name in out else dict(glob)
            out[name] = ("preset", {**base, **opts})
        return dict(sorted(out.items()))

    def _model(self, name: str, src: tuple[str, dict[str, str]]) -> Model:
        source, opts = src
        split = lambda v: sorted({s.strip() for s in v.split(",") if s.strip()})  # noqa: E731
        m = Model(name, source, opts, aliases=split(opts.get("alias", "")),
                  tags=split(opts.get("tags", "")))
        for a in m.aliases:
            other = self.resolve(a)
            if other is not None and other.name != name:
                raise ConfigError(f"model name '{a}' conflicts with alias of model "
                                  f"'{other.name}'")
        return m

    async def reload(self) -> None:
        """GET /models?reload=1 (llama-server's load_models on a second call): running models
        gone from the sources or whose options changed are stopped (and waited for), models
        gone are dropped, the others get their new options, new ones are listed (not
        started)."""
        fresh = self._read_sources()
        stale = [n for n, m in self.models.items()
                 if m.running and (n not in fresh or fresh[n][1] != m.options)]
        for name in stale:
            self.unload(name)
        while any(self.models[n].running for n in stale):
            await self._wait_change()
        for name, m in list(self.models.items()):
            if m.running:
                continue
            if name not in fresh:
                del self.models[name]
            else:
                self.models[name] = self._model(name, fresh[name])
        for name, src in fresh.items():
            if name not in self.models:
                self.models[name] = self._model(name, src)
        self.models = dict(sorted(self.models.items()))
        self._notify()

    def resolve(self, name: str) -> Model | None:
        if name in self.models:
            return self.models[name]
        return next((m for m in self.models.values() if name in m.aliases), None)

    # ---------------------------------------------------------------- change signalling
    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float = 0.2) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ---------------------------------------------------------------- children
    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def child_args(self, m: Model, port: int) -> list[str]:
        """preset options, then the router's own flags (they win: argparse keeps the last),
        then what the router decides: the address and the model's name."""
        args = []
        for key, value in m.options.items():
            if key in PRESET_ONLY or key in ("alias", "tags"):
                continue
            f = self.cfg.flag(key)
            long, takes_value = f if f else (key, True)
            opt = ("-" if len(long) == 1 else "--") + long
            if takes_value:
                args += [opt, value]
            elif truthy(value):
                args.append(opt)
        return [*self.cfg.command, *args, *self.cfg.base_args,
                "--host", CHILD_HOST, "--port", str(port), "--alias", m.name]

    async def load(self, name: str) -> None:
        """Start the child (llama-server's server_models::load): a no-op unless unloaded; over
        --models-max is an error (callers make room first)."""
        if self.fake_timing:
            await asyncio.sleep(2)
        m = self.models[name]
        if m.status != "unloaded":
            return
        if self.cfg.models_max > 0 and self.n_running() >= self.cfg.models_max:
            raise ApiError(500, "model limit reached, try again later")
        port = _free_port()
        m.args = self.child_args(m, port)
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        print(f"jllama serve (router): starting '{name}' on port {port}", file=sys.stderr)
        try:
            proc = subprocess.Popen(m.args, env=env, stdin=subprocess.DEVNULL,
                                    preexec_fn=self._preexec)
        except OSError as e:
            raise ApiError(500, f"failed to spawn server instance: {e.strerror or e}") from None
        m.proc, m.port, m.status, m.exit_code = proc, port, "loading", 0
        m.loaded_info, m.stopping, m.last_used = {}, False, time.monotonic()
        self._spawn(self._watch(m, proc))
        self._notify()

    async def _watch(self, m: Model, proc: subprocess.Popen) -> None:
        """Loading -> loaded once the child answers /health; unloaded when it exits."""
        next_sleep_probe = 0.0
        while True:
            rc = proc.poll()
            if rc is not None:
                if m.proc is proc:
                    if m.stopping and rc == -signal.SIGTERM:
                        rc = 0  # uvicorn re-raises the SIGTERM it shut down on: a clean stop
                    m.status, m.exit_code, m.proc, m.stopping = "unloaded", rc, None, False
                    m.sleeping = False
                    m.loaded_info = {}
                    print(f"jllama serve (router): '{m.name}' exited with status {rc}",
                          file=sys.stderr)
                    self.tick()
                    self._notify()
                return
            if m.proc is proc and m.status == "loading":
                info = await asyncio.to_thread(_probe, m.port)
                if info is not None and proc.poll() is None:
                    m.status, m.loaded_info = "loaded", info
                    self._notify()
            elif (m.proc is proc and m.status == "loaded" and "--sleep-idle-seconds" in m.args
                  and time.monotonic() >= next_sleep_probe):
                # llama-server's children report their sleeping state to the router; here the
                # router reads it from the child's GET /props, which does not wake it
                next_sleep_probe = time.monotonic() + SLEEP_PROBE_S
                asleep = await asyncio.to_thread(_probe_sleeping, m.port)
                if asleep is not None and asleep != m.sleeping and m.proc is proc:
                    m.sleeping = asleep
                    self._notify()
            await asyncio.sleep(0.1 if m.status == "loading" else 0.25)

    def request_stop(self, m: Model) -> None:
        if m.proc is None or m.stopping:
            return
        m.stopping = True
        proc = m.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

        async def force():
            await asyncio.sleep(m.stop_timeout)
            if proc.poll() is None:
                print(f"jllama serve (router): force-killing '{m.name}' after timeout",
                      file=sys.stderr)
                proc.kill()

        self._spawn(force())
        self._notify()

    def unload(self, name: str) -> None:
        m = self.models[name]
        if not m.running or m.proc is None:
            return
        if m.status == "loading":  # llama-server: unloading a loading model kills it
            m.proc.kill()
        self.request_stop(m)

    async def shutdown(self) -> None:
        procs = [m.proc for m in self.models.values() if m.proc is not None]
        for m in self.models.values():
            self.request_stop(m)
        t0 = time.monotonic()
        while any(p.poll() is None for p in procs) and time.monotonic() - t0 < STOP_TIMEOUT_S:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()

    # ---------------------------------------------------------------- LRU queue
    def n_running(self) -> int:
        return sum(m.running for m in self.models.values())

    def has_capacity(self) -> bool:
        return self.cfg.models_max <= 0 or self.n_running() < self.cfg.models_max

    def _entry(self, name: str) -> list | None:
        return next((e for e in self.queue if e[0] == name), None)

    def pick_victim(self) -> str | None:
        """The least recently used model that is loaded, idle, not stopping and not wanted by a
        queued request; None when every model is busy."""
        best = None
        for m in self.models.values():
            if m.req_count or m.status != "loaded" or m.stopping or self._entry(m.name):
                continue
            if best is None or m.last_used < best.last_used:
                best = m
        return best.name if best else None

    def join(self, name: str) -> None:
        e = self._entry(name)
        if e is not None:
            e[1] += 1
        else:
            self.queue.append([name, 1, False])

    def leave(self, name: str) -> None:
        e = self._entry(name)
        if e is not None:
            e[1] -= 1
            if e[1] <= 0:
                self.queue.remove(e)

    def try_claim(self, name: str) -> bool:
        if not self.queue or self.queue[0][0] != name or self.queue[0][2]:
            return False
        if not self.has_capacity():
            return False
        self.queue[0][2] = True
        return True

    def tick(self) -> None:
        """Stop idle LRU models while queued requests outnumber the free (or freeing) slots."""
        if self.cfg.models_max <= 0 or not self.queue:
            return
        running = [m for m in self.models.values() if m.running]
        n_stopping = sum(m.stopping for m in running)
        n_needed = sum(not e[2] for e in self.queue)
        n_claimed = sum(1 for e in self.queue if e[2] and e[0] in self.models
                        and not self.models[e[0]].running)
        n_free = self.cfg.models_max - len(running) + n_stopping - n_claimed
        while n_free < n_needed:
            victim = self.pick_victim()
            if victim is None:
                return
            print(f"jllama serve (router): evicting idle LRU '{victim}' for a queued request",
                  file=sys.stderr)
            self.request_stop(self.models[victim])
            n_free += 1

    async def unload_lru(self) -> None:
        """POST /models/load at the limit: stop the LRU idle model and wait until it is down."""
        if self.has_capacity():
            return
        victim = self.pick_victim()
        if victim is None:
            return
        self.unload(victim)
        while self.models[victim].running:
            await self._wait_change()

    async def ensure_ready(self, name: str, gone: Callable) -> None:
        """Wait until ``name`` serves (llama-server's ensure_model_ready): a model that is not
        running joins the queue, whose head loads it once a slot is free. Raises ApiError when
        the load fails or the client ``gone()``."""
        m = self.models[name]
        if not m.stopping and m.status == "loaded":
            return
        queued = did_load = saw_loading = False
        if m.status == "unloaded":
            self.join(name)
            self.tick()
            queued = True
        try:
            while True:
                m = self.models.get(name)
                if m is None:
                    break
                if m.stopping:  # a stopping instance takes no request: the next one serves it
                    if not queued:
                        self.join(name)
                        self.tick()
                        queued = True
                    if await gone():
                        raise ApiError(500, f"request cancelled while waiting for model "
                                       f"name={name}")
                    await self._wait_change()
                    continue
                if m.status == "loaded":
                    break
                if m.status == "loading":
                    saw_loading = True
                elif m.status == "unloaded":
                    if did_load or saw_loading:
                        if m.failed:
                            raise ApiError(500, f"model name={name} failed to load")
                        break
                    if not queued:
                        break
                if await gone():
                    raise ApiError(500, f"request cancelled while waiting for model name={name}")
                if m.status == "unloaded" and self.try_claim(name):
                    ok = True
                    try:
                        await self.load(name)
                        did_load = True
                    except ApiError:
                        ok = False  # lost the race for the slot: stay in line
                    e = self._entry(name)
                    if not ok and e is not None:
                        e[2] = False
                    self.tick()
                    continue
                await self._wait_change()
        except BaseException:
            if queued:
                self.leave(name)
            self.tick()  # a slot freed for this waiter goes to the next one
            raise
        # no tick here: the model just loaded is idle until the caller's request counts on it
        # (synchronously after this returns), and must not be picked as a victim before that
        if queued:
            self.leave(name)

    # ---------------------------------------------------------------- listing
    def listing(self) -> dict:
        t = int(time.time())
        data = []
        for m in self.models.values():
            value = "sleeping" if m.status == "loaded" and m.sleeping else m.status
            status: dict = {"value": value, "args": m.args}
            if m.source == "preset":
                status["preset"] = "\n".join(f"{k} = {v}" for k, v in m.options.items())
            if m.failed:
                status["exit_code"] = m.exit_code
                status["failed"] = True
            modal = ["text", "image"] if m.options.get("mmproj") else ["text"]
            info = {"id": m.name, "aliases": m.aliases, "tags": m.tags, "object": "model",
                    "owned_by": "llamacpp", "created": t, "status": status,
                    "architecture": {"input_modalities": modal, "output_modalities": ["text"]},
                    "source": m.source, "can_remove": False}
            if m.running:
                for k, v in m.loaded_info.items():
                    info.setdefault(k, v)
            data.append(info)
        return {"data": data, "object": "list"}


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the child SIGTERMed when the router dies, however it dies
    (llama-server's children watch their stdin for the same reason), so that no orphan keeps a
    model's memory: Linux's prctl(PR_SET_PDEATHSIG). Resolved here in the parent: between fork
    and exec the child must not import (another thread may hold the import lock). None
    elsewhere: the router's shutdown alone stops the children."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _probe_sleeping(port: int) -> bool | None:
    """The child's /props is_sleeping; None when it does not answer."""
    try:
        c = http.client.HTTPConnection(CHILD_HOST, port, timeout=5)
        try:
            c.request("GET", "/props")
            r = c.getresponse()
            body = json.loads(r.read() or b"{}")
        finally:
            c.close()
    except Exception:  # noqa: BLE001 - busy or going away: the watcher asks again
        return None
    return bool(body.get("is_sleeping")) if isinstance(body, dict) else None


def _probe(port: int) -> dict | None:
    """The child's /v1/models entry once its /health answers 200, else None."""
    try:
        c = http.client.HTTPConnection(CHILD_HOST, port, timeout=5)
        try:
            c.request("GET", "/health")
            r = c.getresponse()
            r.read()
            if r.status != 200:
                return None
            c.request("GET", "/v1/models")
            r = c.getresponse()
            body = json.loads(r.read() or b"{}")
        finally:
            c.close()
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason: the watcher retries
        return None
    data = body.get("data") if isinstance(body, dict) else None
    return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}


class _Proxied(Response):
    """The child's answer streamed through; ``done`` runs however the exchange ends (client
    gone included), which is when the model stops counting as busy."""

    def __init__(self, conn, resp, done: Callable[[], None]):
        self.conn, self.resp, self.done = conn, resp, done
        self.status_code = resp.status

    async def __call__(self, scope, receive, send):
        resp = self.resp

        async def chunks():
            while True:
                b = await asyncio.to_thread(resp.read1, 65536)
                if not b:
                    return
                yield b

        headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP
                   and not k.lower().startswith("access-control-")}
        try:
            await StreamingResponse(chunks(), status_code=resp.status, headers=headers)(
                scope, receive, send)
        finally:
            # shutdown, not just close: a reader thread may still be blocked in recv on this
            # socket, which keeps it open (no FIN: the child would go on generating for nobody)
            # until the child's next write
            with contextlib.suppress(OSError, AttributeError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.conn.close()
            self.done()


def _open(port: int, method: str, path: str, headers: dict, body: bytes | None, timeout: float):
    conn = http.client.HTTPConnection(CHILD_HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


class RouterHandlers:
    def __init__(self, router: Router):
        self.r = router
        self.auth = _Auth(router.cfg.settings)
        self._tasks: set[asyncio.Task] = set()  # session producers (kept referenced)

    async def _run(self, request: Request, fn, auth: bool = True) -> Response:
        try:
            if auth:
                check_auth(self.auth, request)
            return await fn(request)
        except ApiError as e:
            return error_response(e)

    def _autoload(self, request: Request) -> bool:
        v = request.query_params.get("autoload", "")
        return self.r.cfg.autoload if not v else v in ("true", "1")

    def _validate(self, name, autoload: bool) -> str:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model name is missing from the request")
        m = self.r.resolve(name)
        if m is None:
            raise ApiError(400, f"model '{name}' not found")
        if not autoload and not m.running:
            raise ApiError(400, "model is not loaded")
        return m.name

    async def _forward(self, request: Request, name: str, body: bytes | None,
                       update_last_used: bool, conv_id: str | None = None) -> Response:
        conn, resp, done = await self._open_child(request, name, body, update_last_used)
        if conv_id is not None and resp.status == 200:
            return self._session(conv_id, conn, resp, done)
        return _Proxied(conn, resp, done)

    def _session(self, conv_id: str, conn, resp, done: Callable[[], None]) -> Response:
        """The child's stream copied into the conversation's session by a task of its own, so
        it goes on when the client hangs up; the client reads the session live."""
        sess = self.r.streams.create(conv_id)

        def hang_up():  # unblocks the reader thread: the child sees the close and stops
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)

        async def produce():
            try:
                while True:
                    b = await asyncio.to_thread(resp.read1, 65536)
                    if not b:
                        break
                    sess.append(b)
            except (OSError, http.client.HTTPException, ValueError):
                pass  # a stop (the socket shut) or the child gone: the session ends here
            finally:
                hang_up()
                with contextlib.suppress(OSError):
                    conn.close()
                done()
                sess.finish()

        task = asyncio.get_running_loop().create_task(produce())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        sess.stop = hang_up
        headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP
                   and not k.lower().startswith("access-control-")
                   and k.lower() != "content-length"}
        return StreamingResponse(sess.read_from(0), status_code=resp.status, headers=headers)

    async def _open_child(self, request: Request, name: str, body: bytes | None,
                          update_last_used: bool):
        r = self.r
        m = r.models.get(name)
        if m is None:  # dropped by a reload while the request waited
            raise ApiError(500, f"model name={name} is not found")
        if not m.running:
            raise ApiError(400, f"model name={name} is not running")
        if update_last_used:
            m.last_used = time.monotonic()
        m.req_count += 1
        proc = m.proc

        def done():
            if m.proc is proc and m.req_count > 0:
                m.req_count -= 1
                if m.req_count == 0:
                    r.tick()
                    r._notify()

        try:
            if r.fake_timing:  # after req_count++: the model counts as busy meanwhile
                await asyncio.sleep(2)
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            # the router keeps the conversation's session: the child's answer stays bound to
            # this connection, which a stop shuts
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP
                       and k.lower() not in ("accept-encoding", CONV_HEADER)}
            conn, resp = await asyncio.to_thread(_open, m.port, request.method, path, headers,
                                                 body, r.cfg.settings.timeout)
        except BaseException as e:
            done()
            if isinstance(e, (OSError, http.client.HTTPException)):
                raise ApiError(500, f"model name={name}: the instance did not answer "
                               f"({e})") from None
            raise
        return conn, resp, done

    # ---------------------------------------------------------------- routes
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def props(self, request: Request) -> Response:
        async def fn(request):
            if not request.query_params.get("model"):
                return JSONResponse({
                    "role": "router", "max_instances": self.r.cfg.models_max,
                    "models_autoload": self.r.cfg.autoload, "model_alias": "jllama",
                    "model_path": "none",
                    "default_generation_settings": {"params": {}, "n_ctx": 0},
                    "build_info": oa.FINGERPRINT})
            return await self._proxy_get(request)
        return await self._run(request, fn)

    async def tools(self, request: Request) -> Response:
        # the router serves /tools and /cors-proxy itself, as llama-server's
        return await self._run(request, agent.tools_handler(self.r.cfg.settings.tools))

    async def cors_proxy(self, request: Request) -> Response:
        return await self._run(request, cp.proxy_handler(self.r.cfg.settings.ui_mcp_proxy))

    async def proxy_get(self, request: Request) -> Response:
        return await self._run(request, self._proxy_get)

    async def _proxy_get(self, request: Request) -> Response:
        autoload = self._autoload(request)
        name = self._validate(request.query_params.get("model", ""), autoload)
        if autoload:
            await self.r.ensure_ready(name, request.is_disconnected)
        return await self._forward(request, name, None, update_last_used=False)

    async def proxy_post(self, request: Request) -> Response:
        async def fn(request):
            raw = await request.body()
            try:
                body = json.loads(raw or b"{}")
            except ValueError as e:
                raise ApiError(400, f"the request body is not JSON: {e}") from None
            autoload = self._autoload(request)
            name = self._validate(body.get("model") if isinstance(body, dict) else None,
                                  autoload)
            # llama-server: a streamed request with X-Conversation-Id maps its conversation to
            # the model before the load wait, so that a stop meanwhile cancels it; only a stop
            # does (the client may drop during the load: the session must still fill)
            conv = request.headers.get(CONV_HEADER) or None
            if conv is not None and not (isinstance(body, dict) and body.get("stream") is True):
                conv = None
            ticket = self.r.streams.remember(conv, name) if conv is not None else 0
            streams = self.r.streams

            async def stopped() -> bool:
                return not streams.alive(conv, ticket)

            cancelled = ApiError(400, "request cancelled by a stop while the model was loading")
            if autoload:
                try:
                    await self.r.ensure_ready(name, stopped if ticket else
                                              request.is_disconnected)
                except ApiError:
                    if ticket and not streams.alive(conv, ticket):
                        raise cancelled from None
                    raise
            if ticket and not streams.alive(conv, ticket):
                raise cancelled
            return await self._forward(request, name, raw, update_last_used=True,
                                       conv_id=conv)
        return await self._run(request, fn)

    # ------------------------------------------------------- resumable streams (streams.py)
    def _conv_loading(self, conv_id: str) -> bool:
        name = self.r.streams.model_of(conv_id)
        m = self.r.models.get(name) if name is not None else None
        return m is not None and m.status == "loading"

    async def stream_get(self, request: Request) -> Response:
        return await self._run(request, lambda r: streams.get_route(self.r.streams, r,
                                                                     self._conv_loading))

    async def stream_delete(self, request: Request) -> Response:
        async def fn(request):
            return streams.delete_route(self.r.streams, request)
        return await self._run(request, fn)

    async def streams_lookup(self, request: Request) -> Response:
        return await self._run(request, lambda r: streams.lookup_route(self.r.streams, r))

    async def models(self, request: Request) -> Response:
        async def fn(request):
            if request.query_params.get("reload"):
                await self.r.reload()
            return JSONResponse(self.r.listing())
        return await self._run(request, fn)

    async def load(self, request: Request) -> Response:
        async def fn(request):
            body = await json_body(request)
            m = self.r.resolve(str(body.get("model") or ""))
            if m is None:
                raise ApiError(404, "model is not found")
            if m.running:
                raise ApiError(400, "model is already running")
            await self.r.unload_lru()
            await self.r.load(m.name)
            return JSONResponse({"success": True})
        return await self._run(request, fn)

    async def unload(self, request: Request) -> Response:
        async def fn(request):
            body = await json_body(request)
            m = self.r.resolve(str(body.get("model") or ""))
            if m is None:
                raise ApiError(400, "model is not found")
            if not m.running:
                raise ApiError(400, "model is not running")
            self.r.unload(m.name)
            return JSONResponse({"success": True})
        return await self._run(request, fn)

    async def no_downloads(self, request: Request) -> Response:
        async def fn(request):
            raise ApiError(400, "jllama serve does not download or delete models: put GGUF "
                           "files in --models-dir or list them in --models-preset")
        return await self._run(request, fn)


def create_router_app(router: Router) -> HttpRules:
    h = RouterHandlers(router)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        router._notify()
        for name in router.startup:
            await router.load(name)
        yield
        await router.shutdown()

    routes = [Route("/health", h.health, methods=["GET"]),
              Route("/v1/health", h.health, methods=["GET"]),
              Route("/props", h.props, methods=["GET"]),
              Route("/models", h.models, methods=["GET"]),
              Route("/v1/models", h.models, methods=["GET"]),
              Route("/models/load", h.load, methods=["POST"]),
              Route("/models/unload", h.unload, methods=["POST"]),
              Route("/models", h.no_downloads, methods=["POST", "DELETE"]),
              Route("/models/sse", h.no_downloads, methods=["GET"]),
              Route("/tools", h.tools, methods=["GET", "POST"]),
              Route("/cors-proxy", h.cors_proxy, methods=["GET", "POST"]),
              Route("/v1/stream", h.stream_get, methods=["GET"]),
              Route("/v1/stream", h.stream_delete, methods=["DELETE"]),
              Route("/v1/streams/lookup", h.streams_lookup, methods=["POST"])]
    routes += [Route(p, h.proxy_get, methods=["GET"]) for p in GET_PROXIED]
    routes += [Route(p, h.proxy_post, methods=["POST"]) for p in POST_PROXIED]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = (f"no route {request.method} {request.url.path}" if status == 404
               else f"method {request.method} not allowed on {request.url.path}")
        return error_response(ApiError(status, msg))

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found})
    app.state.max_body = router.cfg.settings.max_body
    return HttpRules(app, router.cfg.settings)

