"""Control vectors: llama.cpp's ``--control-vector`` / ``--control-vector-scaled`` /
``--control-vector-layer-range`` (common/common.cpp ``common_control_vector_load``,
src/llama-adapter.cpp ``llama_adapter_cvec``).

A control vector GGUF holds F32 1-D tensors ``direction.{il}`` (il >= 1); each file's directions
are scaled by its strength and summed per layer (several files too), and layer il's output (after
its feed-forward residual, llama.cpp's ``l_out``) gets its vector added when il lies in the layer
range (default 1 .. n_layer). Layer 0 never takes one, nor does a layer past n_layer - 1.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jllama.errors import ModelError
from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf

_NAME = re.compile(r"direction\.(-?\d+)$")


def _load_one(path: str, strength: float) -> np.ndarray:
    """[n_layers_in_file, n_embd] f32: row il - 1 for direction.il, scaled and summed."""
    try:
        g = read_gguf(path)
    except OSError as e:
        raise ModelError(f"control vector {path}: {e.strerror or e}") from None
    if not g.tensors:
        raise ModelError(f"control vector {path}: no direction tensors")
    n_embd, rows = None, {}
    for name, t in g.tensors.items():
        m = _NAME.match(name)
        il = int(m.group(1)) if m else -1
        if il < 0:
            raise ModelError(f"control vector {path}: tensor '{name}' is no direction.N")
        if il == 0:
            raise ModelError(f"control vector {path}: invalid (zero) direction layer index")
        if t.qtype != QType.F32:
            raise ModelError(f"control vector {path}: direction.{il} is not F32")
        if len(t.shape) != 1:
            raise ModelError(f"control vector {path}: direction.{il} is not 1-D")
        if n_embd is None:
            n_embd = t.n_elements
        elif t.n_elements != n_embd:
            raise ModelError(f"control vector {path}: direction tensors of different sizes")
        v = np.frombuffer(t.data, dtype="<f4", count=n_embd).astype(np.float32)
        acc = rows.get(il, np.zeros(n_embd, np.float32))
        rows[il] = acc + v * np.float32(strength)  # f32 as llama.cpp's dst += src * strength
    out = np.zeros((max(rows), n_embd), np.float32)
    for il, v in rows.items():
        out[il - 1] = v
    return out


def load_control_vectors(entries: list[tuple[str, float]]) -> np.ndarray:
    """The summed vectors [n, n_embd] (row il - 1 for layer il) of (path, strength) entries."""
    total = None
    for path, strength in entries:
        cur = _load_one(path, strength)
        if total is None:
            total = cur
            continue
        if cur.shape[1] != total.shape[1]:
            raise ModelError(f"control vector {path}: n_embd {cur.shape[1]} differs from the "
                             f"previous files' {total.shape[1]}")
        n = max(len(total), len(cur))
        total = np.pad(total, ((0, n - len(total)), (0, 0)))
        total[: len(cur)] += cur
    return total


def attach(model, n_embd: int, data: np.ndarray, start: int = -1, end: int = -1) -> None:
    """Give each block of ``model`` (its ``blocks``, each with a ``cvec`` slot) its layer's
    vector; layers outside [start, end] or without one get none (start/end <= 0: 1 and the
    number of layers, as common_init_from_params)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "cvec") for b in blocks):
        raise ModelError(f"control vectors are not built for the {model.spec.arch} architecture")
    if data.shape[1] != n_embd:
        raise ModelError(f"control vector n_embd {data.shape[1]} does not match the model's "
                         f"{n_embd}")
    n_layer = len(blocks)
    start = start if start > 0 else 1
    end = end if end > 0 else n_layer
    # every block holds a vector (zeros where none applies, which adds nothing), so alike blocks
    # keep one scanned trace
    for il, b in enumerate(blocks):
        v = np.zeros(n_embd, np.float32)
        if 1 <= il <= len(data) and start <= il <= end:
            v = data[il - 1]
        b.cvec = nnx.Param(jnp.asarray(v))
