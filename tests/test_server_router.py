"""Router mode (``jllama serve --models-dir DIR``, no -m): llama-server 0c1e570's router.

Expected values are llama-server's documented behaviour (tools/server/README.md "Using multiple
models", and server-models.cpp / common/preset.cpp for the exact strings and rules), never
outputs of our own code. One router with real children serves two tiny random gemma3 GGUFs
(tests/visionmodels.py) and a file that is not a GGUF, with --models-max 1: loading on demand,
LRU eviction, streams passing through, a failed load isolated from the other models, the
listing's statuses, load/unload and the errors, API keys. The rest are unit tests of the
sources, the child command line and the LRU queue without processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-router-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ sources
def test_models_dir_scan_as_llama_cpp(tmp_path: Path) -> None:
    """common/preset.cpp load_from_models_dir: NAME.gguf -> NAME; a folder -> its model (first
    shard of a split) plus an mmproj*.gguf; companions at the top level are not models."""
    from jllama.server.router import scan_models_dir

    (tmp_path / "solo-Q4_K_M.gguf").write_bytes(b"x")
    (tmp_path / "mmproj-F16.gguf").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    mm = tmp_path / "gemma-3-4b-it-Q8_0"
    mm.mkdir()
    (mm / "gemma-3-4b-it-Q8_0.gguf").write_bytes(b"x")
    (mm / "mmproj-F16.gguf").write_bytes(b"x")
    sh = tmp_path / "Kimi"
    sh.mkdir()
    for i in (1, 2):
        (sh / f"Kimi-0000{i}-of-00002.gguf").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    got = scan_models_dir(str(tmp_path))
    assert got == {
        "solo-Q4_K_M": {"model": str(tmp_path / "solo-Q4_K_M.gguf")},
        "gemma-3-4b-it-Q8_0": {"model": str(mm / "gemma-3-4b-it-Q8_0.gguf"),
                               "mmproj": str(mm / "mmproj-F16.gguf")},
        "Kimi": {"model": str(sh / "Kimi-00001-of-00002.gguf")},
    }


def _parser():
    from jllama.cli.main import build_parser

    p = build_parser()
    return next(a for a in p._subparsers._group_actions[0].choices.values()
                if a.prog.endswith(" serve"))


def test_preset_ini_and_child_command_line(tmp_path: Path) -> None:
    """README "Model presets": [*] for all, short/long flag names, a repo:tag section's tag
    upper-cased (canonical_tag), precedence command line > model section > [*]; the child gets
    the router's flags less its own (host, port, key, sources) and the model's name as alias."""
    import functools

    from jllama.cli.serve import child_args, preset_flag
    from jllama.server.router import Router, RouterConfig

    ini = tmp_path / "p.ini"
    ini.write_text("version = 1\n; comment\n[*]\nc = 8192\nn-predict = 5\n\n"
                   "[org/Repo:q8_0]\nmodel = /m/a.gguf\nctx-size = 4096\nalias = first,one\n"
                   "jinja = true\nload-on-startup = false\n\n"
                   "[b]\nmodel = /m/b.gguf\nkv-unified = false\n")
    p = _parser()
    argv = ["--models-preset", str(ini), "--port", "9000", "--host", "0.0.0.0", "-n", "7",
            "--api-key", "k", "--models-max=2", "--no-models-autoload", "-np", "2",
            "--temp", "-0.5"]
    base = child_args(p, argv)
    assert base == ["-n", "7", "-np", "2", "--temp", "-0.5"]
    r = Router(RouterConfig(models_dir=None, models_preset=str(ini), base_args=base,
                            flag=functools.partial(preset_flag, p), command=["serve"]))
    assert list(r.models) == ["b", "org/Repo:Q8_0"]
    a = r.models["org/Repo:Q8_0"]
    assert a.aliases == ["first", "one"] and r.resolve("one") is a
    args = r.child_args(a, 1234)
    assert args == ["serve", "--ctx-size", "4096", "--n-predict", "5", "--model", "/m/a.gguf",
                    "--jinja", *base, "--host", "127.0.0.1", "--port", "1234", "--alias",
                    "org/Repo:Q8_0"]
    # argparse keeps the last value: the model's section beats [*], the command line beats both
    ns = p.parse_args(args[1:])
    assert (ns.ctx_size, ns.n_predict, ns.model, ns.alias, ns.port) == (4096, 7, "/m/a.gguf",
                                                                         "org/Repo:Q8_0", 1234)
    assert "--kv-unified" not in r.child_args(r.models["b"], 1)  # a false flag is left out
    bad = tmp_path / "bad.ini"
    bad.write_text("[x]\nmodel = /m/x.gguf\nno-such-flag = 1\n")
    from jllama.errors import ConfigError

    with pytest.raises(ConfigError, match="option 'no-such-flag' not recognized in preset 'x'"):
        Router(RouterConfig(models_dir=None, models_preset=str(bad),
                            flag=functools.partial(preset_flag, p)))


def test_reload_rereads_the_preset(tmp_path: Path) -> None:
    """GET /models?reload=1 as test_router_reload_models: a section removed from the INI is
    gone, one kept stays, one added appears; a models dir change is seen too."""
    import asyncio
    import functools

    from jllama.cli.serve import preset_flag
    from jllama.server.router import Router, RouterConfig

    ini = tmp_path / "p.ini"
    ini.write_text("[model-reload-a]\nhf-repo = org/a\n\n[model-reload-b]\nhf-repo = org/b\n")
    d = tmp_path / "dir"
    d.mkdir()
    r = Router(RouterConfig(models_dir=str(d), models_preset=str(ini),
                            flag=functools.partial(preset_flag, _parser())))
    assert list(r.models) == ["model-reload-a", "model-reload-b"]
    ini.write_text("[model-reload-b]\nhf-repo = org/b\n\n[model-reload-c]\nhf-repo = org/c\n")
    (d / "local.gguf").write_bytes(b"x")
    asyncio.run(r.reload())
    assert list(r.models) == ["local", "model-reload-b", "model-reload-c"]
    assert r.models["local"].source == "models_dir" and r.models["model-reload-c"].source == "preset"


def test_cli_router_flags_refusals(tmp_path: Path) -> None:
    from jllama.cli.main import main

    assert main(["serve", "--models-dir", str(tmp_path / "nope"), "--port", "0"]) == 1
    assert main(["serve", "-m", "x.gguf", "--models-dir", str(tmp_path)]) == 1
    assert main(["serve", "--models-dir", str(tmp_path), "--models-max", "-1"]) == 1


def test_lru_queue_rules() -> None:
    """server_lru_sched without processes: the victim is the least recently used idle model;
    busy, loading, stopping or wanted models are never picked; queued requests for one model
    share one entry and cost one eviction."""
    from jllama.server.router import Model, Router, RouterConfig

    r = Router(RouterConfig(models_dir=None, models_preset=None, models_max=2))
    for name, status, used in (("a", "loaded", 1.0), ("b", "loaded", 2.0), ("c", "unloaded", 0),
                               ("d", "unloaded", 0)):
        r.models[name] = Model(name, "models_dir", {}, status=status, last_used=used)
    stopped = []
    r.request_stop = lambda m: (stopped.append(m.name), setattr(m, "stopping", True))
    assert r.pick_victim() == "a"
    r.models["a"].req_count = 1  # busy: never evicted mid-request
    assert r.pick_victim() == "b"
    for _ in range(3):
        r.join("c")
    assert r.queue == [["c", 3, False]]
    r.tick()
    assert stopped == ["b"]  # one entry, one eviction
    r.tick()
    assert stopped == ["b"]  # b is already on its way out: it counts as a freeing slot
    assert not r.try_claim("d")  # not the head of the queue
    r.join("d")
    r.tick()
    assert stopped == ["b"]  # a is busy: d waits for a request to end
    r.models["a"].req_count = 0
    r.tick()
    assert stopped == ["b", "a"]
    for _ in range(3):
        r.leave("c")
    assert r.queue == [["d", 1, False]]


# ------------------------------------------------------------------------------ one router
def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the router exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the router did not start in time")


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    import visionmodels

    d = tmp_path_factory.mktemp("models")
    visionmodels.write_text_model(d / "alpha.gguf", seed=3)
    visionmodels.write_text_model(d / "beta.gguf", seed=5)
    (d / "broken.gguf").write_bytes(b"GGUF" + os.urandom(200))  # not a loadable GGUF
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("LLAMA_SERVER_DEBUG_FAKE_TIMING", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jllama", "serve", "--models-dir", str(d), "--models-max", "1",
         "--port", str(port), "--api-key", KEY, "-c", "128", "-np", "1", "--no-warmup"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _c():
    import httpx

    return httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _status(c, name: str) -> dict:
    body = c.get("/models").json()
    return next(m for m in body["data"] if m["id"] == name)["status"]


def _wait_status(c, name: str, want: str, timeout: float = 90.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = _status(c, name)
        if st["value"] == want:
            return st
        time.sleep(0.1)
    raise AssertionError(f"{name} never became {want}: {st}")


def _chat(c, model, **kw):
    return c.post("/v1/chat/completions", json={"model": model, "max_tokens": 3,
                                                "messages": [{"role": "user", "content": "hi"}],
                                                **kw})


def test_router_end_to_end(router) -> None:
    import httpx

    with _c() as c:
        c.base_url = router
        # the API key guards everything but /health, as llama-server's public endpoints
        assert httpx.get(router + "/health").json() == {"status": "ok"}
        r = httpx.get(router + "/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

        props = c.get("/props").json()
        assert props["role"] == "router" and props["max_instances"] == 1
        assert props["models_autoload"] is True and props["build_info"].startswith("b")

        body = c.get("/v1/models").json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["alpha", "beta", "broken"]
        for m in body["data"]:
            assert m["status"]["value"] == "unloaded" and m["source"] == "models_dir"
            assert m["object"] == "model" and m["owned_by"] == "llamacpp"

        # the model field routes; unknown / missing / not loaded (autoload off) are 400s
        e = _chat(c, "nope")
        assert e.status_code == 400 and e.json()["error"]["message"] == "model 'nope' not found"
        e = c.post("/v1/chat/completions", json={"messages": []})
        assert e.status_code == 400
        assert e.json()["error"]["message"] == "model name is missing from the request"
        e = c.post("/v1/chat/completions?autoload=false", json={"model": "alpha", "messages": []})
        assert e.status_code == 400 and e.json()["error"]["message"] == "model is not loaded"
        assert _status(c, "alpha")["value"] == "unloaded"

        # POST /models/load starts alpha's child; then it serves without autoload
        e = c.post("/models/load", json={"model": "nope"})
        assert e.status_code == 404 and e.json()["error"]["message"] == "model is not found"
        assert c.post("/models/load", json={"model": "alpha"}).json() == {"success": True}
        assert _status(c, "alpha")["value"] in ("loading", "loaded")
        st = _wait_status(c, "alpha", "loaded")
        assert "--alias" in st["args"]
        r = c.post("/v1/chat/completions?autoload=false",
                   json={"model": "alpha", "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "alpha"  # the child answers under the model's name
        assert c.post("/models/load", json={"model": "alpha"}).json()["error"]["message"] == \
            "model is already running"
        tok = c.post("/tokenize", json={"model": "alpha", "content": "hello"})
        assert tok.status_code == 200 and tok.json()["tokens"]

        # a model that cannot load answers that error: --models-max 1 stopped alpha (the LRU
        # idle model) for it first, cleanly
        r = _chat(c, "broken")
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "model name=broken failed to load"
        st = _status(c, "broken")
        assert st["value"] == "unloaded" and st["failed"] is True and st["exit_code"] == 1
        assert "failed" not in _wait_status(c, "alpha", "unloaded")

        # the router and the other models go on: a stream for beta, loaded on demand, passes
        # through chunk by chunk
        chunks = []
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "beta", "max_tokens": 3, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(ch["model"] == "beta" for ch in chunks)
        assert _status(c, "beta")["value"] == "loaded"
        assert _status(c, "broken")["failed"] is True

        # POST /models/unload, and its error
        assert c.post("/models/unload", json={"model": "beta"}).json() == {"success": True}
        assert "failed" not in _wait_status(c, "beta", "unloaded")
        e = c.post("/models/unload", json={"model": "beta"})
        assert e.status_code == 400 and e.json()["error"]["message"] == "model is not running"
