"""The KV cache: a pytree passed into the jitted step and returned updated (donated).

One array per layer (``[batch, n_kv_heads, max_len, head_dim]``) rather than one stacked array:
layers of one model may differ (sliding-window vs global, head sizes), and per-layer buffers
let XLA update each in place under donation. Sequence lengths live on the host (the Engine
owns them); the cache itself is only storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

CACHE_DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}


@jax.tree_util.register_pytree_node_class
@dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    def tree_flatten(self):
        return (self.k, self.v), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(int(a.size * a.dtype.itemsize) for a in (*self.k, *self.v))

    @classmethod
    def create(cls, n_layer: int, batch: int, n_kv_heads: int, max_len: int, head_dim_k: int,
               head_dim_v: int | None = None, dtype: str = "f32") -> KVCache:
        dt = CACHE_DTYPES[dtype]
        hv = head_dim_v or head_dim_k
        k = tuple(jnp.zeros((batch, n_kv_heads, max_len, head_dim_k), dt) for _ in range(n_layer))
        v = tuple(jnp.zeros((batch, n_kv_heads, max_len, hv), dt) for _ in range(n_layer))
        return cls(k, v)
