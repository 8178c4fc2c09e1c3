"""The ``qwen2`` architecture (Qwen1.5, Qwen2, Qwen2.5 dense) as llama.cpp builds it.

Differences from ``llama``: Q/K/V projections carry biases, and rope is NEOX (rotate halves):
the converter does not permute Qwen's Q/K rows, so llama.cpp rotates the two halves of each head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jllama.engine import kvquant
from jllama.engine.cache import KVCache
from jllama.models import common
from jllama.models.common import (
    Embedding,
    Linear,
    RMSNorm,
    Weights,
    gather_last,
    rope,
    write_cache,
)
from jllama.models.spec import ModelSpec

_HALF = {"f16": jnp.float16, "bf16": jnp.bfloat16}


def _round(x: jax.Array, kind: str) -> jax.Array:
    return x.astype(_HALF[kind]).astype(jnp.float32)


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos0: jax.Array,
              kv_len: int, scale: float, window: int | None = None,
              softcap: float | None = None, k_type: str = "f32", v_type: str = "f32",
              head_dim_v: int | None = None) -> jax.Array:
    """``common.attention`` plus llama.cpp's CPU rounding for a half-precision KV cache.

    llama.cpp (no flash attention) multiplies an f16/bf16 cache with half-precision vec_dots:
    Q is rounded to the K type for K·Q, and the softmax weights to the V type for V·P. Tiny as
    they are, these roundings decide which activations later land on the other side of a Q8
    rounding step: without them a Q8_0 model differs from llama.cpp by ~0.05 logits at every
    position, with them most positions agree exactly. Applied when MATCH_LLAMACPP_NUMERICS is
    on. (Shared by qwen2/qwen3/gemma3: belongs in common.py.)
    """
    if not common.MATCH_LLAMACPP_NUMERICS or k_type not in _HALF or v_type not in _HALF:
        return common.attention(q, k_cache, v_cache, pos0, kv_len, scale, window, softcap,
                                k_type, v_type, head_dim_v)
    b, t, h, d = q.shape
    kvh = k_cache.shape[1]
    k = kvquant.dequantize(k_cache[:, :, :kv_len], k_type, d)
    v = kvquant.dequantize(v_cache[:, :, :kv_len], v_type, head_dim_v or d)
    qg = _round(q, k_type).reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    qpos = pos0[:, None] + jnp.arange(t)[None, :]  # [B, T]
    kpos = jnp.arange(kv_len)
    mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, T, S]
    if window:
        mask = mask & (kpos[None, None, :] > qpos[:, :, None] - window)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = _round(jax.nn.softmax(s, axis=-1), v_type)
    o = jnp.einsum("bkgts,bksd->btkgd", p, v)
    return o.reshape(b, t, h * v.shape[-1])


def _optional(w: Weights, name: str) -> jax.Array | None:
    return w.vector(name) if name in w else None


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights, i: int):
        p = f"blk.{i}."
        self.spec = spec
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), spec.norm_eps)
        # llama.cpp requires the q/k/v biases for qwen2; the output bias is optional
        self.wq = Linear(w(p + "attn_q.weight"), w.vector(p + "attn_q.bias"))
        self.wk = Linear(w(p + "attn_k.weight"), w.vector(p + "attn_k.bias"))
        self.wv = Linear(w(p + "attn_v.weight"), w.vector(p + "attn_v.bias"))
        self.wo = Linear(w(p + "attn_output.weight"), _optional(w, p + "attn_output.bias"))
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), spec.norm_eps)
        self.gate = Linear(w(p + "ffn_gate.weight"))
        self.up = Linear(w(p + "ffn_up.weight"))
        self.down = Linear(w(p + "ffn_down.weight"))

    def __call__(self, x, pos, pos0, kc, vc, kv_len: int, kv_types: tuple[str, str]):
        s = self.spec
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).reshape(b, t, s.n_head, s.head_dim)
        k = self.wk(h).reshape(b, t, s.n_head_kv, s.head_dim)
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


class Qwen2(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights):
        self.spec = spec
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.blocks = nnx.List([Block(spec, w, i) for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"),
                                                           _optional(w, "output.bias"))

    def kv_rope(self, layer: int) -> tuple[float, int, bool, float]:
        """How layer ``layer``'s cached keys were rotated (for context shift): NEOX."""
        s = self.spec
        return (s.rope_base, s.rope_dim, True, s.rope_scale)

    def __call__(self, tokens: jax.Array, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None):
        """tokens [B, T] at positions pos0[b]..; returns (logits, cache) as ``llama.Llama``."""
        b, t = tokens.shape
        pos = pos0[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        x = self.tok_embd(tokens)
        ks, vs = list(cache.k), list(cache.v)
        for i, blk in enumerate(self.blocks):
            with jax.named_scope(f"blk{i}"):
                x, ks[i], vs[i] = blk(x, pos, pos0, ks[i], vs[i], kv_len,
                                      (cache.k_type, cache.v_type))
        if last_idx is not None:
            x = gather_last(x, last_idx)
        x = self.out_norm(x)
        logits = self.tok_embd.attend(x) if self.output is None else self.output(x)
        return logits, cache.replace(ks, vs)


def build(spec: ModelSpec, w: Weights, gguf) -> Qwen2:
    return Qwen2(spec, w)
