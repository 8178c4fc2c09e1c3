"""The C library's ``expf`` behind XLA's FFI (``cpu_libm.cc``), compiled at first use like the
other CPU kernels (cpu_ffi.py): ggml's vector ops call it for the elements a SIMD register does
not cover, and it is not correctly rounded, so an exact reproduction needs the function itself.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from jllama.kernels import cpu_ffi

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_libm.cc")
FLAGS = ["-O2", "-fno-tree-vectorize", "-fno-fast-math", "-std=c++17", "-shared", "-fPIC", "-w"]
_TARGET = ("jllama_expf", "JllamaExpf")


@functools.cache
def available() -> bool:
    """Compile (once), load and register the kernel; False where that is not possible."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None or not SOURCE.exists():
        return False
    try:
        lib = ctypes.CDLL(str(cpu_ffi._build(compiler, SOURCE, FLAGS)))
        jax.ffi.register_ffi_target(_TARGET[0], jax.ffi.pycapsule(getattr(lib, _TARGET[1])),
                                    "cpu")
    except Exception as e:  # any failure means "use the f64 stand-in", never a crash
        detail = getattr(e, "stderr", b"") or b""
        log.warning("jllama: C library expf kernel unavailable (%s %s)", e,
                    detail.decode(errors="replace")[-2000:])
        return False
    return True


def expf(x: jax.Array) -> jax.Array:
    """``expf(x)`` elementwise on f32 from the C library (the caller checks ``available()``)."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(_TARGET[0], out, vmap_method="sequential")(x.astype(jnp.float32))
