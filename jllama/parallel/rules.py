"""Which array axis goes to which mesh axis: the one table of sharding rules.

Two levels, so that a new architecture or a new mesh layout is a one-line change:

- ``PARAM_AXES`` names, per module attribute (``wq``, ``down``, ...), the *logical* axes of its
  weight ``(n_out, n_in)``: ``heads`` (query rows / output-projection columns), ``kv_heads``,
  ``ffn``, ``vocab``, ``experts`` (the leading axis of stacked expert weights).
- ``LOGICAL_TO_MESH`` maps logical axes to mesh axes (``"model"`` for tensor parallelism,
  ``"data"`` for the batch / slots of the KV cache).

Quantized weights keep ggml blocks: a row is split only between whole blocks (per layout: GGUF
blocks, the ``i8`` repack's scale groups), so an ``n_in`` axis (``wo``, ``down``) is sharded only
when its block count divides evenly by the mesh axis. Attention is all-or-nothing: query, key,
value and output projections and the KV cache's head axis are sharded together when both head
counts divide by the model axis, else all replicated (``strict`` turns that into a
``ConfigError``). Every fallback is recorded in the plan's ``notes``, so a user sees what ran
replicated and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from jax.sharding import PartitionSpec as P

from jllama.errors import ConfigError
from jllama.quant.qtensor import QTensor

# logical axis -> mesh axis
LOGICAL_TO_MESH: dict[str, str] = {
    "heads": "model",
    "kv_heads": "model",
    "ffn": "model",
    "vocab": "model",
    "experts": "model",
    "batch": "data",
}

# module attribute -> logical axes of its weight (n_out, n_in); 3-D (expert) weights get
# "experts" on their leading axis instead (see ``param_axes``)
PARAM_AXES: dict[str, tuple[str | None, str | None]] = {
    "wq": ("heads", None),
    "wk": ("kv_heads", None),
    "wv": ("kv_heads", None),
    "wo": (None, "heads"),
    "gate": ("ffn", None),
    "up": ("ffn", None),
    "down": (None, "ffn"),
    "tok_embd": ("vocab", None),
    "output": ("vocab", None),
}
ATTENTION_AXES = ("heads", "kv_heads")
EXPERT_PARAMS = ("gate", "up", "down")


@dataclass
class Plan:
    """The shardings chosen for one engine, and why anything stayed replicated."""

    mesh: jax.sharding.Mesh
    attention_sharded: bool
    notes: list[str] = field(default_factory=list)
    specs: dict[str, tuple[P, ...]] = field(default_factory=dict)  # param path -> per-leaf spec

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)


def path_names(path) -> list[str]:
    """A pytree key path as plain names (``['blocks', '3', 'wq', 'weight']``)."""
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return [n for n in out if n not in ("value", "raw_value")]


def param_axes(names: list[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a parameter (from its module path), one per logical dimension."""
    # the module owning the tensor: wq/weight -> wq; ffn/gate/weight (a SwiGLU's Linear) ->
    # gate; ffn/gate (an MoE's stacked experts, a bare Param) -> gate
    role = names[-2] if names and names[-1] in ("weight", "bias") else names[-1] if names else ""
    if ndim == 3 and role in EXPERT_PARAMS:
        return ("experts", None, None)
    axes = PARAM_AXES.get(role)
    if axes is None:
        return (None,) * ndim
    if names and names[-1] == "bias":  # a bias follows its weight's rows
        return (axes[0],)[:ndim] + (None,) * (ndim - 1)
    return (*(None,) * (ndim - 2), *axes) if ndim >= 2 else (None,) * ndim


def mesh_axis(logical: str | None) -> str | None:
    return LOGICAL_TO_MESH.get(logical) if logical else None


def check_attention(plan: Plan, n_head: int, n_head_kv: int, strict: bool) -> bool:
    """Whether attention (heads and KV heads) can be split over the model axis."""
    m = plan.mesh.shape["model"]
    if m == 1:
        return False
    bad = [f"{name}={n}" for name, n in (("n_head", n_head), ("n_head_kv", n_head_kv))
           if n % m]
    if bad:
        msg = (f"mesh axis 'model' of size {m} does not divide {' and '.join(bad)}: attention "
               "(q/k/v/output projections, KV cache heads) stays replicated")
        if strict:
            raise ConfigError(msg.split(":")[0] + " (strict sharding)")
        plan.note(msg)
        return False
    return True


def _n_in_groups(qt: QTensor) -> int:
    """How many indivisible pieces a row of this weight has along n_in (blocks / scale groups)."""
    n_in = qt.shape[-1]
    if qt.layout == "i8":
        return int(qt.data[1].shape[-1])
    if qt.is_float:
        return n_in
    from jllama.gguf.constants import qtype_info

    return n_in // qtype_info(qt.qtype).block_size


def qtensor_specs(plan: Plan, name: str, qt: QTensor, axes: tuple[str | None, ...],
                  strict: bool) -> tuple[P, ...]:
    """One PartitionSpec per array of ``qt.data`` for logical ``axes`` of its logical shape."""
    mesh = plan.mesh
    dims = list(axes)
    for d, logical in enumerate(dims):
        ax = mesh_axis(logical)
        if ax is None:
            continue
        k = mesh.shape[ax]
        if logical in ATTENTION_AXES and not plan.attention_sharded:
            dims[d] = None
            continue
        size = qt.shape[d]
        is_n_in = d == len(qt.shape) - 1 and len(qt.shape) >= 2
        units = _n_in_groups(qt) if is_n_in else size
        if k > 1 and units % k:
            what = "blocks per row" if is_n_in and not qt.is_float else "size"
            msg = (f"{name}: {what} {units} along '{logical}' not divisible by mesh axis "
                   f"'{ax}' of size {k}; replicated")
            if strict:
                raise ConfigError(msg.replace("; replicated", ""))
            plan.note(msg)
            dims[d] = None
    if qt.layout == "pallas":  # k-major planes [.., n_pad]: only n_out (last axis) may split
        n_out = qt.shape[-2]
        out = []
        for a in jax.tree_util.tree_leaves(qt.data):
            row = dims[-2] if a.shape[-1] == n_out else None
            if dims[-1] is not None or (dims[-2] is not None and row is None):
                plan.note(f"{name}: pallas planes are split along n_out only")
            out.append(P(*(None,) * (a.ndim - 1), mesh_axis(row)))
        return tuple(out)
    spec = P(*(mesh_axis(x) for x in dims))
    return tuple(spec for _ in jax.tree_util.tree_leaves(qt.data))


def array_spec(plan: Plan, name: str, a, axes: tuple[str | None, ...], strict: bool) -> P:
    """PartitionSpec of a plain array parameter (norm vector, bias, MLA factors)."""
    dims = []
    for d, logical in enumerate(axes):
        ax = mesh_axis(logical)
        if ax is None or (logical in ATTENTION_AXES and not plan.attention_sharded):
            dims.append(None)
            continue
        k = plan.mesh.shape[ax]
        if a.shape[d] % k:
            msg = f"{name}: size {a.shape[d]} along '{logical}' not divisible by '{ax}'={k}"
            if strict:
                raise ConfigError(msg)
            plan.note(msg + "; replicated")
            dims.append(None)
        else:
            dims.append(ax)
    return P(*dims)


def cache_spec(plan: Plan, shape: tuple[int, ...], kv_layout: bool) -> P:
    """KV cache arrays ``[batch, kv_heads, max_len, row]``: batch over ``data`` when it divides
    (a batch that does not, e.g. one sequence scored on a data-parallel mesh, is replicated),
    KV heads over ``model`` with the attention."""
    d = plan.mesh.shape["data"]
    m = plan.mesh.shape["model"]
    batch = mesh_axis("batch") if d > 1 and shape[0] % d == 0 else None
    if len(shape) == 1:  # a value per row (KVCache.pos_delta)
        return P(batch)
    heads = None
    if kv_layout and plan.attention_sharded and len(shape) > 1 and shape[1] % m == 0:
        heads = mesh_axis("kv_heads")
    return P(batch, heads, *(None,) * (len(shape) - 2))
