"""Resumable SSE stream sessions (jllama/server/streams.py) as llama-server 0c1e570's
server-stream.cpp keeps them: replay from any byte offset then live bytes until the end, a
bounded buffer that drops its oldest bytes (an offset in the dropped part is refused), one live
session per conversation, an idempotent stop that cancels the producer, and the conversation ->
model map whose tickets tell a request parked in a model load that a stop cancelled it.

Expected values are the rules of server-stream.cpp / server-models.cpp (README-dev.md
"Resumable streaming"), written out by hand; the router's routes over real children are run by
llama.cpp's own unit/test_stream.py (experiments/server_suite.py --files test_stream).
"""

from __future__ import annotations

import asyncio

from jllama.server import streams


async def _drain(it) -> bytes:
    return b"".join([b async for b in it])


def test_replay_then_live():
    async def go():
        ss = streams.Sessions()
        s = ss.create("c")
        s.append(b"data: 1\n\n")
        reader = asyncio.ensure_future(_drain(s.read_from(0)))
        late = asyncio.ensure_future(_drain(s.read_from(6)))
        await asyncio.sleep(0.01)
        s.append(b"data: 2\n\n")
        await asyncio.sleep(0.01)
        assert not reader.done()  # live: waits for the end
        s.finish()
        assert await reader == b"data: 1\n\ndata: 2\n\n"
        assert await late == b"1\n\ndata: 2\n\n"
        assert await _drain(ss.get("c").read_from(0)) == b"data: 1\n\ndata: 2\n\n"
    asyncio.run(go())


def test_bounded_buffer_drops_oldest(monkeypatch):
    monkeypatch.setattr(streams, "STREAM_MAX_BYTES", 8)
    s = streams.Session("c")
    s.append(b"0123456789")
    assert s.dropped == 2 and bytes(s.buf) == b"23456789" and s.total == 10
    s.finish()
    assert asyncio.run(_drain(s.read_from(4))) == b"456789"


def test_stop_cancels_and_forgets():
    ss = streams.Sessions()
    t = ss.remember("c", "m")
    assert ss.alive("c", t) and ss.model_of("c") == "m"
    stopped = []
    s = ss.create("c")
    s.stop = lambda: stopped.append(1)
    ss.stop("c")
    assert stopped == [1] and s.done and ss.get("c") is None
    assert not ss.alive("c", t) and ss.model_of("c") is None
    ss.stop("c")  # idempotent
    t2 = ss.remember("c", "m")
    assert ss.alive("c", t2) and not ss.alive("c", t)  # a newer request owns the conversation


def test_one_session_per_conversation_and_lookup():
    ss = streams.Sessions()
    first = ss.create("conv::org/model")
    first.stop = lambda: None
    second = ss.create("conv::org/model")
    assert first.done and not second.done  # the old producer was stopped
    second.append(b"abc")
    got = ss.lookup(["conv", "other"])
    assert [(g["conversation_id"], g["is_done"], g["total_bytes"]) for g in got] == [
        ("conv::org/model", False, 3)]
