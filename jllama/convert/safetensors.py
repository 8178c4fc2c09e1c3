"""Reading ``*.safetensors`` files: the header (JSON after a u64 length), tensors memory-mapped.

Our own reader, so converting needs neither torch nor the ``safetensors`` package. Names come
out sorted within each file, as ``safetensors``' own ``keys()`` and convert_hf_to_gguf.py give
them: that order decides the tensor order of the GGUF file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jllama.errors import ModelError

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


@dataclass(frozen=True)
class StTensor:
    name: str
    dtype: str  # safetensors' name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int

    def load(self) -> np.ndarray:
        """The tensor as numpy: F16 stays float16, BF16 becomes (exact) float32."""
        if self.dtype not in _DTYPES:
            raise ModelError(f"{self.path.name}: tensor '{self.name}' has dtype {self.dtype}, "
                             "which convert-hf does not read")
        dt = np.dtype(_DTYPES[self.dtype])
        n = int(np.prod(self.shape, dtype=np.int64))
        if n * dt.itemsize != self.nbytes:
            raise ModelError(f"{self.path.name}: tensor '{self.name}' of shape {list(self.shape)} "
                             f"{self.dtype} should take {n * dt.itemsize} bytes, the header "
                             f"says {self.nbytes}")
        a = np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=(n,)) if n else \
            np.zeros(0, dt)
        if self.dtype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(a).reshape(self.shape)


def read_header(path: Path) -> list[StTensor]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ModelError(f"{path.name}: safetensors header of {n} bytes runs past the end "
                             f"of the {size}-byte file")
        try:
            meta = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path.name}: safetensors header is not JSON: {e}") from None
    out = []
    for name, m in meta.items():
        if name == "__metadata__":
            continue
        b, e = m["data_offsets"]
        if 8 + n + e > size:
            raise ModelError(f"{path.name}: tensor '{name}' runs past the end of the file "
                             "(truncated download?)")
        out.append(StTensor(name, m["dtype"], tuple(m["shape"]), path, 8 + n + b, e - b))
    return sorted(out, key=lambda t: t.name)


def index_tensors(model_dir: Path) -> dict[str, StTensor]:
    """Every tensor of the checkpoint in convert_hf_to_gguf.py's order: the parts sorted by
    file name (from ``model.safetensors.index.json`` when there is one), names sorted within
    each part. Raises ``ModelError`` for no weights or a part the index names but lacks."""
    index_file = model_dir / "model.safetensors.index.json"
    parts = sorted(p.name for p in model_dir.iterdir()
                   if p.name.startswith("model") and p.name.endswith(".safetensors"))
    from_index: set[str] = set()
    weight_map: dict[str, str] = {}
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index_file.name}: no 'weight_map' ({e})") from None
        from_index = set(weight_map)
        parts = sorted(dict.fromkeys(weight_map.values()))
    if not parts:
        raise ModelError(f"{model_dir}: no model weights (model*.safetensors)")
    missing = [p for p in parts if not (model_dir / p).is_file()]
    if missing:
        raise ModelError(f"{model_dir}: missing weight file(s) named by the index: "
                         f"{', '.join(missing)}")
    tensors: dict[str, StTensor] = {}
    for p in parts:
        for t in read_header(model_dir / p):
            tensors[t.name] = t
    if from_index and set(tensors) != from_index:
        lost = sorted(from_index - set(tensors))
        extra = sorted(set(tensors) - from_index)
        raise ModelError(f"{model_dir}: the weight files and their index disagree "
                         f"(missing: {lost[:5]}, not in the index: {extra[:5]})")
    return tensors


Loader = Callable[[], np.ndarray]
