"""Hand the C heap's free pages back to the system after XLA builds or loads a program.

Compiling a program, or loading one from the persistent cache, allocates and frees a few hundred
MiB of small C++ objects (LLVM, XLA's passes). glibc keeps freed small chunks in its arenas, so
each new program left ~100-400 MiB of free heap resident for the life of the process: on
Gemma-3-1B about half of the ~800 MiB jllama held above llama-bench
(experiments/results/scale.md, 2026-12-07 "heap" section). ``malloc_trim(0)`` returns those pages
(it also releases free pages inside the heap, not just its top). It runs only after a compile
event, never per token: a JAX monitoring listener marks one, and the engine trims at its next
return to the caller. No-op where the C library has no ``malloc_trim`` (not glibc).
"""

from __future__ import annotations

import ctypes

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_state = {"installed": False, "pending": False, "trim": None}


def _on_duration(event: str, duration: float, **_: object) -> None:
    if event == _COMPILE_EVENT:
        _state["pending"] = True


def install() -> None:
    """Start watching for compiles (once per process)."""
    if _state["installed"]:
        return
    _state["installed"] = True
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    _state["trim"] = trim
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def trim_after_compile() -> bool:
    """Trim the heap if a program was compiled or loaded since the last call; whether it did."""
    if not _state["pending"] or _state["trim"] is None:
        return False
    _state["pending"] = False
    _state["trim"](0)
    return True
