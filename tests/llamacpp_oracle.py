"""The llama.cpp oracle (llama-cpp-python) as the tests use it.

ggml's extra CPU buffer types are turned off: on Intel Xeons with AMX, llama-cpp-python 0.3.36
puts Q4_0/Q4_1/Q8_0/K-quant weights in its AMX buffer and then crashes (SIGSEGV) in
``llama_decode``; without extra buffers every machine runs ggml's stock kernels, which are
also what the reference figures (an AMD EPYC without AMX) were measured with.
"""

from __future__ import annotations

import os

import pytest


def llama_cpp_module():
    """``llama_cpp`` with model loading patched to ``use_extra_bufts = False`` (or a skip)."""
    if os.environ.get("CI"):
        import llama_cpp  # in CI a missing oracle is a failure, not a skip
    else:
        llama_cpp = pytest.importorskip("llama_cpp",
                                        reason="install the oracle: pip install -e .[oracle]")
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
