"""Architectures: ``general.architecture`` -> the module that builds it (``build(spec, w, gguf)``).

The GQA decoders (llama and Mixtral-style llama, qwen2, qwen3, qwen2moe, qwen3moe) are one
module, ``decoder``, whose per-architecture differences are a table (``decoder.VARIANTS``);
gemma3 and deepseek2 have their own.

``load_model`` is the one path from a GGUF file to a Flax NNX module; every front end uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax
import numpy as np

from jllama.errors import ModelError
from jllama.gguf.reader import GGUFFile
from jllama.kernels.dispatch import prepare
from jllama.models.common import Weights, in_place_ok
from jllama.models.spec import ModelSpec, RopeOptions, spec_from_gguf, with_rope_options
from jllama.numerics import DEFAULT, Numerics
from jllama.numerics import use as use_numerics
from jllama.quant.qtensor import QTensor, from_gguf_bytes

# general.architecture -> module under jllama.models
ARCHITECTURES: dict[str, str] = {
    "llama": "decoder",
    "qwen2": "decoder",
    "qwen3": "decoder",
    "qwen2moe": "decoder",
    "qwen3moe": "decoder",
    "qwen2vl": "decoder",
    "gemma3": "gemma3",
    "deepseek2": "deepseek2",
}


def known_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_module(arch: str):
    mod = ARCHITECTURES.get(arch)
    if mod is None:
        raise ModelError(
            f"architecture '{arch}' is not supported; jllama knows: {', '.join(known_architectures())}"
        )
    return importlib.import_module(f"jllama.models.{mod}")


def load_weights(g: GGUFFile, transform: Callable[[str, np.ndarray, int, tuple], tuple] | None = None,
                 repack: bool = True, numerics: Numerics = DEFAULT,
                 on_host: Callable[[str], bool] | None = None) -> Weights:
    """Every tensor as a QTensor on the default device, still quantized.

    ``transform(name, raw, qtype, shape) -> (raw, qtype)`` may requantize on load. With
    ``repack`` each weight goes through ``kernels.dispatch.prepare`` (under ``numerics``, whose
    ``cpu_kernels`` decides the CPU layout) straight from the memory-mapped
    bytes (the backend's fast layout), so no second full copy is ever resident. Tensors left in
    GGUF layout are device buffers over the mapping itself on CPU (the file must not change
    while the model is loaded, as with llama.cpp's default mmap).

    ``on_host(name)``: tensors that stay host (numpy) arrays, never put on the device: the
    layers a partial offload streams (models/offload.py stacks them into host memory).
    """
    out: dict[str, QTensor] = {}
    copied = 0  # bytes of the mapping read into copies since its pages were last dropped
    for name, ti in g.tensors.items():
        raw, qtype = ti.data, ti.qtype
        if transform is not None:
            raw, qtype = transform(name, raw, qtype, ti.shape)
        data, qtype = from_gguf_bytes(raw, qtype, ti.shape)
        qt = QTensor(data, int(qtype), tuple(ti.shape))
        if repack:
            with use_numerics(numerics):
                qt = prepare(qt)
        if on_host is not None and on_host(name):
            # a repacking done on the device comes back; nothing of it stays there
            qt = QTensor(jax.tree.map(np.asarray, qt.data), qt.qtype, qt.shape, qt.layout)
        elif isinstance(qt.data, np.ndarray):
            # zero-copy where the host layout allows: weights still in GGUF blocks stay in the
            # file mapping (read-only, as llama.cpp's mmap: no second resident copy, clean pages
            # the kernel can drop), repacked arrays are adopted rather than copied. jnp.asarray
            # would copy, through a compiled copy program per dtype.
            flat = _in_place_view(g, qt, numerics)
            if flat is not None:
                out[name] = flat
                continue
            host = _adoptable(qt.data)
            if host is not qt.data:
                copied += host.nbytes
                if copied >= _RELEASE_EVERY:  # peak RSS: not the whole file and its copy
                    g.release_pages()
                    copied = 0
            qt = QTensor(jax.device_put(host), qt.qtype, qt.shape, qt.layout)
        out[name] = qt
    return Weights(out, g.path)


# XLA:CPU adopts a host buffer only at this alignment; GGUF aligns tensors to 32 bytes, so in
# about half of real files (data section at 32 mod 64) every tensor is misaligned
_ADOPT_ALIGN = 64
_RELEASE_EVERY = 256 << 20


def _in_place_view(g: GGUFFile, qt: QTensor, numerics: Numerics) -> QTensor | None:
    """A misaligned weight still in the file mapping as an offset QTensor (quant/qtensor.py):
    its flat bytes from the 64-aligned address before it, which XLA adopts, for the weights
    whose hot products are the int8 kernels that take the offset (``in_place_ok``); None where
    the tensor is aligned (adopted as it is) or goes elsewhere (copied by ``_adoptable``)."""
    a, mm = qt.data, g.mapping
    off = a.ctypes.data % _ADOPT_ALIGN
    if (off == 0 or mm is None or jax.default_backend() != "cpu" or qt.layout != "gguf"
            or a.nbytes + off >= _MAX_FLAT):
        return None
    with use_numerics(numerics):
        if not in_place_ok(qt):
            return None
    start = a.ctypes.data - mm.ctypes.data - off
    if start < 0 or start + off + a.nbytes > mm.nbytes:  # not a view of this mapping
        return None
    flat = np.asarray(mm[start : start + off + a.nbytes])
    return QTensor(jax.device_put(flat), qt.qtype, qt.shape, qt.layout, off)


# an offset tensor's embedding lookup indexes its flat bytes with int32
_MAX_FLAT = 1 << 31


def _adoptable(a: np.ndarray) -> np.ndarray:
    """``a``, or a copy of it at an address XLA can adopt. ``device_put`` would copy a
    misaligned mapping view anyway, but lazily, reading the file's pages at first use, so that
    copy and the file's pages both stayed resident (2x a model's bytes); copied here, the pages
    are read during load and dropped with the others (``GGUFFile.release_pages``)."""
    if a.ctypes.data % _ADOPT_ALIGN == 0:
        return a
    buf = np.empty(a.nbytes + _ADOPT_ALIGN, np.uint8)
    off = -buf.ctypes.data % _ADOPT_ALIGN
    out = buf[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def build_model(g: GGUFFile, weights: Weights | None = None, spec: ModelSpec | None = None,
                numerics: Numerics = DEFAULT, rope: RopeOptions | None = None):
    """(spec, model) for a GGUF file; the model carries ``numerics`` as static data (an Engine
    built on it compiles with them unless given others). ``rope``: llama.cpp's rope context
    parameters over the file's (``--rope-freq-base`` ...)."""
    mod = arch_module(g.architecture or "?")
    spec = spec or (mod.spec_from_gguf(g) if hasattr(mod, "spec_from_gguf") else spec_from_gguf(g))
    spec = with_rope_options(spec, g, rope)
    weights = weights if weights is not None else load_weights(g, numerics=numerics)
    model = mod.build(spec, weights, g)
    model.numerics = numerics
    return spec, model
