"""GET/POST /tools: llama-server's tool API for the web UI and agents (README-dev.md "API for
tools"): the built-in tools that --tools enables (builtin_tools.py) and the tools of the MCP
servers of --mcp-servers-config/--mcp-servers-json (mcp.py), under one list.

GET lists ``{display_name, tool, type ("server"/"mcp"), permissions {write}, uses_cwd,
definition}``. POST takes ``{"tool", "params", "stream"}`` with the headers x-tool-cwd (the
working directory; a "cwd" the model put in params is dropped), x-tool-runtime (an isolate for
this call, else --tools-runtime's) and x-resp-type (read_file's "base64"). ``stream: true``
(exec_shell_command only) answers SSE ``{"chunk"}`` events then ``{"done": true[, "error"]}``.
Without any tool or MCP server both answer 403.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jllama.server import builtin_tools as bt
from jllama.server.mcp import McpConfigError, McpManager, McpToolDef
from jllama.server.openai_schema import ApiError


class McpTool(bt.Tool):
    kind = "mcp"
    uses_cwd = False

    def __init__(self, d: McpToolDef, mgr: McpManager):
        self.d, self.mgr = d, mgr
        self.name = self.display_name = f"{d.server}_{d.name}"

    def definition(self):
        schema = self.d.input_schema if isinstance(self.d.input_schema, dict) else {}
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.d.description,
                                                 "parameters": schema}}

    def invoke(self, params, push=None):
        # the header-set keys are ours, not the MCP tool's arguments
        args = {k: v for k, v in params.items() if k not in ("cwd", "runtime", "resp_type")}
        return self.mgr.call_tool(self.d.server, self.d.name, args)


class ServerTools:
    """The tools one server offers (built-in and MCP) and the runtime they run in."""

    def __init__(self, tools: list[bt.Tool], mcp: McpManager | None = None, runtime=None):
        self.tools = tools
        self.mcp = mcp
        self.runtime = runtime  # None (host), a fixed isolate spec, or a SpawnedContainer

    @classmethod
    def setup(cls, tools: str | None, runtime: str | None, mcp_file: str | None,
              mcp_json: str | None) -> ServerTools | None:
        """llama-server's start-up: the MCP config read and every server warmed up, --tools
        checked, --tools-runtime prepared. None when nothing is enabled. Raises ValueError
        with one line."""
        names = [n.strip() for n in (tools or "").split(",") if n.strip()]
        mgr = McpManager()
        try:
            mgr.load(mcp_file, mcp_json)
        except McpConfigError as e:
            raise ValueError(str(e)) from None
        if not names and mgr.empty():
            return None
        try:
            built = bt.select_tools(names) if names else []
            rt = bt.make_runtime(runtime or "")
        except bt.ToolFailure as e:
            raise ValueError(f"tools setup failed: {e}") from None
        mgr.warmup()
        seen = {t.name for t in built}
        for d in mgr.list_tools():
            t = McpTool(d, mgr)
            if t.name in seen:  # a name already taken (a built-in or an earlier server's)
                print(f"jllama serve: MCP tool \"{t.name}\" from server \"{d.server}\" collides "
                      "with an existing tool, skipping", file=sys.stderr)
                continue
            seen.add(t.name)
            built.append(t)
        return cls(built, mgr if not mgr.empty() else None, rt)

    def shutdown(self) -> None:
        """Make in-flight MCP calls return now (called when the server is told to stop)."""
        if self.mcp is not None:
            self.mcp.shutdown()

    def close(self) -> None:
        if self.mcp is not None:
            self.mcp.close()
        if isinstance(self.runtime, bt.SpawnedContainer):
            self.runtime.close()

    def _find(self, name: str, stream: bool) -> bt.Tool:
        for t in self.tools:
            if t.name == name:
                if stream and not t.stream:
                    raise bt.ToolNotFound(f"tool \"{name}\" does not support stream = true")
                return t
        raise bt.ToolNotFound(f"unknown tool \"{name}\"")

    async def get(self, request: Request) -> Response:
        return JSONResponse([t.to_json() for t in self.tools])

    async def post(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return _failed(400, f"invalid JSON body: {e}")
        try:
            if not isinstance(body, dict) or not isinstance(body.get("tool"), str):
                raise bt.BadArguments("[json.exception.out_of_range.403] key 'tool' not found")
            params = body.get("params")
            params = dict(params) if isinstance(params, dict) else {}
            stream = body.get("stream") is True
            # these come from the client's runtime, never from the model's arguments
            for key, header in (("cwd", "x-tool-cwd"), ("runtime", "x-tool-runtime"),
                                ("resp_type", "x-resp-type")):
                params.pop(key, None)
                if request.headers.get(header):
                    params[key] = request.headers[header]
            if "runtime" not in params and self.runtime is not None:
                params["runtime"] = (self.runtime.spec() if isinstance(
                    self.runtime, bt.SpawnedContainer) else self.runtime)
            tool = self._find(body["tool"], stream)
            if stream:
                return StreamingResponse(_stream(tool, params), media_type="text/event-stream")
            result = await asyncio.to_thread(tool.invoke, params, None)
        except bt.ToolNotFound:
            # llama-server's HTTP layer answers every 404 with its generic body
            return JSONResponse({"error": {"message": "File Not Found",
                                           "type": "not_found_error", "code": 404}}, 404)
        except bt.BadArguments as e:
            return _failed(400, str(e))
        except bt.ToolFailure as e:
            return _failed(500, str(e))
        except Exception as e:  # noqa: BLE001 - llama-server answers any other throw as a 500
            return _failed(500, str(e) or "unknown error")
        return Response(_dump(result), media_type="application/json")


def _failed(status: int, message: str) -> Response:
    """llama-server's /tools errors: its error object unwrapped (no "error" key)."""
    return Response(_dump({"code": status, "message": message,
                           "type": "invalid_request_error" if status < 500 else "server_error"}),
                    status_code=status, media_type="application/json")


def _dump(obj) -> str:
    """llama-server's compact JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _stream(tool: bt.Tool, params: dict):
    """SSE of a streaming tool: its chunks as they come, then the 'done' event."""
    q: queue.Queue = queue.Queue()
    gone = threading.Event()

    def push(chunk: str) -> bool:
        if chunk:
            q.put({"chunk": chunk})
        return not gone.is_set()

    def work():
        done = {"done": True}
        try:
            tool.invoke(params, push)
        except Exception as e:  # noqa: BLE001 - reported to the client as llama-server does
            done["error"] = str(e) or "An unknown error occurred"
        q.put(done)
    threading.Thread(target=work, daemon=True, name="jllama-tool-stream").start()

    async def events():
        try:
            while True:
                ev = await asyncio.to_thread(q.get)
                yield f"data: {_dump(ev)}\n\n"
                if ev.get("done"):
                    return
        finally:
            gone.set()  # a client that hung up stops the command
    return events()


def tools_handler(tools: ServerTools | None):
    """The /tools endpoint for a server's settings: 403 while no tool is enabled."""
    async def handle(request: Request) -> Response:
        if tools is None:
            raise ApiError(403, "this feature is disabled", type_="feature_disabled")
        if request.method == "GET":
            return await tools.get(request)
        return await tools.post(request)
    return handle
