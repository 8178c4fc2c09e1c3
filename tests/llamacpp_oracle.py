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
    """``llama_cpp`` with models loaded with ``use_extra_bufts = False`` (or a skip off CI)."""
    if not os.environ.get("CI"):  # in CI a missing oracle is a failure, not a skip
        pytest.importorskip("llama_cpp", reason="install the oracle: pip install -e .[oracle]")
    from jllama.eval.llamacpp import llama_cpp_stock

    return llama_cpp_stock()
