"""Google Cloud (Vertex AI Prediction) compatibility, as llama-server's server-http.cpp has it.

With ``AIP_MODE=PREDICTION`` in the environment llama-server listens on ``AIP_HTTP_PORT``
(default 8080) instead of --port, answers ``POST AIP_PREDICT_ROUTE`` (default /predict) and,
when ``AIP_HEALTH_ROUTE`` is set, /health under that path too. A predict body is
``{"instances": [...]}`` (at most 128); each instance names the route it is for in
``@requestFormat`` (a route's camelCase alias, "/v1/chat/completions" -> "chatCompletions", or
its path) and is that route's request body, never streamed. The answer is
``{"predictions": [...]}``, one per instance in order: the route's JSON answer, errors included,
or an ``{"error": ...}`` object for an instance that names no route.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jllama.errors import ConfigError
from jllama.server.openai_schema import ApiError

MAX_INSTANCES = 128


@dataclass(frozen=True)
class GcpParams:
    predict: str
    health: str | None
    port: int

    @staticmethod
    def from_env(env=None) -> GcpParams | None:
        """The AIP_* variables, or None when AIP_MODE is not PREDICTION (empty ones count as
        unset; routes get their leading slash)."""
        env = os.environ if env is None else env
        if env.get("AIP_MODE", "") != "PREDICTION":
            return None

        def route(name: str, default: str | None) -> str | None:
            v = env.get(name) or default
            return v if v is None or v.startswith("/") else "/" + v

        port = env.get("AIP_HTTP_PORT") or "8080"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"AIP_HTTP_PORT={port}: not a port number")
        return GcpParams(predict=route("AIP_PREDICT_ROUTE", "/predict"),
                         health=route("AIP_HEALTH_ROUTE", None), port=int(port))


def request_format(path: str) -> str:
    """llama-server's camelCase alias of a route path: a leading /v1 and the first slash
    dropped, '/', '-', '_' capitalise the next character, a ':' ends it."""
    s = path[3:] if len(path) > 3 and path.startswith("/v1") else path
    s = s[1:] if s.startswith("/") else s
    out, cap = [], False
    for c in s:
        if c == ":":
            break
        if c in "/-_":
            cap = True
        else:
            out.append(c.upper() if cap else c)
            cap = False
    return "".join(out)


def _error(message: str, status: int = 400) -> dict:
    return ApiError(status, message).body()


def gcp_routes(routes: list[Route], params: GcpParams) -> list[Route]:
    """The predict route (and the health alias) dispatching to ``routes``. Where two paths
    share an alias the first in ``routes`` wins (llama-server's is its hash map's order)."""
    if any(r.path == params.predict for r in routes):
        raise ValueError(f"AIP_PREDICT_ROUTE={params.predict} conflicts with an existing "
                         "route")
    by_path: dict[str, Route] = {}
    by_alias: dict[str, Route] = {}
    for r in routes:
        by_path.setdefault(r.path, r)
        by_alias.setdefault(request_format(r.path), r)

    async def one(request: Request, instance) -> object:
        if not isinstance(instance, dict):
            return _error("each instance must be a JSON object")
        fmt = instance.get("@requestFormat")
        if not isinstance(fmt, str):
            return _error("each instance must include a string @requestFormat")
        route = by_alias.get(fmt) or by_path.get(fmt)
        if route is None:
            return _error(f"no handler registered for @requestFormat: {fmt}")
        payload = {k: v for k, v in instance.items() if k != "@requestFormat"}
        if "stream" in payload:  # the predict route answers whole JSON bodies only
            payload["stream"] = False
        body = json.dumps(payload).encode()
        method = "POST" if "POST" in (route.methods or ()) else "GET"
        headers = [(k, v) for k, v in request.scope["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding")]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = {**request.scope, "method": method, "path": route.path, "raw_path":
                 route.path.encode(), "query_string": b"", "headers": headers,
                 "path_params": {}}
        sent = False

        async def receive():
            nonlocal sent
            if sent:  # then the real client's connection: a hang-up cancels the instance
                return await request.receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            resp = await route.endpoint(Request(scope, receive))
        except ApiError as e:
            return e.body()
        if isinstance(resp, StreamingResponse):
            return _error("predict route does not support streaming responses")
        if not resp.body:
            return None
        try:
            return json.loads(resp.body)
        except ValueError:
            return resp.body.decode("utf-8", "replace")

    async def predict(request: Request) -> JSONResponse:
        try:
            data = json.loads(await request.body())
        except ValueError as e:
            return JSONResponse(_error(str(e)), status_code=400)
        if not isinstance(data, dict):
            return JSONResponse(_error("request body must be a JSON object"), status_code=400)
        instances = data.get("instances")
        if not isinstance(instances, list):
            return JSONResponse(_error("request body must include an array field named "
                                       "instances"), status_code=400)
        if len(instances) > MAX_INSTANCES:
            return JSONResponse(_error(f"instances array exceeds maximum size of "
                                       f"{MAX_INSTANCES}"), status_code=400)
        # concurrently, as llama-server's std::async per instance: the slots batch them
        out = await asyncio.gather(*(one(request, i) for i in instances))
        return JSONResponse({"predictions": list(out)})

    extra = [Route(params.predict, predict, methods=["POST"])]
    if params.health is not None and "/health" in by_path:
        extra.append(Route(params.health, by_path["/health"].endpoint, methods=["GET"]))
    return extra
