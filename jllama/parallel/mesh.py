"""Put an Engine's weights and KV cache on a ("data", "model") device mesh.

``plan_engine`` makes an ``EnginePlan``, which the Engine receives when it is built: the
parameters and caches are placed with ``NamedSharding``s chosen in ``rules.py`` (all XLA's SPMD
partitioner needs), caches made later (``score_batch``'s) are placed the same way, and the
outputs read on the host (logits, sampled tokens) are constrained to be replicated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jllama.errors import ConfigError
from jllama.models.cache import KVCache
from jllama.parallel import rules
from jllama.quant.qtensor import QTensor

AXES = ("data", "model")


class MeshLike(Protocol):
    data: int
    model: int


def make_mesh(cfg: MeshLike, devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    d, m = int(cfg.data), int(cfg.model)
    if d < 1 or m < 1:
        raise ConfigError(f"mesh: data={d} and model={m} must both be >= 1")
    if d * m != len(devices):
        raise ConfigError(
            f"mesh: data={d} x model={m} = {d * m} devices, but {len(devices)} are available "
            f"({devices[0].platform}); set mesh.data * mesh.model to the device count"
        )
    # model-axis neighbours adjacent in device order (same host / fastest links)
    arr = np.asarray(devices, dtype=object).reshape(d, m)
    return Mesh(arr, AXES)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """``device_put`` that also works when the mesh spans several processes: every process
    holds the same full value and contributes the shards on its own devices. Arrays already
    placed so (restored from a checkpoint straight into their shards) are kept as they are."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _param_specs(state: Any, plan: rules.Plan, strict: bool) -> list[tuple[P, ...]]:
    """Per QTensor / array leaf of the state (in flatten order): its arrays' specs."""
    out = []
    items = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, QTensor))[0]
    for path, leaf in items:
        names = rules.path_names(path)
        name = ".".join(names)
        if isinstance(leaf, QTensor):
            axes = rules.param_axes(names, len(leaf.shape))
            specs = rules.qtensor_specs(plan, name, leaf, axes, strict)
        else:
            axes = rules.param_axes(names, np.ndim(leaf))
            specs = (rules.array_spec(plan, name, leaf, axes, strict),)
        plan.specs[name] = specs
        out.append(specs)
    return out


def shard_state(state: Any, plan: rules.Plan, strict: bool = False) -> Any:
    """The NNX state with every array placed by the rules."""
    specs = iter(_param_specs(state, plan, strict))
    mesh = plan.mesh

    def put(leaf):
        sp = next(specs)
        if isinstance(leaf, QTensor):
            leaf = leaf.natural()  # shards split rows: no offset bytes in front
            leaves, tree = jax.tree_util.tree_flatten(leaf.data)
            placed = [place(a, NamedSharding(mesh, s)) for a, s in zip(leaves, sp, strict=True)]
            return QTensor(jax.tree_util.tree_unflatten(tree, placed), leaf.qtype, leaf.shape,
                           leaf.layout)
        return place(leaf, NamedSharding(mesh, sp[0]))

    return jax.tree_util.tree_map(put, state, is_leaf=lambda x: isinstance(x, QTensor))


def shard_cache(cache: Any, plan: rules.Plan) -> Any:
    kv = isinstance(cache, KVCache)
    return jax.tree_util.tree_map(
        lambda a: place(a, NamedSharding(plan.mesh, rules.cache_spec(plan, a.shape, kv))), cache)


def _host_safe(x: Any) -> Any:
    """Arrays committed to one device become numpy (jit replicates those), so inputs the engine
    builds with ``jnp.asarray`` are valid next to arrays spanning several processes."""
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 and x.is_fully_addressable:
        return np.asarray(x)
    return x


@dataclass
class EnginePlan(rules.Plan):
    """The shardings of one Engine (``rules.Plan``) and how it places its weights and caches and
    jits its steps; the Engine receives it when it is built (``Engine(..., plan=...)``)."""

    strict: bool = False

    @property
    def multiprocess(self) -> bool:
        return jax.process_count() > 1

    def shard_state(self, state: Any) -> Any:
        return shard_state(state, self, self.strict)

    def shard_cache(self, cache: Any) -> Any:
        return shard_cache(cache, self)

    def replicate(self, host: np.ndarray) -> jax.Array:
        """A small host array (the penalty history) on every device of the mesh."""
        return place(host, NamedSharding(self.mesh, P()))

    def jit(self, fn, static: tuple[str, ...], donate: tuple[str, ...],
            host: tuple[int, ...] | None):
        """jax.jit of an Engine step whose host-read outputs (``host``: their indices, None for
        a single output) are constrained to be replicated: a process can only read arrays it
        holds whole, and it costs one small all-gather. In a multi-process run, arrays on one
        local device are handed in as numpy."""
        rep = NamedSharding(self.mesh, P())

        @functools.wraps(fn)
        def constrained(*args, **kwargs):
            out = fn(*args, **kwargs)
            if host is None:
                return jax.lax.with_sharding_constraint(out, rep)
            out = list(out)
            for i in host:
                out[i] = jax.tree_util.tree_map(
                    lambda a: jax.lax.with_sharding_constraint(a, rep), out[i])
            return tuple(out)

        jitted = jax.jit(constrained, static_argnames=static or None,
                         donate_argnames=donate or None)
        if not self.multiprocess:
            return jitted

        def call(*args, **kwargs):
            args = jax.tree_util.tree_map(_host_safe, args)
            kwargs = {k: v if k in static else jax.tree_util.tree_map(_host_safe, v)
                      for k, v in kwargs.items()}
            return jitted(*args, **kwargs)

        return call


def plan_engine(spec: Any, n_slots: int, mesh_cfg: MeshLike, devices: list | None = None,
                strict: bool = False) -> EnginePlan:
    """The plan for an Engine of this model and slot count on a ("data", "model") mesh.
    ``strict=True`` raises ``ConfigError`` for anything the rules would otherwise replicate
    (e.g. 9 heads on a 2-way model axis)."""
    mesh = make_mesh(mesh_cfg, devices)
    if n_slots % mesh.shape["data"]:
        raise ConfigError(
            f"mesh axis 'data' of size {mesh.shape['data']} does not divide "
            f"the slot count {n_slots} (server.parallel; the KV cache's batch axis)")
    plan = EnginePlan(mesh, attention_sharded=False, strict=strict)
    plan.attention_sharded = rules.check_attention(plan, spec.n_head, spec.n_head_kv, strict)
    return plan


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held by each (addressable) device."""
    out: dict[Any, int] = {}
    for a in jax.tree_util.tree_leaves(tree):
        for s in a.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out
