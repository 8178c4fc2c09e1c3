"""jllama: llama.cpp's job on JAX/XLA."""

import os as _os

__version__ = "0.1.0"


def _default_xla_flags() -> None:
    """XLA:CPU's concurrency-optimized scheduler keeps every layer's temporaries alive at once,
    so peak memory grows with depth for no speed gain on a few cores
    (experiments/results/design_measurements.md). Set before JAX creates its CPU client; a
    value the user already put in XLA_FLAGS wins."""
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    flags = _os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        _os.environ["XLA_FLAGS"] = f"{flags} {flag}=false".strip()


_default_xla_flags()
