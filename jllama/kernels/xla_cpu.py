"""Quantized ``x @ W.T`` for XLA:CPU.

With the C++ kernels (``cpu_ffi``, the default where a compiler exists), weights stay in GGUF
blocks: up to 16 x rows (decode) run the fused decode+dot kernel in one pass over W; more rows
(prefill) dequantize a cache-sized row tile with the C++ decoder and hand it to XLA's f32 GEMM.

The pure-XLA path (no compiler, or ``JLLAMA_NO_FFI=1``) dequantizes one cache-sized row tile at a
time and runs an f32 dot. Why this shape (figures in experiments/results/design_measurements.md):
- A dot whose weight operand is converted in the same fusion becomes a naive loop, far slower
  than the f32 dot, and so does any reduce-fusion formulation (sum of code * x).
- Dequantizing a tile of rows into an f32 buffer, fenced by ``optimization_barrier`` so XLA
  cannot fuse the convert into the dot, then running the f32 dot (Eigen) on it inside a
  ``lax.scan``, reads int8 codes near memory speed for matvec and keeps most of the f32 GEMM's
  speed for prompts. Unpacking nibbles in the tile costs far more, hence weights are
  repacked once at load to int8 codes (``cpu_repack``). Unprepared (raw GGUF) weights still work:
  each tile is repacked in-graph, correct but slower.
- The f32 copy of the weight is never materialised: only one tile lives at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jllama import numerics
from jllama.kernels import cpu_ffi, cpu_repack
from jllama.kernels.cpu_repack import Repacked
from jllama.quant.actquant import act_format, quantize_activations_q8

# Elements per tile: ~2 MiB of f32 for matvec (bandwidth-bound: big tiles amortise the per-step
# cost), ~0.5 MiB for GEMM (compute-bound: the tile must stay in L2 while all x rows stream).
_MATVEC_TILE_ELEMS = 1 << 19
_GEMM_TILE_ELEMS = 1 << 17
_GEMM_ROWS = 16
# Up to this many x rows the C++ kernel (one pass over W per 8 rows) beats dequantize + GEMM.
_FFI_MATVEC_ROWS = 16


def ffi_on() -> bool:
    """Whether the C++ kernels are in use: wanted by the current numerics and built here."""
    return numerics.current().cpu_kernels and cpu_ffi.available()


def q8_on(qtype: int) -> bool:
    """Whether the int8-activation kernel (ggml's vec_dot) is in use for this weight type."""
    num = numerics.current()
    return num.cpu_kernels and num.q8_kernels and cpu_ffi.q8_supported(qtype)


def supported(qtype: int) -> bool:
    """Types this module speeds up here: the XLA repack types, plus the C++-only ones when the
    C++ kernels are in use."""
    return cpu_repack.supported(qtype) or (cpu_ffi.supported(qtype) and ffi_on())


def tile_rows(n_out: int, n_in: int, m: int) -> int:
    """Rows of W per scan step: a multiple of 8, no more than ``n_out``."""
    elems = _GEMM_TILE_ELEMS if m > _GEMM_ROWS else _MATVEC_TILE_ELEMS
    t = max(8, (elems // max(n_in, 1)) // 8 * 8)
    return min(t, n_out)


def _parts(qt) -> tuple:
    """The arrays a tile is cut from: repacked (codes, scales[, mins]) or the raw rows."""
    if qt.layout == "i8":
        return tuple(a for a in qt.data if a is not None)
    return (qt.data,)


def _tile_weights(qt, parts: tuple) -> jax.Array:
    lay = cpu_repack.LAYOUTS[int(qt.qtype)]
    if qt.layout == "i8":
        r = Repacked(parts[0], parts[1], parts[2] if lay.has_min else None)
    else:
        r = cpu_repack.repack(jnp, parts[0], qt.qtype, qt.shape[-1])
    return cpu_repack.dequantize_repacked(jnp, r, lay.group)


def q8_ok(x: jax.Array, qt) -> bool:
    """Whether ``linear`` takes the int8 kernel for x (GGUF blocks of a q8 type here)."""
    # prompt_matmul "int8": ggml's own arithmetic for every row count, prompts included, so
    # every product is bit-identical to llama.cpp's whatever the chunking; "f32": decode-sized
    # calls only, prompts through dequantized tiles and XLA's f32 GEMM
    return (qt.layout == "gguf" and len(qt.shape) == 2 and q8_on(qt.qtype)
            and (numerics.current().prompt_matmul == "int8" or rows(x) <= _FFI_MATVEC_ROWS))


def rows(x: jax.Array) -> int:
    """Rows of x once its leading axes are folded together."""
    m = 1
    for n in x.shape[:-1]:
        m *= n
    return m


def ffi_matvec_ok(x: jax.Array, qt) -> bool:
    """Whether ``qmatmul(x, qt)`` would take the C++ matvec (few rows, GGUF blocks)."""
    return (qt.layout == "gguf" and len(qt.shape) == 2 and rows(x) <= _FFI_MATVEC_ROWS
            and cpu_ffi.supported(qt.qtype) and ffi_on())


def ffi_matvec_xs(x: jax.Array, qt, xs: jax.Array) -> jax.Array:
    """The C++ matvec given per-32 block sums ``xs[..., n_in / 32]`` for the weight mins."""
    n_out, n_in = qt.shape
    lead = x.shape[:-1]
    y = cpu_ffi.qmatvec_xs(x.reshape(-1, n_in), xs.reshape(-1, n_in // 32), qt.natural().data,
                           qt.qtype)
    return y.reshape(*lead, n_out)


def _quantize_q8(x: jax.Array, qtype: int):
    """x's rows in ggml's vec_dot activation format: the C quantizer (exactly ggml's rounding),
    or the XLA one where the format is unknown to it."""
    fmt = act_format(qtype)
    n_in = x.shape[-1]
    if fmt is None or n_in % (256 if fmt == "q8_K" else 32):
        return quantize_activations_q8(x, qtype)
    return cpu_ffi.quantize_q8(x.reshape(-1, n_in), fmt)


def _fused(x: jax.Array, qts: list) -> list[jax.Array] | None:
    """Quantization and product in one kernel call for a few rows: a decode step has ~120
    separate quantize calls otherwise. Prompts keep the separate, multi-threaded quantizer."""
    n_in = x.shape[-1]
    fmt = act_format(qts[0].qtype)
    if rows(x) > numerics.current().fused_quant_rows or fmt is None or n_in % (256 if fmt == "q8_K" else 32):
        return None
    lead = x.shape[:-1]
    ys = cpu_ffi.qmatvec_q8_fused(x.reshape(-1, n_in), list(qts),
                                  [qt.qtype for qt in qts])
    return None if ys is None else [y.reshape(*lead, qt.shape[0]) for y, qt in zip(ys, qts)]


def ffi_matvec_q8(x: jax.Array, qt) -> jax.Array | None:
    """The int8 C++ matvec on x quantized to ggml's vec_dot type, bit-identical to llama.cpp's
    CPU product (see cpu/q8.h); None where this type or machine has no such kernel."""
    if not q8_on(qt.qtype):
        return None
    fused = _fused(x, [qt])
    if fused is not None:
        return fused[0]
    parts = _quantize_q8(x, qt.qtype)
    if parts is None:
        return None
    q, d, s = parts
    n_out, n_in = qt.shape
    lead = x.shape[:-1]
    y = cpu_ffi.qmatvec_q8(
        q.reshape(-1, n_in), d.reshape(-1, d.shape[-1]),
        None if s is None else s.reshape(-1, s.shape[-1]), qt, qt.qtype,
    )
    return y.reshape(*lead, n_out)


def ffi_matvec_q8_multi(x: jax.Array, qts: list) -> list[jax.Array] | None:
    """``ffi_matvec_q8`` for several weights whose types take the same activation format, in one
    kernel call; None when they do not, or without the kernel."""
    if len({act_format(qt.qtype) for qt in qts}) != 1 or len({qt.shape[1] for qt in qts}) != 1:
        return None
    if not all(q8_on(qt.qtype) for qt in qts):
        return None
    fused = _fused(x, qts)
    if fused is not None:
        return fused
    parts = _quantize_q8(x, qts[0].qtype)
    if parts is None:
        return None
    q, d, s = parts
    n_in = qts[0].shape[1]
    lead = x.shape[:-1]
    ys = cpu_ffi.qmatvec_q8_multi(
        q.reshape(-1, n_in), d.reshape(-1, d.shape[-1]),
        None if s is None else s.reshape(-1, s.shape[-1]), list(qts),
        [qt.qtype for qt in qts],
    )
    if ys is None:
        return None
    return [y.reshape(*lead, qt.shape[0]) for y, qt in zip(ys, qts)]


def ffi_matmul_id(x: jax.Array, rows_: jax.Array, counts: jax.Array,
                  qts: list) -> list[jax.Array] | None:
    """ggml's ``mul_mat_id`` on the int8 kernels: the rows ``x[rows_]``, grouped by expert as
    ``counts`` says, against stacked experts ``qts`` (3-D GGUF-block QTensors or ``LayerStack``s
    of them, one activation format); None where the kernels or the format do not allow it."""
    if len({act_format(qt.qtype) for qt in qts}) != 1 or act_format(qts[0].qtype) is None:
        return None
    if not all(q8_on(qt.qtype) and qt.layout == "gguf" and len(qt.shape) == 3 for qt in qts):
        return None
    n_in = x.shape[-1]
    if n_in % (256 if act_format(qts[0].qtype) == "q8_K" else 32):
        return None
    return cpu_ffi.qmatmul_id(x.reshape(-1, n_in), rows_, counts, list(qts),
                              [qt.qtype for qt in qts])


def qmatmul(x: jax.Array, qt) -> jax.Array:
    """``x[..., n_in] @ W.T -> [..., n_out]`` in f32, W a 2-D quantized QTensor."""
    qt = qt.natural()  # the f32 paths take GGUF rows in their usual shape
    n_out, n_in = qt.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in).astype(jnp.float32)
    m = x2.shape[0]
    use_ffi = qt.layout == "gguf" and cpu_ffi.supported(qt.qtype) and ffi_on()
    if use_ffi and m <= _FFI_MATVEC_ROWS:
        return cpu_ffi.qmatvec(x2, qt.data, qt.qtype).reshape(*lead, n_out)
    t = tile_rows(n_out, n_in, m)
    parts = _parts(qt)

    def tile(p: tuple) -> jax.Array:
        if use_ffi:  # an opaque custom call: nothing to keep XLA from fusing
            w = cpu_ffi.dequant_rows(p[0], qt.qtype, n_in)
        else:
            w = jax.lax.optimization_barrier(_tile_weights(qt, p))
        return x2 @ w.T  # [m, rows]

    n_full = n_out // t
    outs = []
    if n_full == 1:
        outs.append(tile(tuple(a[:t] for a in parts)))
    elif n_full > 1:
        stacked = tuple(a[: n_full * t].reshape(n_full, t, *a.shape[1:]) for a in parts)
        _, ys = jax.lax.scan(lambda c, p: (c, tile(p)), None, stacked)  # [n_full, m, t]
        outs.append(jnp.swapaxes(ys, 0, 1).reshape(m, n_full * t))
    if n_full * t < n_out:
        outs.append(tile(tuple(a[n_full * t :] for a in parts)))
    y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
    return y.reshape(*lead, n_out)
