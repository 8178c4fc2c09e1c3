"""The llama.cpp oracle (llama-cpp-python) as the tests use it.

ggml's extra CPU buffer types are turned off: on Intel Xeons with AMX, llama-cpp-python 0.3.36
puts Q4_0/Q4_1/Q8_0/K-quant weights in its AMX buffer and then crashes (SIGSEGV) in
``llama_decode``; without extra buffers every machine runs ggml's stock kernels, which are
also what the reference figures (an AMD EPYC without AMX) were measured with.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import pytest


def llama_cpp_module():
    """``llama_cpp`` with models loaded with ``use_extra_bufts = False`` (or a skip off CI)."""
    if not os.environ.get("CI"):  # in CI a missing oracle is a failure, not a skip
        pytest.importorskip("llama_cpp", reason="install the oracle: pip install -e .[oracle]")
    from jllama.eval.llamacpp import llama_cpp_stock

    return llama_cpp_stock()


def chatml(*turns: tuple[str, str]) -> str:
    """A ChatML prompt written out by hand (role, content turns, then the assistant's opening):
    what a server's chat template should render, fed to the oracle as text."""
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) \
        + "<|im_start|>assistant\n"


def greedy_completion(llm, text: str, n: int) -> tuple[list[int], dict]:
    """llama-cpp-python's greedy completion of ``text`` (special tokens parsed, no BOS): the
    prompt's token ids and its completion."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    return ids, llm.create_completion(ids, max_tokens=n, temperature=0.0, repeat_penalty=1.0)


def llama_cpp_logits(path, tokens: list[int]):
    """llama.cpp's logits (float32 ``[len(tokens), n_vocab]``) for one prompt, one thread."""
    import numpy as np

    llm = llama_cpp_module().Llama(
        str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


# ------------------------------------------------------------------ ggml itself, through ctypes
# Single-op oracles (a matmul, flash attention, a quantizer, a lookup table) run ggml's own CPU
# code from the oracle's libggml-base/-cpu on a plain ggml context: no backend buffers, so no
# AMX/repack extra buffer types either.
class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]  # fmt: skip


_P, _I64, _SZ, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int
_BASE_FNS = {
    "ggml_init": ([GgmlInitParams], _P),
    "ggml_new_tensor_2d": ([_P, _INT, _I64, _I64], _P),
    "ggml_new_tensor_3d": ([_P, _INT, _I64, _I64, _I64], _P),
    "ggml_view_3d": ([_P, _P, _I64, _I64, _I64, _SZ, _SZ, _SZ], _P),
    "ggml_permute": ([_P, _P, _INT, _INT, _INT, _INT], _P),
    "ggml_mul_mat": ([_P, _P, _P], _P),
    "ggml_transpose": ([_P, _P], _P),
    "ggml_cont": ([_P, _P], _P),
    "ggml_cast": ([_P, _P, _INT], _P),
    "ggml_scale": ([_P, _P, ctypes.c_float], _P),
    "ggml_add": ([_P, _P, _P], _P),
    "ggml_flash_attn_ext": ([_P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float,
                             ctypes.c_float], _P),
    "ggml_prec_set_acc": ([_P, _INT], ctypes.c_bool),
    "ggml_new_graph": ([_P], _P),
    "ggml_build_forward_expand": ([_P, _P], None),
    "ggml_get_data": ([_P], _P),
    "ggml_nbytes": ([_P], _SZ),
    "ggml_free": ([_P], None),
    "ggml_quantize_init": ([_INT], None),
    "ggml_quantize_chunk": ([_INT, _P, _P, _I64, _I64, _I64, _P], _SZ),
}  # fmt: skip


def llama_cpp_logits_and_greedy(path, tokens: list[int], n_greedy: int = 16):
    """llama.cpp's logits at every position of ``tokens`` (flash attention on, as the
    tiny-model tests run jllama) and its ``n_greedy`` greedy tokens after them."""
    import numpy as np

    # one thread: below 512 keys no ggml op's bits depend on the thread count, and two threads
    # spin at every op's barrier while the other pytest worker holds a core (2-4x slower)
    llm = llama_cpp_module().Llama(str(path), n_ctx=64, logits_all=True, verbose=False,
                                   n_threads=1, seed=0, flash_attn=True)
    try:
        llm.eval(tokens)
        ref = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        llm.reset()
        greedy = []
        for tok in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
            greedy.append(tok)
            if len(greedy) == n_greedy:
                break
    finally:
        llm.close()
    return ref, greedy


@functools.cache
def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml-cpu) of the oracle, prototypes set, ``ggml_cpu_init`` done (it
    fills ggml's f16 tables)."""
    libdir = Path(llama_cpp_module().__file__).parent / "lib"
    base = ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    for name, (args, res) in _BASE_FNS.items():
        getattr(base, name).argtypes, getattr(base, name).restype = args, res
    cpu.ggml_graph_compute_with_ctx.argtypes = [_P, _P, _INT]
    cpu.ggml_graph_compute_with_ctx.restype = _INT
    cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
    cpu.ggml_cpu_init()
    return base, cpu


def ggml_fill(base: ctypes.CDLL, tensor, arr) -> None:
    """Copy a numpy array into a ggml tensor of exactly its size."""
    import numpy as np

    a = np.ascontiguousarray(arr)
    assert base.ggml_nbytes(tensor) == a.nbytes
    ctypes.memmove(base.ggml_get_data(tensor), a.ctypes.data, a.nbytes)


def ggml_quantize(x, qtype: int, imatrix=None):
    """``ggml_quantize_chunk(type, x, ..., imatrix)``: what llama-quantize writes for rows ``x``
    ``[R, n]`` (float32), with the importance weights ``imatrix [n]`` or without (None)."""
    import numpy as np

    from jllama.gguf.constants import qtype_info

    base, _ = ggml_libs()
    x = np.ascontiguousarray(x, np.float32)
    info = qtype_info(int(qtype))
    out = np.zeros((x.shape[0], x.shape[1] // info.block_size * info.type_size), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    base.ggml_quantize_init(int(qtype))
    base.ggml_quantize_chunk(
        int(qtype), x.ctypes.data, out.ctypes.data, 0, *x.shape,
        None if qw is None else qw.ctypes.data,
    )  # fmt: skip
    return out


class _TypeTraits(ctypes.Structure):  # ggml.h's ggml_type_traits, up to the fields read here
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]  # fmt: skip


def ggml_to_float(raw, qtype: int, row: int):
    """ggml's own ``type_traits[type].to_float`` (dequantize_row_*) on raw GGUF rows
    ``[..., row_bytes]`` -> float32 ``[..., row]``."""
    import numpy as np

    from jllama.gguf.constants import qtype_info

    base, _ = ggml_libs()
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    tr = base.ggml_get_type_traits(int(qtype)).contents
    assert tr.type_name.decode().upper() == qtype_info(int(qtype)).name
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.to_float)
    raw = np.ascontiguousarray(raw)
    out = np.zeros((*raw.shape[:-1], row), np.float32)
    to_float(raw.ctypes.data, out.ctypes.data, out.size)
    return out
