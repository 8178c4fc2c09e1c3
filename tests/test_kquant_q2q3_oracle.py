"""Q2_K and Q3_K weights against llama.cpp on a tiny random llama, bit for bit.

The model is written in F32 (jllama.quant.testing.tiny_llama) and quantized by llama.cpp's own
``llama_model_quantize`` to its Q2_K and Q3_K_M mixes (Q2_K/Q3_K matrices next to Q4_K..Q6_K
ones). Both programs load the same file; the Q2_K/Q3_K products go through the int8 kernels
(ggml's vec_dot order up to 7 rows, its tiled GEMM's from 8), every other op rounds as ggml's:
logits at every position of a 48-token prompt (tiled) and a 4-token one (vec_dot), and 32 greedy
tokens (one-row decode steps), must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

N_VOCAB = 320
# each llama.cpp mix and the types it must hold (Q2_K's mix puts Q3_K on attn_v, ffn_down)
FTYPES = {"Q2_K": {10, 11}, "Q3_K_M": {11}}


@pytest.fixture(scope="module", params=sorted(FTYPES))
def pair(request, tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp",
                                    reason="install the oracle: pip install -e .[oracle]")
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics
    from jllama.quant.testing import llama_cpp_quantize, tiny_llama

    d = tmp_path_factory.mktemp(request.param)
    tiny_llama(d / "f32.gguf", n_layer=2, n_vocab=N_VOCAB, seed=3)
    path = d / f"{request.param}.gguf"
    llama_cpp_quantize(d / "f32.gguf", path, request.param)
    f = read_gguf(path)
    types = {int(t.qtype) for t in f.tensors.values()}
    assert FTYPES[request.param] <= types, f"{request.param}: ggml types {sorted(types)}"
    oracle = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False,
                             n_threads=2, seed=0, flash_attn=True)
    spec, model = build_model(f)
    engine = Engine(spec, model, ctx_size=256,
                    numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    return request.param, oracle, engine


def _sequences() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1] + rng.integers(3, N_VOCAB, 47).tolist(), [1, 17, 300, 42]]


def test_logits_bit_identical(pair):
    name, oracle, engine = pair
    for ids in _sequences():
        oracle.reset()
        oracle.eval(ids)
        ref = np.array(oracle.scores[: len(ids)], np.float32)
        ours = np.asarray(engine.logits(ids), np.float32)
        bad = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
        print(f"\n{name} T={len(ids)}: max|Δlogit| = {float(np.abs(ours - ref).max()):.3g}")
        assert bad.size == 0, f"{name} T={len(ids)}: {bad.size} of {ref.size} logits differ"


@pytest.mark.parametrize("pair", ["Q2_K"], indirect=True)
def test_greedy_32_tokens_identical(pair):
    """One mix only (the Q2_K one holds Q2_K and Q3_K matrices): the decode loop's compile is
    most of this test's time."""
    from jllama.engine.sampling import SamplingParams

    _, oracle, engine = pair
    prompt = _sequences()[0][:8]
    oracle.reset()
    ref = []
    for tok in oracle.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        ref.append(tok)
        if len(ref) == 32:
            break
    engine.reset()
    assert list(engine.generate(prompt, SamplingParams.greedy(), max_tokens=32)) == ref
