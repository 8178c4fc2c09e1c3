"""Pieces every architecture shares: quantized linear layers, norms, rope, cached attention.

All functions are pure and shape-static so the whole forward pass jits once per bucket.
Conventions: activations ``[batch, tokens, ...]``; positions ``pos0[batch]`` is where this call's
first token sits in the sequence; ``kv_len`` (static) is how much of the cache attention reads.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jllama.models.ggml_f32 as ggml_f32
import jllama.models.kvquant as kvquant
from jllama import numerics
from jllama.errors import ModelError
from jllama.kernels import cpu_attention, cpu_ffi, xla_cpu
from jllama.kernels.dispatch import dequantize, qmatmul, take_rows
from jllama.kernels.ragged_paged_attention import ragged_paged_attention
from jllama.models.cache import LayerCache, PagedPool
from jllama.quant.actquant import act_format, opaque, q8_1_correction, quantize_activations_ex
from jllama.quant.qtensor import LayerStack, QTensor

# Where taps land (experiments/numerics_vs_llamacpp.py): with ``Numerics.taps`` on, ``tap``
# copies intermediates here under llama.cpp's tensor names ("attn_norm-0"). A sink only: what
# is computed never depends on it.
TAP_SINK: dict[str, np.ndarray] = {}
# Callables (name, value) also given every tap as it lands (jllama imatrix sums them): sinks too.
TAP_LISTENERS: list = []


def _store(name: str, value) -> None:
    v = np.asarray(value)
    TAP_SINK[name] = v
    for f in TAP_LISTENERS:
        f(name, v)


def tap_layer() -> int:
    """The index of the block ``decoder_forward`` is running, for per-layer tap names. Blocks
    read it instead of storing their index: a static index would make every block's graphdef
    distinct, and equal graphdefs are what lets identical blocks share one trace."""
    return _TAP_LAYER


_TAP_LAYER = 0


def tap(name: str, x: jax.Array) -> jax.Array:
    if numerics.current().taps:
        jax.debug.callback(partial(_store, name), x)
    return x


def linear(x: jax.Array, qt: QTensor) -> jax.Array:
    if numerics.current().match_llamacpp and not qt.is_float:
        on_cpu = jax.default_backend() == "cpu"
        if on_cpu:
            if xla_cpu.q8_ok(x, qt):
                # ggml's own int8 dot on ggml's Q8 activations, bit-identical to llama.cpp's
                # CPU product (None: no int8 kernel for this type or machine)
                y = xla_cpu.ffi_matvec_q8(x, qt)
                if y is not None:
                    return y
        x, s_err = quantize_activations_ex(x, qt.qtype)
        if s_err is not None and on_cpu:
            if xla_cpu.ffi_matvec_ok(x, qt):
                # decode: the kernel takes ggml's Q8_1 block sums for the min term directly,
                # instead of a second (strided) pass over the weight's mins in XLA
                nb = x.shape[-1] // 32
                xs = x.reshape(*x.shape[:-1], nb, 32).sum(-1) + s_err
                return xla_cpu.ffi_matvec_xs(x, qt, xs)
        fix = q8_1_correction(s_err, qt) if s_err is not None else None
        if fix is not None:
            return qmatmul(x, qt) + fix
    return qmatmul(x, qt)


def linear_group(x: jax.Array, mods: list[Linear]) -> list[jax.Array]:
    """Several Linear layers on the same input (q/k/v, gate/up). In a CPU decode step they run
    as one int8 kernel call: one thread hand-off and one activation quantization instead of one
    per weight (each of ~200 calls per step costs a few microseconds of hand-off). Otherwise,
    or when the weights' types take different activation formats, each layer on its own."""
    ys = linear_many(x, [m.weight.get_value() for m in mods])
    return [m.finish(x, y) for y, m in zip(ys, mods)]


def linear_many(x: jax.Array, qts: list[QTensor]) -> list[jax.Array]:
    """``linear(x, qt)`` for each weight, as one int8 kernel call where they allow it."""
    if numerics.current().match_llamacpp and jax.default_backend() == "cpu" and len(qts) in (2, 3):
        if all(not qt.is_float and xla_cpu.q8_ok(x, qt) for qt in qts):
            ys = xla_cpu.ffi_matvec_q8_multi(x, qts)
            if ys is not None:
                return ys
    return [linear(x, qt) for qt in qts]


class Weights:
    """Name → QTensor lookup with errors that say which tensor a file lacks."""

    def __init__(self, tensors: dict[str, QTensor], path: str = "model"):
        self.tensors = tensors
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> QTensor | None:
        return self.tensors.get(name)

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> QTensor:
        qt = self.tensors.get(name)
        if qt is None:
            raise ModelError(f"{self.path}: missing tensor '{name}'")
        if shape is not None and tuple(qt.shape) != tuple(shape):
            raise ModelError(f"{self.path}: tensor '{name}' has shape {qt.shape}, expected {shape}")
        return qt

    def vector(self, name: str, n: int | None = None) -> jax.Array:
        """A small 1-D tensor (norm weight, bias) as f32."""
        qt = self(name, (n,) if n else None)
        return dequantize(qt, jnp.float32)


class Linear(nnx.Module):
    """``x @ W.T (+ bias)``; ``lora``: LoRA adapters on W (models/lora.py attaches them), added
    between the product and the bias as llama.cpp's build_lora_mm does."""

    def __init__(self, qt: QTensor, bias: jax.Array | None = None):
        self.weight = nnx.Param(qt)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.finish(x, linear(x, self.weight.get_value()))

    def finish(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """The adapters' terms and the bias, on this layer's product y of x."""
        if self.lora is not None:
            for p in self.lora:
                y = p.add_to(y, x)
        if self.bias is not None:
            y = y + self.bias.get_value()
        return y


def optional_bias(w: Weights, name: str) -> jax.Array | None:
    """A bias vector the file may or may not have."""
    return w.vector(name) if name in w else None


class SwiGLU(nnx.Module):
    """llama.cpp's gated SiLU feed-forward (``build_ffn`` with LLM_FFN_SILU, LLM_FFN_PAR):
    ``down(silu(gate(h)) * up(h))``, gate and up in one int8 kernel call, ggml's SiLU. Biases
    are used where the file has them (llama's optional MLP biases). ``kind`` names the tensors:
    ``""`` for a dense layer's ``ffn_gate``, ``"_shexp"`` for a shared expert."""

    def __init__(self, w: Weights, prefix: str, kind: str = ""):
        def lin(part: str) -> Linear:
            name = f"{prefix}ffn_{part}{kind}"
            return Linear(w(name + ".weight"), optional_bias(w, name + ".bias"))

        self.gate, self.up, self.down = lin("gate"), lin("up"), lin("down")

    def __call__(self, h: jax.Array) -> jax.Array:
        g = tap(f"ffn_swiglu-{tap_layer()}", swiglu(*linear_group(h, [self.gate, self.up])))
        return self.down(g)


class Embedding(nnx.Module):
    def __init__(self, qt: QTensor):
        self.weight = nnx.Param(qt)
        self.lora = nnx.data(None)  # LoRA adapters on the embedding (models/lora.py)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = take_rows(self.weight.get_value(), ids)
        if self.lora is not None:
            for p in self.lora:
                x = p.add_to(x, ids)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: logits = x @ E.T."""
        return linear(x, self.weight.get_value())


class RMSNorm(nnx.Module):
    def __init__(self, weight: jax.Array, eps: float, add_one: bool = False):
        # Gemma's GGUF already stores (1 + w); add_one exists for formats that do not
        self.weight = nnx.Param(weight + 1.0 if add_one else weight)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight.get_value(), self.eps)


def rms_norm(x: jax.Array, w: jax.Array | None, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    if numerics.current().match_llamacpp:
        # ggml: mean = (float)(double sum of f32 squares / n); scale = 1.0f / sqrtf(mean + eps).
        # The barrier keeps XLA from turning 1/sqrt into its rsqrt, which rounds differently.
        root = jnp.sqrt(_mean_f32_of_exact_sum(x * x) + jnp.float32(eps))
        scale = 1.0 / opaque(root)
        y = x * scale
        # opaque: a following residual add must not fuse with the weight multiply into an FMA
        # (XLA:CPU contracts a*b + c), where ggml rounds the product first
        return opaque(y * w) if w is not None else y
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _mean_f32_of_exact_sum(sq: jax.Array) -> jax.Array:
    """``(float)(sum / n)`` over the last axis with the sum as exact as ggml's double one.

    ggml sums the f32 squares in double and rounds the mean to f32 once; an f32 sum is off by
    an ulp or so, and one ulp in the norm scale is enough to move an activation across a Q8
    rounding boundary. Where f64 is native (CPU, GPU) the sum is done in f64 like ggml's: one
    fused reduction per norm. TPUs have no f64; there the sum is a pairwise tree of error-free
    two-sums (hi + lo), ~6 fusions per norm, which cost ~5 % of SmolLM2's decode step on CPU."""
    if jax.default_backend() in ("cpu", "gpu", "cuda", "rocm"):
        with jax.enable_x64(True):
            s = jnp.sum(sq.astype(jnp.float64), axis=-1, keepdims=True)
            return (s / opaque(jnp.float64(sq.shape[-1]))).astype(jnp.float32)
    return _mean_f32_two_sum_tree(sq)


def _mean_f32_two_sum_tree(sq: jax.Array) -> jax.Array:
    """The f64-free variant: division corrected with the exact remainder (Dekker: q split into
    12-bit halves)."""
    n = sq.shape[-1]
    m = 1 << (n - 1).bit_length()
    hi = jnp.pad(sq, [(0, 0)] * (sq.ndim - 1) + [(0, m - n)]) if m != n else sq
    lo = jnp.zeros_like(hi)
    while hi.shape[-1] > 1:
        h = hi.shape[-1] // 2
        s, e = _two_sum(hi[..., :h], hi[..., h:])
        hi, lo = s, lo[..., :h] + lo[..., h:] + e
    hi, lo = _two_sum(hi, lo)
    nf = jnp.float32(n)
    q = hi / nf
    q_h = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(q, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    q_l = q - q_h
    r = ((hi - q_h * nf) - q_l * nf) + lo  # exact while n has <= 12 significant bits
    return q + r / nf


def rope(x: jax.Array, pos: jax.Array, base: float, dim: int, neox: bool,
         scale: float = 1.0, sections: tuple[int, ...] = (),
         yarn: tuple[float, float, float, float] | None = None) -> jax.Array:
    """Rotary embedding on the first ``dim`` features of each head.

    ``neox=False`` is llama.cpp's NORM mode (rotate adjacent pairs), used for the ``llama``
    arch on GGUF weights whose Q/K rows the converter already permuted; ``neox=True`` rotates
    the two halves (Gemma, Qwen).  x: [B, T, H, D], pos: [B, T].

    ``sections`` (M-RoPE, llama.cpp's ``ggml_rope_multi`` in MROPE mode, Qwen2-VL's text
    model): pos is [B, T, 4] (t, h, w, e) and pair i turns by the position of the section
    holding ``i % sum(sections)``; the rotation is NEOX's.
    """
    if yarn is not None:
        return _rope_yarn(x, pos, base, dim, neox, scale, yarn)
    if sections:
        ang = mrope_angles(pos, base, dim, sections, scale)
    elif numerics.current().match_llamacpp:
        ang = _ggml_rope_angles(pos, base, dim, scale)
    else:
        half = dim // 2
        inv = base ** (-jnp.arange(0, half, dtype=jnp.float32) * 2.0 / dim)
        ang = (pos.astype(jnp.float32) * scale)[..., None] * inv  # [B, T, half]
    return rope_rotate(x, ang, dim, neox or bool(sections))


def _rope_yarn(x: jax.Array, pos: jax.Array, base: float, dim: int, neox: bool, scale: float,
               yarn: tuple[float, float, float, float]) -> jax.Array:
    """ggml's rope_yarn: pairs inside the ramp [low, high] mix the interpolated angle
    (``scale * theta``) with the extrapolated one, and cos/sin carry the magnitude factor."""
    ext, attn, low, high = yarn
    if numerics.current().match_llamacpp:
        extrap = _ggml_rope_angles(pos, base, dim, 1.0)
    else:
        extrap = pos.astype(jnp.float32)[..., None] * base ** (
            -jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)
    interp = extrap * jnp.float32(scale)
    mscale = np.float32(attn)
    if ext != 0:
        y = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(
            max(0.001, high - low))
        mix = jnp.asarray((np.float32(1) - np.clip(y, 0, 1)) * np.float32(ext))
        interp = interp * (1 - mix) + extrap * mix
        mscale = mscale * (np.float32(1) + np.float32(0.1) * np.float32(
            np.log(np.float64(np.float32(1) / np.float32(scale)))))
    return rope_rotate(x, interp, dim, neox, float(mscale))


def rope_rotate(x: jax.Array, ang: jax.Array, dim: int, neox: bool,
                mscale: float = 1.0) -> jax.Array:
    """Rotate the first ``dim`` features of each head of x [B, T, H, D] by the angles
    [B, T, dim/2] (pair i by ang[..., i]), as ggml's ``rotate_pairs``; ``mscale`` multiplies
    cos and sin (YaRN's magnitude factor)."""
    half = dim // 2
    exact = numerics.current().match_llamacpp and _libm_cos_sin_ok()
    if exact:
        cos, sin = cpu_ffi.cos_sin(ang)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    else:
        cos = jnp.cos(ang)[:, :, None, :]
        sin = jnp.sin(ang)[:, :, None, :]
    if mscale != 1.0:
        cos, sin = cos * jnp.float32(mscale), sin * jnp.float32(mscale)
    xr, rest = x[..., :dim], x[..., dim:]
    if neox:
        x1, x2 = xr[..., :half], xr[..., half:]
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    if exact:
        # ggml's rotate_pairs as GCC compiles it: x0*c - x1*s with the first product fused into
        # the add and the second rounded (found by testing against ggml; the other forms differ)
        y1 = ggml_f32.fma32(x1, cos, -(x2 * sin))
        y2 = ggml_f32.fma32(x1, sin, x2 * cos)
    else:
        y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    if neox:
        out = jnp.concatenate([y1, y2], axis=-1)
    else:
        out = jnp.stack([y1, y2], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def mrope_angles(pos: jax.Array, base: float, dim: int, sections: tuple[int, ...],
                 scale: float = 1.0, vision: bool = False, n_pairs: int = 0) -> jax.Array:
    """M-RoPE angles [B, T, dim/2] from positions [B, T, 4] as ggml's ``ggml_mrope_cache_init``:
    four thetas (one per section's position) each multiplied by ``base**(-2/dim)`` once per
    pair, pair i taking the theta of the section ``i % sum(sections)`` falls in. ``vision``
    (GGML_ROPE_TYPE_VISION, Qwen2-VL's encoder): each section's theta restarts from its
    position where the section begins, so pair i turns by its offset within the section;
    there ``dim`` (ggml's n_dims) is half the head and ``n_pairs`` (the head's) twice dim/2."""
    bounds = np.cumsum([0, *sections])
    total = int(bounds[-1])
    half = dim // 2
    n_pairs = n_pairs or half
    if not numerics.current().match_llamacpp:
        tabs = [pos[..., j].astype(jnp.float32)[..., None] * scale
                * base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dim) for j in range(4)]
    else:
        tabs = [_ggml_rope_angles(pos[..., j], base, dim, scale) for j in range(4)]
    cols = []
    for i in range(n_pairs):
        sector = i % total
        j = min(int(np.searchsorted(bounds, sector, side="right")) - 1, 3)
        cols.append(tabs[j][..., sector - int(bounds[j]) if vision else i])
    return jnp.stack(cols, axis=-1)


def _libm_cos_sin_ok() -> bool:
    """Whether rope can take its cos/sin from the C library (ggml's), i.e. the C++ kernels."""
    return jax.default_backend() == "cpu" and xla_cpu.ffi_on()


_F64_BACKENDS = ("cpu", "gpu", "cuda", "rocm")


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, ggml's fused SwiGLU (ggml_vec_swiglu_f32, with its SIMD expf)."""
    if numerics.current().match_llamacpp and jax.default_backend() in _F64_BACKENDS:
        return ggml_f32.silu(gate) * up
    return jax.nn.silu(gate) * up


@functools.cache
def ggml_gelu_table() -> np.ndarray:
    """ggml's GELU lookup table (``ggml_table_gelu_f16``): f16 GELU of every f16 value, computed
    as ggml's C does, ``0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x)))`` with
    GCC contracting ``GELU_COEF_A*x*x + 1`` into one FMA, and the C library's tanhf (not
    correctly rounded: a higher-precision tanh changes entries). Tested equal to ggml's table."""
    f32 = np.float32
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(f32)
    with np.errstate(all="ignore"):
        ax = f32(0.044715) * x
        t = (ax.astype(np.float64) * x + 1.0).astype(f32)  # one rounding, as the FMA
        inner = f32(0.79788456080286535587989211986876) * x * t
        th = _libm_tanhf(inner)
        y = f32(0.5) * x * (f32(1.0) + th)
    return y.astype(np.float16)


def gelu(x: jax.Array) -> jax.Array:
    """GELU (tanh form) as ggml's CPU op computes it when matching llama.cpp.

    ggml looks GELU up in an f16 table: the input is rounded to f16, the result stored as f16,
    and inputs beyond ±10 bypass the table (0 or x). The table is ggml's own, bit for bit
    (``ggml_gelu_table``); XLA's gelu rounds 368 of its entries the other way.
    """
    if not numerics.current().match_llamacpp:
        return jax.nn.gelu(x, approximate=True)
    table = jnp.asarray(ggml_gelu_table())
    idx = jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
    y = jnp.take(table, idx).astype(jnp.float32)
    return jnp.where(x <= -10.0, 0.0, jnp.where(x >= 10.0, x, y))


@functools.cache
def ggml_gelu_quick_table() -> np.ndarray:
    """ggml's quick-GELU table (``ggml_table_gelu_quick_f16``): f16 of
    ``x*(1.0f/(1.0f+expf(-1.702f*x)))`` for every f16 x, with the C library's expf."""
    f32 = np.float32
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(f32)
    with np.errstate(all="ignore"):
        e = _libm_unary("expf", np.exp, f32(-1.702) * x)
        y = x * (f32(1.0) / (f32(1.0) + e))
    return y.astype(np.float16)


def gelu_quick(x: jax.Array) -> jax.Array:
    """ggml_gelu_quick as its CPU op computes it: through its f16 table (the input rounded to
    f16, the result an f16), CLIP's activation."""
    if not numerics.current().match_llamacpp:
        return x * jax.nn.sigmoid(1.702 * x)
    table = jnp.asarray(ggml_gelu_quick_table())
    idx = jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
    return jnp.take(table, idx).astype(jnp.float32)


def _libm_tanhf(x: np.ndarray) -> np.ndarray:
    """The C library's tanhf elementwise (ctypes, ~65k calls once per process); where there is
    none, tanh in f64 rounded to f32, which agrees with glibc's on all but a few values."""
    return _libm_unary("tanhf", np.tanh, x)


def _libm_unary(fname: str, fallback, x: np.ndarray) -> np.ndarray:
    """A float function of the C library elementwise (ctypes); ``fallback`` in f64 where
    there is none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("m")
    try:
        libm = ctypes.CDLL(name) if name else None
        fn = getattr(libm, fname) if libm is not None else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        return fallback(x.astype(np.float64)).astype(np.float32)
    fn.argtypes, fn.restype = [ctypes.c_float], ctypes.c_float
    flat = x.ravel()
    out = np.fromiter((fn(float(v)) for v in flat), np.float32, count=flat.size)
    return out.reshape(x.shape)


def _ggml_rope_angles(pos: jax.Array, base: float, dim: int, scale: float) -> jax.Array:
    """Rotation angles [B, T, dim/2] rounded as ggml's rope cache makes them: theta starts at the
    position and is multiplied by ``powf(base, -2/dim)`` once per pair, in f32. Against
    ``pos * base**(-2i/dim)`` the angles drift by a few f32 ulps (~1e-4 rad at position 500),
    which moved Q/K by ~1e-4 relative, the largest difference in layer 0."""
    ang = ggml_f32.rope_angles(pos, np.float32(float(base) ** (-2.0 / dim)), dim // 2)
    return ang * jnp.float32(scale) if scale != 1.0 else ang


FA_TILE_Q = 64

_HALF = {"f16": jnp.float16, "bf16": jnp.bfloat16}


def fwht(x: jax.Array, n: int) -> jax.Array:
    """ggml-cpu's fast Walsh-Hadamard transform (ggml_compute_forward_fwht: a mul_mat by
    llama.cpp's orthonormal Hadamard matrix, hinted) on each run of ``n`` values of the last
    axis: times 1 / sqrtf(n), then the butterflies u + v, u - v for spans 1, 2, 4, ... n / 2
    in that order (elementwise, so the same bits at any SIMD width)."""
    shape = x.shape
    y = x.astype(jnp.float32) * (np.float32(1.0) / np.sqrt(np.float32(n)))
    y = y.reshape(-1, n)
    span = 1
    while span < n:
        z = y.reshape(-1, n // (2 * span), 2, span)
        u, v = z[:, :, 0], z[:, :, 1]
        y = jnp.stack([u + v, u - v], axis=2).reshape(-1, n)
        span *= 2
    return y.reshape(shape)


def kv_rotation(kv_types: tuple[str, str], head_dim: int, head_dim_v: int) -> tuple[int, int]:
    """llama.cpp's attention rotation for a quantized KV cache (llama_kv_cache: attn_rot_k /
    attn_rot_v, off with LLAMA_ATTN_ROT_DISABLE=1): with a quantized K, Q and K pass through a
    Hadamard transform of the largest power-of-two size >= 64 that divides the head size; with
    a quantized V, V and the attention output through one of size 64; both only where the head
    size is a multiple of 64. Returns those sizes (0: no rotation). Outliers spread over a
    block quantize better; H is orthonormal and its own inverse, so the scores are unchanged up
    to rounding."""
    rk = rv = 0
    if kv_types[0] in kvquant.QUANT_KV and head_dim % 64 == 0:
        rk = 64
        while head_dim % (rk * 2) == 0:
            rk *= 2
    if kv_types[1] in kvquant.QUANT_KV and head_dim_v % 64 == 0:
        rv = 64
    return rk, rv


def write_cache(cache, new: jax.Array, pos0: jax.Array, kind: str = "f32"):
    """Put ``new`` [B, T, KVH, D] into ``cache`` [B, KVH, S, row] (or a ``LayerCache``, the
    layer of a stacked cache, returned as one) at positions pos0[b]..+T, stored as ``kind`` (a
    float type or a ggml block type, see models/kvquant.py)."""
    new = kvquant.quantize(new, kind)
    if isinstance(cache, LayerCache) and isinstance(cache.full, PagedPool):
        return LayerCache(_write_pages(cache.full, cache.index, new, pos0), cache.index)
    if isinstance(cache, LayerCache):
        def one_layer(c, n, p):
            n = n.transpose(1, 0, 2).astype(c.dtype)[None]
            return jax.lax.dynamic_update_slice(c, n, (cache.index, 0, p, 0))

        return LayerCache(jax.vmap(one_layer)(cache.full, new, pos0), cache.index)

    def one(c, n, p):
        return jax.lax.dynamic_update_slice(c, n.transpose(1, 0, 2).astype(c.dtype), (0, p, 0))

    return jax.vmap(one)(cache, new, pos0)


def _write_pages(pool: PagedPool, layer, new: jax.Array, pos0: jax.Array) -> PagedPool:
    """Row b's new [T, KVH, row] at positions pos0[b].. into layer ``layer`` of the pool,
    through the block table; positions past the table's width go to the scratch page 0."""
    b, t = new.shape[:2]
    ps, mp = pool.page_size, pool.table.shape[1]
    p = (pos0[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]).reshape(-1)  # [B*T]
    col = p // ps
    row = jnp.repeat(jnp.arange(b, dtype=jnp.int32), t)
    page = jnp.where(col < mp, pool.table[row, jnp.minimum(col, mp - 1)], 0)
    vals = new.reshape(b * t, *new.shape[2:]).astype(pool.pages.dtype)  # [B*T, KVH, row]
    pages = pool.pages.at[layer, :, page, p % ps, :].set(vals)
    return PagedPool(pages, pool.table, pool.impl)


def _paged_attention(q, kp: PagedPool, vp: PagedPool, layer, pos0, kv_len: int, scale: float,
                     window, softcap, k_type: str, v_type: str, head_dim_v, bidir: bool):
    """``attention`` over a paged cache. "xla": the pages gathered into the dense layout, then
    the dense attention (the same math and bits as a dense cache); else the ragged paged kernel,
    rows as sequences of T queries each ending at position pos0 + T - 1."""
    b, t, h, d = q.shape
    quantized = k_type not in ("f32", *_HALF) or v_type not in ("f32", *_HALF)
    if kp.impl == "xla" or quantized or bidir:
        # on the CPU the table's whole width: the dense cache's length, which sets the exact
        # C++ attention's chunking (n_kv), so the bits are the dense cache's
        n = (kp.table.shape[1] if jax.default_backend() == "cpu"
             else -(-kv_len // kp.page_size))

        def dense(pool: PagedPool):
            return pool.dense(layer, n)

        return attention(q, dense(kp), dense(vp), pos0, kv_len, scale, window, softcap,
                         k_type=k_type, v_type=v_type, head_dim_v=head_dim_v, bidir=bidir)
    cu = jnp.arange(b + 1, dtype=jnp.int32) * t
    o = ragged_paged_attention(
        q.reshape(b * t, h, d), kp.pages, vp.pages, layer, pos0 + t, kp.table, cu, jnp.int32(b),
        scale=scale, window=window, softcap=softcap or None,
        interpret=kp.impl == "interpret")
    return o.astype(jnp.float32).reshape(b, t, -1)


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos0: jax.Array,
              kv_len: int, scale: float, window: int | None = None,
              softcap: float | None = None, k_type: str = "f32", v_type: str = "f32",
              head_dim_v: int | None = None, bidir: bool = False) -> jax.Array:
    """Causal GQA attention of new queries against the first ``kv_len`` cache positions
    (``bidir``: every new query also sees the other new keys, llama.cpp's causal_attn off).

    q: [B, T, H, D]; caches [B, KVH, S, D] already hold this call's keys/values.
    Returns [B, T, H * Dv].
    """
    if isinstance(k_cache, LayerCache) and isinstance(k_cache.full, PagedPool):
        return _paged_attention(q, k_cache.full, v_cache.full, k_cache.index, pos0, kv_len,
                                scale, window, softcap, k_type, v_type, head_dim_v, bidir)
    num = numerics.current()
    exact = num.match_llamacpp
    if exact and num.flash_attn and k_type == "f16" and v_type == "f16":
        # llama.cpp's flash attention (-fa, its CPU default): ggml's FA kernel bit for bit
        # (kernels/cpu_attention.cc); without it the XLA attention below rounds as ggml's
        # non-FA graph does (llama-cpp-python's default)
        if jax.default_backend() == "cpu" and num.cpu_kernels and cpu_attention.available():
            # ggml's own flash attention, bit for bit; kv_pad: llama.cpp's n_kv rule (256)
            if isinstance(k_cache, LayerCache):  # the stacked cache, read in place
                return cpu_attention.ggml_flash_attn(
                    q, k_cache.full, v_cache.full, pos0, kv_len, scale, window, softcap,
                    kv_pad=256, bidir=bidir, layer=k_cache.index)
            return cpu_attention.ggml_flash_attn(q, k_cache, v_cache, pos0, kv_len, scale,
                                                 window, softcap, kv_pad=256, bidir=bidir)
    quant_types = cpu_attention.QUANT_CACHE_TYPES
    if (exact and num.flash_attn and k_type in quant_types and v_type in quant_types
            and jax.default_backend() == "cpu" and num.cpu_kernels
            and cpu_attention.quantized_available()):
        # a quantized K and/or V (the other f16): ggml's flash attention over those blocks
        # (its one_chunk path, Q quantized to K's vec_dot type), bit for bit
        dv = head_dim_v or q.shape[-1]
        if isinstance(k_cache, LayerCache):
            return cpu_attention.ggml_flash_attn_q(
                q, k_cache.full, v_cache.full, pos0, kv_len, scale, k_type, v_type, dv,
                window, softcap, bidir=bidir, layer=k_cache.index)
        return cpu_attention.ggml_flash_attn_q(q, k_cache, v_cache, pos0, kv_len, scale,
                                               k_type, v_type, dv, window, softcap, bidir=bidir)
    if isinstance(k_cache, LayerCache):
        k_cache, v_cache = k_cache.get(), v_cache.get()
    b, t, h, d = q.shape
    kvh = k_cache.shape[1]
    k = kvquant.dequantize(k_cache[:, :, :kv_len], k_type, d)
    v = kvquant.dequantize(v_cache[:, :, :kv_len], v_type, head_dim_v or d)
    fa_tiled = t >= FA_TILE_Q
    if exact and k_type in _HALF and not fa_tiled:
        # ggml (no flash attention) multiplies a half-precision K by q rounded to that type;
        # tiny as it is, this decides which activations later cross a Q8 rounding step
        q = q.astype(_HALF[k_type])
    qg = q.astype(jnp.float32).reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    qpos = pos0[:, None] + jnp.arange(t)[None, :]  # [B, T]
    kpos = jnp.arange(kv_len)
    last = (pos0[:, None] + t - 1) if bidir else qpos
    mask = kpos[None, None, :] <= jnp.broadcast_to(last, qpos.shape)[:, :, None]  # [B, T, S]
    if window:
        mask = mask & (kpos[None, None, :] > qpos[:, :, None] - window)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    if exact:
        # ggml: exp(s - max), then a multiply by 1/sum (not a divide)
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        p = e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))
    else:
        p = jax.nn.softmax(s, axis=-1)
    if exact and v_type in _HALF and not fa_tiled:
        p = p.astype(_HALF[v_type]).astype(jnp.float32)  # likewise softmax(KQ) times V
    o = jnp.einsum("bkgts,bksd->btkgd", p, v)
    return o.reshape(b, t, h * v.shape[-1])


def gather_last(x: jax.Array, last_idx: jax.Array) -> jax.Array:
    """x [B, T, E] → [B, E] at per-sequence index last_idx[b]."""
    return jnp.take_along_axis(x, last_idx[:, None, None], axis=1)[:, 0]


def decoder_forward(model: nnx.Module, x: jax.Array, pos0: jax.Array, cache,
                    kv_len: int, last_idx: jax.Array | None, hidden: bool = False,
                    bidir: bool = False, rope_pos: jax.Array | None = None):
    """The part every decoder-only architecture shares after its embedding: the blocks over
    the per-layer caches, then final norm and output projection (tied or not).

    ``model`` has ``blocks`` (each called as ``blk(x, pos, pos0, k, v, kv_len, kv_types)``),
    ``out_norm``, ``output`` (None when tied) and ``tok_embd``. With ``last_idx`` logits are
    computed only at that index per sequence ([B, V]): generation needs one row, and the output
    matmul is the largest in small models. With ``hidden`` (static) the result is the final
    norm's output instead ([B, T, E] or [B, E]): llama.cpp's embeddings of a decoder (t_embd).
    ``bidir`` (static): non-causal attention within the batch, passed to blocks that take it.
    ``rope_pos``: the blocks' rope positions (M-RoPE's [B, T, 4]) instead of the cell indices.

    A stacked cache (``KVCache.stacked``) runs the blocks as ``scan_blocks`` does; per-layer
    caches run them one after the other (the unrolled program).
    """
    t = x.shape[1]
    pos = (pos0[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :] if rope_pos is None
           else rope_pos)
    kv_types = (cache.k_type, cache.v_type)
    extra = {"bidir": True} if bidir else {}  # only blocks that take it get it
    # partial offload (-ngl): the first layers' weights are in host memory (models/offload.py)
    host = getattr(model, "host_layers", None)
    first = host.n if host is not None else 0
    if cache.paged:  # the page pools through the same layer loop, block table alongside
        # (the engine refuses a paged cache for a split model: Engine._paged_config)
        kp, vp = cache.pools()
        x, kp, vp = scan_blocks(list(model.blocks), x, pos, pos0, kp, vp, kv_len, kv_types,
                                extra)
        new_cache = cache.replace((kp.pages,), (vp.pages,))
    elif cache.stacked:
        kf, vf = cache.k[0], cache.v[0]
        if host is not None:
            x, kf, vf = host(x, pos, pos0, kf, vf, kv_len, kv_types, extra)
        x, kf, vf = scan_blocks(list(model.blocks), x, pos, pos0, kf, vf, kv_len, kv_types,
                                extra, first=first)
        new_cache = cache.replace((kf,), (vf,))
    else:
        ks, vs = list(cache.k), list(cache.v)
        if host is not None:
            x, ks, vs = host(x, pos, pos0, ks, vs, kv_len, kv_types, extra, stacked=False)
        run = _block_runner(bidir)
        for i, blk in enumerate(model.blocks, start=first):
            x, ks[i], vs[i] = _run_block(run, blk, i, x, pos, pos0, ks[i], vs[i], kv_len,
                                         kv_types, extra)
        new_cache = cache.replace(ks, vs)
    if last_idx is not None:
        x = gather_last(x, last_idx)
    output = model.output
    if host is not None and output is not None:  # -ngl 0: the output layer streams too
        output = host.fetch_output(output)
    x = tap("result_norm", model.out_norm(x))
    if hidden:
        return x, new_cache
    logits = model.tok_embd.attend(x) if output is None else output(x)
    return logits, new_cache


def block_of(model: nnx.Module, layer: int):
    """The block of decoder layer ``layer`` (its static attributes): under a partial offload
    the first layers are ``model.host_layers`` (models/offload.py), the rest ``model.blocks``."""
    host = getattr(model, "host_layers", None)
    if host is None:
        return model.blocks[layer]
    return host.template(layer) if layer < host.n else model.blocks[layer - host.n]


def _block_runner(bidir: bool = False):
    """``_run_block``'s runner for one forward pass: the shared trace, or None (taps, or the
    rare non-causal pass, which calls the blocks directly with ``bidir``)."""
    num = numerics.current()
    return (_shared_block_runner() if num.share_block_traces and not num.taps and not bidir
            else None)


def _run_block(run, blk, i: int, x, pos, pos0, kc, vc, kv_len: int, kv_types,
               extra: dict | None = None):
    """Block i on its own, through the shared trace ``run`` unless None (``extra``: keyword
    arguments only the direct call passes, e.g. ``bidir``)."""
    global _TAP_LAYER
    with jax.named_scope(f"blk{i}"):
        if run is None:
            _TAP_LAYER = i
            return blk(x, pos, pos0, kc, vc, kv_len, kv_types, **(extra or {}))
        gd, st = nnx.split(blk)
        return run(gd, st, x, pos, pos0, kc, vc, kv_len, kv_types)


def _is_qt(v) -> bool:
    return isinstance(v, QTensor)


# float weights a loop body may take as stacked copies (per layer): routers and gate vectors of
# MoE blocks (128 experts x 2048 x f32 = 1 MiB); stacking happens every step, so big float
# weights (an F16 model's matrices) leave their block unscanned instead
SMALL_FLOAT_BYTES = 2 << 20


def _scan_signature(blk) -> tuple | None:
    """What must agree between layers for them to share one loop body: the graphdef, the
    state's structure, and per leaf its shape (dtype for arrays; layout and activation format
    for quantized weights, whose ggml types may differ). None where the block cannot be
    scanned: a weight the int8 CPU kernels do not take (they read a traced layer's weight in
    place; anything else would copy it every step), or a big float weight."""
    gd, st = nnx.split(blk)
    leaves, tdef = jax.tree.flatten(st, is_leaf=_is_qt)
    sig = []
    for v in leaves:
        if isinstance(v, QTensor) and v.is_float:
            if v.layout != "gguf" or v.nbytes > SMALL_FLOAT_BYTES:
                return None
            sig.append(("f", v.shape, v.qtype))
        elif isinstance(v, QTensor):
            if not in_place_ok(v):
                return None
            sig.append(("q", v.shape, v.layout, act_format(v.qtype)))
        else:
            sig.append(("a", tuple(v.shape), str(v.dtype)))
    return gd, tdef, tuple(sig)


def in_place_ok(qt: QTensor) -> bool:
    """Whether every product with ``qt`` goes through the int8 kernels, which take a
    ``LayerStack`` (of layers, of stacked experts): ggml's arithmetic for all row counts
    (prompt_matmul "int8")."""
    num = numerics.current()
    return (num.match_llamacpp and num.prompt_matmul == "int8" and jax.default_backend() == "cpu"
            and not qt.is_float and qt.layout == "gguf" and len(qt.shape) in (2, 3)
            and xla_cpu.q8_on(qt.qtype) and act_format(qt.qtype) is not None)


def layer_runs(blocks: list) -> list[tuple[int, int]]:
    """Consecutive layers [a, b) that one loop body runs: equal scan signatures, and no LoRA
    adapters (per-layer Python objects). Unscannable layers are runs of one."""
    return _runs([_scan_signature(b) for b in blocks])


def _runs(sigs: list) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, sig in enumerate(sigs):
        if runs and sig is not None and sigs[runs[-1][0]] == sig:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


# the longest repeating pattern of layer kinds looked for: Gemma 2 alternates local and global
# layers (2), Gemma 3 has five local then one global (6), some hybrids repeat every 4 or 8
MAX_PERIOD = 8


def layer_plan(blocks: list, signature=None) -> list[tuple[int, int, int]]:
    """How ``scan_blocks`` loops over the layers: groups (a, p, k), layers [a, a + p*k) being a
    pattern of p layers repeated k times (layer a + r*p + j alike layer a + j). The loop runs
    over the k repeats; inside it the pattern's runs of alike layers (``layer_runs`` of the
    first repeat) each run as one block or an inner loop. So a model whose layer kinds repeat
    (Gemma 3: five sliding-window layers, one global) holds one copy of each kind's block
    whatever its depth, and a uniform stack is (0, 1, n). Unscannable layers are (i, 1, 1).
    ``signature``: what must agree between alike layers (default ``_scan_signature``; the
    host layers of a partial offload stack every weight, models/offload.py)."""
    sigs = [(signature or _scan_signature)(b) for b in blocks]
    n = len(sigs)
    plan: list[tuple[int, int, int]] = []
    i = 0
    while i < n:
        best = (1, 1)  # (p, k): covers p * k layers
        for p in range(1, min(MAX_PERIOD, n - i) + 1):
            if any(s is None for s in sigs[i:i + p]):
                break
            k = 1
            while i + (k + 1) * p <= n and sigs[i + k * p:i + (k + 1) * p] == sigs[i:i + p]:
                k += 1
            if (k > 1 or p == 1) and p * k > best[0] * best[1]:
                best = (p, k)
        plan.append((i, *best))
        i += best[0] * best[1]
    return plan


def _has_lora(blk) -> bool:
    return any(getattr(m, "lora", None) is not None for _, m in nnx.iter_graph(blk)
               if isinstance(m, nnx.Module))


def scan_blocks(blocks: list, x: jax.Array, pos, pos0, kf: jax.Array, vf: jax.Array,
                kv_len: int, kv_types, extra: dict | None = None, first: int = 0):
    """The blocks over a stacked cache (k and v [B, L, KVH, S, row]): each group of
    ``layer_plan`` as one ``lax.scan`` over its repeats (an inner scan for a run of alike
    layers inside the repeated pattern), so the program holds one copy of each kind of block,
    not one per layer (compile time, executable size and its load do not grow with depth). In
    the loop body quantized weights are ``LayerStack``s (every layer's buffers, read in place
    by the int8 kernels at the traced index), small per-layer arrays (norms, biases) are sliced
    from their stack, and the cache is a ``LayerCache`` written in place. The block code is the
    same as unrolled and computes the same bits. With numerics taps (named per layer) or LoRA
    adapters every layer runs on its own. ``first``: the cache layer of ``blocks[0]`` (the
    layers before it were run from host memory, models/offload.py)."""
    num = numerics.current()
    if num.scan_layers and not num.taps and not any(_has_lora(b) for b in blocks):
        plan = layer_plan(blocks)
    else:
        plan = [(i, 1, 1) for i in range(len(blocks))]
    extra = extra or {}
    run = _block_runner(bool(extra))
    for a, p, k in plan:
        if p == 1 and k == 1:
            x, kc, vc = _run_block(run, blocks[a], first + a, x, pos, pos0,
                                   LayerCache(kf, first + a), LayerCache(vf, first + a),
                                   kv_len, kv_types, extra)
            kf, vf = kc.full, vc.full
            continue
        # the pattern's runs [j0, j1): alike layers inside one repeat (one inner loop body)
        inner = _runs([_scan_signature(b) for b in blocks[a:a + p]])
        parts, small = [], []
        for j0, j1 in inner:
            m = j1 - j0
            # weights in repeat-major order: layer a + r*p + j0 + jj is entry r*m + jj
            layers = [blocks[a + r * p + j] for r in range(k) for j in range(j0, j1)]
            gd, tdef, qcols, sm = _stack_layers(layers)
            parts.append((j0, m, gd, tdef, qcols, len(sm) + len(qcols[0])))
            small.append([s.reshape(k, m, *s.shape[1:]) for s in sm])

        def body(carry, xs, a=a, p=p, parts=parts):
            x, kf, vf = carry
            r, sm_r = xs  # r: this repeat; sm_r[part]: its small arrays [m, ...]
            for (j0, m, gd, tdef, qcols, n), sm in zip(parts, sm_r):
                if m == 1:
                    x, kf, vf = _scanned_block(gd, tdef, qcols, n, r, [s[0] for s in sm],
                                               first + a + r * p + j0, x, kf, vf, pos, pos0,
                                               kv_len,
                                               kv_types, extra)
                    continue

                def inner_body(c, ys, gd=gd, tdef=tdef, qcols=qcols, n=n, m=m, j0=j0):
                    jj, sm_j = ys
                    return _scanned_block(gd, tdef, qcols, n, r * m + jj, sm_j,
                                          first + a + r * p + j0 + jj, *c, pos, pos0,
                                          kv_len,
                                          kv_types, extra), None

                (x, kf, vf), _ = jax.lax.scan(inner_body, (x, kf, vf),
                                              (jnp.arange(m, dtype=jnp.int32), sm))
            return (x, kf, vf), None

        with jax.named_scope(f"blk{first + a}-{first + a + p * k - 1}"):
            (x, kf, vf), _ = jax.lax.scan(body, (x, kf, vf),
                                          (jnp.arange(k, dtype=jnp.int32), small))
    return x, kf, vf


def _stack_layers(layers: list):
    """Alike blocks' state as loop inputs: per quantized leaf the tuple of every layer's
    QTensor (a ``LayerStack`` reads it in place), the other leaves (small float weights'
    data among them) stacked along a new axis."""
    gd, tdef, per_layer = None, None, []
    for blk in layers:
        gd, st = nnx.split(blk)
        leaves, tdef = jax.tree.flatten(st, is_leaf=_is_qt)
        per_layer.append(leaves)
    cols = list(zip(*per_layer))  # per leaf: its value in each layer
    qcols = {j: c for j, c in enumerate(cols) if isinstance(c[0], QTensor) and not c[0].is_float}
    fmeta = {j: (c[0].qtype, c[0].shape, c[0].layout) for j, c in enumerate(cols)
             if isinstance(c[0], QTensor) and c[0].is_float}
    small = [jnp.stack([v.data for v in c] if j in fmeta else c) for j, c in enumerate(cols)
             if j not in qcols]
    return gd, tdef, (qcols, fmeta), small


def _scanned_block(gd, tdef, cols: tuple, n: int, iw, sm, il, x, kf, vf, pos, pos0,
                   kv_len: int, kv_types, extra: dict):
    """One block inside a loop: its quantized weights entry ``iw`` of their stacks, small
    leaves ``sm`` (already sliced), its cache layer ``il`` (both traced)."""
    qcols, fmeta = cols
    it = iter(sm)
    leaves = [LayerStack(tuple(qcols[j]), iw) if j in qcols
              else QTensor(next(it), *fmeta[j]) if j in fmeta else next(it) for j in range(n)]
    blk = nnx.merge(gd, jax.tree.unflatten(tdef, leaves))
    x, kc, vc = blk(x, pos, pos0, LayerCache(kf, il), LayerCache(vf, il), kv_len, kv_types,
                    **extra)
    return x, kc.full, vc.full


def _shared_block_runner():
    """Trace each distinct decoder block once per forward pass instead of once per layer:
    blocks with equal graphdefs (same static attributes, same weight types) go through one
    nested jit, so SmolLM2's 30 layers are traced and lowered as one function called 30 times
    (XLA inlines the calls before optimising, so the compiled program and its numerics are
    those of the unrolled loop). Off while numerics taps record (they name tensors per layer).

    A fresh nested jit per outer trace: its trace cache lives exactly as long as that trace,
    so it always sees the numerics of the model being traced."""

    def run(gd, st, x, pos, pos0, kc, vc, kv_len, kv_types):
        return nnx.merge(gd, st)(x, pos, pos0, kc, vc, kv_len, kv_types)

    return jax.jit(run, static_argnums=(0, 7, 8))
