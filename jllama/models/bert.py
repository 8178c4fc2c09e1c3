"""BERT-family encoders (``bert``, ``nomic-bert``) for embeddings and reranking, as llama.cpp's llm_build_bert.

Not a decoder: no KV cache, no causal mask, one pass over a whole sequence. The graph follows
llama.cpp 0c1e570 (src/models/bert.cpp): token + token-type row 0 (llama.cpp hard-codes type 0,
"sentence A") + learned position embeddings, LayerNorm, then per layer self-attention with the
residual and LayerNorm *after* it (post-norm), GELU feed-forward, residual, LayerNorm. Pooling
(llm_graph_context::build_pooling) is chosen by ``{arch}.pooling_type``: none, mean, cls, last,
or rank (cls row -> ``cls`` dense + tanh -> ``cls.output``: a reranker's score). nomic-bert
drops the learned positions for NEOX RoPE on Q/K and uses a SiLU-gated feed-forward;
jina-bert-v2 uses ALiBi instead of positions, optional Q/K LayerNorms, a second post-attention
norm, and a GELU-gated (GEGLU) feed-forward.

Matmuls go through ``common.linear`` (the quantized kernels); norms and softmax in f32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jllama.errors import ModelError
from jllama.gguf.reader import GGUFFile
from jllama.kernels.dispatch import take_rows
from jllama.models.common import Weights, gelu, linear, rope, swiglu
from jllama.quant.qtensor import QTensor

ENCODERS = ("bert", "nomic-bert", "jina-bert-v2")
# jina-bert-v2: llama.cpp fixes the ALiBi maximum bias at 8
_JINA_MAX_ALIBI_BIAS = 8.0

# llama_pooling_type
POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@dataclass(frozen=True)
class EncoderSpec:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    eps: float
    pooling: str
    n_ctx_train: int
    rope_base: float = 10000.0
    n_rot: int = 0

    @property
    def rope(self) -> bool:
        """nomic-bert rotates Q/K (NEOX pairs) instead of adding learned positions."""
        return self.arch == "nomic-bert"


def spec_from_gguf(g: GGUFFile) -> EncoderSpec:
    arch = g.architecture or "?"
    m = g.metadata

    def need(key: str):
        v = m.get(f"{arch}.{key}")
        if v is None:
            raise ModelError(f"{g.path}: missing {arch}.{key}")
        return v

    pooling = int(m.get(f"{arch}.pooling_type", 0))
    if pooling not in POOLING:
        raise ModelError(f"{g.path}: unknown pooling type {pooling}")
    if arch not in ENCODERS:
        raise ModelError(f"{g.path}: '{arch}' is not an encoder jllama runs ({', '.join(ENCODERS)})")
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    return EncoderSpec(arch, int(need("block_count")), n_embd, n_head,
                       int(need("feed_forward_length")),
                       float(need("attention.layer_norm_epsilon")), POOLING[pooling],
                       int(need("context_length")),
                       float(m.get(f"{arch}.rope.freq_base", 10000.0)),
                       int(m.get(f"{arch}.rope.dimension_count", n_embd // n_head)))


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array | None, eps: float) -> jax.Array:
    """ggml_norm (mean, then variance of the centred values) times w plus b."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + eps) * w
    return y + b if b is not None else y


def _dense(x: jax.Array, w: Weights, name: str) -> jax.Array:
    y = linear(x, w(f"{name}.weight"))
    if f"{name}.bias" in w:
        y = y + w.vector(f"{name}.bias")
    return y


def _rows(qt: QTensor, ids: np.ndarray) -> jax.Array:
    return take_rows(qt, jnp.asarray(ids, jnp.int32)).astype(jnp.float32)


def hidden_states(spec: EncoderSpec, w: Weights, ids, n_valid=None) -> jax.Array:
    """Last layer's output for one sequence of token ids: [n_tokens, n_embd] f32.

    ``n_valid`` (may be traced): only the first n_valid ids are the sequence, the rest padding
    that no real token attends to (one compiled shape serves a bucket of lengths)."""
    n = len(ids)
    if n > spec.n_ctx_train:
        raise ModelError(f"{n} tokens, but the encoder's context is {spec.n_ctx_train}")
    x = _rows(w("token_embd.weight"), ids)
    if "token_types.weight" in w:
        x = x + _rows(w("token_types.weight"), np.zeros(1, np.int64))
    if spec.arch == "bert":
        x = x + _rows(w("position_embd.weight"), np.arange(n))
    x = layer_norm(x, w.vector("token_embd_norm.weight"), w.vector("token_embd_norm.bias"),
                   spec.eps)
    hd = spec.n_embd // spec.n_head
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        if f"{p}attn_qkv.weight" in w:
            qkv = _dense(x, w, p + "attn_qkv")
            q, k, v = jnp.split(qkv, 3, axis=-1)
        else:
            q, k, v = (_dense(x, w, p + t) for t in ("attn_q", "attn_k", "attn_v"))
        if f"{p}attn_q_norm.weight" in w:
            q = layer_norm(q, w.vector(p + "attn_q_norm.weight"),
                           w.vector(p + "attn_q_norm.bias"), spec.eps)
        if f"{p}attn_k_norm.weight" in w:
            k = layer_norm(k, w.vector(p + "attn_k_norm.weight"),
                           w.vector(p + "attn_k_norm.bias"), spec.eps)
        q, k, v = (t.reshape(n, spec.n_head, hd) for t in (q, k, v))
        if spec.rope:
            pos = jnp.arange(n, dtype=jnp.int32)[None]
            q = rope(q[None], pos, spec.rope_base, spec.n_rot, neox=True)[0]
            k = rope(k[None], pos, spec.rope_base, spec.n_rot, neox=True)[0]
        s = jnp.einsum("qhd,khd->hqk", q, k) * (1.0 / math.sqrt(hd))
        if spec.arch == "jina-bert-v2":
            s = s + _alibi(spec.n_head, n)
        if n_valid is not None:
            s = jnp.where((jnp.arange(n) < n_valid)[None, None, :], s, -jnp.inf)
        a = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), v).reshape(n, spec.n_embd)
        h = _dense(a, w, p + "attn_output") + x
        h = layer_norm(h, w.vector(p + "attn_output_norm.weight"),
                       w.vector(p + "attn_output_norm.bias"), spec.eps)
        if f"{p}attn_norm_2.weight" in w:  # jina-bert-v2's second post-attention norm
            h = layer_norm(h + x, w.vector(p + "attn_norm_2.weight"),
                           w.vector(p + "attn_norm_2.bias"), spec.eps)
        f = _dense(_ffn(spec, w, p, h), w, p + "ffn_down") + h
        x = layer_norm(f, w.vector(p + "layer_output_norm.weight"),
                       w.vector(p + "layer_output_norm.bias"), spec.eps)
    return x


def _ffn(spec: EncoderSpec, w: Weights, p: str, h: jax.Array) -> jax.Array:
    """The feed-forward up to (not including) ffn_down, per llama.cpp's build_ffn choice."""
    if spec.arch == "bert":
        return gelu(_dense(h, w, p + "ffn_up"))
    if spec.arch == "nomic-bert":  # SiLU-gated, gate and up in parallel
        return swiglu(_dense(h, w, p + "ffn_gate"), _dense(h, w, p + "ffn_up"))
    up = _dense(h, w, p + "ffn_up")
    if f"{p}ffn_gate.weight" in w:  # jina-bert-v2, separate gate: GELU-gated
        return gelu(_dense(h, w, p + "ffn_gate")) * up
    if up.shape[-1] == 2 * spec.n_ff:  # gate fused into up (first half): GEGLU
        return gelu(up[..., :spec.n_ff]) * up[..., spec.n_ff:]
    return gelu(up)


def _alibi(n_head: int, n: int) -> jax.Array:
    """ALiBi bias for non-causal attention: slope_h * -|i - j| (ggml_soft_max_ext's slopes with
    llama.cpp's mask values)."""
    n_log2 = 1 << int(math.floor(math.log2(n_head)))
    m0 = np.float32(2.0) ** np.float32(-_JINA_MAX_ALIBI_BIAS / n_log2)
    m1 = np.float32(2.0) ** np.float32(-(_JINA_MAX_ALIBI_BIAS / 2.0) / n_log2)
    slopes = np.array([m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1)
                       for h in range(n_head)], np.float32)
    i = np.arange(n)
    dist = -np.abs(i[:, None] - i[None, :]).astype(np.float32)
    return jnp.asarray(slopes[:, None, None] * dist[None])


def pool(spec: EncoderSpec, w: Weights, h: jax.Array, pooling: str | None = None,
         n_valid=None) -> jax.Array:
    """llama.cpp's build_pooling for one sequence: [n_tokens, n_embd] (none), [n_embd]
    (mean/cls/last) or [n_cls_out] (rank). ``n_valid``: rows past it are padding
    (``hidden_states``); none then still returns every row."""
    kind = pooling or spec.pooling
    if kind == "none":
        return h
    if kind == "mean":
        if n_valid is None:
            return jnp.mean(h, axis=0)
        keep = (jnp.arange(h.shape[0]) < n_valid)[:, None]
        return jnp.sum(jnp.where(keep, h, 0.0), axis=0) / n_valid
    if kind == "cls":
        return h[0]
    if kind == "last":
        return h[-1] if n_valid is None else jax.lax.dynamic_index_in_dim(h, n_valid - 1, 0,
                                                                           keepdims=False)
    if kind == "rank":
        cur = h[0]
        if "cls.weight" in w:
            cur = jnp.tanh(_dense(cur, w, "cls"))
        if "cls.output.weight" in w:
            cur = _dense(cur, w, "cls.output")
        return cur
    raise ModelError(f"unknown pooling '{kind}'")


def embed(spec: EncoderSpec, w: Weights, ids: np.ndarray, pooling: str | None = None,
          normalize: bool = False) -> np.ndarray:
    """What llama-cpp-python's ``Llama.embed`` returns for one tokenized input."""
    out = np.asarray(pool(spec, w, hidden_states(spec, w, ids), pooling), np.float32)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
