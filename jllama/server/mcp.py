"""MCP servers over stdio (llama-server's --mcp-servers-config / --mcp-servers-json;
tools/server/server-mcp.cpp of llama.cpp 0c1e570).

A server is a child process speaking JSON-RPC 2.0, one message per line, on its stdin/stdout.
Each configured server is spawned once at start-up (initialize, tools/list, at most 10 s),
then stopped; a call to one of its tools spawns it again and keeps it for later calls, a dead
one is respawned on the next call (after a failed spawn, not for 5 s). Its tools are served as
``<server>_<tool>``. Results follow /tools' shapes: the text parts of the result joined into
``plain_text_response``, an RPC error or an ``isError`` result as ``{"error": ...}``.

The config is Cursor's: ``{"mcpServers": {NAME: {"command", "args", "env", "cwd",
"timeout_ms"}}}``; an entry without a command is skipped, bad JSON is a start-up error.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

PROTOCOL_VERSION = "2024-11-05"
COOLDOWN_S = 5  # a server that failed to spawn is not tried again for this long
WARMUP_S = 10  # start-up tool discovery, per server
POLL_S = 0.05
MAX_LINE = 8 * 1024 * 1024  # longer lines are dropped (a child that never writes '\n')
MAX_QUEUED = 65536  # unsolicited notifications must not grow the reply queue without end


class McpConfigError(Exception):
    """The MCP config cannot be read (one line; the server does not start)."""


@dataclass
class McpServerConfig:
    name: str
    command: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # merged over the parent environment
    cwd: str = ""
    timeout_ms: int = 30000  # per tool call


@dataclass
class McpToolDef:
    server: str
    name: str  # the server's own name, without the '<server>_' prefix
    description: str = ""
    input_schema: object = None


def _warn(msg: str) -> None:
    print(f"jllama serve: MCP: {msg}", file=sys.stderr)


def parse_config(text: str) -> list[McpServerConfig]:
    """Cursor's "mcpServers" object; no such object gives []. Raises ValueError/TypeError on
    anything llama-server's nlohmann parsing would throw on."""
    j = json.loads(text)
    if not isinstance(j, dict) or not isinstance(j.get("mcpServers"), dict):
        return []
    out = []
    for name, cfg in j["mcpServers"].items():
        if not isinstance(cfg, dict):
            raise TypeError(f"server '{name}': an object is expected")

        def get(key, kind, default, cfg=cfg, name=name):
            v = cfg.get(key, default)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise TypeError(f"server '{name}': '{key}' must be a {kind.__name__}")
            return v
        sc = McpServerConfig(name, get("command", str, ""), cwd=get("cwd", str, ""),
                             timeout_ms=get("timeout_ms", int, 30000))
        if isinstance(cfg.get("args"), list):
            for a in cfg["args"]:
                if not isinstance(a, str):
                    raise TypeError(f"server '{name}': 'args' must hold strings")
                sc.args.append(a)
        if isinstance(cfg.get("env"), dict):
            for k, v in cfg["env"].items():
                if not isinstance(v, str):
                    raise TypeError(f"server '{name}': env '{k}' must be a string")
                sc.env[k] = v
        if not sc.command:
            _warn(f"server '{name}' has no command, skipping")
            continue
        out.append(sc)
    return out


def _error(message: str) -> dict:
    return {"error": {"code": -32603, "message": message}}


def _rpc_error_message(resp: dict) -> str:
    e = resp.get("error")
    if isinstance(e, dict):
        m = e.get("message", "unknown error")
        return m if isinstance(m, str) else "unknown error"
    return e if isinstance(e, str) else "unknown error"


def result_to_response(result) -> dict:
    """An MCP tools/call result in /tools' shape."""
    parts = []
    if isinstance(result, dict) and isinstance(result.get("content"), list):
        for p in result["content"]:
            if isinstance(p, dict) and p.get("type") == "text":
                t = p.get("text", "")
                parts.append(t if isinstance(t, str) else "")
    text = "\n".join(parts)
    if isinstance(result, dict) and result.get("isError") is True:
        return {"error": text or "MCP tool returned an error"}
    return {"plain_text_response": text}


class StdioTransport:
    """One session with one MCP server process."""

    def __init__(self, cfg: McpServerConfig):
        self.cfg = cfg
        self.rpc_lock = threading.Lock()  # one RPC at a time on this server
        self.replies: queue.Queue = queue.Queue(MAX_QUEUED)
        self.running = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.threads: list[threading.Thread] = []
        self.next_id = 1
        self.initialized = False
        self.tools: list[McpToolDef] = []
        self.last_error = ""
        self.err_tail = ""

    def start(self) -> bool:
        env = None
        if self.cfg.env:
            env = {**os.environ, **self.cfg.env}
        try:
            self.proc = subprocess.Popen([self.cfg.command, *self.cfg.args],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env,
                                         cwd=self.cfg.cwd or None)
        except (OSError, ValueError) as e:
            self.last_error = f"failed to spawn '{self.cfg.command}': {getattr(e, 'strerror', 0) or e}"
            _warn(f"'{self.cfg.name}': {self.last_error}")
            return False
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.running.set()
        self.threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, True),
                                         daemon=True, name=f"mcp-{self.cfg.name}-out"),
                        threading.Thread(target=self._pump, args=(self.proc.stderr, False),
                                         daemon=True, name=f"mcp-{self.cfg.name}-err")]
        for t in self.threads:
            t.start()
        return True

    def alive(self) -> bool:
        return self.running.is_set()

    def _pump(self, f, is_stdout: bool) -> None:
        """Lines from a child pipe, polled (not a blocking read): a grandchild may hold the
        pipe open after the child is gone, and teardown must not wait for that EOF."""
        fd = f.fileno()
        buf, skipping = b"", False
        try:
            while self.running.is_set():
                r, _, _ = select.select([fd], [], [], POLL_S)
                if not r:
                    continue
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                if skipping:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > MAX_LINE:
                            buf = b""
                        continue
                    buf, skipping = buf[nl + 1:], False
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.rstrip(b"\r")
                    if not line:
                        continue
                    text = line.decode("utf-8", "replace")
                    if is_stdout:
                        try:
                            self.replies.put_nowait(text)
                        except queue.Full:
                            pass
                    else:
                        self.err_tail = (self.err_tail + text + "\n")[-4096:]
                if len(buf) > MAX_LINE:
                    _warn(f"'{self.cfg.name}': dropping an over-long line")
                    buf, skipping = b"", True
        finally:
            if is_stdout:
                self.running.clear()
                with contextlib.suppress(Exception):
                    self.replies.put_nowait(None)  # EOF to a waiting caller

    def _write(self, msg: dict) -> bool:
        data = (json.dumps(msg) + "\n").encode()
        fd = self.proc.stdin.fileno()
        while data and self.running.is_set():
            try:
                n = os.write(fd, data)
                data = data[n:]
            except BlockingIOError:
                select.select([], [fd], [], POLL_S)
            except OSError:
                return False
        return not data

    def close(self) -> None:
        """Blocking and idempotent: kill the child, stop the readers, reap it."""
        self.running.clear()
        p = self.proc
        if p is None:
            return
        with contextlib.suppress(Exception):
            p.kill()
        for t in self.threads:
            t.join(2)
        for f in (p.stdin, p.stdout, p.stderr):
            with contextlib.suppress(Exception):
                f.close()
        with contextlib.suppress(Exception):
            p.wait(2)
        self.proc = None

    def diagnostics(self) -> str:
        out = self.last_error
        if self.err_tail:
            out += ("; " if out else "") + "last stderr: " + self.err_tail.strip()
        return out

    def _rpc(self, request: dict, should_stop) -> dict:
        """Send a request and wait (timeout_ms) for the reply with its id; notifications and
        stale replies are skipped, malformed lines ignored."""
        if not self.running.is_set() or not self._write(request):
            return _error("transport closed")
        deadline = time.monotonic() + self.cfg.timeout_ms / 1000

        def stopped():
            return (should_stop is not None and should_stop()) or time.monotonic() >= deadline
        while not stopped():
            try:
                line = self.replies.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is None:
                with contextlib.suppress(Exception):
                    self.replies.put_nowait(None)
                break
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if not isinstance(reply, dict):
                continue
            if "id" not in request or ("id" in reply and reply["id"] == request["id"]):
                return reply
        if should_stop is not None and should_stop():
            return _error("cancelled")
        if time.monotonic() >= deadline:
            return _error("request timed out")
        return _error("transport closed")

    def _init(self, should_stop) -> bool:
        if self.initialized:
            return True
        resp = self._rpc({"jsonrpc": "2.0", "id": self._id(), "method": "initialize",
                          "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                                     "clientInfo": {"name": "jllama", "version": "1.0"}}},
                         should_stop)
        if "result" not in resp:
            self.last_error = "initialize failed: " + _rpc_error_message(resp)
            return False
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.initialized = True
        return True

    def _id(self) -> int:
        i, self.next_id = self.next_id, self.next_id + 1
        return i

    def list_tools(self, should_stop=None) -> list[McpToolDef]:
        with self.rpc_lock:
            if not self._init(should_stop):
                return []
            if self.tools:
                return self.tools
            resp = self._rpc({"jsonrpc": "2.0", "id": self._id(), "method": "tools/list"},
                             should_stop)
            if "result" not in resp:
                self.last_error = "tools/list failed: " + _rpc_error_message(resp)
                return []
            res = resp["result"]
            for t in (res.get("tools") if isinstance(res, dict) else None) or []:
                if isinstance(t, dict):
                    self.tools.append(McpToolDef(self.cfg.name, str(t.get("name", "")),
                                                 str(t.get("description", "")),
                                                 t.get("inputSchema")))
            return self.tools

    def call_tool(self, name: str, arguments, should_stop=None) -> dict:
        with self.rpc_lock:
            if not self._init(should_stop):
                return {"error": self.last_error}
            resp = self._rpc({"jsonrpc": "2.0", "id": self._id(), "method": "tools/call",
                              "params": {"name": name, "arguments": arguments}}, should_stop)
            if "error" in resp:
                return {"error": _rpc_error_message(resp)}
            if "result" in resp:
                return result_to_response(resp["result"])
            return {"error": "invalid response from MCP server"}


class McpManager:
    def __init__(self):
        self.configs: list[McpServerConfig] = []
        self.registry: list[McpToolDef] = []
        self.transports: dict[str, StdioTransport] = {}
        self.dead_until: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def load(self, config_file: str | None, config_json: str | None) -> None:
        """Read both sources (names unique across them). Raises McpConfigError."""
        texts = []
        if config_file:
            try:
                with open(config_file, encoding="utf-8") as f:
                    texts.append(f.read())
            except OSError:
                raise McpConfigError(f"failed to open MCP config file: {config_file}") from None
        if config_json:
            texts.append(config_json)
        for text in texts:
            try:
                parsed = parse_config(text)
            except (ValueError, TypeError) as e:
                raise McpConfigError(f"failed to parse MCP config JSON: {e}") from None
            if not parsed:
                _warn("no servers found in JSON")
            for p in parsed:
                if any(c.name == p.name for c in self.configs):
                    _warn(f"duplicate server name '{p.name}', skipping")
                    continue
                self.configs.append(p)

    def empty(self) -> bool:
        return not self.configs

    def warmup(self) -> None:
        """Spawn each server, list its tools, stop it."""
        found = []
        for cfg in self.configs:
            t = StdioTransport(cfg)
            if not t.start():
                continue
            deadline = time.monotonic() + WARMUP_S
            tools = t.list_tools(lambda d=deadline: self.stopping.is_set()
                                 or time.monotonic() >= d)
            print(f"jllama serve: MCP '{cfg.name}': {len(tools)} tools", file=sys.stderr)
            found += tools
            t.close()
        with self.lock:
            self.registry = found

    def list_tools(self) -> list[McpToolDef]:
        with self.lock:
            return list(self.registry)

    def _get(self, name: str) -> StdioTransport | None:
        stale = []
        try:
            with self.lock:
                if self.stopping.is_set():
                    return None
                now = time.monotonic()
                if self.dead_until.get(name, 0) > now:
                    return None
                self.dead_until.pop(name, None)
                t = self.transports.get(name)
                if t is not None:
                    if t.alive():
                        return t
                    _warn(f"'{name}' is no longer alive: {t.diagnostics()}")
                    stale.append(self.transports.pop(name))
                cfg = next((c for c in self.configs if c.name == name), None)
                if cfg is None:
                    return None
                fresh = StdioTransport(cfg)
                if fresh.start() and fresh.alive():
                    self.transports[name] = fresh
                    return fresh
                stale.append(fresh)
                self.dead_until[name] = now + COOLDOWN_S
                return None
        finally:
            for t in stale:
                t.close()

    def call_tool(self, server: str, tool: str, arguments, should_stop=None) -> dict:
        t = self._get(server)
        if t is None:
            return {"error": f"MCP server unavailable: {server}"}
        return t.call_tool(tool, arguments, lambda: self.stopping.is_set() or
                           (should_stop is not None and should_stop()))

    def shutdown(self) -> None:
        """Make in-flight calls return now (before the HTTP server drains)."""
        self.stopping.set()

    def close(self) -> None:
        self.shutdown()
        with self.lock:
            ts, self.transports = list(self.transports.values()), {}
        for t in ts:
            t.close()
