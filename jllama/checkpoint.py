"""Orbax checkpoints of a loaded model: start without parsing, requantizing or repacking a GGUF.

A checkpoint directory holds

- ``state/``: an Orbax (``orbax.checkpoint``) tree of the Engine's NNX state leaves exactly as
  loaded, i.e. after any requantization and the backend's repacking: a QTensor contributes its
  block arrays (``layout`` "gguf": the raw ggml rows; "i8": codes, scales[, mins]; "pallas":
  planes), norms and biases their f32 arrays. Keys are the state paths (``blocks.3.wq.weight``),
  with ``#i`` for the i-th array of a QTensor.
- ``jllama-checkpoint.json`` (the marker, written last, so an interrupted save is not mistaken
  for a checkpoint): format version, the backend the layout was prepared for, the ModelSpec,
  one entry per state leaf (QTensor: ggml type, logical shape, layout, each array's shape and
  dtype; plain array: shape, dtype), and a copy of the GGUF header: every metadata key/value
  with its GGUF value type (tokenizer vocabulary, merges and chat template included) plus each
  tensor's name, shape and ggml type as in the source file (after ``--quant`` the per-leaf
  entries give the types actually stored). The weights' bytes are only in ``state/``.

Restoring rebuilds the module structure from that header by tracing the architecture's
``build`` on abstract weights (``nnx.eval_shape``: no weight is materialised), swaps in the
stored leaf types and layouts, and has Orbax read every array straight into its target
sharding: one device, or the ("data", "model") mesh plan of ``jllama.parallel.rules``. In a
multi-process run each process reads only the shards its devices hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from jllama.errors import JllamaError

MARKER = "jllama-checkpoint.json"
STATE_DIR = "state"
FORMAT = "jllama-orbax"
VERSION = 1


class CheckpointError(JllamaError):
    """A directory is not a jllama checkpoint, or its metadata does not match its arrays."""


@dataclass
class Restored:
    """What ``restore`` rebuilt: enough for ``Engine(spec, model, ...)`` and a tokenizer."""

    gguf: Any  # GGUFFile: the stored header; tensors carry no data
    spec: Any  # ModelSpec
    model: Any  # nnx.Module with restored (placed) arrays
    plan: Any  # rules.Plan when restored onto a mesh, else None
    meta: dict


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / MARKER).is_file()


# ------------------------------------------------------------------------------ leaves
def _flat_state(state: Any) -> list[tuple[str, Any]]:
    """(dotted path, QTensor or array) for every state leaf, in flatten order."""
    import jax

    from jllama.parallel.rules import path_names
    from jllama.quant.qtensor import QTensor

    items = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, QTensor))[0]
    # stored in their usual shapes: a file-offset tensor (quant/qtensor.py) is a load detail
    return [(".".join(path_names(p)), leaf.natural() if isinstance(leaf, QTensor) else leaf)
            for p, leaf in items]


def _dtype_name(a: Any) -> str:
    return np.dtype(a.dtype).name


def _leaf_meta(leaf: Any) -> dict:
    import jax

    from jllama.quant.qtensor import QTensor

    if isinstance(leaf, QTensor):
        arrays = jax.tree_util.tree_leaves(leaf.data)
        return {"kind": "qtensor", "qtype": int(leaf.qtype), "type": leaf.type_name,
                "shape": list(leaf.shape), "layout": leaf.layout,
                "tuple": isinstance(leaf.data, tuple | list),
                "arrays": [{"shape": list(a.shape), "dtype": _dtype_name(a)} for a in arrays]}
    return {"kind": "array", "shape": list(leaf.shape), "dtype": _dtype_name(leaf)}


def _array_keys(path: str, meta: dict) -> list[str]:
    if meta["kind"] == "qtensor":
        return [f"{path}#{i}" for i in range(len(meta["arrays"]))]
    return [path]


# ------------------------------------------------------------------------------ header
def _gguf_header(g: Any) -> dict:
    return {
        "version": g.version,
        "alignment": g.alignment,
        "metadata": g.metadata,
        "metadata_types": {k: [int(vt), None if et is None else int(et)]
                           for k, (vt, et) in g.metadata_types.items()},
        "tensors": {n: {"shape": list(t.shape), "qtype": int(t.qtype), "nbytes": int(t.nbytes)}
                    for n, t in g.tensors.items()},
    }


def _gguf_from_header(h: dict, path: str) -> Any:
    from jllama.gguf.constants import ValueType
    from jllama.gguf.reader import GGUFFile, TensorInfo

    tensors = {n: TensorInfo(n, tuple(t["shape"]), int(t["qtype"]), 0, int(t["nbytes"]), None)
               for n, t in h["tensors"].items()}
    types = {k: (ValueType(vt), None if et is None else ValueType(et))
             for k, (vt, et) in h["metadata_types"].items()}
    return GGUFFile(path=path, version=int(h["version"]), metadata=h["metadata"],
                    metadata_types=types, tensors=tensors, alignment=int(h["alignment"]),
                    data_offset=0, file_size=0)


# ------------------------------------------------------------------------------ save
def save(obj: Any, directory: str | os.PathLike[str], gguf: Any = None,
         overwrite: bool = False, quant: dict | None = None) -> Path:
    """Write ``obj``'s (a ``Llama`` or an ``Engine``) parameters and header to ``directory``.

    An Engine does not know its GGUF header: pass ``gguf`` (the ``read_gguf`` result). Arrays may
    be sharded (even over several processes: every process must call ``save``).
    """
    import jax
    import orbax.checkpoint as ocp

    from jllama import __version__

    engine = getattr(obj, "engine", obj)
    gguf = gguf if gguf is not None else getattr(obj, "gguf", None)
    if gguf is None:
        raise CheckpointError("save(engine, dir) needs gguf= (the source GGUF header)")
    quant = quant if quant is not None else getattr(obj, "quant", None)
    d = Path(directory).expanduser().absolute()
    if d.exists() and any(d.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{d}: exists and is not empty (pass --overwrite / "
                                  "overwrite=True to replace it)")
        if not is_checkpoint(d):
            raise CheckpointError(f"{d}: refusing to overwrite a directory that is not a "
                                  "jllama checkpoint")
    leaves = _flat_state(engine.state)
    params: dict[str, dict] = {}
    arrays: dict[str, Any] = {}
    for path, leaf in leaves:
        meta = _leaf_meta(leaf)
        params[path] = meta
        parts = jax.tree_util.tree_leaves(leaf.data) if meta["kind"] == "qtensor" else [leaf]
        arrays.update(zip(_array_keys(path, meta), parts, strict=True))
    if jax.process_index() == 0:
        d.mkdir(parents=True, exist_ok=True)
        (d / MARKER).unlink(missing_ok=True)
    # uncompressed: ggml blocks hardly compress, and zstd would cost every load its CPU time
    with ocp.PyTreeCheckpointer(use_compression=False) as ckptr:
        ckptr.save(d / STATE_DIR, args=ocp.args.PyTreeSave(arrays), force=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "jllama_version": __version__,
        "source": str(getattr(gguf, "path", "")),
        "backend": jax.default_backend(),
        "quant": quant,
        "spec": dataclasses.asdict(engine.spec),
        "params": params,
        "gguf": _gguf_header(gguf),
    }
    if jax.process_index() == 0:
        tmp = d / (MARKER + ".tmp")
        tmp.write_text(json.dumps(meta, default=_json_default))
        tmp.replace(d / MARKER)
    return d


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ------------------------------------------------------------------------------ restore
def read_meta(directory: str | os.PathLike[str]) -> dict:
    """The checkpoint's metadata, validated; ``CheckpointError`` naming what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    if not (d / MARKER).is_file():
        raise CheckpointError(f"{d}: not a jllama checkpoint (no {MARKER}; create one with "
                              "`jllama convert MODEL.gguf --to-orbax DIR`)")
    try:
        meta = json.loads((d / MARKER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / MARKER}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / MARKER}: not jllama checkpoint metadata")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{d / MARKER}: checkpoint format version {meta.get('version')}, "
                              f"this jllama reads version {VERSION}")
    for key in ("params", "gguf", "spec"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{d / MARKER}: corrupt checkpoint metadata (no '{key}')")
    if not (d / STATE_DIR).is_dir():
        raise CheckpointError(f"{d}: checkpoint has no '{STATE_DIR}/' arrays")
    return meta


def _abstract_weights(g: Any) -> dict:
    """GGUF-layout abstract QTensors for ``build`` to trace (their layouts are replaced by the
    stored ones afterwards: ``build`` only wraps weights, it never reads a layout)."""
    import jax

    from jllama.gguf.constants import qtype_info
    from jllama.quant.qtensor import FLOAT_TYPES, QTensor

    out = {}
    for name, t in g.tensors.items():
        if t.qtype in FLOAT_TYPES:
            sds = jax.ShapeDtypeStruct(tuple(t.shape), FLOAT_TYPES[t.qtype])
        else:
            info = qtype_info(t.qtype)
            row = t.shape[-1] // info.block_size * info.type_size
            sds = jax.ShapeDtypeStruct((*t.shape[:-1], row), np.uint8)
        out[name] = QTensor(sds, int(t.qtype), tuple(t.shape))
    return out


def _abstract_model(g: Any, numerics: Any = None) -> tuple[Any, Any, Any]:
    """(spec, graphdef, abstract state) of the architecture built on abstract weights."""
    from flax import nnx

    from jllama.models import build_model
    from jllama.models.common import Weights
    from jllama.numerics import DEFAULT

    specs = []

    def build(tensors):
        spec, model = build_model(g, Weights(tensors, g.path), numerics=numerics or DEFAULT)
        specs.append(spec)
        return model

    model = nnx.eval_shape(build, _abstract_weights(g))
    graphdef, state = nnx.split(model)
    return specs[0], graphdef, state


def _target_leaf(path: str, m: dict) -> Any:
    import jax

    from jllama.quant.qtensor import QTensor

    try:
        if m["kind"] == "qtensor":
            arrs = [jax.ShapeDtypeStruct(tuple(a["shape"]), _dtype(a["dtype"]))
                    for a in m["arrays"]]
            data = tuple(arrs) if m["tuple"] else arrs[0]
            return QTensor(data, int(m["qtype"]), tuple(m["shape"]), str(m["layout"]))
        return jax.ShapeDtypeStruct(tuple(m["shape"]), _dtype(m["dtype"]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata for '{path}': {e!r}") from None


def _dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _check_stored(d: Path, md: Any, target: dict[str, Any]) -> None:
    """After a failed restore: name the array whose stored shape / dtype differs from what the
    metadata promises (Orbax's own message is a page of TensorStore spec)."""
    if md is None:
        return
    stored = getattr(md, "item_metadata", md)
    try:
        keys = set(stored.keys())
    except AttributeError:  # unknown metadata object: Orbax's own checks still apply
        return
    if keys != set(target):
        diff = sorted(keys.symmetric_difference(target))[:3]
        raise CheckpointError(f"{d}: checkpoint arrays do not match its metadata (keys {diff})")
    for k, t in target.items():
        a = stored[k]
        shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
        if shape is not None and tuple(shape) != tuple(t.shape) or \
                dtype is not None and np.dtype(dtype) != np.dtype(t.dtype):
            raise CheckpointError(f"{d}: checkpoint arrays do not match its metadata: '{k}' is "
                                  f"stored as {dtype}{list(shape)}, metadata says "
                                  f"{np.dtype(t.dtype)}{list(t.shape)}")


def restore(directory: str | os.PathLike[str], mesh: Any = None, devices: list | None = None,
            strict: bool = False, numerics: Any = None) -> Restored:
    """Rebuild the model of a checkpoint with every array read straight into its placement.

    ``mesh``: a MeshConfig / ``{"data": d, "model": m}``; arrays then land in the shardings
    ``jllama.parallel.rules`` plans for it (an Engine built with that plan finds them
    in place). Without a mesh everything goes to the first local device. ``numerics``: what
    the rebuilt model carries (default ``Numerics()``).
    """
    import warnings

    import jax
    import jax.tree_util as jtu
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import NamedSharding, SingleDeviceSharding

    from jllama.parallel.rules import path_names
    from jllama.quant.qtensor import QTensor

    d = Path(directory).expanduser().absolute()
    meta = read_meta(d)
    try:
        g = _gguf_from_header(meta["gguf"], str(d))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / MARKER}: corrupt GGUF header copy ({e!r})") from None
    spec, graphdef, abstract = _abstract_model(g, numerics)
    # a field added later with its default (rope_yarn None) matches a checkpoint without it
    def unset_dropped(d: dict) -> dict:
        return {k: v for k, v in d.items() if not (k == "rope_yarn" and v is None)}

    rebuilt = json.loads(json.dumps(dataclasses.asdict(spec), default=_json_default))
    if unset_dropped(rebuilt) != unset_dropped(meta["spec"]):
        raise CheckpointError(f"{d}: the model spec rebuilt from the stored header differs from "
                              "the saved one (checkpoint written by another jllama version?)")
    if meta.get("backend") != jax.default_backend():
        warnings.warn(f"{d}: weights were laid out for {meta.get('backend')}, running on "
                      f"{jax.default_backend()}; re-convert for the fastest kernels", stacklevel=2)
    items, treedef = jtu.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, QTensor))
    paths = [".".join(path_names(p)) for p, _ in items]
    stored = meta["params"]
    missing = [p for p in paths if p not in stored]
    extra = [p for p in stored if p not in set(paths)]
    if missing or extra:
        raise CheckpointError(f"{d}: checkpoint parameters do not match the {spec.arch} model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    leaves = [_target_leaf(p, stored[p]) for p in paths]
    for p, (_, built), leaf in zip(paths, items, leaves, strict=True):
        if tuple(built.shape) != tuple(leaf.shape):  # QTensor: logical shapes
            raise CheckpointError(f"{d}: '{p}' has shape {tuple(leaf.shape)} in the checkpoint, "
                                  f"the model built from its header expects {tuple(built.shape)}")
    state = jtu.tree_unflatten(treedef, leaves)

    plan = None
    cfg = SimpleNamespace(data=int(mesh["data"]), model=int(mesh["model"])) \
        if isinstance(mesh, dict) else mesh
    if cfg is not None and cfg.data * cfg.model > 1:
        from jllama.parallel import mesh as pmesh
        from jllama.parallel import rules

        plan = rules.Plan(pmesh.make_mesh(cfg, devices), attention_sharded=False)
        plan.attention_sharded = rules.check_attention(plan, spec.n_head, spec.n_head_kv, strict)
        specs = pmesh._param_specs(state, plan, strict)
        shardings = [[NamedSharding(plan.mesh, s) for s in sp] for sp in specs]
    else:
        one = SingleDeviceSharding((devices or jax.local_devices())[0])
        shardings = [[one] * len(jtu.tree_leaves(leaf)) for leaf in leaves]

    target: dict[str, Any] = {}
    keys: list[list[str]] = []
    for p, leaf, shs in zip(paths, leaves, shardings, strict=True):
        ks = _array_keys(p, stored[p])
        keys.append(ks)
        for k, a, sh in zip(ks, jtu.tree_leaves(leaf), shs, strict=True):
            target[k] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(d / STATE_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        md = None
        with contextlib.suppress(Exception), ocp.StandardCheckpointer() as ckptr:
            md = ckptr.metadata(d / STATE_DIR)
        _check_stored(d, md, target)  # raises naming the array, if it can
        raise CheckpointError(f"{d}: checkpoint arrays do not match its metadata: "
                              f"{str(e).splitlines()[0][:300]}") from None
    out = []
    for leaf, ks in zip(leaves, keys, strict=True):
        if isinstance(leaf, QTensor):
            parts = [arrays[k] for k in ks]
            data = tuple(parts) if isinstance(leaf.data, tuple) else parts[0]
            out.append(QTensor(data, leaf.qtype, leaf.shape, leaf.layout))
        else:
            out.append(arrays[ks[0]])
    model = nnx.merge(graphdef, jtu.tree_unflatten(treedef, out))
    return Restored(g, spec, model, plan, meta)
