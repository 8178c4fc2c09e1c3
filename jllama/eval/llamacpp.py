"""llama-cpp-python as the benchmarks' side-by-side reference.

ggml's extra CPU buffer types are turned off: on Intel Xeons with AMX, llama-cpp-python 0.3.36
puts quantized weights in its AMX buffer and crashes (SIGSEGV) in ``llama_decode``. This also
turns off ggml's CPU_REPACK layouts (Q4_0/Q4_K/IQ4_NL/Q8_0 interleaved for AVX2/NEON); SmolLM2's
Q4_1 has none, so its figures are unaffected, while Gemma's Q4_K layers lose them. The reference
figures in shared/reference (an AMD EPYC without AMX) had them on: say which in any comparison.
"""

from __future__ import annotations


def llama_cpp_stock():
    """The ``llama_cpp`` module with models loaded with ``use_extra_bufts = False``."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not getattr(low.llama_model_default_params, "_jllama_no_extra_bufts", False):
        orig = low.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = False
            return p

        params._jllama_no_extra_bufts = True
        low.llama_model_default_params = params
    return llama_cpp
