"""The GQA decoder shared by ``llama`` (Llama 1-3, SmolLM, Mistral, Mixtral-style MoE), ``qwen2``,
``qwen3``, ``qwen2moe`` and ``qwen3moe``, as llama.cpp builds each of them.

One block, one model; what differs between the architectures is data (``Variant``, looked up in
``VARIANTS`` by ``general.architecture``):

========== ====== ============ ======= ================================================
arch       rope   q/k/v biases Q/K norm feed-forward
========== ====== ============ ======= ================================================
llama      NORM   optional     no      SwiGLU; routed experts (renormalised top-k) in
                                       layers with a router (``expert_count > 0``)
qwen2      NEOX   required     no      SwiGLU
qwen3      NEOX   none         yes     SwiGLU
qwen2moe   NEOX   required     no      experts (top-k not renormalised) + shared expert
                                       scaled by sigmoid(x · ffn_gate_inp_shexp)
qwen3moe   NEOX   none         yes     experts (renormalised top-k)
qwen2vl    MROPE  optional     no      SwiGLU
========== ====== ============ ======= ================================================

MROPE (Qwen2-VL's text model) is NEOX's rotation with 4 positions per token (t, h, w, e),
each owning a section of the rotated pairs (``{arch}.rope.dimension_sections``). A text token
sits at (p, p, p, 0); an image's tokens at (p0, p0 + row, p0 + col, 0) with p0 the position
after the text before it, and the text after the image continues from p0 + max(rows, cols),
as libmtmd places them: positions then run behind the cache cells, by ``KVCache.pos_delta``.

NORM rope rotates adjacent pairs (the converter permuted llama's Q/K rows so that this reproduces
HF's rotate-half); NEOX rotates the two halves of each head (Qwen's rows are not permuted). The
Q/K norms are per-head RMS norms (weights over head_dim) before rope; the head size comes from
``key_length`` and need not be n_embd / n_head. All variants softmax-gate their experts (llama.cpp
hard-codes the gating and the renormalisation per architecture, whatever the metadata says).

Numerics: q/k/v and gate/up are one int8 kernel call each on CPU (``linear_group``), SiLU is
ggml's, and ``tap`` records intermediates under llama.cpp's tensor names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jllama.errors import ModelError
from jllama.models.cache import KVCache
from jllama.models.common import (
    Embedding,
    Linear,
    RMSNorm,
    SwiGLU,
    Weights,
    attention,
    decoder_forward,
    fwht,
    kv_rotation,
    linear_group,
    optional_bias,
    rope,
    tap,
    tap_layer,
    write_cache,
)
from jllama.models.moe import GATING_SOFTMAX, MoE, MoEConfig, moe_config
from jllama.models.spec import ModelSpec
from jllama.models.spec import spec_from_gguf as base_spec_from_gguf

QKV_BIAS = ("optional", "required", "none")


@dataclass(frozen=True)
class Routing:
    """How an architecture's experts are gated and weighted (llama.cpp hard-codes these)."""

    norm: bool  # renormalise the top-k weights to sum 1
    gating: int = GATING_SOFTMAX
    scale: float = 0.0  # constant factor on the weights (0: none)


@dataclass(frozen=True)
class Variant:
    """What distinguishes one architecture of this decoder from another."""

    neox: bool = False  # rope: NEOX (rotate halves) instead of NORM (adjacent pairs)
    qkv_bias: str = "optional"  # q/k/v biases: "optional" (per tensor), "required", "none"
    qk_norm: bool = False  # per-head RMS norm of Q and K before rope
    moe: Routing | None = None  # routed experts in the layers that have a router
    moe_required: bool = False  # every layer has experts (else dense unless expert_count > 0)
    shared_expert: bool = False  # always-on shared expert (with its sigmoid gate if present)
    mrope: bool = False  # M-RoPE: positions [B, T, 4] over the spec's rope_sections
    # llama.cpp 0c1e570's qwen2vl loader reads only the rope sections: its RMS-norm epsilon
    # stays 0 whatever attention.layer_norm_rms_epsilon says (found comparing its norms)
    rms_eps_read: bool = True

    def __post_init__(self):
        if self.qkv_bias not in QKV_BIAS:
            raise ValueError(f"qkv_bias {self.qkv_bias!r}: expected one of {QKV_BIAS}")


VARIANTS: dict[str, Variant] = {
    "llama": Variant(moe=Routing(norm=True)),
    "qwen2": Variant(neox=True, qkv_bias="required"),
    "qwen3": Variant(neox=True, qkv_bias="none", qk_norm=True),
    "qwen2moe": Variant(neox=True, qkv_bias="required", moe=Routing(norm=False),
                        moe_required=True, shared_expert=True),
    "qwen3moe": Variant(neox=True, qkv_bias="none", qk_norm=True, moe=Routing(norm=True),
                        moe_required=True),
    "qwen2vl": Variant(neox=True, qkv_bias="optional", mrope=True, rms_eps_read=False),
}


def _qkv_bias(w: Weights, name: str, how: str) -> jax.Array | None:
    if how == "required":
        return w.vector(name)
    return optional_bias(w, name) if how == "optional" else None


class Block(nnx.Module):
    """Pre-norm attention and feed-forward with residuals. Holds no per-layer static data (the
    tap names come from ``tap_layer``), so identical blocks share one trace."""

    def __init__(self, spec: ModelSpec, var: Variant, w: Weights, i: int,
                 moe: MoEConfig | None):
        p = f"blk.{i}."
        eps = spec.norm_eps
        self.spec = spec
        self.variant = var
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), eps)
        self.wq, self.wk, self.wv = (
            Linear(w(f"{p}attn_{t}.weight"), _qkv_bias(w, f"{p}attn_{t}.bias", var.qkv_bias))
            for t in "qkv")
        self.wo = Linear(w(p + "attn_output.weight"), optional_bias(w, p + "attn_output.bias"))
        if var.qk_norm:
            self.q_norm = RMSNorm(w.vector(p + "attn_q_norm.weight", spec.head_dim), eps)
            self.k_norm = RMSNorm(w.vector(p + "attn_k_norm.weight", spec.head_dim), eps)
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), eps)
        self.cvec = nnx.data(None)  # a control vector (models/cvec.py), added to the output
        if moe is not None:
            self.ffn = MoE(w, p, moe, shared=var.shared_expert)
        else:
            self.ffn = SwiGLU(w, p)

    def __call__(self, x, pos, pos0, kc, vc, kv_len: int, kv_types: tuple[str, str]):
        s, var = self.spec, self.variant
        il = tap_layer()
        b, t, _ = x.shape
        h = tap(f"attn_norm-{il}", self.attn_norm(x))
        q, k, v = linear_group(h, [self.wq, self.wk, self.wv])
        q = q.reshape(b, t, s.n_head, s.head_dim)
        k = k.reshape(b, t, s.n_head_kv, s.head_dim)
        v = tap(f"Vcur-{il}", v.reshape(b, t, s.n_head_kv, s.head_dim_v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        sections = s.rope_sections if var.mrope else ()
        q = tap(f"Qcur-{il}", rope(q, pos, s.rope_base, s.rope_dim, neox=var.neox,
                                   scale=s.rope_scale, sections=sections,
                                   yarn=s.rope_yarn))
        k = tap(f"Kcur-{il}", rope(k, pos, s.rope_base, s.rope_dim, neox=var.neox,
                                   scale=s.rope_scale, sections=sections,
                                   yarn=s.rope_yarn))
        rk, rv = kv_rotation(kv_types, s.head_dim, s.head_dim_v)  # quantized caches
        if rk:
            q, k = fwht(q, rk), fwht(k, rk)
        if rv:
            v = fwht(v, rv)
        kc = write_cache(kc, k, pos0, kv_types[0])
        vc = write_cache(vc, v, pos0, kv_types[1])
        a = attention(q, kc, vc, pos0, kv_len, 1.0 / math.sqrt(s.head_dim),
                      k_type=kv_types[0], v_type=kv_types[1], head_dim_v=s.head_dim_v)
        if rv:
            a = fwht(a, rv)
        x = tap(f"ffn_inp-{il}", x + tap(f"attn_out-{il}", self.wo(tap(f"kqv_out-{il}", a))))
        h = tap(f"ffn_norm-{il}", self.ffn_norm(x))
        x = x + self.ffn(h)
        if self.cvec is not None:
            x = x + self.cvec.get_value()
        x = tap(f"l_out-{il}", x)
        return x, kc, vc


class Decoder(nnx.Module):
    # runs its blocks as a scan over a stacked KV cache (common.scan_blocks) when the Engine's
    # numerics ask for it (Numerics.scan_layers)
    scans_layers = True

    def __init__(self, spec: ModelSpec, var: Variant, w: Weights, moe: MoEConfig | None = None):
        self.spec = spec
        self.variant = var
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.blocks = nnx.List([
            Block(spec, var, w, i, moe if _has_experts(var, w, i, moe) else None)
            for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"),
                                                           optional_bias(w, "output.bias"))

    @property
    def uses_mrope(self) -> bool:
        """Whether positions are M-RoPE's (the Engine then keeps ``KVCache.pos_delta``)."""
        return self.variant.mrope

    def kv_rope(self, layer: int) -> tuple:
        """How layer ``layer``'s cached keys were rotated (for the Engine's context shift):
        (base, dims, neox, scale, yarn)."""
        s = self.spec
        return (s.rope_base, s.rope_dim, self.variant.neox, s.rope_scale, s.rope_yarn)

    def __call__(self, tokens: jax.Array | None, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None, hidden: bool = False,
                 embd: jax.Array | None = None, bidir: bool = False,
                 mpos: jax.Array | None = None):
        """tokens [B, T] at positions pos0[b]..; returns (logits, cache).

        With ``last_idx`` the logits are only computed at that index per sequence ([B, V]):
        generation needs one row, and the output matmul is the largest in small models.
        ``embd`` [B, T, n_embd]: input embeddings (an image's) instead of tokens.
        ``mpos`` [B, T, 4] (M-RoPE): the tokens' rope positions (an image's); text tokens
        otherwise sit at (p, p, p, 0) with p the cell index plus ``cache.pos_delta``.
        """
        if bidir:
            raise ValueError("non-causal batches are a gemma3 feature")
        x = self.tok_embd(tokens) if embd is None else embd.astype(jnp.float32)
        rope_pos = None
        if self.variant.mrope:
            rope_pos = mpos if mpos is not None else _text_mrope_positions(
                pos0, x.shape[1], cache.pos_delta)
        return decoder_forward(self, x, pos0, cache, kv_len, last_idx, hidden,
                               rope_pos=rope_pos)


def _text_mrope_positions(pos0: jax.Array, t: int, delta: jax.Array | None) -> jax.Array:
    """llama.cpp's 4 positions of text tokens: the first three the token's, the fourth 0."""
    p = pos0[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if delta is not None:
        p = p + delta[:, None]
    return jnp.stack([p, p, p, jnp.zeros_like(p)], axis=-1)


def _has_experts(var: Variant, w: Weights, i: int, moe: MoEConfig | None) -> bool:
    """Whether layer i is a MoE layer: llama.cpp's llama graph checks each layer's router; its
    loader requires one in every layer once ``expert_count > 0``, as qwen2moe/qwen3moe always."""
    if moe is None:
        return False
    if f"blk.{i}.ffn_gate_inp.weight" not in w:
        raise ModelError(f"{w.path}: layer {i} has no router (blk.{i}.ffn_gate_inp.weight) "
                         f"though the file declares {moe.n_expert} experts")
    return True


def spec_from_gguf(g) -> ModelSpec:
    """The common spec, with the norm epsilon as the architecture's llama.cpp loader has it."""
    spec = base_spec_from_gguf(g)
    if not variant_of(spec.arch).rms_eps_read:
        spec = dataclasses.replace(spec, norm_eps=0.0)
    return spec


def variant_of(arch: str) -> Variant:
    var = VARIANTS.get(arch)
    if var is None:
        raise ModelError(f"architecture '{arch}' is not one of the decoder's: "
                         f"{', '.join(sorted(VARIANTS))}")
    return var


def build(spec: ModelSpec, w: Weights, gguf) -> Decoder:
    """The decoder for ``spec.arch`` with its variant; expert routing from the table, expert
    counts from the file (``{arch}.expert_count``; llama without experts is dense)."""
    var = variant_of(spec.arch)
    if var.mrope and not spec.rope_sections:
        raise ModelError(f"{w.path}: missing metadata key '{spec.arch}.rope.dimension_sections'")
    moe = None
    n_expert = int(gguf.metadata.get(f"{spec.arch}.expert_count", 0) or 0)
    if var.moe is not None and (var.moe_required or n_expert > 0):
        r = var.moe
        moe = moe_config(gguf.metadata, spec.arch, norm=r.norm, scale=r.scale, gating=r.gating)
    return Decoder(spec, var, w, moe)
