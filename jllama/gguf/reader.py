"""GGUF v2/v3 reader with validation.

We parse the header ourselves (rather than through ``gguf.GGUFReader``) because the product
promise is that a truncated or lying file is refused with one line naming the file and the
problem, before any tensor is touched. Tensor bytes are memory-mapped, never copied.

Shapes follow numpy order: GGUF stores ``ne[0]`` (the contiguous row length) first, so a weight
of ``ne = [n_in, n_out]`` becomes ``shape = (n_out, n_in)``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jllama.errors import GGUFError
from jllama.gguf.constants import GGML_MAX_DIMS, GGUF_MAGIC, ValueType, qtype_info

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
_NP_DTYPE = {
    ValueType.UINT8: np.uint8,
    ValueType.INT8: np.int8,
    ValueType.UINT16: np.uint16,
    ValueType.INT16: np.int16,
    ValueType.UINT32: np.uint32,
    ValueType.INT32: np.int32,
    ValueType.FLOAT32: np.float32,
    ValueType.BOOL: np.bool_,
    ValueType.UINT64: np.uint64,
    ValueType.INT64: np.int64,
    ValueType.FLOAT64: np.float64,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry plus a zero-copy view of its bytes."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first)
    qtype: int  # ggml type id (gguf.GGMLQuantizationType value)
    offset: int  # absolute offset in the file
    nbytes: int
    data: np.ndarray = field(repr=False, compare=False)  # uint8, memory-mapped

    @property
    def type_name(self) -> str:
        return qtype_info(self.qtype).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    # value type of each metadata key (for faithful re-writing / dumping)
    metadata_types: dict[str, tuple[ValueType, ValueType | None]]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    # the file mapping the tensor views share (None for headers rebuilt from a checkpoint)
    mapping: np.memmap | None = field(default=None, repr=False, compare=False)

    def release_pages(self) -> None:
        """Drop this process's resident copy of the mapped file (``MADV_DONTNEED``).

        Call once the weights are copied into device buffers: the mapped pages otherwise stay in
        the process's RSS (the whole file, next to the copy). The views stay valid; touching a
        tensor again faults its pages back in from the file."""
        mm = getattr(self.mapping, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


class _Cursor:
    def __init__(self, path: str, buf: memoryview):
        self.path = path
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp keeps invalid UTF-8 (some vocab pieces are raw bytes); so do we.
            return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        """A string array without per-element bookkeeping: vocabularies hold 50k-260k entries
        and the generic path cost half a second of every start-up. One pass finds (and bounds
        checks) where the strings are; then their bytes, NUL-separated, are decoded at once."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        starts, lens = [0] * count, [0] * count
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            starts[i], lens[i] = pos, n
            pos += n
        lo, self.pos = self.pos, pos
        if count == 0:
            return []
        region = np.frombuffer(buf, np.uint8, count=pos - lo, offset=lo).copy()
        st = np.asarray(starts, np.int64) - lo
        keep = np.ones(region.size, bool)
        keep[(st[:, None] - 8 + np.arange(8)).ravel()] = False  # the length fields
        region[st[1:] - 1] = 0  # each length's last byte becomes the separator before its string
        keep[st[1:] - 1] = True
        out = region[keep].tobytes().decode("utf-8", errors="surrogateescape").split("\x00")
        if len(out) == count:
            return out
        # a string holds NUL itself: decode one by one (llama.cpp keeps invalid UTF-8 too)
        return [bytes(buf[a:a + n]).decode("utf-8", errors="surrogateescape")
                for a, n in zip(starts, lens)]

    def value(self, vtype: int, what: str) -> tuple[Any, ValueType, ValueType | None]:
        try:
            vt = ValueType(vtype)
        except ValueError:
            raise self.fail(f"{what}: unknown metadata value type {vtype}") from None
        if vt == ValueType.STRING:
            return self.string(what), vt, None
        if vt == ValueType.ARRAY:
            et_raw = self.u32(f"element type of {what}")
            try:
                et = ValueType(et_raw)
            except ValueError:
                raise self.fail(f"{what}: unknown array element type {et_raw}") from None
            count = self.u64(f"length of {what}")
            if et == ValueType.STRING:
                # each string takes at least its 8-byte length
                self.need(count * 8, f"{count} strings of {what}")
                return self.strings(count, what), vt, et
            if et == ValueType.ARRAY:
                # nested arrays are legal in the spec but used by nobody; read them generically
                out = []
                for i in range(count):
                    out.append(self.value(ValueType.ARRAY, f"{what}[{i}]")[0])
                return out, vt, et
            dt = np.dtype(_NP_DTYPE[et])
            self.need(count * dt.itemsize, f"{count} elements of {what}")
            arr = np.frombuffer(self.buf, dtype=dt.newbyteorder("<"), count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return arr.astype(dt).tolist(), vt, et
        return self.unpack(_SCALAR_FMT[vt], what), vt, None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF file; tensor data stays memory-mapped."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GGUFError(f"{path}: no such file")
    if os.path.isdir(path):
        raise GGUFError(f"{path}: is a directory, expected a .gguf file")
    file_size = os.path.getsize(path)
    if file_size == 0:
        raise GGUFError(f"{path}: empty file, not a GGUF model")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(path, memoryview(mm))

    cur.need(4, "magic")
    magic = bytes(cur.buf[0:4])
    cur.pos = 4
    if magic != GGUF_MAGIC:
        raise cur.fail(f"bad magic {magic!r}: not a GGUF file (expected b'GGUF')")
    version = cur.u32("version")
    if version == 1:
        raise cur.fail("GGUF version 1 is obsolete and not supported (re-convert the model)")
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # every kv needs >= 12 bytes (key length + type), every tensor info >= 24: reject lies early
    if n_kv * 12 > file_size or n_tensors * 24 > file_size:
        raise cur.fail(
            f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"impossible in a {file_size}-byte file"
        )

    metadata: dict[str, Any] = {}
    mtypes: dict[str, tuple[ValueType, ValueType | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}")
        vtype = cur.u32(f"type of metadata '{key}'")
        val, vt, et = cur.value(vtype, f"metadata '{key}'")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key '{key}'")
        metadata[key] = val
        mtypes[key] = (vt, et)

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment = {alignment!r} is not a power of two")

    raw_infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.u32(f"n_dims of tensor '{name}'")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (max {GGML_MAX_DIMS})")
        ne = [cur.u64(f"dimension {d} of tensor '{name}'") for d in range(n_dims)]
        qtype = cur.u32(f"type of tensor '{name}'")
        offset = cur.u64(f"offset of tensor '{name}'")
        raw_infos.append((name, ne, qtype, offset))

    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, qtype, rel in raw_infos:
        if name in tensors:
            raise cur.fail(f"duplicate tensor name '{name}'")
        try:
            info = qtype_info(qtype)
        except KeyError:
            raise cur.fail(f"tensor '{name}' has unknown ggml type id {qtype}") from None
        n = 1
        for d in ne:
            if d == 0 or d >= 2**62:
                raise cur.fail(f"tensor '{name}' has absurd dimensions {ne}")
            n *= d
            if n >= 2**62:
                raise cur.fail(f"tensor '{name}' has absurd dimensions {ne} (too many elements)")
        row = ne[0] if ne else 1
        if row % info.block_size:
            raise cur.fail(
                f"tensor '{name}' ({info.name}) row length {row} is not a multiple of "
                f"the block size {info.block_size}"
            )
        nbytes = n // info.block_size * info.type_size
        if rel % alignment:
            raise cur.fail(f"tensor '{name}' offset {rel} is not aligned to {alignment}")
        start = data_offset + rel
        if start + nbytes > file_size:
            raise cur.fail(
                f"tensor '{name}' data ends at byte {start + nbytes}, past the end of the "
                f"file ({file_size} bytes): truncated download?"
            )
        tensors[name] = TensorInfo(
            name=name,
            shape=tuple(int(d) for d in reversed(ne)),
            qtype=int(qtype),
            offset=start,
            nbytes=nbytes,
            data=mm[start : start + nbytes],
        )
    return GGUFFile(
        path=path,
        version=version,
        metadata=metadata,
        metadata_types=mtypes,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=file_size,
        mapping=mm,
    )
