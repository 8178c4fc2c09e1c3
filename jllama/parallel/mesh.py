"""Put an Engine's weights and KV cache on a ("data", "model") device mesh.

The engine's jitted steps close over nothing device-specific: parameters and cache are
arguments. Re-placing ``engine.state`` and ``engine.cache`` with ``NamedSharding``s (chosen in
``rules.py``) is therefore all XLA's SPMD partitioner needs; each step recompiles once for the
new input shardings. Two small adjustments are made on the engine instance (no engine code
changes): caches it creates later (``score_batch``'s) are placed the same way, and the host-read
outputs (logits, sampled tokens) are constrained to be replicated, which a multi-process run
needs (a process can only read arrays it holds whole) and which costs one small all-gather.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jllama.engine.cache import KVCache
from jllama.errors import ConfigError
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


# engine attribute -> (static argnames, donated argnames, indices of outputs read on the host)
ENGINE_JITS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...] | None]] = {
    "_forward_slot": (("kv_len",), ("cache",), (0,)),
    "_forward_all": (("kv_len",), ("cache",), (0,)),
    "_forward_logprobs": (("kv_len",), ("cache",), (0, 1)),
    "_decode_sample": (("kv_len",), ("cache", "history"), (0, 1, 3)),
    "_sample": ((), (), None),  # None: the single output
    "_first_sample": ((), (), None),
}


def _host_safe(x: Any) -> Any:
    """Arrays committed to one device become numpy (jit replicates those), so inputs the engine
    builds with ``jnp.asarray`` are valid next to arrays spanning several processes."""
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 and x.is_fully_addressable:
        return np.asarray(x)
    return x


def _replicated_outputs(fn, mesh: Mesh, static: tuple[str, ...], donate: tuple[str, ...],
                        idx: tuple[int, ...] | None, multiprocess: bool):
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return fn
    rep = NamedSharding(mesh, P())

    @functools.wraps(inner)
    def constrained(*args, **kwargs):
        out = inner(*args, **kwargs)
        if idx is None:
            return jax.lax.with_sharding_constraint(out, rep)
        out = list(out)
        for i in idx:
            out[i] = jax.tree_util.tree_map(
                lambda a: jax.lax.with_sharding_constraint(a, rep), out[i])
        return tuple(out)

    jitted = jax.jit(constrained, static_argnames=static or None, donate_argnames=donate or None)
    if not multiprocess:
        return jitted

    def call(*args, **kwargs):
        args = jax.tree_util.tree_map(_host_safe, args)
        kwargs = {k: v if k in static else jax.tree_util.tree_map(_host_safe, v)
                  for k, v in kwargs.items()}
        return jitted(*args, **kwargs)

    return call


def apply_mesh(engine: Any, mesh_cfg: MeshLike, devices: list | None = None,
               strict: bool = False) -> rules.Plan:
    """Shard ``engine``'s weights and cache over a ("data", "model") mesh; returns the plan.

    A 1x1 mesh is a no-op. ``strict=True`` raises ``ConfigError`` for anything the rules would
    otherwise replicate (e.g. 9 heads on a 2-way model axis).
    """
    mesh = make_mesh(mesh_cfg, devices)
    spec = engine.spec
    plan = rules.Plan(mesh, attention_sharded=False)
    if mesh.size == 1:
        return plan
    if engine.n_slots % mesh.shape["data"]:
        raise ConfigError(
            f"mesh axis 'data' of size {mesh.shape['data']} does not divide "
            f"runtime.n_slots={engine.n_slots} (the KV cache's batch axis)")
    plan.attention_sharded = rules.check_attention(plan, spec.n_head, spec.n_head_kv, strict)
    engine.state = shard_state(engine.state, plan, strict)
    engine.cache = shard_cache(engine.cache, plan)
    multiprocess = jax.process_count() > 1
    if multiprocess:
        engine.history = place(np.asarray(engine.history), NamedSharding(mesh, P()))
    new_cache = engine._new_cache
    engine._new_cache = lambda batch: shard_cache(new_cache(batch), plan)
    for attr, (static, donate, idx) in ENGINE_JITS.items():
        if hasattr(engine, attr):
            setattr(engine, attr, _replicated_outputs(getattr(engine, attr), mesh, static,
                                                      donate, idx, multiprocess))
    engine.mesh = mesh
    engine.sharding_plan = plan
    return plan


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held by each (addressable) device."""
    out: dict[Any, int] = {}
    for a in jax.tree_util.tree_leaves(tree):
        for s in a.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out
