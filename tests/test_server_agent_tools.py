"""llama-server's agent surface in jllama serve: GET/POST /tools with the built-in tools
(--tools), MCP servers over stdio (--mcp-servers-json/-config), the web UI's /cors-proxy
(--ui-mcp-proxy) and the localhost CORS default they bring.

Expected values are llama-server's documented/implemented behaviour (tools/server/README-dev.md
"API for tools", server-tools.cpp, server-mcp.cpp, server-cors-proxy.h of llama.cpp 0c1e570),
the same that its own suite (tests/unit/test_tools_builtin.py, test_mcp_servers.py,
test_proxy.py) checks against both servers in experiments/server_suite.py. No model is loaded:
the app is served with a stand-in encoder that no route here touches.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jllama.server import builtin_tools as bt
from jllama.server.agent import ServerTools

# a tiny MCP server: echo (text), add, fail (isError), and a notification before each reply
FAKE_MCP = r'''
import json, os, sys
for line in sys.stdin:
    req = json.loads(line)
    m, i = req.get("method"), req.get("id")
    if i is None:
        continue
    if m == "initialize":
        res = {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
               "serverInfo": {"name": "fake", "version": "1"}}
    elif m == "tools/list":
        res = {"tools": [
            {"name": "echo", "description": "echo it",
             "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}}},
            {"name": "env", "description": "an env var", "inputSchema": {"type": "object"}},
            {"name": "fail", "description": "always fails"}]}
    elif m == "tools/call":
        name, args = req["params"]["name"], req["params"]["arguments"]
        if name == "echo":
            res = {"content": [{"type": "text", "text": "echo: " + args["message"]},
                               {"type": "text", "text": "pid " + str(os.getpid())}]}
        elif name == "env":
            res = {"content": [{"type": "text", "text": os.environ.get("FAKE_MCP_VAR", "")
                                + "@" + os.getcwd()}]}
        else:
            res = {"content": [{"type": "text", "text": "it broke"}], "isError": True}
    else:
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": i,
                                     "error": {"code": -32601, "message": "no such method"}}) + "\n")
        sys.stdout.flush()
        continue
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/message"}) + "\n")
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": i, "result": res}) + "\n")
    sys.stdout.flush()
'''


def _client(tools: ServerTools | None, proxy: bool = False, cors: str = "*"):
    from starlette.testclient import TestClient

    from jllama.server.app import ServerSettings, ServerState, create_app

    settings = ServerSettings("m", tools=tools, ui_mcp_proxy=proxy, cors_origins=cors)
    enc = types.SimpleNamespace(n_ctx=8, tokenizer=None)
    return TestClient(create_app(ServerState(None, settings, encoder=enc), warmup=False))


@pytest.fixture(scope="module")
def client():
    with _client(ServerTools.setup("all", None, None, None)) as c:
        yield c


def call(client, tool, params, headers=None):
    r = client.post("/tools", json={"tool": tool, "params": params}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def test_off_without_tools():
    with _client(None) as c:
        for r in (c.get("/tools"), c.post("/tools", json={"tool": "read_file"})):
            assert r.status_code == 403 and r.json()["error"]["type"] == "feature_disabled"
    assert ServerTools.setup(None, None, None, None) is None


def test_listing_shape(client):
    tools = client.get("/tools").json()
    assert [t["tool"] for t in tools] == list(bt.TOOL_NAMES)
    by = {t["tool"]: t for t in tools}
    assert by["write_file"]["permissions"] == {"write": True}
    assert by["read_file"]["permissions"] == {"write": False}
    assert by["read_file"]["type"] == "server" and by["read_file"]["display_name"] == "Read file"
    fn = by["grep_search"]["definition"]["function"]
    assert fn["parameters"]["required"] == ["path", "pattern"]
    some = ServerTools.setup("read_file,get_info", None, None, None)
    assert [t.name for t in some.tools] == ["read_file", "get_info"]
    with pytest.raises(ValueError, match='unknown tool "nope". available tools: read_file'):
        ServerTools.setup("read_file,nope", None, None, None)


def test_files_and_cwd(client, tmp_path):
    w = str(tmp_path)
    hdr = {"x-tool-cwd": w}
    r = call(client, "write_file", {"path": "sub/a.txt", "content": "l1\nl2\nl3"}, hdr)
    assert r == {"result": "file written successfully", "path": "sub/a.txt", "bytes": 8}
    # a cwd the model sends is dropped for the header's
    r = call(client, "read_file", {"path": "sub/a.txt", "cwd": "/nonexistent"}, hdr)
    assert r == {"plain_text_response": "l1\nl2\nl3\n"}  # every line ends with '\n'
    r = call(client, "read_file", {"path": f"{w}/sub/a.txt", "start_line": 2, "end_line": 2,
                                   "append_loc": True})
    assert r == {"plain_text_response": "2\u2192l2\n"}
    assert call(client, "read_file", {"path": f"{w}/none"}) == {
        "error": f"cannot stat file: {w}/none"}
    (tmp_path / "big.txt").write_text("x" * (16 * 1024 + 1))
    assert "file too large (16385 bytes, max 16384)" in call(
        client, "read_file", {"path": "big.txt"}, hdr)["error"]
    r = client.post("/tools", json={"tool": "read_file", "params": {"path": "sub/a.txt"}},
                    headers={**hdr, "x-resp-type": "base64"}).json()
    assert r == {"base64": "bDEKbDIKbDM=", "size_bytes": 8}
    # llama-server's error answers: a missing argument 400 and an isolate that cannot be used
    # 500 (its error object unwrapped), an unknown tool or stream of a tool that cannot its
    # HTTP layer's generic 404
    r = client.post("/tools", json={"tool": "read_file", "params": {}})
    assert r.status_code == 400 and r.json() == {
        "code": 400, "message": "[json.exception.out_of_range.403] key 'path' not found",
        "type": "invalid_request_error"}
    not_found = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
    r = client.post("/tools", json={"tool": "nope", "params": {}})
    assert r.status_code == 404 and r.json() == not_found
    r = client.post("/tools", json={"tool": "read_file", "params": {}, "stream": True})
    assert r.status_code == 404 and r.json() == not_found
    assert client.post("/tools", content=b"{bad").status_code == 400


def test_edit_file(client, tmp_path):
    p = str(tmp_path / "e.txt")
    call(client, "write_file", {"path": p, "content": "alpha\nbeta  \ngamma\n"})
    r = call(client, "edit_file", {"path": p, "edits": [{"old_text": "alpha", "new_text": "A"},
                                                        {"old_text": "gamma\n", "new_text": "G\n"}]})
    assert r == {"result": "file edited successfully", "path": p, "edits_applied": 2}
    assert open(p).read() == "A\nbeta  \nG\n"
    # typographic quotes and trailing blanks match fuzzily; untouched lines stay verbatim
    r = call(client, "edit_file", {"path": p, "edits": [{"old_text": "beta\u00a0\nG",
                                                         "new_text": "B\nG"}]})
    assert "error" in r  # a no-break space is normalized in old_text, yet 'beta  ' is 'beta'
    r = call(client, "edit_file", {"path": p, "edits": [{"old_text": "beta\nG",
                                                         "new_text": "B\nG"}]})
    assert r["edits_applied"] == 1 and open(p).read() == "A\nB\nG\n"
    call(client, "write_file", {"path": p, "content": "dup\ndup\n"})
    assert "found 2 occurrences of edits[0].old_text" in call(
        client, "edit_file", {"path": p, "edits": [{"old_text": "dup", "new_text": "x"}]})["error"]
    call(client, "write_file", {"path": p, "content": "l1\nl2\n"})
    e = call(client, "edit_file", {"path": p, "edits": [{"old_text": "l1\nl2", "new_text": "a"},
                                                        {"old_text": "l2", "new_text": "b"}]})
    assert "edits[0] and edits[1] overlap" in e["error"]
    assert "could not find edits[0].old_text" in call(
        client, "edit_file", {"path": p, "edits": [{"old_text": "zz", "new_text": "y"}]})["error"]
    assert call(client, "edit_file", {"path": p, "edits": []}) == {
        "error": "\"edits\" must be a non-empty array"}


def test_glob_and_grep(client, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "build").mkdir()
    (tmp_path / "top.cpp").write_text("int main() { return 0; }\n")
    (tmp_path / "a" / "mid.cpp").write_text("// Marker here\nint x;\n")
    (tmp_path / "a" / "b" / "deep.txt").write_text("marker\n")
    (tmp_path / "build" / "junk.cpp").write_text("marker\n")
    w = str(tmp_path)
    r = call(client, "file_glob_search", {"path": w, "include": "*.cpp"})
    assert sorted(e["path"] for e in r["entries"]) == ["a/mid.cpp", "top.cpp"]
    assert r["base"] == w and "Total matches: 2" in r["plain_text_response"]
    r = call(client, "file_glob_search", {"path": w, "type": "dir"})
    assert sorted(e["path"] for e in r["entries"]) == ["a", "a/b", "build"]
    assert "a/b/\n" in r["plain_text_response"]
    r = call(client, "file_glob_search", {"path": w, "max_depth": 1})
    assert [e["path"] for e in r["entries"]] == ["top.cpp"]
    r = call(client, "file_glob_search", {"path": w, "limit": 1, "include": "**"})
    assert len(r["entries"]) == 1 and "(3 total matches)" in r["plain_text_response"]
    assert call(client, "file_glob_search", {"path": w, "type": "x"})["error"].startswith(
        "invalid type: x")
    r = call(client, "grep_search", {"path": w, "pattern": "marker", "ignore_case": True,
                                     "return_line_numbers": True})
    lines = r["plain_text_response"].splitlines()
    assert sorted(lines[:2]) == ["a/b/deep.txt:1:marker", "a/mid.cpp:1:// Marker here"]
    assert "Total matches: 2" in r["plain_text_response"]  # build/ is never walked
    r = call(client, "grep_search", {"path": w, "pattern": "x;", "context_lines": 1,
                                     "include": "*.cpp"})
    assert r["plain_text_response"].startswith(
        "a/mid.cpp-1-// Marker here\na/mid.cpp:2:int x;\n--\n")
    # a pattern with '/' is anchored as '**/a/*.cpp': 'a/' at the top does not match it
    r = call(client, "grep_search", {"path": w, "pattern": "x;", "include": "a/*.cpp"})
    assert "Total matches: 0" in r["plain_text_response"]
    assert call(client, "grep_search", {"path": w, "pattern": "("})["error"].startswith(
        "invalid regex")
    assert call(client, "grep_search", {"path": w, "pattern": "(", "literal": True})[
        "plain_text_response"].startswith("top.cpp:int main() {")


def test_globs():
    """common.cpp's glob_match: '*' and '?' stop at '/', '**' crosses it, classes."""
    assert bt.glob_match("*.cpp", "a.cpp") and not bt.glob_match("*.cpp", "d/a.cpp")
    assert bt.glob_match("**/*.cpp", "d/e/a.cpp") and bt.glob_match("**", "x/y")
    assert bt.glob_match("[a-c]?.[!h]", "b1.c") and not bt.glob_match("[a-c]?.[!h]", "b1.h")
    assert bt.glob_match("a[", "a[")
    assert bt.path_glob_match("*.cpp", "src/x/a.cpp")
    assert bt.path_glob_match("src/*.cpp", "lib/src/a.cpp")
    assert not bt.path_glob_match("/src/*.cpp", "lib/src/a.cpp")


def test_exec_and_stream(client, tmp_path):
    r = call(client, "exec_shell_command", {"command": "echo hi; pwd; exit 3"},
             {"x-tool-cwd": str(tmp_path)})
    assert r == {"plain_text_response": f"hi\n{tmp_path}\n\n[exit code: 3]"}
    r = call(client, "exec_shell_command", {"command": "sleep 5", "timeout": 1})
    assert r["plain_text_response"].endswith("[exit code: 1] [exit due to timed out]")
    r = call(client, "exec_shell_command", {"command": "yes | head -c 20000",
                                            "max_output_size": 10})
    assert r["plain_text_response"] == "y\ny\ny\ny\ny\n\n[output truncated]\n[exit code: 0]"
    with client.stream("POST", "/tools", json={"tool": "exec_shell_command", "stream": True,
                                               "params": {"command": "echo a; echo b"}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
    assert events[-1] == {"done": True}
    assert "".join(e["chunk"] for e in events[:-1]) == "a\nb\n\n[exit code: 0]"
    info = call(client, "get_info", {})
    assert info["cwd"] == os.getcwd() and info["os"].startswith(os.uname().sysname)


def test_runtimes(client, tmp_path, monkeypatch):
    """x-tool-runtime: an isolate or an error, never the host; a container and an ssh target
    that look like options are refused. A stand-in `docker` (exec runs the command here)
    drives the isolate path end to end."""
    for rt, msg in (("fake:x", "unknown tool runtime: fake:x"),
                    ("ssh:-oProxyCommand=touch /tmp/p", "invalid ssh target"),
                    ("docker-container:--privileged", "invalid container id: --privileged"),
                    ("podman:busybox", "tool runtime must name a running container")):
        r = client.post("/tools", json={"tool": "get_info", "params": {}},
                        headers={"x-tool-runtime": rt})
        assert r.status_code == 500 and msg in r.json()["message"], rt
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "docker").write_text('#!/bin/sh\n[ "$1" = exec ] || exit 9\nshift\n'
                                   '[ "$1" = -i ] && shift\n[ "$1" = cid1 ] || exit 8\n'
                                   'shift\nexec "$@"\n')
    os.chmod(bindir / "docker", 0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    work = tmp_path / "w"
    work.mkdir()
    hdr = {"x-tool-runtime": "docker-container:cid1", "x-tool-cwd": str(work)}
    assert call(client, "write_file", {"path": "d/t.log", "content": "hello\n"}, hdr)[
        "result"] == "file written successfully"
    assert (work / "d" / "t.log").read_text() == "hello\n"
    assert call(client, "read_file", {"path": "d/t.log"}, hdr) == {
        "plain_text_response": "hello\n"}
    assert "hello" in call(client, "exec_shell_command", {"command": "cat d/t.log"}, hdr)[
        "plain_text_response"]
    r = call(client, "file_glob_search", {"path": ".", "type": "all"}, hdr)
    assert sorted((e["path"], e["type"]) for e in r["entries"]) == [("d", "dir"),
                                                                   ("d/t.log", "file")]
    with pytest.raises(bt.ToolFailure, match="invalid ssh target: -x"):
        bt.make_runtime("ssh:-x")
    with pytest.raises(bt.ToolFailure, match="requires an image name"):
        bt.make_runtime("podman:")


def _mcp(tmp_path, servers: dict) -> ServerTools:
    script = tmp_path / "fake_mcp.py"
    script.write_text(FAKE_MCP)
    cfg = {name: {"command": sys.executable, "args": [str(script)], **extra}
           for name, extra in servers.items()}
    return ServerTools.setup(None, None, None, json.dumps({"mcpServers": cfg}))


def test_mcp_servers(tmp_path):
    tools = _mcp(tmp_path, {"fx": {"env": {"FAKE_MCP_VAR": "v1"}, "cwd": str(tmp_path)},
                            "gone": {"command": "/nonexistent/mcp"}})
    try:
        with _client(tools) as c:
            listed = c.get("/tools").json()
            assert [t["tool"] for t in listed] == ["fx_echo", "fx_env", "fx_fail"]
            echo = listed[0]
            assert echo["type"] == "mcp" and echo["definition"]["function"]["parameters"] == {
                "type": "object", "properties": {"message": {"type": "string"}}}
            assert listed[2]["definition"]["function"]["parameters"] == {}
            r = call(c, "fx_echo", {"message": "hi"})
            pid = r["plain_text_response"].split("pid ")[1]
            assert r["plain_text_response"] == f"echo: hi\npid {pid}"
            # spawned again for the first call after start-up, then kept
            assert call(c, "fx_echo", {"message": "2"})["plain_text_response"].endswith(pid)
            assert call(c, "fx_env", {}) == {"plain_text_response": f"v1@{tmp_path}"}
            assert call(c, "fx_fail", {}) == {"error": "it broke"}
            # a dead server is spawned again on the next call
            os.kill(int(pid), 9)
            time.sleep(0.3)
            r = call(c, "fx_echo", {"message": "3"})
            assert r["plain_text_response"].startswith("echo: 3") and not r[
                "plain_text_response"].endswith(f"pid {pid}")
    finally:
        tools.close()


def test_mcp_collisions_and_config_errors(tmp_path):
    # a builtin name wins over an MCP tool of the same name ('read' + '_' + 'file')
    script = tmp_path / "m.py"
    script.write_text(FAKE_MCP.replace('"name": "echo"', '"name": "file"'))
    tools = ServerTools.setup("read_file", None, None, json.dumps(
        {"mcpServers": {"read": {"command": sys.executable, "args": [str(script)]}}}))
    try:
        assert [t.name for t in tools.tools] == ["read_file", "read_env", "read_fail"]
    finally:
        tools.close()
    for cfg_json, cfg_file, msg in (
            ("not json", None, "failed to parse MCP config JSON"),
            ('{"mcpServers": {"a": {"command": "x", "args": [1]}}}', None,
             "failed to parse MCP config JSON"),
            (None, "/nonexistent/mcp.json", "failed to open MCP config file: /nonexistent")):
        with pytest.raises(ValueError, match=msg):
            ServerTools.setup(None, None, cfg_file, cfg_json)
    # no command: skipped; no server left: nothing enabled
    assert ServerTools.setup(None, None, None, '{"mcpServers": {"a": {"args": []}}}') is None


def test_cli_bad_config_is_one_line(tmp_path, capsys, monkeypatch):
    from jllama.cli.main import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no docker, podman or ssh to be found
    for flags, msg in ((["--mcp-servers-json", "{bad"], "failed to parse MCP config JSON"),
                       (["--mcp-servers-config", "/nonexistent.json"], "failed to open"),
                       (["--tools", "read_file,nope"], 'unknown tool "nope"'),
                       (["--tools", "all", "--tools-runtime", "docker:busybox"],
                        "docker is not installed"),
                       (["--agent", "--tools-runtime", "ssh:host"], "ssh is not installed"),
                       (["--tools", "all", "--tools-runtime", "lxc:x"],
                        "unknown tool runtime: lxc:x")):
        assert main(["serve", "--models-dir", str(tmp_path), *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err, err


def test_cli_flags_and_cors_default():
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _agent_tools, _check_llama_server_args, child_args
    from jllama.config import load_config

    p = build_parser()
    cfg = load_config(None, [])
    args = p.parse_args(["serve", "-m", "m.gguf", "--agent"])
    _check_llama_server_args(args)
    f = _agent_tools(args, cfg)
    assert f["ui_mcp_proxy"] and f["cors_origins"] == "localhost"
    assert [t.name for t in f["tools"].tools] == list(bt.TOOL_NAMES)
    f = _agent_tools(p.parse_args(["serve", "-m", "m.gguf", "--tools", "get_info",
                                   "--cors-origins", "*"]), cfg)
    assert "cors_origins" not in f and not f["ui_mcp_proxy"]
    f = _agent_tools(p.parse_args(["serve", "-m", "m.gguf", "--ui-mcp-proxy"]), cfg)
    assert f == {"ui_mcp_proxy": True, "tools": None}
    # a router's children get none of them: the router answers /tools itself
    sub = p._subparsers._group_actions[0].choices["serve"]
    assert child_args(sub, ["--tools", "all", "--ui-mcp-proxy", "-c", "64"]) == ["-c", "64"]


def test_cors_localhost_with_tools():
    with _client(ServerTools.setup("get_info", None, None, None), cors="localhost") as c:
        ok = c.options("/completions", headers={"Origin": "http://localhost:8080"})
        assert ok.headers["access-control-allow-origin"] == "http://localhost:8080"
        bad = c.options("/completions", headers={"Origin": "http://evil.com"})
        assert "access-control-allow-origin" not in bad.headers


def test_cors_proxy():
    seen = {}

    class Target(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["headers"] = {k.lower(): v for k, v in self.headers.items()}
            seen["path"] = self.path
            body = b'{"ok": 1}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Access-Control-Allow-Origin", "http://other")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/final?x=1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        with _client(None, proxy=True) as c:
            r = c.get(f"/cors-proxy?url={base}/cap?q=2", headers={
                "Authorization": "Bearer k", "Cookie": "s=1",
                "x-llama-server-proxy-header-authorization": "Bearer explicit"})
            assert r.status_code == 200 and r.json() == {"ok": 1}
            assert seen["path"] == "/cap?q=2"
            assert seen["headers"]["authorization"] == "Bearer explicit"
            assert "cookie" not in seen["headers"]
            # the target's CORS headers are dropped: the server sets its own
            assert r.headers.get("access-control-allow-origin") != "http://other"
            r = c.post(f"/cors-proxy?url={base}/", json={})
            assert r.status_code == 204 and r.content == b""
            r = c.post(f"/cors-proxy?url={base}/redirect", json={})  # a POST 302 -> GET
            assert r.status_code == 200 and seen["path"] == "/final?x=1"
            r = c.get("/cors-proxy?url=ftp://x/")
            assert r.status_code == 500 and "unsupported URL scheme" in r.text
            r = c.get("/cors-proxy?url=http://u:p@127.0.0.1/")
            assert r.status_code == 500 and "authentication" in r.text
        with _client(None, proxy=False) as c:
            assert c.get(f"/cors-proxy?url={base}/").status_code == 403
    finally:
        srv.shutdown()
        srv.server_close()


def test_router_serves_tools_itself(tmp_path):
    """In router mode /tools and /cors-proxy are the router's own (no model involved), behind
    its API key."""
    from starlette.testclient import TestClient

    from jllama.cli.main import build_parser
    from jllama.cli.serve import preset_flag
    from jllama.server.app import ServerSettings
    from jllama.server.router import Router, RouterConfig, create_router_app

    sub = build_parser()._subparsers._group_actions[0].choices["serve"]
    settings = ServerSettings("", api_keys=["k"], tools=ServerTools.setup("get_info", None,
                                                                          None, None))
    r = Router(RouterConfig(models_dir=str(tmp_path), models_preset=None, settings=settings,
                            flag=lambda key: preset_flag(sub, key)))
    with TestClient(create_router_app(r)) as c:
        assert c.get("/tools").status_code == 401
        auth = {"Authorization": "Bearer k"}
        assert [t["tool"] for t in c.get("/tools", headers=auth).json()] == ["get_info"]
        r = c.post("/tools", json={"tool": "get_info", "params": {}}, headers=auth)
        assert r.status_code == 200 and r.json()["cwd"] == os.getcwd()
        assert c.get("/cors-proxy?url=http://x/", headers=auth).status_code == 403


def test_text_that_is_not_utf8(client, tmp_path):
    """A file's bytes that are not UTF-8 survive an edit elsewhere in it; a lone surrogate in
    the arguments is an error answer, not a crash."""
    p = tmp_path / "b.txt"
    p.write_bytes(b"caf\xe9\nend\n")
    assert call(client, "edit_file", {"path": str(p), "edits": [
        {"old_text": "end", "new_text": "fin"}]})["edits_applied"] == 1
    assert p.read_bytes() == b"caf\xe9\nfin\n"
    r = client.post("/tools", content=b'{"tool": "write_file", "params": {"path": "%s", '
                    b'"content": "\\ud800"}}' % str(tmp_path / "s.txt").encode())
    assert r.status_code == 500 and "surrogate" in r.json()["message"]
