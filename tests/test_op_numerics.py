"""Each op of a llama-arch forward pass, fed llama.cpp's own inputs, reproduces llama.cpp's output.

A tiny random llama model with SmolLM2's types (Q4_1 weights, so Q8_1 activations; tied Q8_0
embedding, Q8_0 activations for the logits) runs 96 tokens through llama.cpp with flash
attention (>= 64 rows: ggml's tiled f32 kernel, as llama-perplexity runs it); ggml's eval
callback dumps every tensor. jllama's rms_norm, matmul (with ggml's activation rounding), rope,
attention and SwiGLU then recompute each op from llama.cpp's inputs, and the result is compared
with llama.cpp's output and with the exact (float64, unrounded) value of the op.

What must hold: our difference from llama.cpp is f32 summation noise (<= 1e-5 of the op's
magnitude), and for every matmul it is at most 1 % of llama.cpp's own rounding error against the
exact product; i.e. we inject the same rounding, not less. A missing rounding (an f16 step, an
activation quantization, a different FA kernel) shows up here as lc_jl ~ lc_ex.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pytest
from llamacpp_oracle import ggml_libs, llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, write_gguf

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))

pytestmark = pytest.mark.oracle

Q = gguf.GGMLQuantizationType
SHAPE = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)


def _qtype(name, arr):
    if arr.ndim < 2:
        return None
    return Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    llama_cpp_module()  # the stock-kernel oracle (or a skip off CI)
    from op_errors_vs_llamacpp import analyse

    tensors = dense_tensors(3, n_vocab=320, tied=True, **SHAPE)
    path = write_gguf(tmp_path_factory.mktemp("opnum") / "tiny.gguf", "llama",
                      dense_hparams(**SHAPE), tensors, qtype=_qtype)
    ids = [(i * 37 + 11) % 320 for i in range(96)]
    return {s["op"]: s for s in analyse(str(path), ids, [0, 1], 256)}


def test_every_op_was_compared(stats):
    for il in (0, 1):
        for op in ("attn_norm", "Qmat", "Kmat", "Vmat", "ropeQ", "ropeK", "attn", "Omat",
                   "ffn_norm", "gate", "up", "swiglu", "down"):
            assert f"{op}-{il}" in stats
    assert "output" in stats


def test_ops_reproduce_llamacpp(stats):
    for op, s in stats.items():
        assert s["lc_jl"] < 1e-5, (op, s)
        assert abs(s["mean_lc_jl"]) < 1e-6, (op, s)


def test_matmuls_inject_llamacpps_rounding(stats):
    mats = [op for op in stats if op.split("-")[0] in
            ("Qmat", "Kmat", "Vmat", "Omat", "gate", "up", "down", "output")]
    for op in mats:
        s = stats[op]
        assert s["lc_ex"] > 1e-4, (op, s)  # the Q8 rounding is there and visible
        assert s["lc_jl"] < 0.01 * s["lc_ex"], (op, s)
        assert abs(s["jl_ex"] / s["lc_ex"] - 1) < 0.01, (op, s)


def test_elementwise_ops_are_bit_identical(stats):
    """Norms, rope (the C library's cosf/sinf, GCC's FMA contraction) and SwiGLU (ggml's SIMD
    expf) reproduce llama.cpp exactly: a 1-ulp difference anywhere grows, through the Q8
    roundings of later layers, into ~0.1 % of perplexity noise."""
    for il in (0, 1):
        for op in ("attn_norm", "ropeQ", "ropeK", "ffn_norm", "swiglu"):
            assert stats[f"{op}-{il}"]["lc_jl"] == 0.0, (op, il, stats[f"{op}-{il}"])


def test_gelu_table_is_ggmls():
    """Gemma's GELU goes through ggml's f16 lookup table; ours must equal it entry for entry
    (read from the oracle's libggml-cpu, where ``ggml_cpu_init`` fills it)."""
    import ctypes

    import numpy as np

    from jllama.models.common import ggml_gelu_table

    _, cpu = ggml_libs()
    ref = np.frombuffer((ctypes.c_uint16 * 65536).in_dll(cpu, "ggml_table_gelu_f16"), np.uint16)
    ours = ggml_gelu_table().view(np.uint16)
    finite = np.isfinite(np.arange(1 << 16, dtype=np.uint16).view(np.float16))
    assert finite.sum() > 60000
    np.testing.assert_array_equal(ours[finite], ref[finite])


def test_rope_cos_sin_are_the_c_librarys():
    """The rope's cos/sin kernel returns the C library's cosf/sinf bit for bit (not a rounded
    higher-precision cos, which differs on ~1 % of rope angles)."""
    import ctypes
    import ctypes.util

    import jax
    import numpy as np

    from jllama.kernels import cpu_ffi

    assert cpu_ffi.available()
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    for fn in (libm.cosf, libm.sinf):
        fn.argtypes, fn.restype = [ctypes.c_float], ctypes.c_float
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-10, 4000, 3000), np.arange(512) * 0.6978306]).astype(
        np.float32)
    c, s = jax.jit(cpu_ffi.cos_sin)(x)
    np.testing.assert_array_equal(np.asarray(c), [libm.cosf(float(v)) for v in x])
    np.testing.assert_array_equal(np.asarray(s), [libm.sinf(float(v)) for v in x])
    f64 = np.cos(x.astype(np.float64)).astype(np.float32)
    assert (f64 != np.asarray(c)).any()  # the distinction this test is about


def test_rope_angles_are_ggmls_serial_products():
    """The rope cache's angles (kernels/cpu/ggml_f32.cc) are ggml's loop, theta = pos then
    theta *= theta_scale per pair with every product rounded to f32 (a numpy f32 loop states
    it), and the XLA chain (no C++ kernels) computes the same bits."""
    import jax
    import numpy as np

    from jllama import numerics
    from jllama.kernels import cpu_ggml_f32
    from jllama.models import ggml_f32

    assert cpu_ggml_f32.available()
    pos = np.array([[0, 1, 7, 500, 4095, 131071], [3, 2, 1, 0, 65535, 9]], np.int32)
    for base, dim in ((10000.0, 64), (1e6, 256), (500000.0, 128)):
        s = np.float32(base ** (-2.0 / dim))
        want = np.empty((*pos.shape, dim // 2), np.float32)
        th = pos.astype(np.float32)
        for i in range(dim // 2):
            want[..., i] = th
            th = th * s  # numpy f32 * f32: one rounding, as ggml's float
        fn = jax.jit(lambda p, s=s, d=dim: ggml_f32.rope_angles(p, s, d // 2))
        with numerics.use(numerics.Numerics()):
            got = np.asarray(fn(pos))
            assert "jllama_rope_angles" in fn.lower(pos).as_text()
        np.testing.assert_array_equal(got, want)
        with numerics.use(numerics.Numerics(cpu_kernels=False)):
            fx = jax.jit(lambda p, s=s, d=dim: ggml_f32.rope_angles(p, s, d // 2))
            assert "jllama_rope_angles" not in fx.lower(pos).as_text()
            np.testing.assert_array_equal(np.asarray(fx(pos)), want)
