"""Decoding several tokens per dispatch (``Engine.decode_chunk``, issue #17 item 1) gives the
per-step path's tokens and leaves the engine in the same state.

The per-step path is the reference here; it is itself checked against llama.cpp token for token
(test_llama_oracle.py's greedy generation, which now runs through the chunks by default).
"""

from __future__ import annotations

import numpy as np
import pytest

from jllama.engine.sampling import BatchSampling, SamplingParams


@pytest.fixture(scope="module")
def model(smollm2_path):
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    return build_model(read_gguf(smollm2_path))


def _engine(model, **kw):
    from jllama.engine.engine import Engine

    spec, m = model
    return Engine(spec, m, **kw)


PROMPT = [1, 504, 3458, 282, 4649, 314]
CTX = 48


@pytest.fixture(scope="module")
def engines(model):
    """One engine per path, reused (each compiles its programs once)."""
    out = {}
    for loop in (False, True):
        out[loop] = _engine(model, ctx_size=CTX)
        out[loop].loop_decode = loop
    return out


def _both(engines, params, max_tokens, stop_ids=frozenset(), **kw):
    runs = []
    for loop in (False, True):
        eng = engines[loop]
        eng.reset()
        out = list(eng.generate(PROMPT, params, max_tokens, stop_ids, **kw))
        runs.append((out, eng.pos.tolist(), [list(t) for t in eng.tokens], eng))
    return runs


def _next_logits(eng):
    _, logits = eng.step(np.array([5], np.int32), np.array([True]),
                         BatchSampling.stack([SamplingParams.greedy()]),
                         np.zeros((1, 2), np.uint32), np.zeros(1, np.int32))
    return np.asarray(logits)


def _same_state(a, b):
    assert a[1] == b[1] and a[2] == b[2]
    # the caches hold the same rows: the next token's logits agree bit for bit
    np.testing.assert_array_equal(_next_logits(a[3]), _next_logits(b[3]))


def test_greedy_chunks_equal_steps(engines):
    step, loop = _both(engines, SamplingParams.greedy(), 37)  # not a multiple of any chunk
    assert len(loop[0]) == 37 and loop[0] == step[0]
    _same_state(step, loop)


def test_stop_id_inside_a_chunk(engines):
    ref, _ = _both(engines, SamplingParams.greedy(), 30)
    # the first token that is not among the first 8: stop there (inside the 8-token chunk
    # or later), nothing after it is yielded or fed
    i = next(k for k in range(8, 30) if ref[0][k] not in ref[0][:k])
    step, loop = _both(engines, SamplingParams.greedy(), 30, frozenset({ref[0][i], 3}))
    assert loop[0] == step[0] == ref[0][:i]
    _same_state(step, loop)


def test_penalties_and_bias_in_the_loop(engines):
    p = SamplingParams(temperature=0.0, top_k=1, repeat_penalty=1.3, presence_penalty=0.4,
                       frequency_penalty=0.2, logit_bias={28: -5.0, 30: 2.0})
    step, loop = _both(engines, p, 40)
    assert loop[0] == step[0]
    _same_state(step, loop)


@pytest.mark.parametrize("on_full", ["stop", "shift"])
def test_context_full(engines, on_full):
    # the chunks must end where the context does, then stop or shift as the steps do
    step, loop = _both(engines, SamplingParams.greedy(), 60, on_full=on_full, n_keep=3)
    assert loop[0] == step[0]
    # stop: the first token comes from the prompt, then one per free cell
    assert len(loop[0]) == (60 if on_full == "shift" else CTX - len(PROMPT) + 1)
    assert loop[3].timings.extra.get("shifts") == step[3].timings.extra.get("shifts")
    _same_state(step, loop)


def test_two_slots_leave_at_their_own_step(model):
    """decode_chunk over two slots: one stops at its budget, the other at a stop id; each
    gets what step() gives it, and the other slot's leaving does not disturb it."""
    sp = BatchSampling.stack([SamplingParams.greedy()] * 2)
    keys = np.zeros((2, 2), np.uint32)

    eng = _engine(model, ctx_size=CTX, n_slots=2)

    def fresh():
        eng.reset()
        firsts = []
        for s, pr in enumerate((PROMPT, [1, 22, 333, 4444])):
            lg = eng.prefill(pr, s)
            firsts.append(int(np.argmax(np.asarray(lg))))
        return eng, np.array(firsts, np.int32)

    eng, tok = fresh()
    ref: list[list[int]] = [[], []]
    active = np.array([True, True])
    for _ in range(12):
        nxt, _ = eng.step(tok, active, sp, keys, np.zeros(2, np.int32))
        for b in range(2):
            ref[b].append(int(nxt[b]))
        tok = nxt
    stop = ref[1][5]  # slot 1 ends there (at its first occurrence, if earlier)

    def expect(toks, budget):
        n = toks.index(stop) + 1 if stop in toks[:budget] else budget
        return toks[:n], n


    eng, tok = fresh()
    out = eng.decode_chunk(tok, active, sp, keys, np.zeros(2, np.int32), np.array([9, 12]),
                           {stop}, 12)
    (e0, f0), (e1, f1) = expect(ref[0], 9), expect(ref[1], 12)
    assert e1[-1] == stop
    assert [int(t) for t in out[:, 0] if t >= 0] == e0
    assert [int(t) for t in out[:, 1] if t >= 0] == e1
    # fed: the first token and every drawn one but the last (budget spent, or a stop id), so
    # as many as were drawn
    assert eng.pos.tolist() == [len(PROMPT) + f0, 4 + f1]


@pytest.mark.parametrize("p_min", [0.0, 0.5])
def test_draft_model_proposes_the_same_on_device(model, engines, p_min):
    """A greedy draft model's proposals (llama.cpp's p_min rule: stop drafting when the top-10
    softmax's best is below it) from one dispatch equal the token-by-token ones."""
    from types import SimpleNamespace

    from jllama.engine.speculative import ModelDraft

    spec, _ = model
    # a repeated prompt: the model is sure how it goes on (a full proposal at p_min 0.5)
    seqs = [PROMPT, PROMPT * 3, [1, 22, 333, 4444, 555, 66, 7] * 2]
    got = {}
    for loop in (False, True):
        eng = engines[loop]
        eng.reset()
        d = ModelDraft(SimpleNamespace(engine=eng), p_min)
        got[loop] = [d.propose(s, 10, SamplingParams.greedy(), None, None, spec.n_vocab)[0]
                     for s in seqs]
    assert got[True] == got[False]
    assert any(len(x) == 10 for x in got[True])
    if p_min:
        assert any(len(x) < 10 for x in got[True])  # the rule cut some proposal short


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from tinymodels import write_tiny_llama

    from jllama.api import Llama

    path = write_tiny_llama(tmp_path_factory.mktemp("chunks") / "llama.gguf", 5, n_layer=2,
                            n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)
    return Llama(str(path), ctx_size=64, n_slots=2, compile_cache=False)


def _serve(llm, chunk: int, groups: list[list[dict]]) -> tuple[list[dict], int]:
    """The /completion answers of each group's requests, a group's sent at once (two clients,
    each on its own slot), and how many chunked dispatches the scheduler made. The slots start
    empty."""
    import threading

    from starlette.testclient import TestClient

    from jllama.server.app import ServerSettings, ServerState, create_app

    llm.engine.reset()
    state = ServerState(llm, ServerSettings("tiny", timeout=120))
    state.scheduler.decode_chunk = chunk
    calls = []
    eng = llm.engine
    orig = eng.decode_chunk
    eng.decode_chunk = lambda *a, **k: calls.append(1) or orig(*a, **k)
    out: list[dict] = []
    try:
        with TestClient(create_app(state, warmup=False)) as c:
            def send(req, box):
                r = c.post("/completion", json={"temperature": 0.0, **req})
                assert r.status_code == 200, r.text
                box.append(r.json())

            for group in groups:
                boxes = [[] for _ in group]
                ts = [threading.Thread(target=send, args=(q, b)) for q, b in zip(group, boxes)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(120)
                out += [b[0] for b in boxes]
    finally:
        del eng.decode_chunk
    return out, len(calls)


def test_server_chunks_answer_as_steps(tiny_llm):
    """Two clients at a time: budgets, the end of the context, an end-of-generation token and
    a stop string met inside a chunk give the per-step server's answers, and the prompt cache
    finds what the per-step server left in the slot."""
    keys = ("content", "stop_type", "stopping_word", "truncated", "tokens_cached")
    long = dict(prompt=[9, 8, 7, 6], n_predict=40, id_slot=0)
    text = _serve(tiny_llm, 1, [[long]])[0][0]["content"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    groups = [[dict(prompt=[5, 6, 7], n_predict=23, id_slot=0),
               dict(prompt=list(range(30, 45)), n_predict=-1, id_slot=1)],  # to the end
              [dict(long, stop=[stop]), dict(prompt=[5, 6, 7], n_predict=17, id_slot=1)],
              [dict(prompt=[9, 8, 7, 6, 1], n_predict=4, id_slot=0)]]  # after the stop
    ref, n1 = _serve(tiny_llm, 1, groups)
    assert n1 == 0
    got, n16 = _serve(tiny_llm, 16, groups)
    assert n16 > 0
    for r, g in zip(ref, got, strict=True):
        assert {k: r.get(k) for k in keys} == {k: g.get(k) for k in keys}
        assert r["timings"]["predicted_n"] == g["timings"]["predicted_n"]
        assert r["timings"]["cache_n"] == g["timings"]["cache_n"]
    assert ref[2]["stop_type"] == "word" and ref[1]["truncated"] and ref[4]["timings"]["cache_n"]
