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


def _row_shapes(dtype: str, dtype_v: str | None, head_dim_k: int, head_dim_v: int | None):
    """The V type (default: K's) and the (elements, dtype) of a K row and a V row, both types
    checked against their head sizes: shared by the dense and the paged cache."""
    dtype_v = dtype_v or dtype
    hv = head_dim_v or head_dim_k
    check_kv_type(dtype, head_dim_k)
    check_kv_type(dtype_v, hv)
    return dtype_v, row_shape(dtype, head_dim_k), row_shape(dtype_v, hv)


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

    paged = False

    def with_pos_delta(self, d: jax.Array) -> KVCache:
        return KVCache(self.k, self.v, self.k_type, self.v_type, d)

    def slot_rows(self, slot) -> KVCache:
        """Row ``slot`` (traced) as a batch of one (a copy of its rows)."""
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, 0), self)

    def put_slot_rows(self, slot, rows: KVCache) -> KVCache:
        """``slot_rows``'s result after a step, written back in place."""
        return jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, 0),
                            self, rows)

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
        dtype_v, (nk, dk), (nv, dv) = _row_shapes(dtype, dtype_v, head_dim_k, head_dim_v)
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
        """The layer as a [B, KVH, S, row] array (a copy: for the XLA attention path; of a
        paged pool, its pages gathered in each row's order)."""
        if isinstance(self.full, PagedPool):
            return self.full.dense(self.index)
        return jax.lax.dynamic_index_in_dim(self.full, self.index, axis=1, keepdims=False)


@jax.tree_util.register_pytree_node_class
@dataclass
class PagedPool:
    """One half (k or v) of a paged cache as the decoder's layer loop carries it: the pool
    ``[L, KVH, n_pages, page_size, row]`` with the block table ``[B, max_pages]`` that maps each
    row's positions to pages. ``impl`` (static): how attention reads it, "xla" (gather the pages,
    then the dense attention's own math: on the CPU the same bits as the dense cache),
    "pallas" (the ragged paged kernel, compiled) or "interpret" (the kernel interpreted)."""

    pages: jax.Array
    table: jax.Array
    impl: str = "xla"

    def tree_flatten(self):
        return (self.pages, self.table), (self.impl,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def page_size(self) -> int:
        return self.pages.shape[3]

    def dense(self, layer, n_pages: int | None = None) -> jax.Array:
        """Layer ``layer`` as the dense cache lays it out, [B, KVH, n_pages * page_size, row]
        (a gather of each row's first ``n_pages`` table columns, default all): for the paths
        that read a layer as an array (the XLA attention, DeepSeek2's latent attention)."""
        n = self.table.shape[1] if n_pages is None else n_pages
        x = jax.lax.dynamic_index_in_dim(self.pages, layer, 0, keepdims=False)
        x = x[:, self.table[:, :n]].transpose(1, 0, 2, 3, 4)  # [B, KVH, n, ps, row]
        return x.reshape(*x.shape[:2], n * self.page_size, x.shape[-1])


PAGED_IMPLS = ("xla", "pallas", "interpret")


@jax.tree_util.register_pytree_node_class
@dataclass
class PagedKVCache:
    """The KV cache as a page pool (see kernels/ragged_paged_attention.py for the layout and
    why): ``k``/``v`` one pool each ``[L, KVH, n_pages, page_size, row]``, stacked over layers
    as the dense stacked cache is (the decoder scans its layers over it); ``block_table``
    ``[B, max_pages]`` int32, row b's page for positions ``j * page_size ..`` at column j
    (page 0 is scratch: unallocated columns point there, so writes past a row's pages, from
    padded prompt tails or idle decode rows, land where nothing reads them). The Engine owns
    the table (engine/pages.py) and puts it here before each step; the pools are what the
    steps update in place (donated). Batch is the table's leading axis: a slot's rows are its
    table row over the whole pool (``slot_rows``)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    block_table: jax.Array
    k_type: str = "f16"
    v_type: str = "f16"
    impl: str = "xla"  # static: see PagedPool
    pos_delta: jax.Array | None = None

    paged = True
    stacked = True

    def tree_flatten(self):
        return (self.k, self.v, self.block_table, self.pos_delta), (self.k_type, self.v_type,
                                                                    self.impl)

    @classmethod
    def tree_unflatten(cls, aux, children):
        k, v, t, d = children
        return cls(k, v, t, *aux, d)

    def replace(self, k, v) -> PagedKVCache:
        return PagedKVCache(tuple(k), tuple(v), self.block_table, self.k_type, self.v_type,
                            self.impl, self.pos_delta)

    def with_pos_delta(self, d: jax.Array) -> PagedKVCache:
        return PagedKVCache(self.k, self.v, self.block_table, self.k_type, self.v_type,
                            self.impl, d)

    def with_table(self, table: jax.Array) -> PagedKVCache:
        return PagedKVCache(self.k, self.v, table, self.k_type, self.v_type, self.impl,
                            self.pos_delta)

    def pools(self) -> tuple[PagedPool, PagedPool]:
        """The halves as the layer loop carries them."""
        t = self.block_table
        return PagedPool(self.k[0], t, self.impl), PagedPool(self.v[0], t, self.impl)

    def slot_rows(self, slot) -> PagedKVCache:
        """Row ``slot`` (traced) as a batch of one: its table row over the whole pool."""
        d = (None if self.pos_delta is None
             else jax.lax.dynamic_slice_in_dim(self.pos_delta, slot, 1, 0))
        return PagedKVCache(self.k, self.v,
                            jax.lax.dynamic_slice_in_dim(self.block_table, slot, 1, 0),
                            self.k_type, self.v_type, self.impl, d)

    def put_slot_rows(self, slot, rows: PagedKVCache) -> PagedKVCache:
        """``slot_rows``'s result after a step: its pools (written through its table row)."""
        d = (None if self.pos_delta is None
             else jax.lax.dynamic_update_slice_in_dim(self.pos_delta, rows.pos_delta, slot, 0))
        return PagedKVCache(rows.k, rows.v, self.block_table, self.k_type, self.v_type,
                            self.impl, d)

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[3]

    @property
    def n_pages(self) -> int:
        return self.k[0].shape[2]

    @property
    def max_len(self) -> int:
        return self.block_table.shape[1] * self.page_size

    @property
    def nbytes(self) -> int:
        return sum(int(a.size * a.dtype.itemsize) for a in (*self.k, *self.v))

    @classmethod
    def create(cls, n_layer: int, batch: int, n_kv_heads: int, max_len: int, head_dim_k: int,
               head_dim_v: int | None = None, dtype: str = "f16", dtype_v: str | None = None,
               page_size: int = 16, n_pages: int | None = None, impl: str = "xla",
               pos_delta: bool = False) -> PagedKVCache:
        """A pool of ``n_pages`` pages (default: enough for every row's full ``max_len``,
        plus the scratch page 0) and an all-scratch table."""
        if impl not in PAGED_IMPLS:
            raise ValueError(f"paged attention impl {impl!r}: expected one of {PAGED_IMPLS}")
        dtype_v, (nk, dk), (nv, dv) = _row_shapes(dtype, dtype_v, head_dim_k, head_dim_v)
        max_pages = -(-max_len // page_size)
        if n_pages is None:
            n_pages = batch * max_pages + 1
        # host zeros moved in, as KVCache.create does (no eager device program per start)
        def zeros(n: int, dt) -> jax.Array:
            return jax.device_put(np.zeros((n_layer, n_kv_heads, n_pages, page_size, n),
                                           jnp.dtype(dt)))

        delta = jax.device_put(np.zeros(batch, np.int32)) if pos_delta else None
        table = jax.device_put(np.zeros((batch, max_pages), np.int32))
        return cls((zeros(nk, dk),), (zeros(nv, dv),), table, dtype, dtype_v, impl, delta)
