"""``llama`` with experts (Mixtral-style: ``llama.expert_count > 0``) and the shared decoder used
by other GQA + MoE architectures (``qwen3moe``).

The attention half is llama's (optionally with per-head Q/K RMS norms and NEOX rope, as
qwen3moe has); the feed-forward is ``moe.MoE``. Layers without a router (``ffn_gate_inp``) keep a
dense SwiGLU, as llama.cpp's llama graph does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from flax import nnx

from jllama.models.cache import KVCache
from jllama.models.common import (
    Embedding,
    Linear,
    RMSNorm,
    Weights,
    attention,
    decoder_forward,
    rope,
    write_cache,
)
from jllama.models.moe import MoE, MoEConfig, moe_config
from jllama.models.spec import ModelSpec


@dataclass(frozen=True)
class Variant:
    neox: bool = False  # rope mode: NEOX (halves) vs NORM (adjacent pairs)
    qk_norm: bool = False  # per-head RMS norm of Q and K before rope
    shared_expert: bool = False


def _opt_bias(w: Weights, name: str):
    return w.vector(name) if name in w else None


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights, i: int, moe: MoEConfig, var: Variant):
        p = f"blk.{i}."
        self.spec = spec
        self.neox = var.neox
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), spec.norm_eps)
        self.wq = Linear(w(p + "attn_q.weight"), _opt_bias(w, p + "attn_q.bias"))
        self.wk = Linear(w(p + "attn_k.weight"), _opt_bias(w, p + "attn_k.bias"))
        self.wv = Linear(w(p + "attn_v.weight"), _opt_bias(w, p + "attn_v.bias"))
        self.wo = Linear(w(p + "attn_output.weight"), _opt_bias(w, p + "attn_output.bias"))
        self.q_norm = self.k_norm = nnx.data(None)
        if var.qk_norm:
            self.q_norm = RMSNorm(w.vector(p + "attn_q_norm.weight"), spec.norm_eps)
            self.k_norm = RMSNorm(w.vector(p + "attn_k_norm.weight"), spec.norm_eps)
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), spec.norm_eps)
        if p + "ffn_gate_inp.weight" in w:
            self.moe = nnx.data(MoE(w, p, moe, shared=var.shared_expert))
            self.dense = nnx.data(None)
        else:
            self.moe = nnx.data(None)
            self.dense = nnx.List([Linear(w(p + "ffn_gate.weight")), Linear(w(p + "ffn_up.weight")),
                                   Linear(w(p + "ffn_down.weight"))])

    def __call__(self, x, pos, pos0, kc, vc, kv_len: int, kv_types: tuple[str, str]):
        s = self.spec
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).reshape(b, t, s.n_head, s.head_dim)
        k = self.wk(h).reshape(b, t, s.n_head_kv, s.head_dim)
        v = self.wv(h).reshape(b, t, s.n_head_kv, s.head_dim_v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, pos, s.rope_base, s.rope_dim, neox=self.neox, scale=s.rope_scale)
        k = rope(k, pos, s.rope_base, s.rope_dim, neox=self.neox, scale=s.rope_scale)
        kc = write_cache(kc, k, pos0, kv_types[0])
        vc = write_cache(vc, v, pos0, kv_types[1])
        a = attention(q, kc, vc, pos0, kv_len, 1.0 / math.sqrt(s.head_dim),
                      k_type=kv_types[0], v_type=kv_types[1], head_dim_v=s.head_dim_v)
        x = x + self.wo(a)
        h = self.ffn_norm(x)
        if self.moe is not None:
            x = x + self.moe(h)
        else:
            g, u, d = self.dense
            x = x + d(jax.nn.silu(g(h)) * u(h))
        return x, kc, vc


class MoEDecoder(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights, moe: MoEConfig, var: Variant):
        self.spec = spec
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.blocks = nnx.List([Block(spec, w, i, moe, var) for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"))
        self.neox = var.neox

    def kv_rope(self, layer: int) -> tuple[float, int, bool, float]:
        """How layer ``layer``'s cached keys were rotated (for the Engine's context shift)."""
        s = self.spec
        return (s.rope_base, s.rope_dim, self.neox, s.rope_scale)

    def __call__(self, tokens: jax.Array, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None):
        x = self.tok_embd(tokens)
        logits, cache = decoder_forward(self, x, pos0, cache, kv_len, last_idx)
        return logits, cache


def build(spec: ModelSpec, w: Weights, gguf) -> MoEDecoder:
    """Mixtral-style llama: softmax gating, top-k weights renormalised (llama.cpp hard-codes
    this for the llama graph whatever the metadata says)."""
    cfg = moe_config(gguf.metadata, spec.arch, norm=True, scale=0.0, gating=1)
    return MoEDecoder(spec, w, cfg, Variant(neox=False, qk_norm=False))


def has_experts(gguf) -> bool:
    """Whether a ``llama`` GGUF is Mixtral-style (dispatch here instead of ``models.llama``)."""
    return int(gguf.metadata.get(f"{gguf.architecture}.expert_count", 0) or 0) > 0
