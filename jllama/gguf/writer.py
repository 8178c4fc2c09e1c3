"""GGUF v3 writer: metadata with explicit value types, tensors streamed from raw bytes.

Tensor data is produced one tensor at a time (a callable per tensor), so quantizing a model never
holds more than one converted tensor in memory. The file is written to a hidden temporary file in
the target directory and renamed into place only once complete: a failure (read-only directory,
full disk, a bug in a converter) leaves no partial file behind, only a ``GGUFError``.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from jllama.errors import GGUFError
from jllama.gguf.constants import GGUF_MAGIC, ValueType, qtype_info

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_FMT = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}

MetaTypes = dict[str, tuple[ValueType, ValueType | None]]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write. ``data`` returns its raw GGUF bytes (uint8, exactly ``nbytes``)."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), as the reader reports it
    qtype: int
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_nbytes(shape: Sequence[int], qtype: int) -> int:
    info = qtype_info(qtype)
    if not shape:
        return info.type_size
    if shape[-1] % info.block_size:
        raise GGUFError(f"row of {shape[-1]} is not a multiple of {info.name}'s block size")
    n = shape[-1] // info.block_size * info.type_size
    for d in shape[:-1]:
        n *= d
    return int(n)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def infer_value_type(value: Any) -> tuple[ValueType, ValueType | None]:
    """The GGUF type llama.cpp would give a Python value set without an explicit type."""
    if isinstance(value, bool):
        return ValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        if 0 <= value < 2**32:
            return ValueType.UINT32, None
        if -(2**31) <= value < 2**31:
            return ValueType.INT32, None
        return (ValueType.UINT64 if value >= 0 else ValueType.INT64), None
    if isinstance(value, (float, np.floating)):
        return ValueType.FLOAT32, None
    if isinstance(value, str):
        return ValueType.STRING, None
    if isinstance(value, (list, tuple)):
        sub = infer_value_type(value[0])[0] if len(value) else ValueType.INT32
        return ValueType.ARRAY, sub
    raise GGUFError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _string(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _encode(value: Any, vt: ValueType, sub: ValueType | None, key: str) -> bytes:
    try:
        if vt == ValueType.STRING:
            return _string(value)
        if vt == ValueType.ARRAY:
            if sub is None:
                raise GGUFError(f"metadata '{key}': array without element type")
            head = struct.pack("<IQ", int(sub), len(value))
            if sub == ValueType.STRING:
                return head + b"".join(_string(v) for v in value)
            if sub == ValueType.ARRAY:
                parts = [_encode(v, ValueType.ARRAY, infer_value_type(v)[1], key) for v in value]
                return head + b"".join(parts)
            fmt = _SCALAR_FMT[sub]
            dt = np.dtype(fmt[1]).newbyteorder("<")
            return head + np.asarray(value, dtype=dt).tobytes()
        return struct.pack(_SCALAR_FMT[vt], value)
    except (struct.error, TypeError, ValueError, OverflowError) as e:
        raise GGUFError(f"metadata '{key}' cannot be stored as {vt.name}: {e}") from None


def _header(
    metadata: dict[str, Any], types: MetaTypes, tensors: Sequence[TensorSpec], align: int
) -> tuple[bytes, list[int]]:
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        vt, sub = types.get(key) or infer_value_type(value)
        out += [_string(key), struct.pack("<I", int(vt)), _encode(value, vt, sub, key)]
    offsets, off = [], 0
    for t in tensors:
        dims = tuple(reversed(t.shape)) or (1,)  # ggml order: innermost first
        out += [_string(t.name), struct.pack("<I", len(dims))]
        out += [struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", int(t.qtype), off)]
        offsets.append(off)
        off = _pad(off + t.nbytes, align)
    return b"".join(out), offsets


def write_gguf(
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
    tensors: Iterable[TensorSpec],
    metadata_types: MetaTypes | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> int:
    """Write a GGUF v3 file atomically; returns its size in bytes.

    ``metadata_types`` gives the GGUF type of each key (keys missing from it get a type inferred
    from the value); ``general.alignment`` in the metadata sets the alignment. ``on_tensor`` is
    called after each tensor is written (progress reporting).
    """
    path = Path(path)
    tensors = list(tensors)
    types = dict(metadata_types or {})
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if align <= 0 or align & (align - 1):
        raise GGUFError(f"general.alignment = {align} is not a power of two")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFError("duplicate tensor names")
    header, _ = _header(metadata, types, tensors, align)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=directory)
    except OSError as e:
        raise GGUFError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(b"\0" * (_pad(len(header), align) - len(header)))
            for t in tensors:
                _write_tensor(f, t, align)
                if on_tensor is not None:
                    on_tensor(t)
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise GGUFError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise
    return size


def _write_tensor(f: IO[bytes], t: TensorSpec, align: int) -> None:
    raw = np.ascontiguousarray(t.data())
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if raw.size != t.nbytes:
        raise GGUFError(f"tensor '{t.name}': got {raw.size} bytes, its header says {t.nbytes}")
    f.write(memoryview(raw.reshape(-1)))
    f.write(b"\0" * (_pad(raw.size, align) - raw.size))


def _remove(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
