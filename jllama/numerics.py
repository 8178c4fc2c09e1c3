"""Numerics: how a model computes, as one frozen value.

Every switch that can change a result (or which compiled program runs) lives here and nowhere
else. A model carries its ``Numerics`` as a static attribute (part of its graphdef), the Engine
takes it from the model, so it is part of every jitted program's key: two models with different
numerics never share a trace, and changing it means building a new model, never flipping a
global under an existing program.

While a model is traced, ``use(num)`` makes its numerics the ``current()`` value for the shared
building blocks (norms, rope, attention, matmul dispatch), so they need not thread it through
every call; the value always comes from the model being traced. Outside a model call (tests,
benchmarks calling a kernel directly) ``current()`` is ``Numerics()``, the product defaults.

Environment variables are read only by ``Numerics.from_env`` (called where a user-facing object
is built: ``api.Llama``, the CLI), never at trace time:

=============================  ====================  ===============================================
variable                       field                 meaning
=============================  ====================  ===============================================
``JLLAMA_NO_FFI=1``            ``cpu_kernels``       no C++ kernels: the pure-XLA CPU paths
``JLLAMA_NO_Q8=1``             ``q8_kernels``        no int8-activation kernels (f32 decode dots)
``JLLAMA_Q8_ALL_ROWS=0``       ``prompt_matmul``     ``"f32"``: XLA's f32 GEMM for prompts
``JLLAMA_FUSED_QUANT_ROWS=N``  ``fused_quant_rows``  rows up to which x is quantized inside the
                                                     matvec call (0: never)
``GGML_CPU_TILED_MM=0``        ``ggml_tiled_mm``     ggml's own switch: K-quant products in
                                                     vec_dot order instead of the tiled GEMM's
``JLLAMA_NO_SCAN=1``           ``scan_layers``       the unrolled program (one copy of the block
                                                     per layer; same results, slower start-up)
=============================  ====================  ===============================================

Switches that change speed only and never a bit of a result stay environment variables of the
C++ kernels (read once when the library loads): ``JLLAMA_CPU_KERNEL_THREADS``,
``JLLAMA_CPU_SPIN_US``, ``JLLAMA_CPU_PREFETCH_ROWS``, ``JLLAMA_CPU_PREFETCH_NTA``,
``JLLAMA_Q8_GEMM_MIN_ROWS`` (the int8 GEMM and the row kernel give the same bits).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

from jllama.errors import ConfigError

PROMPT_MATMULS = ("int8", "f32")


@dataclass(frozen=True)
class Numerics:
    """How a model computes (hashable: it is static jit data)."""

    # ggml's roundings: int8 matmuls on ggml's Q8 activation blocks, rms_norm's double sum, the
    # C library's cos/sin for rope, ggml's SIMD expf in SiLU, its GELU table. False: plain f32.
    match_llamacpp: bool = True
    # llama.cpp's -fa: ggml's flash-attention kernel (bit for bit with an f16 cache on the CPU);
    # False rounds like llama.cpp's non-FA graph (llama-cpp-python's default)
    flash_attn: bool = True
    # CPU matmuls with more rows than a decode step: "int8" (ggml's arithmetic, bit-identical)
    # or "f32" (dequantized tiles and XLA's f32 GEMM; not exact)
    prompt_matmul: str = "int8"
    # KV cache element types (llama.cpp's --cache-type-k / --cache-type-v; models/kvquant.py
    # checks them against the model's head size)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    cpu_kernels: bool = True
    q8_kernels: bool = True
    fused_quant_rows: int = 16
    ggml_tiled_mm: bool = True
    # trace identical decoder blocks once (a nested jit); compile time only, never results
    share_block_traces: bool = True
    # runs of alike decoder layers as one lax.scan (a loop in the program, the KV cache stacked
    # [B, L, ...]): compile time, program size and cache load independent of depth; never
    # results. False: the unrolled program (per-layer caches)
    scan_layers: bool = True
    # copy intermediates to numerics taps (experiments/numerics_vs_llamacpp.py); forces
    # per-layer traces, since taps are named per layer
    taps: bool = False

    def __post_init__(self):
        if self.prompt_matmul not in PROMPT_MATMULS:
            raise ConfigError(f"prompt_matmul {self.prompt_matmul!r}: expected one of "
                              f"{', '.join(PROMPT_MATMULS)}")
        if self.fused_quant_rows < 0:
            raise ConfigError(f"fused_quant_rows {self.fused_quant_rows}: must be >= 0")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **fields) -> Numerics:
        """Defaults, then the environment switches in the table above, then ``fields``."""
        env = os.environ if env is None else env

        def on(name: str, default: str = "0") -> bool:
            return env.get(name, default) not in ("", "0")

        base: dict = {}
        if on("JLLAMA_NO_FFI"):
            base["cpu_kernels"] = False
        if on("JLLAMA_NO_Q8"):
            base["q8_kernels"] = False
        if not on("JLLAMA_Q8_ALL_ROWS", "1"):
            base["prompt_matmul"] = "f32"
        if "JLLAMA_FUSED_QUANT_ROWS" in env:
            try:
                base["fused_quant_rows"] = int(env["JLLAMA_FUSED_QUANT_ROWS"])
            except ValueError:
                raise ConfigError("JLLAMA_FUSED_QUANT_ROWS: expected a whole number, got "
                                  f"{env['JLLAMA_FUSED_QUANT_ROWS']!r}") from None
        if not on("GGML_CPU_TILED_MM", "1"):
            base["ggml_tiled_mm"] = False
        if on("JLLAMA_NO_SCAN"):
            base["scan_layers"] = False
        base.update({k: v for k, v in fields.items() if v is not None})
        return cls(**base)

    def replace(self, **fields) -> Numerics:
        return dataclasses.replace(self, **fields)


DEFAULT = Numerics()
_CURRENT: contextvars.ContextVar[Numerics | None] = contextvars.ContextVar(
    "jllama_numerics", default=None)


def current() -> Numerics:
    """The numerics of the model being traced (``DEFAULT`` outside any model call)."""
    num = _CURRENT.get()
    return DEFAULT if num is None else num


@contextlib.contextmanager
def use(num: Numerics) -> Iterator[Numerics]:
    """Make ``num`` current for the duration of a model call (trace)."""
    token = _CURRENT.set(num)
    try:
        yield num
    finally:
        _CURRENT.reset(token)
