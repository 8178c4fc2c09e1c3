"""LoRA adapters as llama.cpp reads and applies them (src/llama-adapter.cpp, and
``llm_graph_context::build_lora_mm`` / ``build_inp_embd`` in src/llama-graph.cpp).

The file (what convert_lora_to_gguf.py writes): a GGUF with ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (f32; 0 or absent: no alpha) and the base's
``general.architecture``. Each adapted base tensor ``N`` [n_out, n_in] (numpy order) has a pair
``N.lora_a`` [r, n_in] and ``N.lora_b`` [n_out, r] (PEFT's A and B). ``token_embd.weight`` is the
exception: its ``lora_a`` is stored transposed, [n_vocab, r], so that the token rows can be
gathered from it. Tensors ending in ``_norm.weight`` (mergekit adds them) are ignored, as
llama.cpp does; any other name is an error.

Applied unmerged, in ggml's order: ``y = W x``; then for each adapter (last given first, see
``attach``), ``y = y + s * (B (A x))`` (two f32 ``mul_mat``, ``ggml_scale``, ``ggml_add``); only then the bias.
The token embedding gets ``rows(E) + s * (B rows(A))``. ``s = scale * alpha / r`` in f32 (left to
right, as the C expression rounds) when alpha is set, else ``scale``; r is B's inner size. The
effective ``s`` is data in the model's state (``LoraScale``), so a new scale is a new value for the
same compiled program. Any weight a model holds as a ``Linear`` (attention q/k/v/o, dense and
shared-expert feed-forward, a separate output) and the token embedding can carry adapters; stacked
expert tensors, MoE routers and weights used otherwise cannot, and an adapter for them is refused
by name. A model class may list tensors llama.cpp's graph multiplies without its adapters
(``LORA_PLAIN``, deepseek2's MLA projections): adapters there are ignored, with a warning, as
llama.cpp ignores them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jllama.models.ggml_f32 as ggml_f32
from jllama.errors import JllamaError, ModelError
from jllama.gguf.constants import ValueType
from jllama.gguf.reader import GGUFFile, TensorInfo, read_gguf
from jllama.gguf.writer import TensorSpec, write_gguf
from jllama.kernels.dispatch import dequantize, take_rows
from jllama.models import load_weights
from jllama.models.common import Embedding, Linear, Weights, linear
from jllama.quant.actquant import opaque
from jllama.quant.formats import dequantize_np
from jllama.quant.qtensor import FLOAT_TYPES, QTensor, from_gguf_bytes

log = logging.getLogger("jllama")

TOKEN_EMBD = "token_embd.weight"
_F32, _F16 = 0, 1


@dataclass
class LoraFile:
    """One adapter file, read and checked on its own (not yet against a base model)."""

    path: str
    arch: str
    alpha: float
    pairs: dict[str, tuple[TensorInfo, TensorInfo]]  # base tensor name -> (lora_a, lora_b)
    gguf: GGUFFile = field(repr=False)
    task_name: str = ""
    prompt_prefix: str = ""

    def rank(self, name: str) -> int:
        return int(self.pairs[name][1].shape[-1])

    def scale_for(self, name: str, user_scale: float) -> np.float32:
        """llama_adapter_lora_weight::get_scale: ``alpha ? scale * alpha / rank : scale``, f32."""
        f = np.float32
        if f(self.alpha) != 0:
            return f(f(f(user_scale) * f(self.alpha)) / f(self.rank(name)))
        return f(user_scale)


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read and check a LoRA adapter GGUF (the checks llama_adapter_lora_init makes on the file
    alone; ``check_against`` makes those that need the base)."""
    path = str(path)
    g = read_gguf(path)
    kind = g.metadata.get("general.type", "")
    if kind != "adapter":
        raise ModelError(f"{path}: not a LoRA adapter (general.type is {kind or 'absent'!r}, "
                         "expected 'adapter')")
    atype = g.metadata.get("adapter.type", "")
    if atype != "lora":
        raise ModelError(f"{path}: adapter.type is {atype or 'absent'!r}, expected 'lora'")
    if "adapter.alora.invocation_tokens" in g.metadata:
        raise ModelError(f"{path}: activated LoRA (aLoRA) adapters are not supported")
    alpha = float(g.metadata.get("adapter.lora.alpha", 0.0) or 0.0)
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, ti in g.tensors.items():
        for suffix in (".lora_a", ".lora_b"):
            if name.endswith(suffix):
                halves.setdefault(name[: -len(suffix)], {})[suffix] = ti
                break
        else:
            if not name.endswith("_norm.weight"):  # llama.cpp skips these too
                raise ModelError(f"{path}: tensor '{name}' is neither .lora_a nor .lora_b")
    pairs = {}
    for base, h in sorted(halves.items()):
        if len(h) != 2:
            raise ModelError(f"{path}: LoRA tensor pair for '{base}' is missing one component")
        a, b = h[".lora_a"], h[".lora_b"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise ModelError(f"{path}: '{base}' lora_a/lora_b must be matrices, got "
                             f"{a.shape} and {b.shape}")
        pairs[base] = (a, b)
    if not pairs:
        raise ModelError(f"{path}: the adapter has no lora_a/lora_b tensors")
    return LoraFile(path, str(g.architecture or ""), alpha, pairs, g,
                    task_name=str(g.metadata.get("adapter.lora.task_name", "") or ""),
                    prompt_prefix=str(g.metadata.get("adapter.lora.prompt_prefix", "") or ""))


def check_against(lf: LoraFile, base: GGUFFile) -> None:
    """llama.cpp's checks of an adapter against its base: same architecture, every adapted
    tensor in the base, shapes that fit (token_embd: A and B flipped, see the module doc)."""
    if lf.arch != base.architecture:
        raise ModelError(f"{lf.path}: adapter is for architecture '{lf.arch}', the model "
                         f"{base.path} is '{base.architecture}'")
    for name, (a, b) in lf.pairs.items():
        ti = base.tensors.get(name)
        if ti is None:
            raise ModelError(f"{lf.path}: LoRA tensor '{name}' does not exist in the base model "
                             f"{base.path} (wrong base model?)")
        if len(ti.shape) != 2:
            raise ModelError(f"{lf.path}: '{name}' is not a matrix in the base model "
                             f"(shape {ti.shape}); adapters on it are not supported")
        n_out, n_in = ti.shape
        if name == TOKEN_EMBD:
            ok = a.shape[0] == n_out and b.shape[0] == n_in and a.shape[1] == b.shape[1]
            want = f"lora_a [{n_out}, r], lora_b [{n_in}, r]"
        else:
            ok = a.shape[1] == n_in and b.shape[0] == n_out and a.shape[0] == b.shape[1]
            want = f"lora_a [r, {n_in}], lora_b [{n_out}, r]"
        if not ok:
            raise ModelError(f"{lf.path}: '{name}' has lora_a {list(a.shape)}, lora_b "
                             f"{list(b.shape)}; the base tensor {list(ti.shape)} needs {want} "
                             "(wrong base model?)")


class LoraScale(nnx.Variable):
    """An adapter's effective scale on one weight: state, not static, so it can change freely."""


def _mm(x: jax.Array, qt: QTensor) -> jax.Array:
    """ggml's ``mul_mat`` of an adapter matrix [M, K] and activations x [N, K] -> [N, M].

    F32: ggml's f32 product step by step (ggml_f32.mul_mat). F16: ggml first rounds the
    activations to f16 (the vec_dot type), then multiplies in f32 lanes, the same steps on
    f16 values. Quantized adapters go through the ordinary quantized ``linear``."""
    if ggml_f32.rounding_on() and qt.qtype in (_F32, _F16):
        if qt.qtype == _F16:
            x = x.astype(jnp.float16).astype(jnp.float32)
        return ggml_f32.mul_mat(x, dequantize(qt, jnp.float32))
    return linear(x, qt)


class LoraPair(nnx.Module):
    """One adapter's A and B on one base weight, with its effective scale."""

    def __init__(self, a: QTensor, b: QTensor, scale: np.float32, embed: bool = False):
        self.a = nnx.Param(a)
        self.b = nnx.Param(b)
        self.scale = LoraScale(jnp.asarray(scale, jnp.float32))
        self.embed = embed

    def delta(self, x: jax.Array) -> jax.Array:
        """``s * B (A x)`` for activations x [..., n_in] (or token ids for the embedding)."""
        if self.embed:
            lead = x.shape
            t = take_rows(self.a.get_value(), x.reshape(-1))
        else:
            lead = x.shape[:-1]
            t = _mm(x.reshape(-1, x.shape[-1]), self.a.get_value())
        d = _mm(t, self.b.get_value()) * self.scale.get_value()
        return d.reshape(*lead, d.shape[-1])

    def add_to(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """``y + delta(x)``, the sum rounded on its own (ggml_add after ggml_scale: the product
        must not fuse into the add)."""
        return y + opaque(self.delta(x))


@dataclass
class LoraSet:
    """The adapters attached to one model, in order, with their user scales."""

    files: list[LoraFile]
    scales: list[float]
    pairs: list[list[tuple[str, LoraPair]]]  # per adapter: (base name, module) for each weight


def _leaf_id(qt: QTensor) -> int:
    return id(jax.tree_util.tree_leaves(qt.data)[0])


def attach(model: nnx.Module, weights: Weights, base: GGUFFile,
           adapters: list[tuple[LoraFile, float]], numerics=None) -> LoraSet:
    """Attach adapters (file, user scale) to a built model, in order. Each ``Linear`` and the
    token ``Embedding`` are found by the weight they hold (the base tensor of that name), so
    every architecture built from ``Linear`` layers takes adapters without knowing of them."""
    by_leaf = {_leaf_id(qt): name for name, qt in weights.tensors.items()}
    mods: dict[str, nnx.Module] = {}
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Linear | Embedding):
            name = by_leaf.get(_leaf_id(m.weight.get_value()))
            if name is not None and (name not in mods or isinstance(m, Linear)):
                mods[name] = m
    tied = getattr(model, "output", 0) is None
    plain = set(getattr(type(model), "LORA_PLAIN", ()))
    out, staged = LoraSet([], [], []), []
    kw = {} if numerics is None else {"numerics": numerics}
    for lf, scale in adapters:
        check_against(lf, base)
        w = load_weights(lf.gguf, **kw)
        mine, skipped = [], []
        for name in lf.pairs:
            if (name.split(".", 2)[-1] if name.startswith("blk.") else name) in plain:
                skipped.append(name)
                continue
            m = mods.get(name)
            if m is None:
                raise ModelError(f"{lf.path}: adapters on '{name}' are not supported by jllama's "
                                 f"{base.architecture} (the tensor is not used as a plain matrix "
                                 "product)")
            if name == TOKEN_EMBD and tied:
                raise ModelError(f"{lf.path}: adapts '{TOKEN_EMBD}', which this model also uses "
                                 "as its output projection (tied); llama.cpp cannot run that "
                                 "either")
            p = LoraPair(w(name + ".lora_a"), w(name + ".lora_b"), lf.scale_for(name, scale),
                         embed=isinstance(m, Embedding))
            mine.append((name, p, m))
        if skipped:
            log.warning("%s: %d adapted tensors (%s, ...) are not adapted by llama.cpp's %s "
                        "graph either; ignored", lf.path, len(skipped), skipped[0],
                        base.architecture)
        out.files.append(lf)
        out.scales.append(float(scale))
        out.pairs.append([(name, p) for name, p, _ in mine])
        staged.append(mine)
    # llama.cpp keeps a context's adapters in an unordered_map keyed by their address, which
    # libstdc++ iterates newest first unless two addresses share a hash bucket (13 buckets up
    # to 13 adapters: ~8 % of runs with two adapters, ~40 % with four); its order then depends
    # on where the adapters were allocated, which nothing here can know. jllama adds the last
    # given first; tests/test_lora.py checks both the usual order and, given llama.cpp's
    # other orders, that only the order of the sums differs.
    for mine in reversed(staged):
        for _, p, m in mine:
            if m.lora is None:
                m.lora = nnx.List([])
            m.lora.append(p)
    return out


def set_scales(loras: LoraSet, scales: list[float]) -> None:
    """New user scales for the attached adapters (same count and order). Only state changes:
    an Engine re-splits the model and keeps its compiled programs."""
    if len(scales) != len(loras.files):
        raise JllamaError(f"{len(scales)} LoRA scales given for {len(loras.files)} adapters")
    for lf, s, mine in zip(loras.files, scales, loras.pairs, strict=True):
        for name, p in mine:
            p.scale.set_value(jnp.asarray(lf.scale_for(name, s), jnp.float32))
    loras.scales = [float(s) for s in scales]


# ------------------------------------------------------------------------ merging (export-lora)
_FTYPE_MOSTLY_F16 = 1


def merge_tensor(base: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, np.float32]],
                 embed: bool) -> np.ndarray:
    """``W + s B A`` for each adapter in order, in f32, as llama-export-lora's graph computes it:
    delta = mul_mat(cont(transpose(A)), B) (token_embd: mul_mat(B, A)), ggml_scale, then
    ``delta + cur``. ``base`` is the dequantized f32 tensor; A/B as float arrays."""
    cur = jnp.asarray(base, jnp.float32)
    for a, b, s in parts:
        a = jnp.asarray(a, jnp.float32)
        b = jnp.asarray(b, jnp.float32)
        if embed:  # A [n_vocab, r] as the activations, B [n_embd, r] as the weight
            delta = ggml_f32.mul_mat(a, b)
        else:  # B [n_out, r] as the activations, A^T [n_in, r] as the weight
            delta = ggml_f32.mul_mat(b, a.T)
        cur = opaque(delta * jnp.float32(s)) + cur
    return np.asarray(cur)


def _as_f32(ti: TensorInfo) -> np.ndarray:
    if ti.qtype in FLOAT_TYPES:
        return np.asarray(from_gguf_bytes(ti.data, ti.qtype, ti.shape)[0], np.float32)
    return dequantize_np(ti.data.reshape(*ti.shape[:-1], -1), ti.qtype, ti.shape[-1])


def export_merged(base_path: str | os.PathLike[str], adapters: list[tuple[str, float]],
                  out_path: str | os.PathLike[str], log=None) -> int:
    """llama-export-lora: a new GGUF whose adapted tensors are ``W + sum s B A``. As that tool:
    the base's metadata with general.file_type = MOSTLY_F16; merged tensors F32 where the base
    tensor is F32, else F16 (a quantized base tensor is dequantized, merged and written F16,
    not requantized); other tensors copied as they are; tensors in name order (its std::map);
    quantized adapters refused; several adapters must adapt the same tensors. Returns the
    output's size in bytes."""
    base = read_gguf(base_path)
    if "split.count" in base.metadata:
        raise ModelError(f"{base.path}: split models are not supported")
    files = [(read_lora(p), float(s)) for p, s in adapters]
    if not files:
        raise ModelError("export-lora needs at least one adapter (--lora / --lora-scaled)")
    for lf, _ in files:
        if lf.arch != base.architecture:
            raise ModelError(f"{lf.path}: adapter is for architecture '{lf.arch}', the model "
                             f"{base.path} is '{base.architecture}'")
        check_against(lf, base)
        for name, (a, b) in lf.pairs.items():
            if a.qtype not in (_F32, _F16) or b.qtype not in (_F32, _F16):
                raise ModelError(f"{lf.path}: '{name}': quantized LoRA adapters cannot be merged "
                                 "(llama-export-lora neither); convert them as f16 or f32")
    first = set(files[0][0].gguf.tensors)
    if any(set(lf.gguf.tensors) != first for lf, _ in files[1:]):
        raise ModelError("the adapters do not adapt the same tensors; merge them one by one "
                         "(llama-export-lora has the same limit)")

    def merged(name: str, ti: TensorInfo, out_type: int):
        def data() -> np.ndarray:
            parts = []
            for lf, s in files:
                a, b = lf.pairs[name]
                parts.append((_as_f32(a), _as_f32(b), lf.scale_for(name, s)))
            w = merge_tensor(_as_f32(ti), parts, embed=name == TOKEN_EMBD)
            w = w.astype(np.float32 if out_type == _F32 else np.float16)
            if log is not None:
                log(f"merged {name} {list(ti.shape)} -> {'F32' if out_type == _F32 else 'F16'}")
            return w.view(np.uint8)
        return data

    specs = []
    for name in sorted(base.tensors, key=lambda n: n.encode()):
        ti = base.tensors[name]
        if name in files[0][0].pairs:
            out_type = _F32 if ti.qtype == _F32 else _F16
            specs.append(TensorSpec(name, ti.shape, out_type, merged(name, ti, out_type)))
        else:
            specs.append(TensorSpec(name, ti.shape, ti.qtype, lambda ti=ti: ti.data))
    meta = dict(base.metadata)
    types = dict(base.metadata_types)
    meta["general.file_type"] = _FTYPE_MOSTLY_F16
    types["general.file_type"] = (ValueType.UINT32, None)
    return write_gguf(out_path, meta, specs, metadata_types=types)
