"""A short soak of the real server (issue #18 item 5; the long one: experiments/soak_server.py).

SmolLM2 behind ``jllama serve``'s app, 4 slots, 120 mixed requests at 32 concurrent: chats
(plain, streamed, JSON-schema constrained, with tools), streams the client cancels after one
chunk while they ask for the whole context, over-long prompts and bodies that are not JSON.
Every request must end in exactly one outcome of its kind, response ids never repeat, the
cancelled streams' slots come back at once, ``/health`` stays ok and the process's RSS does not
grow past a bound after the first quarter. The kinds and checks live in the experiment's
``run_soak`` so the CI version and the long one are the same code.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

N, CONC, SLOTS, CTX = 120, 32, 4, 1024


def test_soak_mixed_requests(smollm2_path, experiment):
    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    soak = experiment("soak_server")
    llm = Llama(str(smollm2_path), ctx_size=CTX, n_slots=SLOTS)
    state = ServerState(llm, ServerSettings("smollm2", max_queue=N, timeout=600))
    with ServerThread(state) as s:
        rep = soak.run_soak(s.url, N, CONC, CTX, seed=1, watch_rss=True)
    print({k: v for k, v in rep.items() if k != "failed"})
    assert rep["failed"] == []
    assert rep["outcomes"] == rep["distinct_requests"] == N
    assert rep["ids"] == rep["distinct_ids"]
    assert all(rep["by_kind"][k] > 0 for k in soak.KINDS)
    assert rep["health"] == 200
    assert rep["slots_busy_after"] == 0 and rep["n_slots"] == SLOTS
    # a cancelled stream not noticed would hold its slot for ~1000 tokens (many seconds)
    assert rep["settle_s"] < 5
    # measured growth after the first quarter: -10 to +26 MiB (experiments/results/server_soak.md)
    assert rep["rss_end_mib"] - rep["rss_quarter_mib"] < 128
