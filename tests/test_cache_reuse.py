"""llama-server's --cache-reuse / n_cache_reuse (KV-shift reuse of cached chunks) on a tiny
random llama.

* The engine's ``reuse_chunks`` against llama.cpp doing what server-context.cpp does for
  n_cache_reuse through llama-cpp-python's low-level API: per reused chunk
  llama_memory_seq_rm(head_p, head_c) + llama_memory_seq_add(head_c, head_c + n,
  head_p - head_c), then the K-shift at the next decode. The prompts are built so the chunks
  llama-server's loop takes are known by hand; the logits of the tokens evaluated after the
  reuse are llama.cpp's bit for bit, for the per-layer and the stacked (scanned) cache. As in
  test_ctx_shift.py, llama.cpp's shifted state is first moved into a fresh context with
  llama_state_seq_get_data/set_data so its cells sit in position order, as jllama keeps them
  (llama.cpp would put the new tokens into the freed cells and sum attention in another order).
* The server: ``n_cache_reuse`` (request) / --cache-reuse (server) reuse the chunks, cache_n
  counts the reused tokens as llama-server's n_prompt_cached does (llama-server 0c1e570 itself
  reports 15, 21 and 5 for these three requests with --cache-ram 0), and the greedy text and
  the first token's top probabilities are those llama.cpp gives after the same reuse.

Expected values: llama.cpp's logits and tokens, and server-context.cpp's loop worked by hand.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, write_gguf

CTX = 96
SHP = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)

# cached: P J1 C1 J2 C2 J3; new prompt: P C1 C2 X (each letter a run of fresh random tokens)
LENS = dict(P=5, J1=7, C1=10, J2=3, C2=6, J3=4, X=8)
# server-context.cpp's loop over these, by hand: n_past starts at |P| = 5; with
# n_cache_reuse 5 both chunks move (C1: cache 12 -> 5, C2: cache 25 -> 15), n_past = 21;
# with 8 only C1 (10 tokens) moves, C2 (6) is too short, n_past = 15; with 11 none does
MOVES = {5: ([(12, 5, 10), (25, 15, 6)], 21), 8: ([(12, 5, 10)], 15), 11: ([], 5)}


def _runs(seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    toks = rng.permutation(np.arange(3, 290))[: sum(LENS.values())].tolist()  # no repeats
    out, i = {}, 0
    for k, n in LENS.items():
        out[k], i = toks[i: i + n], i + n
    return out


def _prompts(seed: int) -> tuple[list[int], list[int]]:
    r = _runs(seed)
    return (r["P"] + r["J1"] + r["C1"] + r["J2"] + r["C2"] + r["J3"],
            r["P"] + r["C1"] + r["C2"] + r["X"])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    import gguf

    t = dense_tensors(5, n_vocab=300, **SHP)
    return write_gguf(tmp_path_factory.mktemp("reuse") / "llama.gguf", "llama",
                      dense_hparams(**SHP), t, qtype=gguf.GGMLQuantizationType.Q8_0)


def _oracle(path, cached, moves, n_past, after, n_greedy=0):
    """llama.cpp's logits for ``after`` (and then ``n_greedy`` greedy tokens) once ``cached``
    was evaluated and the chunks ``moves`` = [(head_c, head_p, n)] moved as llama-server's
    cache reuse moves them."""
    lc = llama_cpp_module()
    low = lc.llama_cpp
    o = lc.Llama(model_path=str(path), n_ctx=CTX, logits_all=True, verbose=False, n_threads=1,
                 seed=0, flash_attn=True)
    try:
        ctx = o._ctx.ctx
        mem = low.llama_get_memory(ctx)
        assert low.llama_memory_can_shift(mem)
        o.eval(cached)
        for head_c, head_p, n in moves:
            assert low.llama_memory_seq_rm(mem, 0, head_p, head_c)
            low.llama_memory_seq_add(mem, 0, head_c, head_c + n, head_p - head_c)
        assert low.llama_memory_seq_rm(mem, 0, n_past, -1)
        o.n_tokens = n_past
        o.eval(after[:1])  # the decode that applies llama.cpp's K-shift...
        assert low.llama_memory_seq_rm(mem, 0, n_past, -1)  # ...its token dropped again
        size = low.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        assert low.llama_state_seq_get_data(ctx, buf, size, 0) == size
        low.llama_memory_clear(mem, True)
        assert low.llama_state_seq_set_data(ctx, buf, size, 0) == size  # cells in order
        o.n_tokens = n_past
        o.eval(after)
        logits = np.array(o.scores[n_past: n_past + len(after)], np.float32)
        greedy = []
        for _ in range(n_greedy):
            greedy.append(int(np.argmax(o.scores[o.n_tokens - 1])))
            o.eval(greedy[-1:])
        return logits, o.detokenize(greedy).decode("utf-8", "replace")
    finally:
        o.close()


def _engine(path, scan: bool):
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics

    num = Numerics(scan_layers=scan)
    spec, m = build_model(read_gguf(path), numerics=num)
    eng = Engine(spec, m, ctx_size=CTX, n_slots=2, numerics=num)
    assert eng.cache.stacked == scan
    return eng


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "stacked"])
def test_reuse_matches_llamacpp(model_path, scan):
    eng = _engine(model_path, scan)
    for seed, n_min in ((1, 5), (2, 8), (3, 11)):
        cached, new = _prompts(seed)
        moves, n_past = MOVES[n_min]
        eng.reset(1)
        eng.prefill(cached, 1)
        assert eng.reuse_chunks(1, new, eng.common_prefix(new, 1), n_min) == n_past
        assert eng.tokens[1] == new[:n_past] and int(eng.pos[1]) == n_past
        ours = np.asarray(eng.prefill(new[n_past:], 1, all_logits=True), np.float32)
        ref, _ = _oracle(model_path, cached, moves, n_past, new[n_past:])
        np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------ the server
def _server(llm, **settings):
    from starlette.testclient import TestClient

    from jllama.server.app import ServerSettings, ServerState, create_app

    state = ServerState(llm, ServerSettings("tiny", timeout=120, **settings))
    return state, TestClient(create_app(state, warmup=False))


def _complete(c, prompt, **body):
    r = c.post("/completion", json={"prompt": prompt, "temperature": 0.0, "cache_prompt": True,
                                    "id_slot": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_reuses_chunks(model_path):
    from jllama.api import Llama

    llm = Llama(str(model_path), ctx_size=CTX, n_slots=1, compile_cache=False)
    cached, new = _prompts(27)  # (a prompt whose greedy answer is not one token repeated)
    moves, n_past = MOVES[5]
    logits, greedy = _oracle(model_path, cached, moves, n_past, new[n_past:], n_greedy=6)
    z = logits[-1].astype(np.float64)
    logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    top = np.argsort(-z, kind="stable")[:3]
    state, c = _server(llm, cache_reuse=8)
    with c:
        # the server's --cache-reuse 8 takes C1 only; cache_n as llama-server's n_prompt_cached
        _complete(c, cached, n_predict=1)
        assert _complete(c, new, n_predict=1)["timings"]["cache_n"] == MOVES[8][1]
        # the request's n_cache_reuse 5 overrides it: both chunks, and llama.cpp's tokens
        _complete(c, cached, n_predict=1)
        r = _complete(c, new, n_predict=6, n_cache_reuse=5, n_probs=3)
        assert r["timings"]["cache_n"] == n_past and r["timings"]["predicted_n"] == 6
        assert r["content"] == greedy
        # the first token's distribution: llama.cpp's after the same reuse
        first = r["completion_probabilities"][0]["top_logprobs"]
        assert [e["id"] for e in first] == top.tolist()
        np.testing.assert_allclose([e["logprob"] for e in first], logp[top], rtol=1e-5)
        # 0 turns it off: the common prefix only
        _complete(c, cached, n_predict=1)
        assert _complete(c, new, n_predict=1, n_cache_reuse=0)["timings"]["cache_n"] == 5
        r = c.post("/completion", json={"prompt": new, "n_cache_reuse": -1})
        assert r.status_code == 400


def test_cli_flag_and_config_key():
    """--cache-reuse N (llama-server's flag, default 0) is server.cache_reuse."""
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _overrides, settings_from_config
    from jllama.config import load_config

    def settings(*flags):
        args = build_parser().parse_args(["serve", "-m", "m.gguf", *flags])
        assert getattr(args, "_refused", None) is None
        return settings_from_config(load_config(None, _overrides(args)), "m", [])

    assert settings().cache_reuse == 0
    assert settings("--cache-reuse", "256").cache_reuse == 256
    assert settings_from_config(load_config(None, ["server.cache_reuse=64"]), "m",
                                []).cache_reuse == 64
