"""Mixture-of-experts feed-forward as llama.cpp's ``build_moe_ffn`` computes it.

GGUF stores the experts stacked: ``ffn_{gate,up}_exps`` ``[n_expert, n_ff, n_embd]`` and
``ffn_down_exps`` ``[n_expert, n_embd, n_ff]`` (numpy order), plus the router ``ffn_gate_inp``
``[n_expert, n_embd]``. Routing: router logits → gating (softmax / sigmoid / raw) → top-k on the
gating probabilities (plus the V3 selection bias ``exp_probs_b``, which picks experts but does not
weight them) → optional renormalisation of the k weights → optional constant scale.

Two expert formulations, picked at trace time from the static token count:

* gathered (decode, few tokens): a scan over the (token, slot) pairs; each step slices the chosen
  expert's blocks out of the stacked tensor and runs the ordinary 2-D quantized matmul kernels on
  them (the fused C++ decode+dot on CPU), so a decode step reads k experts, never all of them;
* grouped (prefill, when tokens × k ≥ n_expert): the (token, slot) pairs are sorted by expert and
  each expert's run is padded to a multiple of a tile of C rows, so every tile belongs to one
  expert; a ``lax.scan`` over the tiles dequantizes that tile's expert and runs its C rows. The
  tile count is static (``ceil(pairs / C) + n_expert`` bounds it), so this jits once per shape;
  rows computed are at most pairs + n_expert × C instead of tokens × n_expert for a dense-masked
  formulation, and each tile's matmuls are the ordinary 2-D kernels on one expert's blocks.

Activations are rounded to the weight type's ``vec_dot_type`` first, as ggml's ``mul_mat_id``
does, so quantized experts track llama.cpp closely.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jllama import numerics
from jllama.errors import ModelError
from jllama.kernels.dispatch import dequantize
from jllama.models.common import Linear, Weights, linear
from jllama.quant.actquant import quantize_activations
from jllama.quant.qtensor import QTensor

# llama.cpp's llama_expert_gating_func_type
GATING_NONE, GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT = 0, 1, 2, 3


@dataclass(frozen=True)
class MoEConfig:
    n_expert: int
    n_used: int
    gating: int = GATING_SOFTMAX
    norm_weights: bool = False
    scale: float = 0.0  # 0 = no scaling (llama.cpp applies it only when set)
    n_group: int = 1  # DeepSeek-V3 group-limited routing: experts in n_group groups,
    n_group_used: int = 1  # only the best n_group_used groups (by their top-2 sum) compete


def _round(x: jax.Array, qt: QTensor) -> jax.Array:
    if numerics.current().match_llamacpp and not qt.is_float:
        return quantize_activations(x, qt.qtype)
    return x


def _expert(qt: QTensor, e: jax.Array) -> QTensor:
    """Expert ``e`` (traced index) of a stacked tensor as a 2-D QTensor, still in GGUF blocks:
    only its rows are copied, and the 2-D quantized matmul kernels then read it directly."""
    if qt.layout != "gguf":
        raise ModelError(f"stacked expert tensor in layout '{qt.layout}' is not supported")
    return QTensor(jax.lax.dynamic_index_in_dim(qt.data, e, 0, keepdims=False), qt.qtype,
                   tuple(qt.shape[1:]))


def route(logits: jax.Array, cfg: MoEConfig, bias: jax.Array | None
          ) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] → (expert ids [N, k], weights [N, k])."""
    if cfg.gating == GATING_SIGMOID:
        probs = jax.nn.sigmoid(logits)
    elif cfg.gating == GATING_SOFTMAX_WEIGHT:
        probs = logits
    else:  # softmax (and "none", which llama.cpp maps to softmax)
        probs = jax.nn.softmax(logits, axis=-1)
    sel = probs + bias if bias is not None else probs
    if cfg.n_group > 1:
        n, e = sel.shape
        grouped = sel.reshape(n, cfg.n_group, e // cfg.n_group)
        score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, G]
        _, gids = jax.lax.top_k(score, cfg.n_group_used)
        keep = jnp.any(gids[:, None, :] == jnp.arange(cfg.n_group)[None, :, None], axis=-1)
        sel = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, ids = jax.lax.top_k(sel, cfg.n_used)
    w = jnp.take_along_axis(probs, ids, axis=-1)
    if cfg.gating == GATING_SOFTMAX_WEIGHT:
        w = jax.nn.softmax(w, axis=-1)
    if cfg.norm_weights:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    if cfg.scale:
        w = w * cfg.scale
    return ids, w


class MoE(nnx.Module):
    """Routed experts (SwiGLU), optionally plus an always-on shared expert."""

    def __init__(self, w: Weights, prefix: str, cfg: MoEConfig, shared: bool = False):
        self.cfg = cfg
        self.router = nnx.Param(w(prefix + "ffn_gate_inp.weight"))
        self.gate = nnx.Param(w(prefix + "ffn_gate_exps.weight"))
        self.up = nnx.Param(w(prefix + "ffn_up_exps.weight"))
        self.down = nnx.Param(w(prefix + "ffn_down_exps.weight"))
        for name, p in (("ffn_gate_exps", self.gate), ("ffn_up_exps", self.up),
                        ("ffn_down_exps", self.down)):
            shp = p.get_value().shape
            if len(shp) != 3 or shp[0] != cfg.n_expert:
                raise ModelError(f"{w.path}: {prefix}{name} has shape {shp}, expected "
                                 f"[{cfg.n_expert}, rows, cols]")
        bias = prefix + "exp_probs_b.bias"
        self.bias = nnx.Param(w.vector(bias)) if bias in w else nnx.data(None)
        if shared and prefix + "ffn_gate_shexp.weight" in w:
            self.shared = nnx.List([Linear(w(prefix + "ffn_gate_shexp.weight")),
                                    Linear(w(prefix + "ffn_up_shexp.weight")),
                                    Linear(w(prefix + "ffn_down_shexp.weight"))])
        else:
            self.shared = nnx.data(None)
        # qwen2moe: the shared expert's output is scaled by sigmoid(x · ffn_gate_inp_shexp)
        sg = prefix + "ffn_gate_inp_shexp.weight"
        self.shared_gate = nnx.Param(w(sg)) if shared and sg in w else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).astype(jnp.float32)
        router = self.router.get_value()
        logits = jnp.einsum("nd,ed->ne", _round(xf, router), dequantize(router, jnp.float32))
        bias = self.bias.get_value() if self.bias is not None else None
        ids, wts = route(logits, self.cfg, bias)
        n = xf.shape[0]
        if n * self.cfg.n_used < self.cfg.n_expert:
            out = self._gathered(xf, ids, wts)
        else:
            out = self._grouped(xf, ids, wts)
        if self.shared is not None:
            g, u, d = self.shared
            sh = d(jax.nn.silu(g(xf)) * u(xf))
            if self.shared_gate is not None:
                sg = self.shared_gate.get_value()
                gw = dequantize(sg, jnp.float32).reshape(-1, xf.shape[-1])  # [1, n_embd]
                sh = sh * jax.nn.sigmoid(_round(xf, sg) @ gw.T)
            out = out + sh
        return out.reshape(shape[:-1] + (out.shape[-1],)).astype(x.dtype)

    def _ffn(self, x: jax.Array, e: jax.Array) -> jax.Array:
        """SwiGLU of expert ``e`` on rows ``x``, activations rounded per weight type as ggml's
        ``mul_mat_id`` does."""
        gate, up, down = (p.get_value() for p in (self.gate, self.up, self.down))
        h = jax.nn.silu(linear(x, _expert(gate, e))) * linear(x, _expert(up, e))
        return linear(h, _expert(down, e))

    def _gathered(self, x: jax.Array, ids: jax.Array, wts: jax.Array) -> jax.Array:
        """One (token, slot) pair per scan step, in slot order per token (llama.cpp's sum
        order): a decode step touches exactly the k chosen experts' blocks."""
        n, k = ids.shape

        def body(out, p):
            t = p // k
            y = self._ffn(jax.lax.dynamic_index_in_dim(x, t, 0), ids[t, p % k])
            return out.at[t].add(wts[t, p % k] * y[0]), None

        out0 = jnp.zeros((n, self.down.get_value().shape[1]), jnp.float32)
        out, _ = jax.lax.scan(body, out0, jnp.arange(n * k))
        return out

    def _grouped(self, x: jax.Array, ids: jax.Array, wts: jax.Array) -> jax.Array:
        n_expert = self.cfg.n_expert
        n, k = ids.shape
        pairs = n * k
        tile = int(min(128, max(8, 1 << max(0, (pairs // n_expert - 1).bit_length()))))
        n_tiles = -(-pairs // tile) + n_expert
        flat_e = ids.reshape(-1)
        order = jnp.argsort(flat_e, stable=True)
        e_sorted = flat_e[order]
        counts = jnp.bincount(flat_e, length=n_expert)
        padded = (counts + tile - 1) // tile * tile
        pad_end = jnp.cumsum(padded)
        start = jnp.cumsum(counts) - counts
        dest = (pad_end - padded)[e_sorted] + jnp.arange(pairs) - start[e_sorted]
        slots = n_tiles * tile
        tok = jnp.zeros(slots, jnp.int32).at[dest].set((order // k).astype(jnp.int32))
        wt = jnp.zeros(slots, jnp.float32).at[dest].set(wts.reshape(-1)[order])
        tile_e = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_tiles) * tile, side="right"),
                             n_expert - 1)

        def body(_, i):
            rows = jax.lax.dynamic_slice_in_dim(tok, i * tile, tile)
            return None, self._ffn(x[rows], tile_e[i])

        _, ys = jax.lax.scan(body, None, jnp.arange(n_tiles))
        ys = ys.reshape(slots, -1) * wt[:, None]  # padding rows carry weight 0
        return jnp.zeros((n, ys.shape[-1]), jnp.float32).at[tok].add(ys)


def moe_config(g_meta: dict, arch: str, *, norm: bool | None = None, scale: float | None = None,
               gating: int | None = None) -> MoEConfig:
    """Read ``{arch}.expert_*`` keys; explicit arguments override (archs that hard-code them)."""
    n_expert = int(g_meta.get(f"{arch}.expert_count", 0))
    n_used = int(g_meta.get(f"{arch}.expert_used_count", 0))
    if n_expert <= 0 or not 0 < n_used <= n_expert:
        raise ModelError(f"{arch}: bad expert counts (expert_count={n_expert}, "
                         f"expert_used_count={n_used})")
    if gating is None:
        gating = int(g_meta.get(f"{arch}.expert_gating_func", GATING_NONE)) or GATING_SOFTMAX
    if norm is None:
        norm = bool(g_meta.get(f"{arch}.expert_weights_norm", False))
    if scale is None:
        scale = float(g_meta.get(f"{arch}.expert_weights_scale", 0.0))
    n_group = int(g_meta.get(f"{arch}.expert_group_count", 0) or 1)
    n_group_used = int(g_meta.get(f"{arch}.expert_group_used_count", 0) or n_group)
    if n_group > 1 and (n_expert % n_group or n_expert // n_group < 2
                        or not 0 < n_group_used <= n_group):
        raise ModelError(f"{arch}: bad expert groups ({n_group} groups, {n_group_used} used, "
                         f"{n_expert} experts)")
    return MoEConfig(n_expert, n_used, gating, norm, scale, n_group, n_group_used)
