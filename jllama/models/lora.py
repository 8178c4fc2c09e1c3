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
expert tensors and weights used otherwise cannot, and an adapter for them is refused by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jllama.models.ggml_f32 as ggml_f32
from jllama.errors import JllamaError, ModelError
from jllama.gguf.reader import GGUFFile, TensorInfo, read_gguf
from jllama.kernels.dispatch import dequantize, take_rows
from jllama.models.common import Embedding, Linear, Weights, linear
from jllama.models import load_weights
from jllama.quant.actquant import opaque
from jllama.quant.qtensor import QTensor

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
    out, staged = LoraSet([], [], []), []
    kw = {} if numerics is None else {"numerics": numerics}
    for lf, scale in adapters:
        check_against(lf, base)
        w = load_weights(lf.gguf, **kw)
        mine = []
        for name in lf.pairs:
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
        out.files.append(lf)
        out.scales.append(float(scale))
        out.pairs.append([(name, p) for name, p, _ in mine])
        staged.append(mine)
    # llama.cpp keeps a context's adapters in an unordered_map keyed by their address, which
    # libstdc++ iterates newest first (unless two addresses share a hash bucket): the last
    # adapter given is added first. Tested on two and three adapters: bit for bit this way,
    # not the other.
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
