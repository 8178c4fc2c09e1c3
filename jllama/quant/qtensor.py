"""QTensor: a weight kept in ggml block form.

Model code never unpacks blocks itself: it calls ``kernels.dispatch.dequantize(qt)`` or
``qmatmul(x, qt)``, which dispatch on the ggml type, the layout and the backend at trace time.

Layout: for a 2-D weight of logical shape ``(n_out, n_in)`` (numpy order, as GGUF stores it),
``data`` is ``uint8[n_out, n_in // block_size * type_size]`` (the raw GGUF rows), or for float
types the array itself (f32/f16/bf16) with the logical shape. Leading axes (e.g. stacked experts)
are allowed: ``data`` then has them too.

``layout`` (static) says how ``data`` is stored: ``"gguf"`` is the above; ``"i8"`` is a tuple
``(codes int8 [n_out, n_in], scales f32 [n_out, n_in // g][, mins f32 [n_out, n_in // g]])``, the
load-time repacking that XLA:CPU dequantizes fast without the C++ kernels (see
``kernels/cpu_repack.py``); ``"pallas"`` is the Pallas kernel's k-major planes
(``kernels/pallas_qmatmul.py``). ``kernels.dispatch.prepare`` puts a weight in its backend's
layout once at load; the dispatch functions accept every layout.

``offset`` (static; layout ``"gguf"`` only): nonzero for GGUF blocks used in place from a file
mapping where they start off XLA:CPU's 64-byte buffer alignment (GGUF aligns tensors to 32
bytes, so in about half of real files every tensor does). ``data`` is then the flat ``uint8``
bytes from the aligned address ``offset`` bytes before the tensor's first byte to its last, so
XLA adopts the mapping instead of copying it; the int8 CPU kernels take the offset, and
``natural()`` gives the usual shape (an in-graph slice, i.e. a copy, for other paths). A
consumer that ignores the offset fails on the shape instead of reading wrong bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jllama.gguf.constants import QType, qtype_info

FLOAT_TYPES = {
    int(QType.F32): jnp.float32,
    int(QType.F16): jnp.float16,
    int(QType.BF16): jnp.bfloat16,
}


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QTensor:
    data: Any  # jax.Array, or a tuple of arrays for layout "i8"
    qtype: int  # static
    shape: tuple[int, ...]  # static, logical (numpy order)
    layout: str = "gguf"  # static
    offset: int = 0  # static: bytes of ``data`` before the tensor's first (see the module doc)

    def tree_flatten(self):
        return (self.data,), (self.qtype, self.shape, self.layout, self.offset)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES

    @property
    def type_name(self) -> str:
        return qtype_info(self.qtype).name

    @property
    def nbytes(self) -> int:
        """The tensor's bytes (an offset tensor's leading bytes not counted)."""
        n = sum(int(a.size * a.dtype.itemsize) for a in jax.tree_util.tree_leaves(self.data))
        return n - self.offset

    def natural(self) -> QTensor:
        """This tensor with ``data`` in its layout's usual shape: itself where ``offset`` is 0,
        else a view of the bytes (numpy) or a slice of them (jax: a copy)."""
        if not self.offset:
            return self
        shape = gguf_data_shape(self.qtype, self.shape)
        n = int(np.prod(shape))
        return QTensor(self.data[self.offset : self.offset + n].reshape(shape), self.qtype,
                       self.shape, self.layout)


def gguf_data_shape(qtype: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a quantized tensor's ``data`` in layout ``"gguf"``: its rows of blocks."""
    info = qtype_info(int(qtype))
    return (*shape[:-1], shape[-1] // info.block_size * info.type_size)


def from_gguf_bytes(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """View a tensor's raw GGUF bytes in QTensor's data layout (no copy)."""
    qtype = int(qtype)
    if qtype in FLOAT_TYPES or qtype == int(QType.F64):
        if qtype == int(QType.BF16):
            import ml_dtypes

            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = {
                int(QType.F32): np.float32,
                int(QType.F16): np.float16,
                int(QType.F64): np.float64,
            }[qtype]
        return raw.view(dt).reshape(shape), qtype
    return raw.reshape(gguf_data_shape(qtype, shape)), qtype


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class LayerStack:
    """One weight of a run of decoder layers as a ``lax.scan`` body sees it: every layer's
    QTensor, buffers untouched, and the (traced) index of the layer being run. The int8 CPU
    kernels take all of them and read the indexed one in place; stacking the layers into one
    array and slicing it in the loop would copy the layer's weights every step (XLA:CPU
    materialises a dynamic slice that feeds a custom call).

    Layers may differ in ggml type (Q4_K_M gives some layers Q6_K) but not in logical shape,
    layout or activation format; ``qtype`` is the first layer's, for decisions that are the
    same for all (callers check that when they build one).

    ``expert`` (an int32 scalar, or None): the parts are stacked experts [n_expert, n_out, n_in]
    and the product is with that expert's rows, also read in place (models/moe.py); a single
    layer's experts are a stack of one part at index 0."""

    parts: tuple[QTensor, ...]
    index: Any  # int32 scalar
    expert: Any = None  # int32 scalar, or None

    def tree_flatten(self):
        return (self.parts, self.index, self.expert), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(tuple(children[0]), children[1], children[2])

    @property
    def qtype(self) -> int:
        return self.parts[0].qtype

    @property
    def qtypes(self) -> list[int]:
        return [p.qtype for p in self.parts]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of what a product reads: one layer's weight (one expert's)."""
        shp = self.parts[0].shape
        return shp[1:] if self.expert is not None else shp

    @property
    def layout(self) -> str:
        return self.parts[0].layout

    @property
    def is_float(self) -> bool:
        return self.parts[0].is_float
