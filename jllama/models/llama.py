"""The ``llama`` architecture (Llama 1-3, SmolLM, Mistral-style dense models) as in llama.cpp.

GGUF stores Q/K rows permuted by the converter so that llama.cpp's NORM rope (adjacent pairs)
reproduces HF's rotate-half; we apply NORM rope to the weights as stored, like llama.cpp.
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
    linear_group,
    rope,
    swiglu,
    tap,
    tap_layer,
    write_cache,
)
from jllama.models.spec import ModelSpec


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights, i: int):
        p = f"blk.{i}."
        self.spec = spec
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), spec.norm_eps)
        self.wq = Linear(w(p + "attn_q.weight"), _bias(w, p + "attn_q.bias"))
        self.wk = Linear(w(p + "attn_k.weight"), _bias(w, p + "attn_k.bias"))
        self.wv = Linear(w(p + "attn_v.weight"), _bias(w, p + "attn_v.bias"))
        self.wo = Linear(w(p + "attn_output.weight"), _bias(w, p + "attn_output.bias"))
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), spec.norm_eps)
        self.gate = Linear(w(p + "ffn_gate.weight"))
        self.up = Linear(w(p + "ffn_up.weight"))
        self.down = Linear(w(p + "ffn_down.weight"))

    def __call__(self, x, pos, pos0, kc, vc, kv_len: int, kv_types: tuple[str, str]):
        s = self.spec
        il = tap_layer()
        b, t, _ = x.shape
        h = tap(f"attn_norm-{il}", self.attn_norm(x))
        q, k, v = linear_group(h, [self.wq, self.wk, self.wv])
        q = q.reshape(b, t, s.n_head, s.head_dim)
        k = k.reshape(b, t, s.n_head_kv, s.head_dim)
        v = tap(f"Vcur-{il}", v.reshape(b, t, s.n_head_kv, s.head_dim_v))
        q = tap(f"Qcur-{il}", rope(q, pos, s.rope_base, s.rope_dim, neox=False,
                                   scale=s.rope_scale))
        k = tap(f"Kcur-{il}", rope(k, pos, s.rope_base, s.rope_dim, neox=False,
                                   scale=s.rope_scale))
        kc = write_cache(kc, k, pos0, kv_types[0])
        vc = write_cache(vc, v, pos0, kv_types[1])
        a = attention(q, kc, vc, pos0, kv_len, 1.0 / math.sqrt(s.head_dim),
                      k_type=kv_types[0], v_type=kv_types[1], head_dim_v=s.head_dim_v)
        x = tap(f"ffn_inp-{il}", x + tap(f"attn_out-{il}", self.wo(tap(f"kqv_out-{il}", a))))
        h = tap(f"ffn_norm-{il}", self.ffn_norm(x))
        g = tap(f"ffn_swiglu-{il}", swiglu(*linear_group(h, [self.gate, self.up])))
        x = tap(f"l_out-{il}", x + self.down(g))
        return x, kc, vc


def _bias(w: Weights, name: str):
    qt = w.get(name)
    return None if qt is None else w.vector(name)


class Llama(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights):
        self.spec = spec
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.blocks = nnx.List([Block(spec, w, i) for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"))

    def kv_rope(self, layer: int) -> tuple[float, int, bool, float]:
        """How layer ``layer``'s cached keys were rotated (for context shift)."""
        s = self.spec
        return (s.rope_base, s.rope_dim, False, s.rope_scale)

    def __call__(self, tokens: jax.Array, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None):
        """tokens [B, T] at positions pos0[b]..; returns (logits, cache).

        With ``last_idx`` the logits are only computed at that index per sequence ([B, V]):
        generation needs one row, and the output matmul is the largest in small models.
        """
        x = self.tok_embd(tokens)
        logits, cache = decoder_forward(self, x, pos0, cache, kv_len, last_idx)
        return logits, cache


def build(spec: ModelSpec, w: Weights, gguf) -> Llama:
    return Llama(spec, w)
