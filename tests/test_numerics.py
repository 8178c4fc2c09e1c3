"""The numerics description (jllama/numerics.py): read from the environment in one place, carried
by each model and Engine as static data, and obeyed by every layer kind.

The bug this guards against: when the switch was a module global, ``models/moe.py`` and
``models/deepseek2.py`` imported it by value, so turning llama.cpp's roundings off never reached
expert or MLA layers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tinymodels_moe as tm

from jllama.errors import ConfigError
from jllama.numerics import Numerics, current, use


def test_from_env_reads_the_documented_switches():
    env = {"JLLAMA_NO_FFI": "1", "JLLAMA_NO_Q8": "1", "JLLAMA_Q8_ALL_ROWS": "0",
           "JLLAMA_FUSED_QUANT_ROWS": "4", "GGML_CPU_TILED_MM": "0"}
    n = Numerics.from_env(env)
    assert (n.cpu_kernels, n.q8_kernels, n.prompt_matmul, n.fused_quant_rows,
            n.ggml_tiled_mm) == (False, False, "f32", 4, False)
    assert Numerics.from_env({}) == Numerics()
    # explicit fields beat the environment; None means "not given"
    assert Numerics.from_env(env, prompt_matmul="int8", flash_attn=None).prompt_matmul == "int8"
    with pytest.raises(ConfigError, match="JLLAMA_FUSED_QUANT_ROWS"):
        Numerics.from_env({"JLLAMA_FUSED_QUANT_ROWS": "many"})
    with pytest.raises(ConfigError, match="prompt_matmul"):
        Numerics(prompt_matmul="f16")


def test_current_is_scoped_and_hashable():
    a, b = Numerics(), Numerics(match_llamacpp=False)
    assert current() == Numerics()
    with use(b):
        assert current() is b
        with use(a):
            assert current() is a
        assert current() is b
    assert current() == Numerics()
    assert len({a, b, Numerics()}) == 2  # static jit data must hash by value


def _plain_f32_weights(w):
    """The same model with every quantized tensor dequantized to F32 once."""
    from jllama.gguf.constants import QType
    from jllama.kernels.dispatch import dequantize
    from jllama.models.common import Weights
    from jllama.quant.qtensor import QTensor

    out = {}
    for name, qt in w.tensors.items():
        if not qt.is_float:
            qt = QTensor(dequantize(qt, jax.numpy.float32), int(QType.F32), qt.shape)
        out[name] = qt
    return Weights(out, w.path)


@pytest.mark.parametrize("writer", [tm.write_qwen3moe, tm.write_qwen2moe, tm.write_llama_moe,
                                    tm.write_deepseek2], ids=lambda f: f.__name__[6:])
def test_plain_numerics_reach_expert_and_mla_layers(tmp_path, writer):
    """With llama.cpp's roundings off, a Q8_0 model computes in f32 on its dequantized weights,
    experts and latent attention included: its logits equal those of the same weights stored as
    F32 up to summation order. Where a layer kept rounding its activations to Q8 blocks, the two
    differ by whole quantization steps (~1e-2 of the logit scale)."""
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, load_weights
    from jllama.quant.quantizers import quantize_np

    def router_q8(name, raw, qtype, shape):
        # the writers keep routers in F32; a Q8_0 router takes ggml's activation rounding too
        if name.endswith("ffn_gate_inp.weight") and int(qtype) == int(tm.Q.F32):
            x = np.asarray(raw).view(np.float32).reshape(shape)
            return quantize_np(x, int(tm.Q.Q8_0)), int(tm.Q.Q8_0)
        return raw, qtype

    g = read_gguf(writer(tmp_path / "m.gguf", quant=tm.Q.Q8_0))
    num = Numerics(match_llamacpp=False, cache_type_k="f32", cache_type_v="f32")
    ids = tm.prompt_ids(g.tensors["token_embd.weight"].shape[0], n=24)
    w = load_weights(g, router_q8, numerics=num)
    logits = []
    for weights in (w, _plain_f32_weights(w)):
        spec, model = build_model(g, weights, numerics=num)
        logits.append(Engine(spec, model, ctx_size=64).logits(ids))
    scale = np.abs(logits[1]).max()
    assert np.abs(logits[0] - logits[1]).max() <= 1e-4 * scale


def test_engines_with_other_numerics_compile_their_own_programs(tmp_path):
    """Two Engines on one model with different numerics in one process: each gets its own
    programs (no stale trace), and building the first again reproduces it bit for bit."""
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    g = read_gguf(tm.write_qwen3moe(tmp_path / "m.gguf", quant=tm.Q.Q8_0))
    spec, model = build_model(g)
    ids = tm.prompt_ids(spec.n_vocab, n=24)
    ggml = Engine(spec, model, ctx_size=64).logits(ids)
    plain = Engine(spec, model, ctx_size=64,
                   numerics=Numerics(match_llamacpp=False)).logits(ids)
    again = Engine(spec, model, ctx_size=64).logits(ids)
    assert np.abs(ggml - plain).max() > 0  # the setting took effect...
    assert np.array_equal(ggml, again)  # ...and did not leak into the next Engine


def test_engine_refuses_a_layout_changing_numerics(tmp_path):
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    g = read_gguf(tm.write_qwen3moe(tmp_path / "m.gguf", quant=tm.Q.Q8_0))
    spec, model = build_model(g)
    with pytest.raises(ConfigError, match="cpu_kernels"):
        Engine(spec, model, ctx_size=64, numerics=Numerics(cpu_kernels=False))
