"""models/ggml_f32.py against ggml's own CPU ops (the oracle's libggml, through ctypes): the f32
``mul_mat`` (llamafile's tinyBLAS and ggml_vec_dot_f32, chosen by shape as ggml does), soft_max,
SiLU / SwiGLU, sigmoid and sum_rows, bit for bit, in the SIMD variant of the CPU running the
test (AVX2 or AVX-512), on the shapes MoE routing and the shared-expert gate produce.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

pytestmark = pytest.mark.oracle

_P = ctypes.c_void_p


def _ggml_op(op: str, *arrs: np.ndarray) -> np.ndarray:
    """ggml's ``op`` on 2-D f32 arrays (numpy [rows, ne0]), computed on 2 threads."""
    base, cpu = ggml_libs()
    fn = getattr(base, op)
    fn.argtypes, fn.restype = [_P] * (len(arrs) + 1), _P
    ctx = base.ggml_init(GgmlInitParams(64 << 20, None, False))
    assert ctx
    try:
        ts = []
        for a in arrs:
            t = base.ggml_new_tensor_2d(ctx, 0, a.shape[1], a.shape[0])
            ggml_fill(base, t, np.ascontiguousarray(a, np.float32))
            ts.append(t)
        y = fn(ctx, *ts)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        out = np.empty(base.ggml_nbytes(y) // 4, np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
        return out.reshape(arrs[0].shape[0], -1)
    finally:
        base.ggml_free(ctx)


def _mul_mat(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml_mul_mat(w [m, k], x [n, k]) -> [n, m]."""
    base, cpu = ggml_libs()
    ctx = base.ggml_init(GgmlInitParams(64 << 20, None, False))
    try:
        a = base.ggml_new_tensor_2d(ctx, 0, w.shape[1], w.shape[0])
        ggml_fill(base, a, w)
        b = base.ggml_new_tensor_2d(ctx, 0, x.shape[1], x.shape[0])
        ggml_fill(base, b, x)
        y = base.ggml_mul_mat(ctx, a, b)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
        return out
    finally:
        base.ggml_free(ctx)


def jitted(f, *arrays: np.ndarray) -> np.ndarray:
    """``f`` on the arrays under jit, as the models run it (XLA's rewrites happen only when
    compiled), traced here: a fresh function, so no trace made under other numerics is reused
    (``numerics.use`` is not part of jit's cache key). Eagerly, each of the f64 steps, the
    unrolled FMA chain included, was a compile of its own (~3 s a test)."""
    return np.asarray(jax.jit(lambda *a: f(*a))(*(jnp.asarray(a) for a in arrays)))


# (tokens, outputs, k): decode rows and prompts, routers of 4/6/8/60/128 experts, a 1-row gate,
# k off the SIMD step (leftover products)
MATMULS = [(1, 8, 64), (2, 8, 64), (41, 4, 64), (5, 6, 64), (3, 1, 64), (1, 1, 64),
           (7, 128, 256), (1, 60, 256), (9, 60, 256), (1, 40, 72), (3, 4, 72), (3, 6, 100)]


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp", "xla"])
@pytest.mark.parametrize("n,m,k", MATMULS)
def test_f32_mul_mat_is_ggmls(n, m, k, kernels):
    """Both implementations: the C++ kernel (kernels/cpu/ggml_f32.cc) and the XLA steps."""
    from jllama.models import ggml_f32
    from jllama.numerics import Numerics, use

    rng = np.random.default_rng(n * 1000 + m + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((m, k)) / 8).astype(np.float32)
    with use(Numerics(cpu_kernels=kernels)):
        ours = jitted(ggml_f32.mul_mat, x, w)
    np.testing.assert_array_equal(ours, _mul_mat(w, x))


@pytest.mark.parametrize("shape", [(50, 4), (50, 6), (50, 8), (50, 60), (30, 128), (7, 13)])
def test_soft_max_is_ggmls(shape):
    from jllama.models import ggml_f32

    x = (np.random.default_rng(sum(shape)).standard_normal(shape) * 3).astype(np.float32)
    ours = jitted(ggml_f32.soft_max, x)
    np.testing.assert_array_equal(ours, _ggml_op("ggml_soft_max", x))


@pytest.mark.parametrize("shape", [(50, 96), (30, 100), (200, 1), (40, 7), (2000, 16)])
def test_silu_swiglu_sigmoid_are_ggmls(shape):
    """Rows shorter than a SIMD register and row tails go through the C library's expf (not
    correctly rounded: an f64 exp would differ on ~1 in 2000 values)."""
    from jllama.models import common, ggml_f32

    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(jitted(ggml_f32.silu, x), _ggml_op("ggml_silu", x))
    np.testing.assert_array_equal(jitted(common.swiglu, x, g),
                                  _ggml_op("ggml_swiglu_split", x, g))
    np.testing.assert_array_equal(jitted(ggml_f32.sigmoid, x), _ggml_op("ggml_sigmoid", x))


def test_sum_rows_is_ggmls():
    from jllama.models import ggml_f32

    x = np.random.default_rng(0).random((200, 8)).astype(np.float32)
    np.testing.assert_array_equal(jitted(ggml_f32.sum_rows, x)[:, None],
                                  _ggml_op("ggml_sum_rows", x))
