"""GGUF/ggml constants, taken from the upstream ``gguf`` package so type ids never drift."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cache

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
ValueType = GGUFValueType

# Types of ggml 0c1e570 (ggml.h) that a gguf-py release may not list yet: id, elements and bytes
# per block (ggml-common.h). gguf 0.19 has NVFP4 and Q1_0 but not Q2_0.
_GGML_EXTRA = {"NVFP4": (40, 64, 36), "Q1_0": (41, 128, 18), "Q2_0": (42, 64, 18)}
_known = {t.name: int(t) for t in GGMLQuantizationType}
# gguf-py's members with the same names and ids, plus the missing ones: the values are plain
# ints, so gguf-py's own tables (keyed by its enum) still find every type it knows
QType = IntEnum("QType", {**_known, **{n: v[0] for n, v in _GGML_EXTRA.items() if n not in _known}})
QType.__module__ = __name__
_SIZES = {**{v[0]: v[1:] for v in _GGML_EXTRA.values()},
          **{int(t): s for t, s in GGML_QUANT_SIZES.items()}}


@dataclass(frozen=True)
class QTypeInfo:
    id: int
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


@cache
def qtype_info(qtype: int | str) -> QTypeInfo:
    """Look a ggml type up by id or by (case-insensitive) name; KeyError if unknown."""
    if isinstance(qtype, str):
        try:
            t = QType[qtype.upper()]
        except KeyError:
            raise KeyError(qtype) from None
    else:
        try:
            t = QType(int(qtype))
        except ValueError:
            raise KeyError(qtype) from None
    bs, ts = _SIZES[int(t)]
    return QTypeInfo(int(t), t.name, bs, ts)
