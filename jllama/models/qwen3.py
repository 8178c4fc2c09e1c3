"""The ``qwen3`` architecture (Qwen3 dense) as llama.cpp builds it.

Differences from ``llama``: no Q/K/V biases; each head's Q and K are RMS-normalised (weights
``attn_q_norm``/``attn_k_norm`` over head_dim) before NEOX rope (the converter does not permute
Qwen's Q/K rows). Head size comes from ``key_length`` and need not equal n_embd / n_head.
"""

from __future__ import annotations

import math

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
from jllama.models.spec import ModelSpec


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights, i: int):
        p = f"blk.{i}."
        self.spec = spec
        eps = spec.norm_eps
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), eps)
        self.wq = Linear(w(p + "attn_q.weight"))
        self.wk = Linear(w(p + "attn_k.weight"))
        self.wv = Linear(w(p + "attn_v.weight"))
        self.q_norm = RMSNorm(w.vector(p + "attn_q_norm.weight", spec.head_dim), eps)
        self.k_norm = RMSNorm(w.vector(p + "attn_k_norm.weight", spec.head_dim), eps)
        self.wo = Linear(w(p + "attn_output.weight"))
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), eps)
        self.gate = Linear(w(p + "ffn_gate.weight"))
        self.up = Linear(w(p + "ffn_up.weight"))
        self.down = Linear(w(p + "ffn_down.weight"))

    def __call__(self, x, pos, pos0, kc, vc, kv_len: int, kv_types: tuple[str, str]):
        s = self.spec
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_norm(self.wq(h).reshape(b, t, s.n_head, s.head_dim))
        k = self.k_norm(self.wk(h).reshape(b, t, s.n_head_kv, s.head_dim))
        v = self.wv(h).reshape(b, t, s.n_head_kv, s.head_dim_v)
        q = rope(q, pos, s.rope_base, s.rope_dim, neox=True, scale=s.rope_scale)
        k = rope(k, pos, s.rope_base, s.rope_dim, neox=True, scale=s.rope_scale)
        kc = write_cache(kc, k, pos0, kv_types[0])
        vc = write_cache(vc, v, pos0, kv_types[1])
        a = attention(q, kc, vc, pos0, kv_len, 1.0 / math.sqrt(s.head_dim),
                      k_type=kv_types[0], v_type=kv_types[1], head_dim_v=s.head_dim_v)
        x = x + self.wo(a)
        h = self.ffn_norm(x)
        x = x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))
        return x, kc, vc


class Qwen3(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights):
        self.spec = spec
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.blocks = nnx.List([Block(spec, w, i) for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"))

    def kv_rope(self, layer: int) -> tuple[float, int, bool, float]:
        """How layer ``layer``'s cached keys were rotated (for context shift): NEOX."""
        s = self.spec
        return (s.rope_base, s.rope_dim, True, s.rope_scale)

    def __call__(self, tokens: jax.Array, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None):
        """tokens [B, T] at positions pos0[b]..; returns (logits, cache) as ``llama.Llama``."""
        x = self.tok_embd(tokens)
        logits, cache = decoder_forward(self, x, pos0, cache, kv_len, last_idx)
        return logits, cache


def build(spec: ModelSpec, w: Weights, gguf) -> Qwen3:
    return Qwen3(spec, w)
