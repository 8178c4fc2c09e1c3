"""The KV cache: a pytree passed into the jitted step and returned updated (donated).

One array per layer (``[batch, n_kv_heads, max_len, head_dim]``), where layers of one model may
differ (sliding-window vs global, head sizes); or, for a decoder whose layers run as a
``lax.scan`` (``stacked``), one array ``[batch, n_layer, n_kv_heads, max_len, head_dim]`` each
for k and v, which the loop updates in place under donation (a loop cannot index a tuple) and
the kernels read at a traced layer (``LayerCache``). Batch stays the leading axis either way
(the Engine's slot rows). Sequence lengths live on the host (the Engine owns them); the cache
itself is only storage, and for M-RoPE models (qwen2vl) the offset of each row's next rope
position from its next cell (``pos_delta``: an image takes nx * ny cells but only max(nx, ny)
positions, as llama.cpp's cells record positions apart from their index).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jllama.models.kvquant import check_kv_type, row_shape


@jax.tree_util.register_pytree_node_class
@dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    k_type: str = "f32"  # static: f32 | f16 | bf16 | q8_0 | q4_0 (see kvquant.py)
    v_type: str = "f32"
    pos_delta: jax.Array | None = None  # [B] int32 (M-RoPE): rope position minus cell index

    def tree_flatten(self):
        return (self.k, self.v, self.pos_delta), (self.k_type, self.v_type)

    @classmethod
    def tree_unflatten(cls, aux, children):
        k, v, d = children
        return cls(k, v, *aux, d)

    def replace(self, k, v) -> KVCache:
        return KVCache(tuple(k), tuple(v), self.k_type, self.v_type, self.pos_delta)

    def with_pos_delta(self, d: jax.Array) -> KVCache:
        return KVCache(self.k, self.v, self.k_type, self.v_type, d)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[-2]

    @property
    def stacked(self) -> bool:
        """One [B, L, KVH, S, row] array per half instead of one per layer."""
        return self.k[0].ndim == 5

    def layers(self) -> tuple[list[jax.Array], list[jax.Array]]:
        """Per-layer [B, KVH, S, row] arrays (slices of a stacked cache)."""
        if not self.stacked:
            return list(self.k), list(self.v)
        n = self.k[0].shape[1]
        return ([self.k[0][:, i] for i in range(n)], [self.v[0][:, i] for i in range(n)])

    @property
    def nbytes(self) -> int:
        return sum(int(a.size * a.dtype.itemsize) for a in (*self.k, *self.v))

    @classmethod
    def create(cls, n_layer: int, batch: int, n_kv_heads: int, max_len: int, head_dim_k: int,
               head_dim_v: int | None = None, dtype: str = "f32",
               dtype_v: str | None = None, stacked: bool = False,
               pos_delta: bool = False) -> KVCache:
        dtype_v = dtype_v or dtype
        hv = head_dim_v or head_dim_k
        check_kv_type(dtype, head_dim_k)
        check_kv_type(dtype_v, hv)
        nk, dk = row_shape(dtype, head_dim_k)
        nv, dv = row_shape(dtype_v, hv)
        # Host zeros moved in, not jnp.zeros: one eager device program per layer and cache
        # half would be compiled on every warm start, on the time-to-first-token path; the
        # buffers are still XLA's own (donation works).
        def zeros(n: int, dt, lead: tuple[int, ...] = ()) -> jax.Array:
            return jax.device_put(np.zeros((batch, *lead, n_kv_heads, max_len, n),
                                           jnp.dtype(dt)))

        delta = jax.device_put(np.zeros(batch, np.int32)) if pos_delta else None
        if stacked:
            return cls((zeros(nk, dk, (n_layer,)),), (zeros(nv, dv, (n_layer,)),), dtype, dtype_v,
                       delta)
        k = tuple(zeros(nk, dk) for _ in range(n_layer))
        v = tuple(zeros(nv, dv) for _ in range(n_layer))
        return cls(k, v, dtype, dtype_v, delta)


@jax.tree_util.register_pytree_node_class
@dataclass
class LayerCache:
    """Layer ``index`` (traced in a scan, else static) of a stacked cache half ``full``
    [B, L, KVH, S, row]: what a decoder block gets instead of its own array. Writes update
    ``full`` in place; the flash-attention kernel reads the layer where it lies."""

    full: jax.Array
    index: jax.Array | int

    def tree_flatten(self):
        return (self.full, self.index), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def get(self) -> jax.Array:
        """The layer as a [B, KVH, S, row] array (a copy: for the XLA attention path)."""
        return jax.lax.dynamic_index_in_dim(self.full, self.index, axis=1, keepdims=False)
