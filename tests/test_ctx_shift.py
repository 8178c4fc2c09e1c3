"""Context shift (llama-server's --context-shift) on tiny random models.

* The engine's shift (drop n_discard tokens after n_keep, slide the rest down, re-rotate the
  moved keys) against llama.cpp doing the same through llama-cpp-python's low-level API
  (llama_memory_seq_rm + llama_memory_seq_add, then its K-shift at the next decode), for a
  llama (NORM rope) and a gemma3 (NEOX rope, sliding-window layers with their own rope base):
  the logits of the tokens evaluated after the shift are llama.cpp's bit for bit once
  llama.cpp's cells sit in the order jllama keeps them. llama.cpp puts the next tokens into
  the freed cells, so its flash attention (f16 V accumulated in cell order) sums in another
  order; the oracle's shifted state is therefore moved, as it is, into a fresh context with
  llama_state_seq_get_data/set_data (which lays the cells out in order) before the tokens
  after the shift are evaluated.
* The server: per-slot shifts with n_keep as server-context.cpp computes it (the request's;
  -1: the prompt), the slot's neighbour unaffected, truncated; without the flag llama-server's
  end-of-context rule and its prompt-too-long error; gemma3's sliding-window cache shifts only
  with --swa-full, as llama-server allows it.

Expected values: llama.cpp's logits, and llama-server's rules and numbers as
server-context.cpp computes them (not outputs of jllama).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, write_gguf

CTX = 64


def _write(tmp, arch: str):
    import gguf

    if arch == "llama":
        shp = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)
        t = dense_tensors(5, n_vocab=300, **shp)
        hp = dense_hparams(**shp)
    else:  # sliding window 8 on layers 0-4, layer 5 global
        shp = dict(n_layer=6, n_embd=128, n_ff=256, n_head=4, n_head_kv=1, head_dim=64)
        t = dense_tensors(3, n_vocab=320, qk_norm=True, post_norms=True, tied=True,
                          embd_std=0.05, **shp)
        hp = dense_hparams(**shp, **{"rope.freq_base": 1e6, "attention.sliding_window": 8})
    return write_gguf(tmp / f"{arch}.gguf", arch, hp, t, qtype=gguf.GGMLQuantizationType.Q8_0)


def _load(tmp_path_factory, arch: str):
    from jllama.api import Llama

    path = _write(tmp_path_factory.mktemp(arch), arch)
    return path, Llama(str(path), ctx_size=CTX, n_slots=2, compile_cache=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _load(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return _load(tmp_path_factory, "gemma3")


def _oracle_after_shift(path, prompt, n_keep, n_discard, after, **kw):
    """llama.cpp's logits for ``after`` once ``prompt``'s tokens n_keep .. n_keep+n_discard-1
    were removed and the rest moved down (as llama-server's context shift does); ``kw``: more
    llama-cpp-python context arguments (rope_* ...)."""
    lc = llama_cpp_module()
    low = lc.llama_cpp
    o = lc.Llama(model_path=str(path), n_ctx=CTX, logits_all=True, verbose=False, n_threads=1,
                 seed=0, flash_attn=True, swa_full=True, **kw)
    try:
        ctx = o._ctx.ctx
        mem = low.llama_get_memory(ctx)
        assert low.llama_memory_can_shift(mem)
        o.eval(prompt)
        n = len(prompt)
        assert low.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
        low.llama_memory_seq_add(mem, 0, n_keep + n_discard, n, -n_discard)
        m = n - n_discard
        o.n_tokens = m
        o.eval(after[:1])  # the decode that applies llama.cpp's K-shift...
        assert low.llama_memory_seq_rm(mem, 0, m, -1)  # ...its token dropped again
        size = low.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        assert low.llama_state_seq_get_data(ctx, buf, size, 0) == size
        low.llama_memory_clear(mem, True)
        assert low.llama_state_seq_set_data(ctx, buf, size, 0) == size  # cells in order
        o.n_tokens = m
        o.eval(after)
        return np.array(o.scores[m: m + len(after)], np.float32)
    finally:
        o.close()


@pytest.mark.parametrize("arch,n_keep,n_discard", [("llama", 5, 17), ("llama", 0, 20),
                                                   ("llama", 1, 1), ("gemma3", 5, 17),
                                                   ("gemma3", 0, 30)])
def test_shift_matches_llamacpp(request, arch, n_keep, n_discard):
    path, llm = request.getfixturevalue(arch)
    eng = llm.engine
    rng = np.random.default_rng(n_keep + n_discard)
    prompt = rng.integers(3, 290, 40).tolist()
    after = rng.integers(3, 290, 12).tolist()
    eng.reset(1)
    eng.prefill(prompt, 1)
    assert eng.shift_context(1, n_keep, n_discard) == n_discard
    assert eng.tokens[1] == prompt[:n_keep] + prompt[n_keep + n_discard:]
    ours = np.asarray(eng.prefill(after, 1, all_logits=True), np.float32)
    ref = _oracle_after_shift(path, prompt, n_keep, n_discard, after)
    np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------ the server
def _server(llm, **settings):
    from starlette.testclient import TestClient

    from jllama.server.app import ServerSettings, ServerState, create_app

    state = ServerState(llm, ServerSettings("tiny", timeout=120, **settings))
    return state, TestClient(create_app(state, warmup=False))


def _complete(c, prompt, **body):
    r = c.post("/completion", json={"prompt": prompt, "temperature": 0.0, "cache_prompt": True,
                                    **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_shifts_per_slot(llama):
    """A 40-token prompt asking for 60 tokens in a 64-token slot: shifts, as llama-server, and
    reports truncated; a request beside it, never full, gives what it gives alone."""
    state, c = _server(llama[1], context_shift=True)
    with c:
        assert state.scheduler.context_shift
        prompt = list(range(30, 70))
        alone = _complete(c, [5, 6, 7], n_predict=20, id_slot=1, cache_prompt=False)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "side", _complete(c, [5, 6, 7], n_predict=20, id_slot=1, cache_prompt=False)))
        t.start()
        r = _complete(c, prompt, n_predict=60, id_slot=0, n_keep=-1)
        t.join(60)
        assert r["timings"]["predicted_n"] == 60 and r["truncated"] is True
        assert out["side"]["content"] == alone["content"] and not out["side"]["truncated"]
        # n_keep = -1 kept the whole prompt through the shifts: it is still the slot's prefix
        again = _complete(c, prompt, n_predict=1, id_slot=0)
        assert again["timings"]["cache_n"] == len(prompt) - 1
        # n_keep = 0 (the default, no BOS added by this vocabulary): the prompt's start is gone
        # after n_discard = (63 - 0) / 2 = 31 tokens were dropped
        _complete(c, prompt, n_predict=40, id_slot=0, cache_prompt=False)
        assert state.llm.engine.tokens[0][:9] == prompt[31:]
        assert _complete(c, prompt, n_predict=1, id_slot=0)["timings"]["cache_n"] == 0


def test_server_without_shift_ends_at_the_context(llama):
    """llama-server's rule (test_ctx_shift_disabled_short_prompt: 8 + 248 = 256): generation
    stops once prompt + generated tokens reach the slot's context; a prompt that fills it is
    refused with llama-server's words."""
    state, c = _server(llama[1])
    with c:
        assert not state.scheduler.context_shift
        r = _complete(c, list(range(30, 38)), n_predict=-1, cache_prompt=False)
        assert r["timings"]["predicted_n"] == CTX - 8 and r["truncated"] is True
        assert r["stop_type"] == "limit"
        r = _complete(c, list(range(30, 38)), n_predict=10, cache_prompt=False)
        assert r["timings"]["predicted_n"] == 10 and r["truncated"] is False
        r = c.post("/completion", json={"prompt": list(range(10, 10 + CTX)), "n_predict": 4})
        assert r.status_code == 400
        assert "exceeds the available context size" in r.json()["error"]["message"]


def test_sliding_window_shifts_only_with_swa_full(gemma3):
    """llama-server turns --context-shift off for an SWA cache smaller than the context (its
    default); with --swa-full it shifts. jllama's SWA cache always holds the context."""
    from jllama.server.scheduler import Scheduler

    llm = gemma3[1]
    assert not Scheduler(llm, context_shift=True).context_shift
    # (the shift itself on this cache: test_shift_matches_llamacpp[gemma3-*])
    assert Scheduler(llm, context_shift=True, swa_full=True).context_shift


@pytest.fixture(scope="module")
def gemma3_q8(tmp_path_factory):
    from jllama.api import Llama

    path = _write(tmp_path_factory.mktemp("gemma3q"), "gemma3")
    return path, Llama(str(path), ctx_size=CTX, n_slots=2, compile_cache=False,
                       cache_type="q8_0", cache_type_v="q8_0")


@pytest.mark.parametrize("n_keep,n_discard", [(5, 17), (0, 30)])
def test_shift_of_a_rotated_quantized_cache_matches_llamacpp(gemma3_q8, n_keep, n_discard):
    """A q8_0 K and V with head size 64: llama.cpp rotates Q/K/V by a Hadamard transform
    (models/common.kv_rotation), and its K-shift dequantizes, rotates back, ropes every cell,
    rotates forward and quantizes again: the logits after the shift bit for bit."""
    path, llm = gemma3_q8
    eng = llm.engine
    rng = np.random.default_rng(n_keep + n_discard + 1)
    prompt = rng.integers(3, 310, 40).tolist()
    after = rng.integers(3, 310, 12).tolist()
    eng.reset(1)
    eng.prefill(prompt, 1)
    assert eng.shift_context(1, n_keep, n_discard) == n_discard
    ours = np.asarray(eng.prefill(after, 1, all_logits=True), np.float32)
    ref = _oracle_after_shift(path, prompt, n_keep, n_discard, after, type_k=8, type_v=8)
    np.testing.assert_array_equal(ours, ref)
