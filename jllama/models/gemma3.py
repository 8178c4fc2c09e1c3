"""The ``gemma3`` architecture (Gemma 3 text models) as llama.cpp builds it.

Per layer: RMSNorm → Q/K/V → per-head RMSNorm on Q and K → NEOX rope → Q scaled by
``1/sqrt(head_dim)`` → attention → RMSNorm (post-attention) → residual; RMSNorm → GELU(tanh)
gated FFN → RMSNorm (post-FFN) → residual. Embeddings are scaled by sqrt(n_embd); norm weights
are used as stored (the converter already wrote Gemma's ``1 + w``).

Interleaved local/global attention: with ``gemma3.attention.sliding_window`` set, every
``sliding_window_pattern``-th layer (default 6: layers 5, 11, 17, ...) is global and uses the
file's rope base and scaling; the others see only the last ``sliding_window`` positions and use
rope base ``rope.freq_base_swa`` (default 10000) without scaling. Without a sliding window all
layers are global. Final logits are soft-capped only when the file sets
``final_logit_softcapping`` (as llama.cpp 0c1e570 does, checked on tiny models either way).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import jllama.models.common as common
from jllama import numerics
from jllama.errors import ModelError
from jllama.gguf.reader import GGUFFile
from jllama.models.cache import KVCache
from jllama.models.common import (
    Embedding,
    Linear,
    RMSNorm,
    Weights,
    attention,
    decoder_forward,
    gelu,
    rope,
    write_cache,
)
from jllama.models.spec import ModelSpec
from jllama.models.spec import spec_from_gguf as base_spec
from jllama.quant.actquant import opaque


def spec_from_gguf(g: GGUFFile) -> ModelSpec:
    """The common spec plus Gemma 3's per-layer attention plan in ``extra``."""
    s = base_spec(g)
    a = s.arch
    md = g.metadata
    window = int(md.get(f"{a}.attention.sliding_window", 0) or 0)
    if window > 0:
        pattern = md.get(f"{a}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per-layer flags: true = sliding window
            if len(pattern) != s.n_layer:
                raise ModelError(f"{g.path}: sliding_window_pattern has {len(pattern)} entries "
                                 f"for {s.n_layer} layers")
            swa = tuple(bool(p) for p in pattern)
        else:
            n = int(pattern)
            # llama.cpp's set_swa_pattern: the last layer of every group of n is global
            swa = tuple(n == 0 or (il % n) < (n - 1) for il in range(s.n_layer))
    else:
        swa = (False,) * s.n_layer
    softcap = md.get(f"{a}.final_logit_softcapping")
    # llama.cpp: the 27B (62 layers) scales queries by 1/sqrt(n_embd / n_head), others by
    # 1/sqrt(head_dim) (query_pre_attn_scalar in the HF config)
    q_scale = (1.0 / math.sqrt(s.n_embd // s.n_head) if s.n_layer == 62
               else 1.0 / math.sqrt(s.head_dim))
    extra = dict(s.extra)
    extra.update(
        sliding_window=window,
        swa_layers=swa,
        rope_base_swa=float(md.get(f"{a}.rope.freq_base_swa", 10000.0)),
        q_scale=q_scale,
        final_softcap=float(softcap) if softcap else None,
    )
    return dataclasses.replace(s, extra=extra)


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, w: Weights, i: int):
        p = f"blk.{i}."
        e = spec.extra
        self.spec = spec
        self.swa = bool(e["swa_layers"][i])
        self.window = int(e["sliding_window"]) if self.swa else None
        # local layers: fixed base, no position scaling; global: the file's rope settings
        self.rope_base = e["rope_base_swa"] if self.swa else spec.rope_base
        self.rope_scale = 1.0 if self.swa else spec.rope_scale
        eps = spec.norm_eps
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), eps)
        self.wq = Linear(w(p + "attn_q.weight"))
        self.wk = Linear(w(p + "attn_k.weight"))
        self.wv = Linear(w(p + "attn_v.weight"))
        self.q_norm = RMSNorm(w.vector(p + "attn_q_norm.weight", spec.head_dim), eps)
        self.k_norm = RMSNorm(w.vector(p + "attn_k_norm.weight", spec.head_dim), eps)
        self.wo = Linear(w(p + "attn_output.weight"))
        self.post_attn_norm = RMSNorm(w.vector(p + "post_attention_norm.weight"), eps)
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), eps)
        self.gate = Linear(w(p + "ffn_gate.weight"))
        self.up = Linear(w(p + "ffn_up.weight"))
        self.down = Linear(w(p + "ffn_down.weight"))
        self.post_ffn_norm = RMSNorm(w.vector(p + "post_ffw_norm.weight"), eps)

    def __call__(self, x, pos, pos0, kc, vc, kv_len: int, kv_types: tuple[str, str],
                 bidir: bool = False):
        s = self.spec
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = common.linear_group(h, [self.wq, self.wk, self.wv])
        q = self.q_norm(q.reshape(b, t, s.n_head, s.head_dim))
        k = self.k_norm(k.reshape(b, t, s.n_head_kv, s.head_dim))
        v = v.reshape(b, t, s.n_head_kv, s.head_dim_v)
        q = rope(q, pos, self.rope_base, s.rope_dim, neox=True, scale=self.rope_scale)
        k = rope(k, pos, self.rope_base, s.rope_dim, neox=True, scale=self.rope_scale)
        # llama.cpp scales Q itself and calls attention with scale 1 (same rounding order)
        q = q * s.extra["q_scale"]
        rk, rv = common.kv_rotation(kv_types, s.head_dim, s.head_dim_v)  # quantized caches
        if rk:
            q, k = common.fwht(q, rk), common.fwht(k, rk)
        if rv:
            v = common.fwht(v, rv)
        kc = write_cache(kc, k, pos0, kv_types[0])
        vc = write_cache(vc, v, pos0, kv_types[1])
        a = attention(q, kc, vc, pos0, kv_len, 1.0, window=self.window,
                      k_type=kv_types[0], v_type=kv_types[1], head_dim_v=s.head_dim_v,
                      bidir=bidir)
        if rv:
            a = common.fwht(a, rv)
        x = x + self.post_attn_norm(self.wo(a))
        h = self.ffn_norm(x)
        g, u = common.linear_group(h, [self.gate, self.up])
        h = self.down(gelu(g) * u)
        return x + self.post_ffn_norm(h), kc, vc


class Gemma3(nnx.Module):
    # one scan over a stacked cache (common.scan_blocks) whose body is the repeating pattern of
    # five sliding-window layers (an inner scan) and one global layer
    scans_layers = True

    def __init__(self, spec: ModelSpec, w: Weights):
        self.spec = spec
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.embd_scale = math.sqrt(spec.n_embd)
        self.blocks = nnx.List([Block(spec, w, i) for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"))
        self.final_softcap = spec.extra["final_softcap"]

    def kv_rope(self, layer: int) -> tuple[float, int, bool, float]:
        """How layer ``layer``'s cached keys were rotated (for context shift): NEOX."""
        blk = common.block_of(self, layer)
        return (blk.rope_base, self.spec.rope_dim, True, blk.rope_scale)

    def __call__(self, tokens: jax.Array | None, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None, hidden: bool = False,
                 embd: jax.Array | None = None, bidir: bool = False):
        """tokens [B, T] at positions pos0[b]..; returns (logits, cache) as ``llama.Llama``.

        ``embd`` [B, T, n_embd] instead of tokens: input embeddings (an image's, from the
        mmproj), used as they are (llama.cpp scales token embeddings only); ``bidir``: the
        batch attends to itself non-causally (libmtmd decodes Gemma 3 image tokens so)."""
        if embd is not None:
            x = embd.astype(jnp.float32)
        else:
            x = self.tok_embd(tokens).astype(jnp.float32) * jnp.float32(self.embd_scale)
            if numerics.current().match_llamacpp:  # rounded here, as ggml_scale does
                x = opaque(x)
        logits, cache = decoder_forward(self, x, pos0, cache, kv_len, last_idx, hidden,
                                        bidir=bidir)
        if self.final_softcap and not hidden:  # the softcap is on logits only
            logits = jnp.tanh(logits / self.final_softcap) * self.final_softcap
        return logits, cache


def build(spec: ModelSpec, w: Weights, gguf) -> Gemma3:
    if "swa_layers" not in spec.extra:  # a spec made by the generic reader
        spec = spec_from_gguf(gguf)
    return Gemma3(spec, w)
