"""GGUF/ggml constants, taken from the upstream ``gguf`` package so type ids never drift."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
ValueType = GGUFValueType
QType = GGMLQuantizationType


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
            t = GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise KeyError(qtype) from None
    else:
        try:
            t = GGMLQuantizationType(int(qtype))
        except ValueError:
            raise KeyError(qtype) from None
    bs, ts = GGML_QUANT_SIZES[t]
    return QTypeInfo(int(t), t.name, bs, ts)
