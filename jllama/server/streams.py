"""Resumable SSE streams, as llama-server 0c1e570 keeps them (tools/server/server-stream.cpp).

A streamed request that carries an ``X-Conversation-Id`` header gets a session: the answer's
SSE bytes go to a bounded buffer (4 MiB, oldest bytes dropped first) as well as to the client,
and the generation goes on when the client hangs up. ``GET /v1/stream?conv_id=ID&from=N``
replays the buffer from byte N and follows the live bytes until the answer ends;
``DELETE /v1/stream?conv_id=ID`` (an explicit stop) cancels the generation and drops the
session; ``POST /v1/streams/lookup`` reports the sessions of the ids a client names. A finished
session is kept STREAM_TTL_S seconds.

A single-model ``jllama serve`` detaches its generating endpoints' streamed answers into
sessions (``detach``); the router (``--models-dir/--models-preset``) keeps the sessions of what
it forwards itself (its children get no X-Conversation-Id) and maps a conversation to its model
from the moment the request arrives, so a stop during the model's load cancels the parked
request (llama-server's conv_models map).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from jllama.server.openai_schema import ApiError

STREAM_TTL_S = 300  # STREAM_SESSION_TTL_SECONDS
STREAM_MAX_BYTES = 4 * 1024 * 1024  # STREAM_SESSION_MAX_BYTES
CONV_HEADER = "x-conversation-id"


class Session:
    """One conversation's answer: its bytes so far (``dropped`` lost off the front), whether it
    ended, and how to stop its producer."""

    def __init__(self, conv_id: str):
        self.conv_id = conv_id
        self.buf = bytearray()
        self.dropped = 0
        self.done = False
        self.started = int(time.time())
        self.completed: float | None = None
        self.changed = asyncio.Event()
        self.stop: Callable[[], None] | None = None  # cancels the producer

    @property
    def total(self) -> int:
        return self.dropped + len(self.buf)

    def append(self, b: bytes) -> None:
        self.buf += b
        over = len(self.buf) - STREAM_MAX_BYTES
        if over > 0:
            del self.buf[:over]
            self.dropped += over
        self._wake()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.completed = time.time()
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def read_from(self, offset: int) -> AsyncIterator[bytes]:
        """The bytes from ``offset`` on, live until the session ends (a reader leaving does
        not end it)."""
        while True:
            wait = self.changed
            start = max(offset - self.dropped, 0)
            if start < len(self.buf):
                chunk = bytes(self.buf[start:])
                offset = self.dropped + len(self.buf)
                yield chunk
                continue
            if self.done:
                return
            await wait.wait()


class Sessions:
    """Sessions by conversation id, and which model each conversation's request went to."""

    def __init__(self):
        self.sessions: dict[str, Session] = {}
        self.conv_models: dict[str, tuple[str, int]] = {}  # conv -> (model, ticket)
        self.tasks: set = set()  # producers of detached answers (kept referenced)
        self._tickets = itertools.count(1)

    # conversation -> model (llama-server's conv_models)
    def remember(self, conv_id: str, model: str) -> int:
        t = next(self._tickets)
        self.conv_models[conv_id] = (model, t)
        return t

    def alive(self, conv_id: str, ticket: int) -> bool:
        e = self.conv_models.get(conv_id)
        return e is not None and e[1] == ticket

    def model_of(self, conv_id: str) -> str | None:
        e = self.conv_models.get(conv_id)
        return e[0] if e is not None else None

    # sessions
    def _gc(self) -> None:
        cutoff = time.time() - STREAM_TTL_S
        for k in [k for k, s in self.sessions.items()
                  if s.completed is not None and s.completed < cutoff]:
            del self.sessions[k]

    def create(self, conv_id: str) -> Session:
        """A new session for ``conv_id``; one it had before is stopped (one live session per
        conversation)."""
        self.cancel(conv_id)
        s = self.sessions[conv_id] = Session(conv_id)
        return s

    def get(self, conv_id: str) -> Session | None:
        self._gc()
        return self.sessions.get(conv_id)

    def cancel(self, conv_id: str) -> None:
        """evict_and_cancel: the producer stops, the session is gone (idempotent)."""
        s = self.sessions.pop(conv_id, None)
        if s is not None:
            if s.stop is not None and not s.done:
                with contextlib.suppress(Exception):
                    s.stop()
            s.finish()

    def stop(self, conv_id: str) -> None:
        """An explicit stop (DELETE /v1/stream): the session and the conversation's model."""
        self.cancel(conv_id)
        self.conv_models.pop(conv_id, None)

    def lookup(self, ids: list[str]) -> list[dict]:
        """The sessions of ``ids`` (each id also matches ``ID::model`` variants)."""
        self._gc()
        out = []
        for rid in ids:
            for s in list(self.sessions.values()):
                if s.conv_id == rid or s.conv_id.startswith(rid + "::"):
                    out.append({"conversation_id": s.conv_id, "is_done": s.done,
                                "total_bytes": s.total, "started_at": s.started,
                                "completed_at": int(s.completed or 0)})
        return out


# ---------------------------------------------------------------------------- HTTP side
def detach(sessions: Sessions, request, resp):
    """A generating endpoint's streamed answer, when its request carries X-Conversation-Id:
    a task of its own drains the answer into a new session (the generation then survives the
    client's hang-up; cancelling the task ends the generation) and the client reads the session
    live. Any other answer is returned as is."""
    conv = request.headers.get(CONV_HEADER)
    if not conv or not isinstance(resp, StreamingResponse) or resp.status_code != 200:
        return resp
    sess = sessions.create(conv)
    body = resp.body_iterator

    async def produce():
        try:
            async for part in body:
                sess.append(part.encode() if isinstance(part, str) else bytes(part))
        finally:
            sess.finish()

    task = asyncio.get_running_loop().create_task(produce())
    sessions.tasks.add(task)
    task.add_done_callback(sessions.tasks.discard)
    sess.stop = task.cancel
    headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-length"}
    return StreamingResponse(sess.read_from(0), status_code=200, headers=headers)


def _conv_id(request) -> str:
    conv = request.query_params.get("conv_id", "")
    if not conv:
        raise ApiError(400, "Missing conversation id in path")
    return conv


async def get_route(sessions: Sessions, request, loading: Callable[[str], bool] | None = None):
    """GET /v1/stream?conv_id=ID&from=N: the session's bytes from N on, live until it ends;
    404 for none (503 while ``loading(ID)``: the router's model for it is loading)."""
    conv = _conv_id(request)
    sess = sessions.get(conv)
    if sess is None:
        if loading is not None and loading(conv):
            raise ApiError(503, "Stream owner model is loading, retry later",
                           type_="unavailable_error")
        raise ApiError(404, "Stream not found or expired")
    frm = request.query_params.get("from", "")
    try:
        offset = int(frm) if frm else 0
        if offset < 0:
            raise ValueError
    except ValueError:
        raise ApiError(400, "Invalid 'from' offset") from None
    if offset < sess.dropped:
        raise ApiError(400, "Stream offset lost, please restart")
    return StreamingResponse(sess.read_from(offset), media_type="text/event-stream")


def delete_route(sessions: Sessions, request):
    """DELETE /v1/stream?conv_id=ID: the explicit stop (idempotent, 204)."""
    sessions.stop(_conv_id(request))
    return Response(status_code=204)


async def lookup_route(sessions: Sessions, request):
    """POST /v1/streams/lookup {"conversation_ids": [...]}: those ids' sessions only."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise ApiError(400, f"invalid body: {e}") from None
    ids = body.get("conversation_ids") if isinstance(body, dict) else None
    ids = [i for i in ids if isinstance(i, str) and i] if isinstance(ids, list) else []
    return JSONResponse(sessions.lookup(ids))
