"""Scanned decoder layers (``Numerics.scan_layers``, see test_scan.py) for Gemma 3's repeating
layer pattern (a nested loop) and for mixture-of-experts blocks (experts read in place at the
traced layer): the bits of the unrolled program, and decode steps whose program does not grow
with depth. A file of its own so that pytest-xdist's ``--dist loadfile`` can run it beside
test_scan.py: each is minutes of compiles on a 2-core machine.
"""

from __future__ import annotations

import numpy as np
from test_scan import _engine
from tinymodels import dense_hparams, dense_tensors, realigned, write_gguf

GEMMA_SHAPE = dict(n_embd=128, n_ff=256, n_head=4, n_head_kv=1, head_dim=64)


def _gemma3(tmp_path, n_layer: int):
    """A tiny Q8_0 gemma3 with a sliding window of 8: layers 5, 11, ... global (pattern 6)."""
    import gguf

    shp = dict(GEMMA_SHAPE, n_layer=n_layer)
    t = dense_tensors(3, n_vocab=320, qk_norm=True, post_norms=True, tied=True, embd_std=0.05,
                      **shp)
    hp = dense_hparams(**shp, **{"rope.freq_base": 1e6, "attention.sliding_window": 8})
    path = write_gguf(tmp_path / f"g{n_layer}.gguf", "gemma3", hp, t,
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    # data at 32 mod 64 whatever the header's length: weights read in place at a byte offset
    # (the embedding lookup's program differs with the alignment; the depth tests compare two)
    return realigned(path, tmp_path / f"g{n_layer}m.gguf", mod=32)


def _decode_step_hlo(path) -> str:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.cache import KVCache
    from jllama.numerics import Numerics, use

    num = Numerics(scan_layers=True)
    spec, m = build_model(read_gguf(path), numerics=num)
    gd, st = nnx.split(m)
    cache = KVCache.create(spec.n_layer, 1, spec.n_head_kv, 128, spec.head_dim,
                           spec.head_dim_v, "f16", "f16", stacked=True)

    def step(st, tok, pos0, cache):
        with use(num):
            return nnx.merge(gd, st)(tok, pos0, cache, 64, jnp.zeros_like(pos0))

    return jax.jit(step, donate_argnums=3).lower(
        st, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), cache
    ).compile().as_text()


def test_gemma3_layer_pattern_is_one_loop_whatever_the_depth(tmp_path):
    """Gemma 3's five sliding-window layers and one global layer repeat: the scan runs over
    the repeats with the pattern as its body (an inner loop for the five), so the decode step
    of a 13- and a 25-layer model holds the same instructions: two loops (pattern, then its
    run of local layers), the lone last layer, no copy of a weight or of the cache."""
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.common import layer_plan
    from jllama.numerics import Numerics, use

    counts = []
    for n, plan in ((13, [(0, 6, 2), (12, 1, 1)]), (25, [(0, 6, 4), (24, 1, 1)])):
        path = _gemma3(tmp_path, n)
        num = Numerics(scan_layers=True)
        _, m = build_model(read_gguf(path), numerics=num)
        with use(num):
            assert layer_plan(list(m.blocks)) == plan
        txt = _decode_step_hlo(path)
        assert txt.count(" while(") == 2
        assert [ln for ln in txt.splitlines()
                if " copy(" in ln and ("s8[" in ln or "u8[" in ln or "f16[" in ln)] == []
        counts.append((txt.count("custom-call("), txt.count(" fusion(")))
    assert counts[0] == counts[1]


def test_gemma3_pattern_scan_equals_unrolled(tmp_path):
    """The nested loop computes the unrolled program's bits: logits at 40 positions (window 8,
    so local and global layers differ) and 16 greedy tokens on a 13-layer gemma3."""
    from jllama.engine.sampling import SamplingParams

    path = _gemma3(tmp_path, 13)
    ids = np.random.default_rng(0).integers(0, 300, 40).tolist()
    out = {}
    for s in (True, False):
        eng = _engine(path, s)
        out[s] = (eng.logits(ids), list(eng.generate(ids[:5], SamplingParams.greedy(), 16)))
    assert np.array_equal(out[True][0], out[False][0])
    assert out[True][1] == out[False][1]


def _moe_models(tmp_path):
    """Tiny MoE files (tests/tinymodels_moe.py): qwen3moe Q4_0 (8 experts, top-3), qwen2moe
    Q8_0 (a shared expert behind an F32 gate vector, F32 routers), Mixtral-style llama Q8_0,
    deepseek2 Q8_0 (MLA with its latent cache, a leading dense layer, then MoE layers with
    sigmoid routing and a selection bias): with the layer runs each scans as."""
    import tinymodels_moe as tm

    return {
        "qwen3moe": (tm.write_qwen3moe(tmp_path / "q3.gguf", quant=tm.Q.Q4_0, n_layer=3),
                     [(0, 3)]),
        "qwen2moe": (tm.write_qwen2moe(tmp_path / "q2.gguf", quant=tm.Q.Q8_0), [(0, 2)]),
        "llama": (tm.write_llama_moe(tmp_path / "ll.gguf", quant=tm.Q.Q8_0), [(0, 2)]),
        "deepseek2": (tm.write_deepseek2(tmp_path / "ds.gguf", quant=tm.Q.Q8_0, n_layer=4),
                      [(0, 1), (1, 4)]),
    }


def test_moe_layers_scan_and_equal_unrolled(tmp_path):
    """MoE blocks are scanned too: the int8 kernels read the chosen expert of the traced
    layer's stacked experts in place (routers and gate vectors, small F32 weights, are stacked
    per layer). Logits at 41 positions (the grouped, sorted-tile expert path) and 12 greedy
    tokens (the gathered path) equal the unrolled program's bit for bit; test_arch_moe and
    test_arch_deepseek2 compare the scanned default with llama.cpp."""
    from jllama.engine.sampling import SamplingParams
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.common import layer_runs
    from jllama.numerics import Numerics, use

    ids = np.random.default_rng(3).integers(0, 260, 41).tolist()
    for name, (path, runs) in _moe_models(tmp_path).items():
        num = Numerics(scan_layers=True)
        _, m = build_model(read_gguf(path), numerics=num)
        with use(num):
            assert layer_runs(list(m.blocks)) == runs, name
        out = {}
        for s in (True, False):
            eng = _engine(path, s)
            out[s] = (eng.logits(ids), list(eng.generate(ids[:6], SamplingParams.greedy(), 12)))
        np.testing.assert_array_equal(out[True][0], out[False][0], err_msg=name)
        assert out[True][1] == out[False][1], name


def test_moe_decode_step_reads_experts_in_place_whatever_the_depth(tmp_path):
    """A scanned qwen3moe decode step with 2 and 5 layers: one loop, the same instructions,
    and no copy of quantized weights (the chosen experts' blocks are read where they lie, not
    sliced out of the stack)."""
    import tinymodels_moe as tm

    counts = []
    for n in (2, 5):
        path = realigned(tm.write_qwen3moe(tmp_path / f"q{n}.gguf", quant=tm.Q.Q4_0, n_layer=n),
                         tmp_path / f"q{n}m.gguf", mod=32)  # as in the gemma3 test above
        txt = _decode_step_hlo(path)
        assert [ln for ln in txt.splitlines() if " copy(" in ln and ("u8[" in ln or "s8[" in ln)
                ] == []
        counts.append((txt.count("custom-call("), txt.count(" fusion("), txt.count(" while(")))
    assert counts[0] == counts[1]
