"""The C++ CPU kernels (``cpu/``) behind XLA's FFI, compiled at first use.

Why at first use, not at install: the package is pure Python (setuptools, no build step), and
``-march=native`` must see the machine that runs it. All of ``cpu/*.cc`` are compiled, each
with its own flags (``UNITS``), and linked into one shared library, cached under
``$JLLAMA_CACHE`` (default ``~/.cache/jllama``)/kernels and keyed by every source and header in
``cpu/``, the flags, the jax version and the CPU's feature flags, so it compiles once per
machine. If there is no compiler, or the build fails, ``available()`` is False and callers use
the pure-XLA path instead (``Numerics.cpu_kernels`` is the callers' to check).

The library holds the matvec kernels (registered here) and ggml's flash attention (registered
by ``cpu_attention``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jllama import numerics
from jllama.quant.formats import iq_grid
from jllama.quant.iqgrids import grid as iq8_grid
from jllama.quant.qtensor import LayerStack, QTensor, gguf_data_shape

log = logging.getLogger(__name__)

CPU_DIR = Path(__file__).with_name("cpu")
# The matvec kernels' flags. Reassociation lets the compiler vectorise the f32 dot reductions
# (no NaN/Inf assumptions); the int8 kernels and the activation quantizer, whose f32 steps must
# be ggml's, turn it and contraction off again with ``#pragma GCC optimize``.
MATVEC_FLAGS = [
    "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
    "-ffp-contract=fast", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math",
]  # fmt: skip
# Flash attention: every rounding step is ggml's, so no reassociation and no contraction at
# all (each FMA in the source is explicit).
ATTENTION_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   "-ffp-contract=off"]
# Each translation unit with its flags: these flags are part of the numerics, per file.
UNITS = {
    "threadpool.cc": MATVEC_FLAGS,  # no float arithmetic: either set would do
    "vec_dot.cc": MATVEC_FLAGS,
    "gemm.cc": MATVEC_FLAGS,
    "actquant.cc": MATVEC_FLAGS,
    "ffi_qmatvec.cc": MATVEC_FLAGS,
    "attention.cc": ATTENTION_FLAGS,
    "ggml_f32.cc": ATTENTION_FLAGS,  # explicit fmaf only: every other product rounded first
}
# Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS
QTYPES = frozenset({2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23})
_TARGETS = {"jllama_qmatvec": "JllamaQMatVec", "jllama_qmatvec_xs": "JllamaQMatVecXs",
            "jllama_dequant": "JllamaDequant", "jllama_cos_sin": "JllamaCosSin"}
# The int8-activation kernels (ggml's vec_dot, bit-exact) exist where the build machine has
# AVX2 + FMA + F16C (VNNI, where present, only speeds up their integer dots).
# Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K, IQ3_XXS IQ3_S TQ1_0 TQ2_0 MXFP4 NVFP4,
# IQ2_XXS IQ2_XS IQ2_S IQ1_S IQ1_M, IQ4_NL IQ4_XS, Q1_0 Q2_0
Q8_QTYPES = frozenset({2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 18, 21, 34, 35, 39, 40, 16, 17, 22, 19,
                       29, 20, 23, 41, 42})
# q8: quantized x (q, d, s), any number of weights sharing it (q/k/v, gate/up: one call);
# q8f: f32 x, quantized inside the call (decode); quantize_q8: the activation quantizer.
_Q8_TARGETS = {"jllama_qmatvec_q8": "JllamaQMatVecQ8",
               "jllama_qmatvec_q8f": "JllamaQMatVecQ8F",
               "jllama_quantize_q8": "JllamaQuantizeQ8",
               "jllama_qmatmul_id": "JllamaQMatMulId"}
_q8_registered = False
_lib: ctypes.CDLL | None = None


def _cpu_key() -> str:
    try:
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
            "",
        )
    except OSError:
        flags = ""
    return flags + platform.machine()


@functools.cache
def ggml_simd() -> str:
    """The x86 SIMD branch of ggml-cpu that a ``-march=native`` build on this machine compiles,
    where ggml's float arithmetic depends on it (vector width, expf/silu, flash attention's dots
    and sums): ``"avx512"`` (AVX-512F + DQ), ``"avx2"`` (AVX2 + FMA), ``""`` otherwise (neither
    is reproduced; callers keep the AVX-512 forms)."""
    flags = set(_cpu_key().split())
    if {"avx512f", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return ""


def _key() -> str:
    """The cache key: every source and header of ``cpu/`` (name and bytes), each unit's flags,
    the jax version (its FFI headers) and the CPU."""
    h = hashlib.sha256()
    for p in sorted(CPU_DIR.iterdir()):
        if p.suffix in (".cc", ".h"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for unit, flags in UNITS.items():
        h.update(unit.encode() + b"\0" + " ".join(flags).encode() + b"\0")
    h.update(jax.__version__.encode() + b"\0" + _cpu_key().encode())
    return h.hexdigest()[:16]


def _build(compiler: str) -> Path:
    """Compile every unit with its flags (in parallel) and link them into the cached library.
    One builder at a time per cache (a file lock): test workers and servers started together
    would otherwise each compile everything, on the same cores."""
    cache = Path(os.environ.get("JLLAMA_CACHE", Path.home() / ".cache" / "jllama")) / "kernels"
    lib = cache / f"jllama_cpu-{_key()}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): concurrent builders race harmlessly
            pass
        if lib.exists():  # built by whoever held the lock before us
            return lib
        with tempfile.TemporaryDirectory(dir=cache) as tmp:

            def compile_unit(unit: str) -> str:
                obj = str(Path(tmp) / (Path(unit).stem + ".o"))
                cmd = [compiler, *UNITS[unit], "-c", "-I", jax.ffi.include_dir(),
                       str(CPU_DIR / unit), "-o", obj]
                # vec_dot.cc alone takes ~2 min on a busy 2-core machine
                subprocess.run(cmd, check=True, capture_output=True, timeout=1200)
                return obj

            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                objs = list(pool.map(compile_unit, UNITS))
            out = str(Path(tmp) / "lib.so")
            subprocess.run([compiler, "-shared", "-fPIC", *objs, "-o", out], check=True,
                           capture_output=True, timeout=300)
            os.replace(out, lib)  # atomic: readers never see a partial file
    return lib


def _set_iq3_grids(lib: ctypes.CDLL) -> None:
    """Hand the int8 IQ3/IQ2/IQ1 kernels ggml's grids, from gguf-py's tables."""
    grids = [np.ascontiguousarray(iq_grid(n).astype(np.uint8)).view("<u4").reshape(-1)
             for n in ("IQ3_XXS", "IQ3_S")]  # fmt: skip
    lib.JllamaSetIQ3Grids.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.JllamaSetIQ3Grids.restype = None
    lib.JllamaSetIQ3Grids(grids[0].ctypes.data, grids[1].ctypes.data)
    # IQ2/IQ1 (8 bytes a point; IQ1's as int8 -1/0/1)
    grids8 = [np.ascontiguousarray(iq8_grid(n)).view(np.uint8).view("<u8").reshape(-1)
              for n in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S")]  # fmt: skip
    lib.JllamaSetIQ2Grids.argtypes = [ctypes.c_void_p] * 4
    lib.JllamaSetIQ2Grids.restype = None
    lib.JllamaSetIQ2Grids(*(g.ctypes.data for g in grids8))


@functools.cache
def available() -> bool:
    """Compile (once), load and register the kernels; False if that is not possible here."""
    global _lib, _q8_registered
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None or not CPU_DIR.is_dir():
        log.warning("jllama: no C++ compiler or kernel source; CPU qmatmul uses the XLA path")
        return False
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
        if hasattr(lib, _Q8_TARGETS["jllama_qmatvec_q8"]):
            _set_iq3_grids(lib)
            for target, symbol in _Q8_TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
            _q8_registered = True
        _lib = lib
    except Exception as e:  # any failure here means "use the XLA path", never a crash
        detail = getattr(e, "stderr", b"") or b""
        log.warning("jllama: C++ CPU kernels unavailable (%s %s); using the XLA path", e,
                    detail.decode(errors="replace")[-2000:])  # fmt: skip
        return False
    return True


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built at the first call), or None where ``available()`` is
    False; other kernel modules (cpu_attention) register their targets from it."""
    return _lib if available() else None


def supported(qtype: int) -> bool:
    return int(qtype) in QTYPES


def q8_supported(qtype: int) -> bool:
    """Whether ``qmatvec_q8`` (int8 activations, ggml's vec_dot) exists for this type here."""
    return int(qtype) in Q8_QTYPES and available() and _q8_registered


def qmatvec(x2: jax.Array, raw: jax.Array, qtype: int) -> jax.Array:
    """``x2[m, k] @ W.T`` for raw GGUF rows ``raw[n, row_bytes]``: f32 ``[m, n]``."""
    out = jax.ShapeDtypeStruct((x2.shape[0], raw.shape[0]), jnp.float32)
    # Under vmap (rare: qmatmul already folds leading axes into rows) fall back to a loop.
    return jax.ffi.ffi_call("jllama_qmatvec", out, vmap_method="sequential")(
        x2.astype(jnp.float32), raw, qtype=np.int64(qtype)
    )


def qmatvec_xs(x2: jax.Array, xs: jax.Array, raw: jax.Array, qtype: int) -> jax.Array:
    """``qmatvec`` with the caller's per-32 sums of x for the weight mins (Q4_1/Q5_1: ggml's
    Q8_1 block sums), so the llama.cpp-exact min term needs no second pass over W in XLA."""
    out = jax.ShapeDtypeStruct((x2.shape[0], raw.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("jllama_qmatvec_xs", out, vmap_method="sequential")(
        x2.astype(jnp.float32), xs.astype(jnp.float32), raw, qtype=np.int64(qtype)
    )


def _tiled(tiled: bool | None) -> bool:
    """ggml's GGML_CPU_TILED_MM switch for an int8 call: given, or the current numerics'."""
    return numerics.current().ggml_tiled_mm if tiled is None else bool(tiled)


def _weight_meta(w) -> list[int]:
    """(byte offset, experts or 0, rows, row bytes) of one weight operand: a raw GGUF-row
    array [n, row_bytes] / [n_expert, n, row_bytes], or a QTensor in layout "gguf" (whose flat
    ``data`` may start ``offset`` bytes before the tensor: QTensor's module doc)."""
    if isinstance(w, QTensor):
        off, shape = w.offset, gguf_data_shape(w.qtype, w.shape)
    else:
        off, shape = 0, tuple(w.shape)
    if len(shape) == 2:
        return [int(off), 0, int(shape[0]), int(shape[1])]
    if len(shape) == 3:
        return [int(off), int(shape[0]), int(shape[1]), int(shape[2])]
    raise ValueError(f"an int8 call's weights are 2-D or 3-D, not {shape}")


def _weight_operands(raws: list, qtypes: list[int]) -> tuple[list, list[int], int, list[int]]:
    """(operands, qtypes, layers, meta) of an int8 call: the weights as they are (layers 0),
    or for weights given as ``LayerStack``s (all of them, then) the index (layer, expert)
    followed by every layer's rows, weight by weight; the kernel reads the indexed layer's in
    place, and of stacked experts [n_expert, n, row_bytes] the indexed expert's rows. A weight
    is a raw GGUF-row array or a QTensor; ``meta`` has ``_weight_meta``'s four numbers per
    weight operand."""
    if not any(isinstance(r, LayerStack) for r in raws):
        ws = list(raws)
        return ([w.data if isinstance(w, QTensor) else w for w in ws], list(qtypes), 0,
                [v for w in ws for v in _weight_meta(w)])
    n = len(raws[0].parts)
    if not all(isinstance(r, LayerStack) and len(r.parts) == n for r in raws):
        raise ValueError("an int8 call's weights are all LayerStacks of one length, or none")
    experts = {id(r.expert) for r in raws if r.expert is not None}
    if len(experts) > 1:
        raise ValueError("an int8 call's stacked experts share one expert index")
    ex = next((r.expert for r in raws if r.expert is not None), -1)
    ops = [jnp.stack([jnp.asarray(raws[0].index, jnp.int32).reshape(()),
                      jnp.asarray(ex, jnp.int32).reshape(())])]
    parts = [p for r in raws for p in r.parts]
    ops += [p.data for p in parts]
    return ops, [t for r in raws for t in r.qtypes], n, [v for p in parts for v in _weight_meta(p)]


def _q8_call(q: jax.Array, d: jax.Array, s: jax.Array | None, raws: list, qtypes: list[int],
             tiled: bool | None) -> list[jax.Array]:
    m = q.shape[0]
    if s is None:
        s = jnp.zeros((m, 0), jnp.float32)
    outs = tuple(jax.ShapeDtypeStruct((m, r.shape[0]), jnp.float32) for r in raws)
    ops, qtypes, layers, meta = _weight_operands(raws, qtypes)
    ys = jax.ffi.ffi_call("jllama_qmatvec_q8", outs, vmap_method="sequential")(
        q.astype(jnp.int8), d.astype(jnp.float32), s.astype(jnp.float32), *ops,
        qtypes=np.asarray(qtypes, np.int64), tiled=_tiled(tiled), layers=np.int64(layers),
        wmeta=np.asarray(meta, np.int64))
    return list(ys)


def qmatvec_q8(
    q: jax.Array, d: jax.Array, s: jax.Array | None, raw: jax.Array, qtype: int,
    tiled: bool | None = None,
) -> jax.Array:
    """``x @ W.T`` with x given as ggml's quantized activations: int8 codes ``q[m, k]``, block
    scales ``d[m, k / block]`` (f32), Q8_1 block sums ``s[m, k / 32]`` (Q4_1/Q5_1 only), against
    raw GGUF rows ``raw[n, row_bytes]``: f32 ``[m, n]``, bit-identical to ggml's CPU mul_mat.
    ``tiled``: ggml's tiled K-quant order from 8 rows (GGML_CPU_TILED_MM); None takes
    ``numerics.current().ggml_tiled_mm``."""
    if not q8_supported(qtype):
        raise ValueError(f"no int8 CPU kernel for ggml type {qtype} on this machine")
    return _q8_call(q, d, s, [raw], [qtype], tiled)[0]


_ACT_FMT = {"q8_0": 0, "q8_1": 1, "q8_K": 2}


def quantize_q8(x2: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """ggml's quantize_row_q8_{0,1,K} on the rows of ``x2[m, k]`` (C, not XLA: see
    cpu/actquant.cc): int8 codes [m, k], block scales [m, k / bs] (the stored f16 value for
    Q8_0/Q8_1, f32 for Q8_K), Q8_1 block sums [m, k / 32] (else None), as f32."""
    m, k = x2.shape
    f = _ACT_FMT[fmt]
    nb = k // (256 if f == 2 else 32)
    outs = (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m, nb), jnp.float32),
            jax.ShapeDtypeStruct((m, k // 32 if f == 1 else 0), jnp.float32))
    q, d, s = jax.ffi.ffi_call("jllama_quantize_q8", outs, vmap_method="sequential")(
        x2.astype(jnp.float32), fmt=np.int64(f))
    return q, d, (s if f == 1 else None)


def qmatvec_q8_multi(q: jax.Array, d: jax.Array, s: jax.Array | None, raws: list,
                     qtypes: list[int], tiled: bool | None = None) -> list[jax.Array] | None:
    """``qmatvec_q8`` for any number of weights on the same activations in one kernel call (one
    thread hand-off instead of one per weight); None where the int8 kernels are missing."""
    if not all(q8_supported(t) for t in qtypes):
        return None
    return _q8_call(q, d, s, raws, qtypes, tiled)


def qmatvec_q8_fused(x2: jax.Array, raws: list, qtypes: list[int],
                     tiled: bool | None = None) -> list[jax.Array] | None:
    """``x2[m, k] @ W.T`` for weights whose types share an activation format, x quantized
    inside the call (``quantize_q8``'s code, so the same bits); None where it is missing.
    ``tiled`` as in ``qmatvec_q8``."""
    if not all(q8_supported(t) for t in qtypes):
        return None
    m = x2.shape[0]
    outs = tuple(jax.ShapeDtypeStruct((m, r.shape[0]), jnp.float32) for r in raws)
    ops, qtypes, layers, meta = _weight_operands(raws, qtypes)
    ys = jax.ffi.ffi_call("jllama_qmatvec_q8f", outs, vmap_method="sequential")(
        x2.astype(jnp.float32), *ops, qtypes=np.asarray(qtypes, np.int64), tiled=_tiled(tiled),
        layers=np.int64(layers), wmeta=np.asarray(meta, np.int64))
    return list(ys)


def qmatmul_id(x2: jax.Array, rows: jax.Array, counts: jax.Array, raws: list,
               qtypes: list[int], tiled: bool | None = None) -> list[jax.Array] | None:
    """ggml's ``mul_mat_id``: ``y[r] = x2[rows[r]] @ W[e].T`` for output rows grouped by expert
    (``counts[e]`` rows for expert e, in expert order), stacked experts ``[n_expert, n, row_bytes]``
    read in place (raw 3-D arrays, or ``LayerStack``s of them); x quantized once inside the call,
    each expert's products in mul_mat_id's order (cpu/ffi_qmatvec.cc; ``tiled`` as in
    ``qmatvec_q8``). One ``[len(rows), n]`` per weight; None where the int8 kernels are missing."""
    if not all(q8_supported(t) for t in qtypes):
        return None
    p = rows.shape[0]
    outs = tuple(jax.ShapeDtypeStruct((p, r.shape[-2]), jnp.float32) for r in raws)
    ops, qtypes, layers, meta = _weight_operands(raws, qtypes)
    ys = jax.ffi.ffi_call("jllama_qmatmul_id", outs, vmap_method="sequential")(
        x2.astype(jnp.float32), rows.astype(jnp.int32), counts.astype(jnp.int32), *ops,
        qtypes=np.asarray(qtypes, np.int64), tiled=_tiled(tiled), layers=np.int64(layers),
        wmeta=np.asarray(meta, np.int64))
    return list(ys)


def cos_sin(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cosf(x), sinf(x)) from the C library, elementwise on f32: what ggml's rope cache uses.
    The caller checks ``available()``."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call("jllama_cos_sin", (out, out), vmap_method="sequential")(
        x.astype(jnp.float32))


def dequant_rows(raw: jax.Array, qtype: int, row_len: int) -> jax.Array:
    """f32 ``[n, row_len]`` from raw GGUF rows ``raw[n, row_bytes]``."""
    out = jax.ShapeDtypeStruct((raw.shape[0], row_len), jnp.float32)
    return jax.ffi.ffi_call("jllama_dequant", out, vmap_method="sequential")(
        raw, qtype=np.int64(qtype)
    )
