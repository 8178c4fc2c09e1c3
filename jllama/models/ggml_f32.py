"""ggml's CPU f32 arithmetic, step by step: its SIMD expf and SiLU, soft_max, sum_rows and the
f32 ``mul_mat``, each rounding where ggml's C rounds (``Numerics.match_llamacpp``).

ggml is compiled for the machine it runs on, and its x86 code takes 16-lane AVX-512 paths where
the CPU has AVX-512F (and DQ, for the exp-based ops), 8-lane AVX2 + FMA paths otherwise; the lane
count decides both the SIMD/scalar split of a row and the order of every horizontal sum, so each
function here follows the lane count of the CPU it runs on (``simd_lanes``), as a llama.cpp built
on that CPU does. Non-x86 CPUs (NEON) are not reproduced: they get the AVX-512 forms.

An f32 fused multiply-add is computed in f64 (the product is exact there) and rounded once to
f32; that differs from a hardware FMA only when the f64 sum lands exactly on an f32 tie
(~2^-29 of cases). ``opaque`` keeps XLA:CPU from contracting an f32 multiply and a following add
into an FMA where ggml rounds the product first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jllama import numerics
from jllama.kernels import cpu_ffi, cpu_ggml_f32
from jllama.quant.actquant import opaque


def rounding_on() -> bool:
    """Whether to round as ggml's CPU ops (the f64 steps need a backend with f64)."""
    return (numerics.current().match_llamacpp
            and jax.default_backend() in ("cpu", "gpu", "cuda", "rocm"))


def simd_lanes() -> int:
    """ggml's f32 vector width on this CPU: 8 for its AVX2 branch, else 16 (AVX-512, and the
    AVX-512 forms where neither branch is reproduced); see ``cpu_ffi.ggml_simd``."""
    return 8 if cpu_ffi.ggml_simd() == "avx2" else 16


def fma32(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """f32 ``a * b + c`` rounded once, as an FMA instruction does."""
    with jax.enable_x64(True):
        f = jnp.float64
        return (jnp.asarray(a).astype(f) * jnp.asarray(b).astype(f)
                + jnp.asarray(c).astype(f)).astype(jnp.float32)


# ggml_v_expf's constants (ggml-cpu/vec.h, after ARM's optimized-routines expf)
_EXPF_C = tuple(float.fromhex(c) for c in (
    "0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"))
_HEX = {k: float.fromhex(v) for k, v in dict(
    shift="0x1.8p23", log2e="0x1.715476p+0", ln2_lo="0x1.7f7d1cp-20", ln2_hi="0x1.62e4p-1").items()}


def _pow2(n: jax.Array) -> jax.Array:
    """2^n in f64 for whole-number f32 n, built from its exponent bits (exact; ``exp2`` may be
    lowered through ``exp``)."""
    e = jnp.clip(n, -1000, 1000).astype(jnp.int64) + 1023
    return jax.lax.bitcast_convert_type(e << 52, jnp.float64)


def expf_simd(x: jax.Array, lanes: int | None = None) -> jax.Array:
    """ggml_v_expf, the SIMD expf of ggml's vector ops (1.5 ulp from exp), in the variant of the
    lane count: AVX-512 adds the 1 inside the polynomial's last FMA and scales by 2^n with
    ``scalef`` (one rounding); AVX2 ends with ``fma(j, 2^n, 2^n)``, i.e. (1 + j) * 2^n rounded
    once, and (1 + j) rounded first where |n| > 126."""
    lanes = lanes or simd_lanes()
    f32 = jnp.float32
    x = x.astype(f32)
    r = f32(_HEX["shift"])
    z = fma32(x, f32(_HEX["log2e"]), r)
    n = z - r
    b = fma32(-n, f32(_HEX["ln2_lo"]), fma32(-n, f32(_HEX["ln2_hi"]), x))
    u = opaque(b * b)
    c0, c1, c2, c3, c4 = (f32(c) for c in _EXPF_C)
    poly = fma32(fma32(c0, b, c1), u, fma32(c2, b, c3))
    with jax.enable_x64(True):
        f64 = jnp.float64
        scale = _pow2(n)
        if lanes >= 16:
            j = fma32(poly, u, fma32(c4, b, f32(1.0)))
            res = (j.astype(f64) * scale).astype(f32)  # scalef: rounded once
        else:
            j = fma32(poly, u, opaque(c4 * b))
            once = ((j.astype(f64) + 1.0) * scale).astype(f32)  # fma(j, k, k)
            twice = ((j.astype(f64) + 1.0).astype(f32).astype(f64) * scale).astype(f32)
            res = jnp.where(jnp.abs(n) > 126, twice, once)
    big = jnp.abs(n) > 192
    return jnp.where(big, jnp.where(n <= 0, f32(0.0), f32(jnp.inf)), res)


def _kernels() -> bool:
    """Whether the C++ steps (kernels/cpu/ggml_f32.cc) are in use here."""
    return (jax.default_backend() == "cpu" and numerics.current().cpu_kernels
            and cpu_ggml_f32.available())


def rope_angles(pos: jax.Array, theta_scale: float, pairs: int) -> jax.Array:
    """ggml's rope cache angles [..., pairs]: theta starts at the position and is multiplied by
    ``theta_scale`` once per pair, each product rounded to f32. The C++ kernel on the CPU: in
    XLA the serial chain becomes one fusion per pair, each repeating the chain before it (at
    head dim 256, 128 fusions per rope: most of a Gemma 3 program's code and its load)."""
    if _kernels():
        return cpu_ggml_f32.rope_angles(pos, theta_scale, pairs)
    scale = opaque(jnp.float32(theta_scale))
    th = pos.astype(jnp.float32)
    cols = []
    for _ in range(pairs):
        cols.append(th)
        th = th * scale
    return jnp.stack(cols, axis=-1)


def expf_libm(x: jax.Array) -> jax.Array:
    """The C library's expf (kernels/cpu/ggml_f32.cc) on the CPU with the C++ kernels; elsewhere
    exp in f64 rounded to f32 (glibc's expf differs from that on ~1 in 2000 floats)."""
    x = x.astype(jnp.float32)
    if _kernels():
        return cpu_ggml_f32.expf(x)
    with jax.enable_x64(True):
        return jnp.exp(x.astype(jnp.float64)).astype(jnp.float32)


def _split(n: int, lanes: int) -> int:
    """How many leading elements of an n-row ggml runs through its SIMD loop."""
    return n - n % lanes


def silu(x: jax.Array) -> jax.Array:
    """ggml_vec_silu/swiglu's SiLU on f32 rows: lane-wide chunks through ggml_v_silu
    (x / (1 + expf(-x)) with the SIMD expf), the ``n % lanes`` tail through libm's expf."""
    x = x.astype(jnp.float32)
    lanes = simd_lanes()
    n = x.shape[-1]
    m = _split(n, lanes)
    y = x / (jnp.float32(1.0) + expf_simd(jnp.float32(0.0) - x, lanes))
    if m < n:
        t = x[..., m:]
        y = y.at[..., m:].set(t / (jnp.float32(1.0) + expf_libm(-t)))
    return y


def silu_scalar(x: jax.Array) -> jax.Array:
    """ggml_silu_f32 (libm expf): what ggml's silu gives a row shorter than the SIMD width."""
    x = x.astype(jnp.float32)
    return x / (jnp.float32(1.0) + expf_libm(-x))


def sigmoid(x: jax.Array) -> jax.Array:
    """ggml_vec_sigmoid_f32: 1 / (1 + expf(-x)) with libm's expf."""
    x = x.astype(jnp.float32)
    return jnp.float32(1.0) / (jnp.float32(1.0) + expf_libm(-x))


def _hsum_tree(v: jax.Array) -> jax.Array:
    """The lanes of v[..., L] summed as ggml's x86 horizontal sums do (hsum_float_8,
    _mm512_reduce_add_ps): repeatedly the upper half onto the lower half."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def _sum_f64_in_order(parts: list[jax.Array]) -> jax.Array:
    """((p0 + p1) + p2) + ... in f64 (ggml_float accumulators)."""
    with jax.enable_x64(True):
        s = parts[0].astype(jnp.float64)
        for p in parts[1:]:
            s = s + p.astype(jnp.float64)
        return s


def soft_max(x: jax.Array) -> jax.Array:
    """ggml's CPU soft_max (no mask, scale 1) over the last axis: max, then ggml_vec_soft_max_f32
    (the SIMD expf on lane-wide chunks of x - max, each chunk's lanes summed in f32 and added to
    an f64 sum; libm's expf and an f64 add per tail element), then a multiply by
    (float)(1.0 / sum)."""
    x = x.astype(jnp.float32)
    lanes = simd_lanes()
    n = x.shape[-1]
    m = _split(n, lanes)
    d = x - jnp.max(x, axis=-1, keepdims=True)
    parts, outs = [], []
    if m:
        e = expf_simd(d[..., :m], lanes)
        outs.append(e)
        chunks = _hsum_tree(e.reshape(*e.shape[:-1], m // lanes, lanes))
        parts += [chunks[..., c] for c in range(m // lanes)]
    if m < n:
        e = expf_libm(d[..., m:])
        outs.append(e)
        parts += [e[..., i] for i in range(n - m)]
    e = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
    with jax.enable_x64(True):
        inv = (1.0 / _sum_f64_in_order(parts)).astype(jnp.float32)
    return e * inv[..., None]


def sum_rows(x: jax.Array) -> jax.Array:
    """ggml_vec_sum_f32 over the last axis: an f64 sum in order, rounded to f32."""
    parts = [x[..., i] for i in range(x.shape[-1])]
    return _sum_f64_in_order(parts).astype(jnp.float32)


def _fma_chain(xs: jax.Array, ws: jax.Array) -> jax.Array:
    """acc = fma(xs[:, None, s], ws[None, :, s], acc) over the step axis s, from 0.

    xs: [N, S, ...], ws: [M, S, ...] -> [N, M, ...] (the trailing lane axes broadcast). The chain
    runs in f64 (each step rounded to f32) as an unrolled loop: no reduction XLA could reorder."""
    n_steps = xs.shape[1]
    with jax.enable_x64(True):
        f64 = jnp.float64
        xs64 = jnp.moveaxis(xs.astype(f64), 1, 0)[:, :, None]  # [S, N, 1, ...]
        ws64 = jnp.moveaxis(ws.astype(f64), 1, 0)[:, None]  # [S, 1, M, ...]
        acc0 = jnp.zeros(jnp.broadcast_shapes(xs64.shape[1:], ws64.shape[1:]), jnp.float32)

        def body(s, acc):
            return (xs64[s] * ws64[s] + acc.astype(f64)).astype(jnp.float32)

        return jax.lax.fori_loop(0, n_steps, body, acc0, unroll=min(n_steps, 8))


def mul_mat(x: jax.Array, w: jax.Array, sgemm: bool = True) -> jax.Array:
    """ggml's CPU ``mul_mat`` of an f32 weight w [M, K] and f32 activations x [N, K] -> [N, M].

    With 2+ activation rows, M % 4 == 0 and K a multiple of the lane count ggml hands the product
    to llamafile's tinyBLAS (``sgemm=False``: ``mul_mat_id``, which never does): per output,
    ``lanes`` FMA chains over K / lanes steps, then one horizontal sum. Otherwise (a decode row,
    a router of 6 experts) ggml_vec_dot_f32: four lane-wide FMA accumulators over steps of
    4 * lanes, added pairwise (0+2, 1+3, then 0+1), the horizontal sum (AVX2: upper onto lower
    half, then two hadds; AVX-512: the halving tree), and the K % (4 * lanes) leftover products
    added one by one (each rounded first). Checked against ggml on both shapes' paths
    (tests/test_ggml_f32.py)."""
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    n, k = x.shape
    m = w.shape[0]
    lanes = simd_lanes()
    if _kernels():
        return cpu_ggml_f32.mul_mat(x, w, lanes, sgemm)
    if sgemm and n >= 2 and m % 4 == 0 and k % lanes == 0:
        acc = _fma_chain(x.reshape(n, k // lanes, lanes), w.reshape(m, k // lanes, lanes))
        return _hsum_tree(acc)
    step = 4 * lanes
    kk = k - k % step
    if kk:
        acc = _fma_chain(x[:, :kk].reshape(n, kk // step, 4, lanes),
                         w[:, :kk].reshape(m, kk // step, 4, lanes))  # [N, M, 4, lanes]
        v = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
        if lanes == 8:
            t = v[..., :4] + v[..., 4:]
            out = (t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])
        else:
            out = _hsum_tree(v)
    else:
        out = jnp.zeros((n, m), jnp.float32)
    for i in range(kk, k):
        out = out + opaque(x[:, i][:, None] * w[:, i][None, :])
    return out
