"""The C++ CPU kernels (``cpu_qmatvec.cc``) behind XLA's FFI, compiled at first use.

Why at first use, not at install: the package is pure Python (setuptools, no build step), and
``-march=native`` must see the machine that runs it. The shared library is cached under
``$JLLAMA_CACHE`` (default ``~/.cache/jllama``)/kernels, keyed by the source, the flags, the jax
version and the CPU's feature flags, so it compiles once per machine (~5 s). If there is no
compiler, or ``JLLAMA_NO_FFI=1`` is set, ``available()`` is False and callers use the pure-XLA
path instead.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_qmatvec.cc")
FLAGS = [
    "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
    # Reassociation lets the compiler vectorise the dot reductions; no NaN/Inf assumptions.
    "-ffp-contract=fast", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math",
]  # fmt: skip
# Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS
QTYPES = frozenset({2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23})
_TARGETS = {"jllama_qmatvec": "JllamaQMatVec", "jllama_qmatvec_xs": "JllamaQMatVecXs",
            "jllama_dequant": "JllamaDequant", "jllama_cos_sin": "JllamaCosSin"}
# The int8-activation kernels (ggml's vec_dot, bit-exact) exist where the build machine has
# AVX2 + FMA + F16C (VNNI, where present, only speeds up their integer dots).
# Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
Q8_QTYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})
_Q8_TARGET = ("jllama_qmatvec_q8", "JllamaQMatVecQ8")
# One call over 2 or 3 weights that share the activations (q/k/v, gate/up).
_Q8_MULTI_TARGETS = {2: ("jllama_qmatvec_q8x2", "JllamaQMatVecQ8x2"),
                     3: ("jllama_qmatvec_q8x3", "JllamaQMatVecQ8x3")}
_q8_multi: set[int] = set()
# Quantization fused in (f32 x in), any number of weights: decode's calls.
_Q8F_TARGET = ("jllama_qmatvec_q8f", "JllamaQMatVecQ8F")
_q8f = False
_q8_registered = False


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


def _build(compiler: str, source: Path = SOURCE, flags: list[str] | None = None) -> Path:
    """Compile ``source`` (default: the qmatvec kernels) with ``flags`` (default ``FLAGS``) into
    a cached shared library; other kernel files (cpu_attention.cc) pass their own flags."""
    flags = FLAGS if flags is None else flags
    src = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(flags).encode(), jax.__version__.encode(), _cpu_key().encode()])
    ).hexdigest()[:16]
    cache = Path(os.environ.get("JLLAMA_CACHE", Path.home() / ".cache" / "jllama")) / "kernels"
    lib = cache / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-I", jax.ffi.include_dir(), str(source), "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(tmp, lib)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def available() -> bool:
    """Compile (once), load and register the kernels; False if that is not possible here."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None or not SOURCE.exists():
        log.warning("jllama: no C++ compiler or kernel source; CPU qmatmul uses the XLA path")
        return False
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
        if hasattr(lib, _Q8_TARGET[1]):
            global _q8_registered, _q8f
            jax.ffi.register_ffi_target(
                _Q8_TARGET[0], jax.ffi.pycapsule(getattr(lib, _Q8_TARGET[1])), "cpu"
            )
            _q8_registered = True
            jax.ffi.register_ffi_target(
                "jllama_quantize_q8", jax.ffi.pycapsule(lib.JllamaQuantizeQ8), "cpu")
            for n, (target, symbol) in _Q8_MULTI_TARGETS.items():
                if hasattr(lib, symbol):
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
                    _q8_multi.add(n)
            if hasattr(lib, _Q8F_TARGET[1]):
                jax.ffi.register_ffi_target(
                    _Q8F_TARGET[0], jax.ffi.pycapsule(getattr(lib, _Q8F_TARGET[1])), "cpu")
                _q8f = True
    except Exception as e:  # any failure here means "use the XLA path", never a crash
        detail = getattr(e, "stderr", b"") or b""
        log.warning("jllama: C++ CPU kernels unavailable (%s %s); using the XLA path", e,
                    detail.decode(errors="replace")[-2000:])  # fmt: skip
        return False
    return True


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


def qmatvec_q8(
    q: jax.Array, d: jax.Array, s: jax.Array | None, raw: jax.Array, qtype: int
) -> jax.Array:
    """``x @ W.T`` with x given as ggml's quantized activations: int8 codes ``q[m, k]``, block
    scales ``d[m, k / block]`` (f32), Q8_1 block sums ``s[m, k / 32]`` (Q4_1/Q5_1 only), against
    raw GGUF rows ``raw[n, row_bytes]``: f32 ``[m, n]``, bit-identical to ggml's CPU mul_mat."""
    if not q8_supported(qtype):
        raise ValueError(f"no int8 CPU kernel for ggml type {qtype} on this machine")
    m = q.shape[0]
    if s is None:
        s = jnp.zeros((m, 0), jnp.float32)
    out = jax.ShapeDtypeStruct((m, raw.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("jllama_qmatvec_q8", out, vmap_method="sequential")(
        q.astype(jnp.int8), d.astype(jnp.float32), s.astype(jnp.float32), raw,
        qtype=np.int64(qtype),
    )


_ACT_FMT = {"q8_0": 0, "q8_1": 1, "q8_K": 2}


def quantize_q8(x2: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """ggml's quantize_row_q8_{0,1,K} on the rows of ``x2[m, k]`` (C, not XLA: see
    cpu_qmatvec.cc): int8 codes [m, k], block scales [m, k / bs] (the stored f16 value for
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
                     qtypes: list[int]) -> list[jax.Array] | None:
    """``qmatvec_q8`` for 2-3 weights on the same activations in one kernel call (one thread
    hand-off instead of one per weight); None where the multi-weight kernel is missing."""
    if len(raws) not in _q8_multi or not all(q8_supported(t) for t in qtypes):
        return None
    m = q.shape[0]
    if s is None:
        s = jnp.zeros((m, 0), jnp.float32)
    outs = tuple(jax.ShapeDtypeStruct((m, r.shape[0]), jnp.float32) for r in raws)
    attrs = {f"qtype{i}": np.int64(t) for i, t in enumerate(qtypes)}
    ys = jax.ffi.ffi_call(_Q8_MULTI_TARGETS[len(raws)][0], outs, vmap_method="sequential")(
        q.astype(jnp.int8), d.astype(jnp.float32), s.astype(jnp.float32), *raws, **attrs)
    return list(ys)


def qmatvec_q8_fused(x2: jax.Array, raws: list, qtypes: list[int]) -> list[jax.Array] | None:
    """``x2[m, k] @ W.T`` for weights whose types share an activation format, x quantized
    inside the call (``quantize_q8``'s code, so the same bits); None where it is missing."""
    if not _q8f or not all(q8_supported(t) for t in qtypes):
        return None
    m = x2.shape[0]
    outs = tuple(jax.ShapeDtypeStruct((m, r.shape[0]), jnp.float32) for r in raws)
    ys = jax.ffi.ffi_call(_Q8F_TARGET[0], outs, vmap_method="sequential")(
        x2.astype(jnp.float32), *raws, qtypes=np.asarray(qtypes, np.int64))
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
