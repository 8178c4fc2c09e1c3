"""The int8-activation C++ matvec (``jllama_qmatvec_q8``) against ggml's own ``ggml_mul_mat``.

The oracle is the llama.cpp build the tests already use (llama-cpp-python's libggml-base/-cpu),
driven through ctypes on a plain ggml context (no backend buffers, so no AMX/repack extra
buffer types): an f32 activation tensor times a quantized weight tensor holding our GGUF bytes.
ggml quantizes the activations to the weight's vec_dot type and runs its vec_dot (one row),
llamafile's tinyBLAS (2+ rows, Q4_0/Q5_0/Q8_0) or its tiled K-quant GEMM (8+ rows, Q2_K-Q6_K,
ggml-cpu/tiled/); our kernel gets the activations quantized by
``quantize_activations_q8``. The products must be bit-identical.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

from jllama.gguf.constants import QType
from jllama.kernels import cpu_ffi
from jllama.quant.actquant import quantize_activations_ex, quantize_activations_q8
from jllama.quant.testing import random_blocks

TYPES = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q2_K, QType.Q3_K,
         QType.Q4_K, QType.Q5_K, QType.Q6_K]
# ggml's tiled K-quant GEMM from 8 rows
K_TILED = {QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K}


def ggml_mul_mat(raw: np.ndarray, qtype: int, x: np.ndarray, n_threads: int) -> np.ndarray:
    """ggml's CPU ``x[m, k] @ W.T`` for W given as raw GGUF rows ``raw[n, row_bytes]``."""
    base, cpu = ggml_libs()
    n, m, k = raw.shape[0], x.shape[0], x.shape[1]
    ctx = base.ggml_init(GgmlInitParams(256 << 20, None, False))
    assert ctx
    try:
        w = base.ggml_new_tensor_2d(ctx, int(qtype), k, n)
        ggml_fill(base, w, raw)
        a = base.ggml_new_tensor_2d(ctx, 0, k, m)  # GGML_TYPE_F32
        ggml_fill(base, a, np.asarray(x, np.float32))
        y = base.ggml_mul_mat(ctx, w, a)  # ne = [n, m]
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        out = np.empty((m, n), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
        return out
    finally:
        base.ggml_free(ctx)


def activations(m: int, k: int, seed: int) -> np.ndarray:
    """Normal values with a few large outliers per row, as in a transformer's hidden state."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.integers(0, k, 4)] *= 30.0
    x[0, :32] = 0.0  # an all-zero block: ggml's d = 0 path
    return x


def require_q8() -> None:
    if os.environ.get("JLLAMA_NO_FFI", "") not in ("", "0"):
        pytest.skip("JLLAMA_NO_FFI is set: the C++ kernels are off by request")
    assert cpu_ffi.available(), "C++ CPU kernels failed to build (see the log warning)"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not all(f in flags.split() for f in ("avx2", "fma", "f16c")):
        pytest.skip("no AVX2 + FMA + F16C on this CPU: the int8 kernels are not built here")
    assert cpu_ffi.q8_supported(int(QType.Q8_0)), "int8 kernels missing from the build"


def ours(raw: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """Quantization and kernel under one jit, as the model runs them (XLA's rewrites of the
    quantization arithmetic, e.g. of a division by a constant, happen only when compiled)."""

    def f(xa, r):
        q, d, s = quantize_activations_q8(xa, qtype)
        return cpu_ffi.qmatvec_q8(q, d, s, r, qtype)

    return np.asarray(jax.jit(f)(jnp.asarray(x), jnp.asarray(raw)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_q8_kernel_bit_exact_vs_ggml(qtype: QType) -> None:
    require_q8()
    k, n = 768, 97  # three 256-blocks; odd n: the two-row path has a one-row tail
    raw = random_blocks(qtype, n, k, seed=int(qtype))
    # 1-5 rows: decode; 300: a prompt chunk (its ~7000 Q8_1 block sums include ties of the
    # f16 rounding of s = d * sum(q), where an XLA-rewritten d once rounded the other way).
    # From 8 rows on ggml multiplies K-quants with its "tiled" kernel (ggml-cpu/tiled/), which
    # sums in another order: 7 is the last vec_dot row count; 8 and 9 its first tiles (one
    # ragged 16-row microtile, the narrow K-chunked path), 64 and 300 full and ragged 256-row
    # windows split over 1 or 2 threads.
    ms = (1, 2, 3, 5) + ((7, 8, 9, 64, 300) if qtype in K_TILED else (300,))
    for m in ms:
        x = activations(m, k, seed=m)
        threads = (2,) if m == 2 else (1, 2) if m >= 8 and qtype in K_TILED else (1,)
        refs = [ggml_mul_mat(raw, qtype, x, n_threads=t) for t in threads]
        for r in refs[1:]:  # the thread count must not matter to ggml either
            np.testing.assert_array_equal(r.view(np.uint32), refs[0].view(np.uint32))
        ref = refs[0]
        got = ours(raw, qtype, x)
        bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
        assert bad.size == 0, (
            f"{qtype.name} m={m}: {bad.size} of {ref.size} differ, e.g. "
            f"{got.flat[bad[0]]!r} vs ggml {ref.flat[bad[0]]!r}"
        )


@pytest.mark.parametrize("qtype", sorted(K_TILED) + [QType.IQ1_S, QType.IQ1_M, QType.IQ2_S,
                                                     QType.IQ3_S, QType.IQ4_XS],
                         ids=lambda t: t.name)
def test_q8_kernel_long_rows_bit_exact_vs_ggml(qtype: QType) -> None:
    """Rows longer than the row kernels' K slab (2048 values, one slab's running sums parked in
    the output between slabs): 2560 = one full slab and a 2-block one; 8192 also has a row
    stride (8 KiB) that maps every x row to the same L1 sets. 8 / 17 / 64 rows: 8-row passes
    (one vector per output row) with 1-row and 8-row tails; 150: blocks of 64 x rows and a
    ragged one; the IQ types from 16 rows: each weight row decoded once (IQ1: as 8 g +
    delta)."""
    require_q8()
    for k, n, ms in ((2560, 37, (8, 17, 64, 150)), (8192, 19, (64,))):
        raw = random_blocks(qtype, n, k, seed=int(qtype) + k)
        for m in ms:
            x = activations(m, k, seed=m + k)
            ref = ggml_mul_mat(raw, qtype, x, n_threads=1)
            got = ours(raw, qtype, x)
            bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
            assert bad.size == 0, f"{qtype.name} k={k} m={m}: {bad.size} of {ref.size} differ"


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_0, QType.Q8_0], ids=lambda t: t.name)
def test_q8_legacy_gemm_bit_exact_vs_ggml(qtype: QType) -> None:
    """Q4_0/Q5_0/Q8_0 on long rows and at prompt sizes: the prompt GEMM (AVX2: transposed tiles
    of 8 weight rows from 64 x rows, gemm.cc ``lane_gemm``; AVX-512 VNNI: tiles of 16 from 16)
    and the row kernels below it, against llamafile's tinyBLAS. 2560 and 8192 values: one or
    more K slabs of 2048 (each output's 8 f32 lanes parked between slabs); 37 / 19 weight rows:
    ragged last tiles; 17 / 63 / 64 rows: either side of the first GEMM row counts; 150: blocks
    of 64 x rows and a ragged one, 2 threads (rows split by chunk)."""
    require_q8()
    for k, n, ms in ((2560, 37, (17, 63, 64, 150)), (8192, 19, (64,))):
        raw = random_blocks(qtype, n, k, seed=int(qtype) + k)
        for m in ms:
            x = activations(m, k, seed=m + k)
            ref = ggml_mul_mat(raw, qtype, x, n_threads=2 if m == 150 else 1)
            got = ours(raw, qtype, x)
            bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
            assert bad.size == 0, f"{qtype.name} k={k} m={m}: {bad.size} of {ref.size} differ"


@pytest.mark.parametrize("qtypes", [(QType.Q4_1, QType.Q4_1, QType.Q4_1),
                                    (QType.Q5_0, QType.Q5_0, QType.Q8_0),
                                    (QType.Q4_K, QType.Q6_K),
                                    (QType.Q3_K, QType.Q2_K, QType.Q3_K),
                                    # 40 rows: the weights share one x + 128 copy per thread
                                    (QType.IQ3_S, QType.IQ2_XS, QType.IQ3_S)],
                         ids=lambda ts: "-".join(t.name for t in ts))
def test_q8_multi_weight_call_bit_exact_vs_ggml(qtypes) -> None:
    """One kernel call over q/k/v (or gate/up) weights: each output is ggml's own product."""
    require_q8()
    from jllama.kernels import xla_cpu
    from jllama.quant.qtensor import QTensor

    k, rows = 512, (96, 33, 64)
    raws = [random_blocks(t, n, k, seed=10 + i) for i, (t, n) in enumerate(zip(qtypes, rows))]
    qts = [QTensor(data=jnp.asarray(r), qtype=int(t), shape=(r.shape[0], k), layout="gguf")
           for r, t in zip(raws, qtypes)]
    for m in (1, 3, 8, 40):  # 8 and 40: ggml's tiled GEMM for the K-quants
        x = activations(m, k, seed=20 + m)
        got = xla_cpu.ffi_matvec_q8_multi(jnp.asarray(x), qts)
        assert got is not None, "multi-weight kernel missing"
        for g, raw, t in zip(got, raws, qtypes):
            ref = ggml_mul_mat(raw, t, x, n_threads=1)
            np.testing.assert_array_equal(np.asarray(g).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_model_path_bit_exact_vs_ggml(qtype: QType) -> None:
    """The model's entry point under jit: up to ``Numerics.fused_quant_rows`` rows the activations are
    quantized inside the kernel call, above that by the separate threaded quantizer (and from
    8 rows the GEMM runs); every row count must still give ggml's bits."""
    require_q8()
    from jllama.kernels import xla_cpu
    from jllama.numerics import Numerics
    from jllama.quant.qtensor import QTensor

    k, n = 512, 50
    raw = random_blocks(qtype, n, k, seed=30 + int(qtype))
    qt = QTensor(data=jnp.asarray(raw), qtype=int(qtype), shape=(n, k), layout="gguf")
    f = jax.jit(lambda xa, q: xla_cpu.ffi_matvec_q8(xa, q))
    fused = Numerics().fused_quant_rows
    for m in (1, 5, fused, fused + 1):
        x = activations(m, k, seed=40 + m)
        ref = ggml_mul_mat(raw, qtype, x, n_threads=1)
        got = np.asarray(f(jnp.asarray(x), qt))
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), f"m={m}")


def test_fused_call_rejects_mixed_activation_formats() -> None:
    require_q8()
    raws = [jnp.asarray(random_blocks(t, 8, 256, seed=1)) for t in (QType.Q4_1, QType.Q8_0)]
    with pytest.raises(Exception, match="activation format"):
        jax.block_until_ready(cpu_ffi.qmatvec_q8_fused(
            jnp.ones((1, 256), jnp.float32), raws, [int(QType.Q4_1), int(QType.Q8_0)]))


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0, QType.Q4_K], ids=lambda t: t.name)
def test_q8_codes_times_scales_are_the_rounded_activations(qtype: QType) -> None:
    """The parts the kernel gets describe the same x that the f32 paths round to."""
    x = jnp.asarray(activations(2, 512, seed=7))
    q, d, _ = quantize_activations_q8(x, qtype)
    bs = 512 // d.shape[-1]
    rebuilt = (q.astype(jnp.float32).reshape(2, -1, bs) * d[..., None]).reshape(2, 512)
    ref = quantize_activations_ex(x, qtype)[0]
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(ref))
    assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q.astype(jnp.int32)))) <= 127


def test_q8_kernel_under_jit_and_vmap_free_shapes() -> None:
    """Through ``linear``'s wrapper: leading axes fold into rows, jit traces once."""
    require_q8()
    from jllama.kernels import xla_cpu
    from jllama.quant.qtensor import QTensor

    qtype, k, n = QType.Q4_1, 256, 40
    raw = random_blocks(qtype, n, k, seed=3)
    qt = QTensor(data=jnp.asarray(raw), qtype=int(qtype), shape=(n, k), layout="gguf")
    x = activations(3, k, seed=5)
    y = jax.jit(lambda v: xla_cpu.ffi_matvec_q8(v, qt))(jnp.asarray(x).reshape(1, 3, k))
    ref = ggml_mul_mat(raw, qtype, x, n_threads=1)
    np.testing.assert_array_equal(np.asarray(y).reshape(3, n), ref)


@pytest.mark.parametrize("fmt", ["q8_0", "q8_1", "q8_K"])
def test_activation_quantizer_is_ggmls(fmt: str) -> None:
    """The C quantizer behind the int8 kernels equals ggml-cpu's quantize_row_q8_{0,1,K} on
    every block: codes, stored scale and (Q8_1) the f16 block sum. Its XLA predecessor stored
    another s for ~1 block in 10^4 under jit (XLA rewrote d * sum(q) and x / 127)."""
    require_q8()
    _, cpu = ggml_libs()
    rng = np.random.default_rng({"q8_0": 1, "q8_1": 2, "q8_K": 3}[fmt])
    m, k = 400, 768
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 30, (m, 1))).astype(np.float32)
    x[0, :256] = 0.0  # all-zero blocks
    x[1] = np.round(x[1] * 4) / 4  # many exact ties of x * 127 / amax
    x[2, [5, 9, 300, 301]] = [-100.0, 100.0, 50.0, -50.0]  # equal |x|: the first one's sign
    q, d, s = (None if a is None else np.asarray(a)
               for a in jax.jit(lambda v: cpu_ffi.quantize_q8(v, fmt))(jnp.asarray(x)))
    bs, size = (256, 292) if fmt == "q8_K" else (32, 36 if fmt == "q8_1" else 34)
    fn = getattr(cpu, f"quantize_row_{fmt}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    for r in range(m):
        row = np.ascontiguousarray(x[r])
        buf = (ctypes.c_uint8 * (k // bs * size))()
        fn(row.ctypes.data, buf, k)
        b = np.frombuffer(buf, np.uint8).reshape(k // bs, size)
        if fmt == "q8_K":
            gd, gq = b[:, :4].copy().view(np.float32)[:, 0], b[:, 4:260].view(np.int8)
        else:
            gd = b[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
            gq = b[:, size - 32 :].view(np.int8)
        np.testing.assert_array_equal(q[r].reshape(-1, bs), gq, err_msg=f"codes, row {r}")
        np.testing.assert_array_equal(d[r], gd, err_msg=f"scales, row {r}")
        if fmt == "q8_1":
            gs = b[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
            np.testing.assert_array_equal(s[r], gs, err_msg=f"block sums, row {r}")


_TILED_OFF_CHILD = """
import hashlib
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from jllama import numerics
from test_cpu_q8_kernel import _TILED_OFF_GRID_TYPES, _tiled_switch_case, ggml_mul_mat, ours
n_bad = 0
for grid_type in (None,) + _TILED_OFF_GRID_TYPES:
    raw, qtype, x = _tiled_switch_case(grid_type)
    ref = ggml_mul_mat(raw, qtype, x, n_threads=2)
    with numerics.use(numerics.Numerics.from_env()):  # GGML_CPU_TILED_MM=0: ggml_tiled_mm=False
        got = ours(raw, qtype, x)
    n_bad += int(np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32)))
    if grid_type is None:
        ref_hash = hashlib.sha256(ref.tobytes()).hexdigest()
print(n_bad, ref_hash)
"""

# The IQ grid types' vec_dot-order kernels from 16 rows (each weight row decoded once; the
# decoded form is shared with the tiled order's act-bias passes), checked in the child too.
_TILED_OFF_GRID_TYPES = (QType.IQ3_S, QType.IQ2_XS)


def _tiled_switch_case(qtype=None):
    qtype, k, n, m = qtype or QType.Q4_K, 512, 48, 40
    return random_blocks(qtype, n, k, seed=5), qtype, activations(m, k, seed=6)


def test_q8_kernel_follows_ggml_tiled_switch() -> None:
    """GGML_CPU_TILED_MM=0 turns ggml's tiled GEMM off (vec_dot order at every row count); our
    kernels take the same switch as ``Numerics.ggml_tiled_mm`` (static jit data, passed to the
    C++ as an attribute), which ``Numerics.from_env`` reads from that variable, so that
    configuration stays bit-identical too. ggml reads it once per process: a child process runs
    with it set. Here, without the variable, the numerics field alone gives the child's bits."""
    require_q8()
    import hashlib
    import subprocess
    import sys

    from jllama import numerics

    env = dict(os.environ, GGML_CPU_TILED_MM="0")
    out = subprocess.run([sys.executable, "-c", _TILED_OFF_CHILD, str(Path(__file__).parent)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n_bad, ref_hash = out.stdout.strip().splitlines()[-1].split()
    assert n_bad == "0", out.stdout
    raw, qtype, x = _tiled_switch_case()
    with numerics.use(numerics.Numerics(ggml_tiled_mm=False)):
        untiled = ours(raw, qtype, x)
    assert hashlib.sha256(untiled.tobytes()).hexdigest() == ref_hash
    if os.environ.get("GGML_CPU_TILED_MM", "1").strip() not in ("0", ""):  # on here
        tiled = ggml_mul_mat(raw, qtype, x, n_threads=2)
        assert hashlib.sha256(tiled.tobytes()).hexdigest() != ref_hash, "switch had no effect"
        np.testing.assert_array_equal(ours(raw, qtype, x).view(np.uint32), tiled.view(np.uint32))


NEW_TYPES = [QType.TQ1_0, QType.TQ2_0, QType.MXFP4, QType.NVFP4, QType.IQ3_XXS, QType.IQ3_S,
             QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ1_S, QType.IQ1_M, QType.IQ4_NL,
             QType.IQ4_XS, QType.Q1_0, QType.Q2_0]


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_q8_kernel_ternary_mxfp4_iq3_bit_exact_vs_ggml(qtype: QType) -> None:
    """ggml's AVX2 vec_dot for TQ1_0/TQ2_0/IQ1/IQ2/IQ3/IQ4_XS (Q8_K), MXFP4/IQ4_NL (Q8_0, an
    odd block count: their scalar tail) and NVFP4 (Q8_0, two q8 blocks per block; every UE4M3
    scale byte, 0 and NaN's 0x7F included), from 8 rows its tiled GEMM for the IQ1/IQ2/IQ3/IQ4_XS
    types, and from 2 rows llamafile's tinyBLAS for IQ4_NL (one accumulator, not vec_dot's two)."""
    require_q8()
    k = 544 if qtype in (QType.MXFP4, QType.IQ4_NL) else 768
    n = 37
    raw = random_blocks(qtype, n, k, seed=int(qtype))  # MXFP4: exponents of real weights
    if qtype == QType.MXFP4:  # and some tiny ones: f32 denormal scales, which ggml keeps
        raw[:5].reshape(5, k // 32, 17)[:, :, 0] = np.array([0, 1, 2, 5, 9])[:, None]
    # 150 (vec_dot-order types, ggml's vec_dot for every row count): the row kernels take x
    # rows in blocks of 64, then a ragged block of 22 (16 + 4 + 2)
    vec_dot_only = qtype in (QType.TQ1_0, QType.TQ2_0, QType.MXFP4, QType.NVFP4, QType.Q1_0,
                             QType.Q2_0)
    ms = (1, 2, 3, 7, 8, 17, 64) + ((150,) if vec_dot_only else ())
    if qtype in (QType.Q1_0, QType.Q2_0):  # vec_dot only, the same row passes as MXFP4's:
        ms = (1, 7, 150)  # one row, 4 + 2 + 1, and 64 + 64 + 16 + 4 + 2 (compiles dominate)
    for m in ms:
        x = activations(m, k, seed=m)
        ref = ggml_mul_mat(raw, qtype, x, n_threads=1)
        got = ours(raw, qtype, x)
        bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
        assert bad.size == 0, f"{qtype.name} m={m}: {bad.size} of {ref.size} differ"
