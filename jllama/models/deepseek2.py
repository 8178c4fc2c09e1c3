"""``deepseek2`` (DeepSeek V2 / V2.5 / V3, Kimi-K2 style) with Multi-head Latent Attention, as
llama.cpp's ``src/models/deepseek2.cpp`` runs it.

MLA: keys and values of every head are linear images of one per-token latent ``c`` (kv_lora_rank
wide, RMS-normed) plus a small rope key ``k_pe`` shared by all heads. The cache therefore holds
only ``(c, k_pe)`` per token and layer — ``kv_lora_rank + rope_dim`` floats instead of
``2 * n_head * head_dim`` — and attention absorbs ``attn_k_b`` into the query
(``q_nope · (W_kb c) = (W_kb^T q_nope) · c``) and ``attn_v_b`` into the output
(``Σ p W_vb c = W_vb Σ p c``): multi-query attention over the latent, as llama.cpp does.

Older GGUFs store the unsplit ``attn_kv_b``; it is split into the same two factors at load, so
the latent cache is used for them too (llama.cpp falls back to a full K/V cache there; the maths
is the same).

Rope: NORM mode on the last ``rope.dimension_count`` features of each query head and on ``k_pe``;
YaRN with llama.cpp's DeepSeek attention-factor handling (``yarn_log_multiplier``, whose GGUF
value the converter pre-multiplies by 0.1) — the rotation stays unit-scaled and the magnitude
correction goes into the softmax scale as ``mscale²``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

import jllama.models.kvquant as kvquant
from jllama import numerics
from jllama.errors import ModelError
from jllama.gguf.constants import QType
from jllama.kernels import xla_cpu
from jllama.kernels.dispatch import dequantize
from jllama.models.cache import KVCache, LayerCache, PagedKVCache
from jllama.models.common import (
    Embedding,
    Linear,
    RMSNorm,
    SwiGLU,
    Weights,
    decoder_forward,
    in_place_ok,
    write_cache,
)
from jllama.models.moe import MoE, MoEConfig, moe_config
from jllama.models.spec import ModelSpec
from jllama.quant.actquant import quantize_activations
from jllama.quant.qtensor import QTensor


@dataclass(frozen=True)
class MLAConfig:
    n_head: int
    q_lora_rank: int  # 0: plain attn_q
    kv_lora_rank: int
    nope_dim: int  # per-head non-rope part of q/k
    rope_dim: int  # per-head rope part of q, and of the shared k_pe
    v_dim: int  # per-head value size after decompression
    n_dense_lead: int
    # rope / YaRN as llama.cpp's ggml_rope_ext receives them
    rope_base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    n_ctx_orig: int
    beta_fast: float
    beta_slow: float
    kq_scale: float

    @property
    def cache_width(self) -> int:
        """Floats cached per token and layer."""
        return self.kv_lora_rank + self.rope_dim


def _meta(g, key, default=None):
    return g.metadata.get(f"{g.architecture}.{key}", default)


def mla_config(g, spec: ModelSpec) -> MLAConfig:
    n_head = spec.n_head
    kv_rank = int(_meta(g, "attention.kv_lora_rank", 0) or 0)
    if kv_rank <= 0:
        raise ModelError(f"{g.path}: deepseek2 needs attention.kv_lora_rank")
    rope_dim = int(_meta(g, "rope.dimension_count", 0) or 0)
    k_mla, v_mla = _meta(g, "attention.key_length_mla"), _meta(g, "attention.value_length_mla")
    if k_mla and v_mla:  # MLA-layout GGUF: key_length is kv_lora_rank + rope_dim
        dk, dv = int(k_mla), int(v_mla)
    else:
        dk, dv = spec.head_dim, spec.head_dim_v
    if not 0 < rope_dim < dk:
        raise ModelError(f"{g.path}: rope dimension {rope_dim} does not fit key length {dk}")

    # rope scaling, as llama.cpp's context setup and deepseek2 graph combine them
    stype = str(_meta(g, "rope.scaling.type", "none") or "none")
    factor = float(_meta(g, "rope.scaling.factor", 0.0) or 0.0)
    freq_scale = 1.0 / factor if (stype in ("linear", "yarn") and factor > 0) else 1.0
    ext = _meta(g, "rope.scaling.yarn_ext_factor")
    ext_factor = float(ext) if ext is not None and float(ext) >= 0 else (
        1.0 if stype == "yarn" else 0.0)
    log_mul = float(_meta(g, "rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
    attn_factor = float(_meta(g, "rope.scaling.yarn_attn_factor", 1.0) or 1.0)
    ln_f = math.log(1.0 / freq_scale)
    if ext_factor != 0:

        def get_mscale(scale: float, m: float) -> float:
            return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0

        f = 1.0 / freq_scale
        if log_mul != 0:
            m = log_mul if log_mul != 1.0 else 1.0  # deepseek2: mscale = mscale_all_dim
            attn_factor = get_mscale(f, m) / get_mscale(f, log_mul)
        else:
            attn_factor = get_mscale(f, 1.0)
        attn_factor /= 1.0 + 0.1 * ln_f  # ggml's rope multiplies this back in
    attn_factor_org = attn_factor * (1.0 + 0.1 * ln_f)
    mscale = attn_factor_org * (1.0 + 0.1 * log_mul * ln_f)
    return MLAConfig(
        n_head=n_head,
        q_lora_rank=int(_meta(g, "attention.q_lora_rank", 0) or 0),
        kv_lora_rank=kv_rank,
        nope_dim=dk - rope_dim,
        rope_dim=rope_dim,
        v_dim=dv,
        n_dense_lead=int(_meta(g, "leading_dense_block_count", 0) or 0),
        rope_base=spec.rope_base,
        freq_scale=freq_scale,
        ext_factor=ext_factor,
        attn_factor=attn_factor,
        n_ctx_orig=int(_meta(g, "rope.scaling.original_context_length", 0) or spec.n_ctx_train),
        beta_fast=float(_meta(g, "rope.scaling.yarn_beta_fast", 32.0) or 32.0),
        beta_slow=float(_meta(g, "rope.scaling.yarn_beta_slow", 1.0) or 1.0),
        kq_scale=mscale * mscale / math.sqrt(dk),
    )


def rope_yarn(x: jax.Array, pos: jax.Array, c: MLAConfig) -> jax.Array:
    """ggml's NORM-mode rope with YaRN on all of x's last axis. x [B, T, H, D], pos [B, T]."""
    d = x.shape[-1]
    i = jnp.arange(d // 2, dtype=jnp.float32)
    theta_extrap = pos.astype(jnp.float32)[..., None] * c.rope_base ** (-2.0 * i / d)
    theta = c.freq_scale * theta_extrap
    mscale = c.attn_factor
    if c.ext_factor != 0:

        def corr_dim(n_rot: float) -> float:
            return d * math.log(c.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(c.rope_base))

        low = max(0.0, math.floor(corr_dim(c.beta_fast)))
        high = min(d - 1.0, math.ceil(corr_dim(c.beta_slow)))
        ramp = (1 - jnp.clip((i - low) / max(0.001, high - low), 0.0, 1.0)) * c.ext_factor
        theta = theta * (1 - ramp) + theta_extrap * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / c.freq_scale)
    cos = (jnp.cos(theta) * mscale)[:, :, None, :]
    sin = (jnp.sin(theta) * mscale)[:, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)


def _qdot(x: jax.Array, qt: QTensor, eq: str) -> jax.Array:
    """``x [B, T, H, in] · W[h] [out, in]`` per head h (``eq`` spells it out) with a (possibly
    quantized) per-head weight: ggml's batched ``mul_mat`` on the int8 kernels where they take
    the weight, else an einsum with activations rounded like ggml's."""
    y = _per_head_int8(x, qt)
    if y is not None:
        return y
    if numerics.current().match_llamacpp and not qt.is_float:
        x = quantize_activations(x, qt.qtype)
    return jnp.einsum(eq, x, dequantize(qt, jnp.float32))


def _per_head_int8(x: jax.Array, qt: QTensor) -> jax.Array | None:
    """ggml multiplies ``attn_k_b`` / ``attn_v_b`` [H, out, in] with one ``mul_mat`` batched over
    heads: per head its T rows, each row quantized to the weight's vec_dot type, each product
    vec_dot's (or from 8 rows the tiled K-quant GEMM's, and tinyBLAS's for Q4_0/Q5_0/Q8_0, which
    accumulates as vec_dot does). The grouped ``mul_mat_id`` call with the heads as experts
    computes exactly that, reading the blocks in place, where the einsum dequantizes both weights
    in every step (experiments/results/scale.md, DeepSeek-V2-Lite). IQ4_NL stays on
    the einsum: from 2 rows ggml's ``mul_mat`` takes tinyBLAS's order for it, which
    ``mul_mat_id`` never does. None where the int8 kernels do not apply."""
    if len(qt.shape) != 3 or int(qt.qtype) == int(QType.IQ4_NL) or not in_place_ok(qt):
        return None
    b, t, h, k = x.shape
    n = b * t
    # expert-major (head-major) order of the rows of x.reshape(n * h, k): row i * h + head
    rows = jnp.arange(n * h, dtype=jnp.int32).reshape(n, h).T.reshape(-1)
    counts = jnp.full((h,), n, jnp.int32)
    ys = xla_cpu.ffi_matmul_id(x.reshape(n * h, k).astype(jnp.float32), rows, counts, [qt])
    if ys is None:
        return None
    return jnp.swapaxes(ys[0].reshape(h, n, -1), 0, 1).reshape(b, t, h, -1)


def _half_round(x: jax.Array, cache_type: str) -> jax.Array:
    if numerics.current().match_llamacpp and cache_type in ("f16", "bf16"):
        return x.astype(kvquant.FLOAT_KV[cache_type]).astype(jnp.float32)
    return x


class MLABlock(nnx.Module):
    def __init__(self, spec: ModelSpec, c: MLAConfig, w: Weights, i: int, moe: MoEConfig):
        p = f"blk.{i}."
        self.c = c
        eps = spec.norm_eps
        h, dq = c.n_head, c.nope_dim + c.rope_dim
        self.attn_norm = RMSNorm(w.vector(p + "attn_norm.weight"), eps)
        if p + "attn_q_a.weight" in w:
            self.wq_a = Linear(w(p + "attn_q_a.weight"))
            self.q_a_norm = RMSNorm(w.vector(p + "attn_q_a_norm.weight"), eps)
            self.wq_b = Linear(w(p + "attn_q_b.weight", (h * dq, c.q_lora_rank)))
            self.wq = nnx.data(None)
        else:
            self.wq_a = self.q_a_norm = self.wq_b = nnx.data(None)
            self.wq = Linear(w(p + "attn_q.weight", (h * dq, spec.n_embd)))
        self.wkv_a = Linear(w(p + "attn_kv_a_mqa.weight", (c.kv_lora_rank + c.rope_dim,
                                                          spec.n_embd)))
        self.kv_a_norm = RMSNorm(w.vector(p + "attn_kv_a_norm.weight", c.kv_lora_rank), eps)
        if p + "attn_k_b.weight" in w:
            # natural(): plain arrays below, whatever the file's alignment (small: a copy)
            k_b = w(p + "attn_k_b.weight", (h, c.kv_lora_rank, c.nope_dim)).natural()
            v_b = w(p + "attn_v_b.weight", (h, c.v_dim, c.kv_lora_rank)).natural()
        else:  # unsplit [h * (nope + v), kv_lora]: split per head, k part transposed
            kv_b = dequantize(w(p + "attn_kv_b.weight",
                                (h * (c.nope_dim + c.v_dim), c.kv_lora_rank)))
            kv_b = kv_b.reshape(h, c.nope_dim + c.v_dim, c.kv_lora_rank)
            k = jnp.transpose(kv_b[:, : c.nope_dim], (0, 2, 1))
            v = kv_b[:, c.nope_dim :]
            k_b = QTensor(k, 0, tuple(k.shape))
            v_b = QTensor(v, 0, tuple(v.shape))
        # per-head weights kept as their raw blocks (plain arrays, the types static): _qdot
        # dequantizes them whole, so a scan (common.scan_blocks) stacks and slices them like
        # norms rather than handing them to the int8 kernels as LayerStacks
        self.k_b = nnx.Param(k_b.data)  # [H, kv_lora, nope]
        self.v_b = nnx.Param(v_b.data)  # [H, v, kv_lora]
        self.k_b_type = (int(k_b.qtype), tuple(k_b.shape))
        self.v_b_type = (int(v_b.qtype), tuple(v_b.shape))
        self.wo = Linear(w(p + "attn_output.weight", (spec.n_embd, h * c.v_dim)))
        self.ffn_norm = RMSNorm(w.vector(p + "ffn_norm.weight"), eps)
        self.ffn = SwiGLU(w, p) if i < c.n_dense_lead else MoE(w, p, moe, shared=True)

    def __call__(self, x, pos, pos0, lat_c, pe_c, kv_len: int, kv_types: tuple[str, str]):
        c = self.c
        b, t, _ = x.shape
        h = self.attn_norm(x)
        if self.wq is None:
            q = self.wq_b(self.q_a_norm(self.wq_a(h)))
        else:
            q = self.wq(h)
        q = q.reshape(b, t, c.n_head, c.nope_dim + c.rope_dim)
        q_nope, q_pe = q[..., : c.nope_dim], q[..., c.nope_dim :]
        kv = self.wkv_a(h)
        lat = self.kv_a_norm(kv[..., : c.kv_lora_rank])[:, :, None, :]  # [B, T, 1, R]
        k_pe = kv[..., c.kv_lora_rank :][:, :, None, :]  # [B, T, 1, rope]
        q_pe = rope_yarn(q_pe, pos, c)
        k_pe = rope_yarn(k_pe, pos, c)
        lat_c = write_cache(lat_c, lat, pos0, kv_types[0])
        pe_c = write_cache(pe_c, k_pe, pos0, kv_types[1])

        q_abs = _qdot(q_nope, QTensor(self.k_b.get_value(), *self.k_b_type), "bthn,hrn->bthr")
        lat_l = lat_c.get() if isinstance(lat_c, LayerCache) else lat_c  # a scan's layer
        pe_l = pe_c.get() if isinstance(pe_c, LayerCache) else pe_c
        lat_all = kvquant.dequantize(lat_l[:, 0, :kv_len], kv_types[0], c.kv_lora_rank)  # [B,S,R]
        pe_all = kvquant.dequantize(pe_l[:, 0, :kv_len], kv_types[1], c.rope_dim)
        # ggml's CPU matmul against a half-precision cache converts the other operand to it
        q_abs, q_pe = _half_round(q_abs, kv_types[0]), _half_round(q_pe, kv_types[1])
        s = (jnp.einsum("bthr,bsr->bhts", q_abs, lat_all)
             + jnp.einsum("bthd,bsd->bhts", q_pe, pe_all)) * c.kq_scale
        qpos = pos0[:, None] + jnp.arange(t)[None, :]
        mask = jnp.arange(kv_len)[None, None, :] <= qpos[:, :, None]  # [B, T, S]
        s = jnp.where(mask[:, None], s, -jnp.inf)
        p = _half_round(jax.nn.softmax(s, axis=-1), kv_types[0])
        o_lat = jnp.einsum("bhts,bsr->bthr", p, lat_all)
        o = _qdot(o_lat, QTensor(self.v_b.get_value(), *self.v_b_type), "bthr,hvr->bthv")
        x = x + self.wo(o.reshape(b, t, c.n_head * c.v_dim))

        x = x + self.ffn(self.ffn_norm(x))
        return x, lat_c, pe_c


class DeepSeek2(nnx.Module):
    # runs its blocks as a scan over a stacked cache (common.scan_blocks) when the Engine's
    # numerics ask for it: the leading dense layers, then the MoE layers, one loop each
    scans_layers = True
    # llama.cpp's deepseek2 graph multiplies these by a plain ggml_mul_mat, not build_lora_mm:
    # LoRA adapters on them load there and are never applied (models/lora.py does the same)
    LORA_PLAIN = ("attn_q_a.weight", "attn_q_b.weight", "attn_q.weight", "attn_kv_a_mqa.weight",
                  "attn_kv_b.weight", "output.weight")

    def __init__(self, spec: ModelSpec, c: MLAConfig, w: Weights, moe: MoEConfig):
        self.spec = spec
        self.c = c
        self.tok_embd = Embedding(w("token_embd.weight"))
        self.blocks = nnx.List([MLABlock(spec, c, w, i, moe) for i in range(spec.n_layer)])
        self.out_norm = RMSNorm(w.vector("output_norm.weight"), spec.norm_eps)
        self.output = None if spec.tied_output else Linear(w("output.weight"))

    # the latent cache also comes as pages (make_cache's ``paged``): one latent "head"
    paged_cache = True

    def make_cache(self, batch: int, max_len: int, cache_type: str = "f32",
                   stacked: bool = False, paged: dict | None = None) -> KVCache:
        """The MLA cache: ``k`` = normed latent [B, 1, S, kv_lora_rank], ``v`` = roped shared
        key [B, 1, S, rope_dim], one pair per layer (``kv_lora_rank + rope_dim`` values per
        token and layer), both parts stored as ``cache_type`` like llama.cpp's single MLA K
        cache (a rope width that is not a multiple of the block size keeps its part in f32).
        ``stacked``: one [B, L, 1, S, row] array per part, for the scanned layers. ``paged``
        (``PagedKVCache.create``'s page_size, n_pages, impl): both parts as page pools
        [L, 1, n_pages, page_size, row] under one block table; the blocks read a layer
        through ``LayerCache.get`` (the pages gathered), the absorbed attention as before."""
        c = self.c
        pe_type = cache_type if (cache_type in kvquant.FLOAT_KV or c.rope_dim % 32 == 0) else "f32"
        kvquant.check_kv_type(cache_type, c.kv_lora_rank)
        n = self.spec.n_layer
        nk, dk = kvquant.row_shape(cache_type, c.kv_lora_rank)
        nv, dv = kvquant.row_shape(pe_type, c.rope_dim)
        if paged is not None:
            return PagedKVCache.create(n, batch, 1, max_len, c.kv_lora_rank, c.rope_dim,
                                       cache_type, pe_type, **paged)
        if stacked:
            return KVCache((jnp.zeros((batch, n, 1, max_len, nk), dk),),
                           (jnp.zeros((batch, n, 1, max_len, nv), dv),), cache_type, pe_type)
        return KVCache(
            tuple(jnp.zeros((batch, 1, max_len, nk), dk) for _ in range(n)),
            tuple(jnp.zeros((batch, 1, max_len, nv), dv) for _ in range(n)),
            cache_type, pe_type,
        )

    def __call__(self, tokens: jax.Array, pos0: jax.Array, cache: KVCache, kv_len: int,
                 last_idx: jax.Array | None = None, hidden: bool = False):
        x = self.tok_embd(tokens)
        logits, cache = decoder_forward(self, x, pos0, cache, kv_len, last_idx, hidden)
        return logits, cache


def build(spec: ModelSpec, w: Weights, gguf) -> DeepSeek2:
    c = mla_config(gguf, spec)
    moe = moe_config(gguf.metadata, spec.arch)
    if gguf.metadata.get(f"{spec.arch}.attention.temperature_scale"):
        raise ModelError(f"{gguf.path}: attention temperature scaling (Mistral-Large style "
                         "deepseek2) is not supported")
    return DeepSeek2(spec, c, w, moe)
