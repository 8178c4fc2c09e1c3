"""Decoder layers as one ``lax.scan`` (models/common.py ``scan_blocks``, ``Numerics.scan_layers``).

The scanned program (stacked KV cache, weights read in place by the int8 kernels at the loop's
layer index) must give the bits of the unrolled one (per-layer caches) and of llama.cpp
(llama-cpp-python, flash attention on, f16 cache): logits at every position of a prompt and
greedy decode steps, on tiny random models of the decoder family, one of them Q4_K_M, whose
layers mix Q4_K and Q6_K weights in one scan. Also: the compiled program holds one loop whose
body does not grow with depth, and a context shift on the stacked cache moves what the
per-layer one does. Gemma 3's layer pattern and the MoE blocks: test_scan_gemma3_moe.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, realigned, write_gguf

pytestmark = pytest.mark.oracle

N_VOCAB = 300
SHP = dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64)
# (arch, mix, layers, the scanned runs): K-quant mixes need n_embd a multiple of 256
CASES = {
    # layers 0, 3, 4 have Q6_K attn_v and ffn_down: one run all the same
    "llama-q4_k_m": ("llama", "q4_k_m", 5, [(0, 5)]),
    # q/k/v biases, NEOX rope
    "qwen2-q8_0": ("qwen2", "q8_0", 2, [(0, 2)]),
    # layer 1's Q5_0 ffn_down takes Q8_0 activations, the others' Q4_K Q8_K: three runs, the
    # last starting at layer 2 (its weights' index is not the cache's)
    "llama-split": ("llama", {"base": "q4_k_s", "pure": True,
                              "rules": [{"match": r"blk\.1\.ffn_down", "type": "q5_0"}]},
                    4, [(0, 1), (1, 2), (2, 4)]),
}


def _model(tmp_path, arch: str, mix, n_layer: int):
    from jllama.quant.mixes import mix_from_base, mix_from_dict
    from jllama.quant.quantize import quantize_file

    shp = dict(SHP, n_layer=n_layer)
    t = dense_tensors(11, n_vocab=N_VOCAB, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                      **shp)
    f32 = write_gguf(tmp_path / "f32.gguf", arch, dense_hparams(**shp), t)
    out = tmp_path / "q.gguf"
    quantize_file(f32, out, mix_from_base(mix) if isinstance(mix, str) else mix_from_dict(mix))
    return out


def _engine(path, scan: bool, ctx: int = 128):
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics

    num = Numerics(scan_layers=scan)
    spec, m = build_model(read_gguf(path), numerics=num)
    eng = Engine(spec, m, ctx_size=ctx, numerics=num)
    assert eng.cache.stacked == scan
    return eng


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, mix, n, _ = CASES[request.param]
    path = _model(tmp_path_factory.mktemp(request.param), arch, mix, n)
    oracle = llama_cpp_module().Llama(model_path=str(path), n_ctx=128, logits_all=True,
                                      verbose=False, n_threads=2, seed=0, flash_attn=True)
    yield request.param, path, oracle
    oracle.close()


def test_one_scan_over_all_layers_even_with_mixed_types(case):
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.common import layer_runs
    from jllama.numerics import use

    name, path, _ = case
    g = read_gguf(path)
    types = {g.tensors[f"blk.{i}.ffn_down.weight"].type_name for i in range(g.metadata[
        f"{g.architecture}.block_count"])}
    if name == "llama-q4_k_m":
        assert types == {"Q4_K", "Q6_K"}  # the mix's more-bits layers
    _, m = build_model(g)
    with use(m.numerics):
        assert layer_runs(list(m.blocks)) == CASES[name][3]


def test_scanned_equals_unrolled_and_llamacpp(case):
    """Logits at every position of a 70-token prompt (ggml's tiled FA and int8 GEMM), then
    12 greedy decode steps."""
    from jllama.engine.sampling import SamplingParams

    name, path, oracle = case
    ids = np.random.default_rng(1).integers(0, N_VOCAB, 70).tolist()
    oracle.reset()
    oracle.eval(ids)
    ref = np.array(oracle.scores[: len(ids)], np.float32)
    prompt = [5, 17, 123, 42, 9]
    want = []
    oracle.reset()
    for tok in oracle.generate(prompt, temp=0.0, top_k=1):
        want.append(int(tok))
        if len(want) == 12:
            break
    logits, toks = {}, {}
    for scan in (True, False):
        eng = _engine(path, scan)
        logits[scan] = eng.logits(ids)
        toks[scan] = list(eng.generate(prompt, SamplingParams.greedy(), 12))
    np.testing.assert_array_equal(logits[True], logits[False])
    np.testing.assert_array_equal(logits[True], ref)
    assert toks[True] == toks[False] == want


def test_program_does_not_grow_with_depth(tmp_path):
    """The compiled decode step of a 2- and a 5-layer model: one loop, the same instructions
    (custom calls, fusions), no copy of a weight or of the cache."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.cache import KVCache
    from jllama.numerics import Numerics, use

    counts = []
    for n in (2, 5):
        (tmp_path / f"d{n}").mkdir()
        # both files' data sections at 32 mod 64 (weights read in place at a byte offset):
        # the embedding lookup differs with the alignment, so it must not differ here
        path = realigned(_model(tmp_path / f"d{n}", "llama", "q4_k_m", n),
                         tmp_path / f"d{n}" / "m.gguf", mod=32)
        num = Numerics(scan_layers=True)
        spec, m = build_model(read_gguf(path), numerics=num)
        gd, st = nnx.split(m)
        cache = KVCache.create(n, 1, spec.n_head_kv, 128, spec.head_dim, spec.head_dim_v,
                               "f16", "f16", stacked=True)

        def step(st, tok, pos0, cache, gd=gd, num=num):
            with use(num):
                return nnx.merge(gd, st)(tok, pos0, cache, 64, jnp.zeros_like(pos0))

        txt = jax.jit(step, donate_argnums=3).lower(
            st, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), cache
        ).compile().as_text()
        assert txt.count(" while(") == 1
        big_copies = [ln for ln in txt.splitlines() if " copy(" in ln and ("u8[" in ln
                                                                           or "f16[" in ln)]
        assert big_copies == []
        counts.append((txt.count("custom-call("), txt.count(" fusion(")))
    assert counts[0] == counts[1]


def test_context_shift_on_the_stacked_cache(tmp_path):
    """Discarding tokens (llama.cpp's context shift) moves and re-ropes the same keys in the
    stacked cache as in per-layer ones: generation past the shift stays identical."""
    from jllama.engine.sampling import SamplingParams

    path = _model(tmp_path, "llama", "q8_0", 2)
    prompt = list(range(3, 40))
    got = {}
    for s in (True, False):
        eng = _engine(path, s, ctx=64)
        got[s] = list(eng.generate(prompt, SamplingParams.greedy(), 40, on_full="shift",
                                   n_keep=4))
    assert len(got[True]) == 40
    assert got[True] == got[False]
