"""/cors-proxy?url=URL: the web UI's way to reach remote MCP servers from the browser
(llama-server's --ui-mcp-proxy; tools/server/server-cors-proxy.h and server_http_proxy of
llama.cpp 0c1e570). Off, it answers 403.

The request's method (GET/POST) and body go to URL (http or https, no user:password);
of the client's headers only those named ``x-llama-server-proxy-header-NAME`` are sent, as
NAME, so the server's own API key, cookies and the like never leave. Redirects are followed;
the answer's status, content type and headers come back (less hop-by-hop and CORS ones: the
server sets its own), its body streamed. A target that does not answer is a 500 with
``proxy error: ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ssl
from urllib.parse import urljoin, urlsplit

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from jllama.server.openai_schema import ApiError

PREFIX = "x-llama-server-proxy-header-"
TIMEOUT_S = 600
MAX_REDIRECTS = 20
_DROP_REQUEST = {"accept-encoding", "transfer-encoding", "content-length"}
_DROP_RESPONSE = {"server", "transfer-encoding", "content-length", "keep-alive", "connection",
                  "content-type"}


def _target(url: str):
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ApiError(500, f"invalid target URL: {e}", type_="server_error") from None
    if not u.hostname:
        raise ApiError(500, "invalid target URL: missing host", type_="server_error")
    if u.password:
        raise ApiError(500, "authentication in target URL is not supported",
                       type_="server_error")
    if u.scheme not in ("http", "https"):
        raise ApiError(500, f"unsupported URL scheme in target URL: {u.scheme}",
                       type_="server_error")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80), path


def _send(method: str, url: str, headers: dict, body: bytes):
    """(connection, response) after following redirects (a 303, or a 301/302 of a POST,
    becomes a GET without a body, as browsers and cpp-httplib do)."""
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path = _target(url)
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if scheme == "https" else {}
        conn = cls(host, port, timeout=TIMEOUT_S, **kw)
        hdrs = {k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST
                and k.lower() != "host"}
        default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        hdrs["Host"] = host if default else f"{host}:{port}"
        conn.request(method, path, body=body if method != "GET" else None, headers=hdrs)
        resp = conn.getresponse()
        loc = resp.getheader("location")
        if resp.status in (301, 302, 303, 307, 308) and loc:
            resp.read()
            conn.close()
            url = urljoin(url, loc)
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body = "GET", b""
            continue
        return conn, resp
    raise http.client.HTTPException("too many redirects")


def proxy_handler(enabled: bool):
    async def handle(request: Request) -> Response:
        if not enabled:
            raise ApiError(403, "this feature is disabled", type_="feature_disabled")
        url = request.query_params.get("url", "")
        _target(url)  # a bad URL is refused before anything is sent
        headers = {}
        for k, v in request.headers.items():
            if k.lower().startswith(PREFIX) and len(k) > len(PREFIX):
                headers[k[len(PREFIX):]] = v
        body = await request.body()
        try:
            conn, resp = await asyncio.to_thread(_send, request.method, url, headers, body)
        except (OSError, http.client.HTTPException) as e:
            return Response(f"proxy error: {e}", status_code=500, media_type="text/plain")
        out_headers = {k: v for k, v in resp.getheaders()
                       if k.lower() not in _DROP_RESPONSE
                       and not k.lower().startswith("access-control-")}
        ctype = resp.getheader("content-type")

        def chunks():
            try:
                while True:
                    b = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                    if not b:
                        break
                    yield b
            finally:
                with contextlib.suppress(OSError):
                    conn.close()
        if resp.status in (204, 304) or request.method == "HEAD":
            conn.close()
            return Response(status_code=resp.status, headers=out_headers, media_type=ctype)
        return StreamingResponse(chunks(), status_code=resp.status, headers=out_headers,
                                 media_type=ctype)
    return handle
