"""Mixture-of-experts feed-forward as llama.cpp's ``build_moe_ffn`` computes it.

GGUF stores the experts stacked: ``ffn_{gate,up}_exps`` ``[n_expert, n_ff, n_embd]`` and
``ffn_down_exps`` ``[n_expert, n_embd, n_ff]`` (numpy order), plus the router ``ffn_gate_inp``
``[n_expert, n_embd]``. Routing: router logits → gating (softmax / sigmoid / raw) → top-k on the
gating probabilities (plus the V3 selection bias ``exp_probs_b``, which picks experts but does not
weight them) → optional renormalisation of the k weights → optional constant scale. The output
is the sum of the k weighted expert outputs in slot order (slot 0 is the most probable expert).

With ``Numerics.match_llamacpp`` every step rounds as ggml's CPU code does: the f32 router product
as ggml's f32 ``mul_mat`` (llamafile's tinyBLAS or ggml_vec_dot_f32, models/ggml_f32.py), soft_max
with ggml's SIMD expf and f64 sum, the weight sum in f64, each expert's products through the
ordinary quantized ``linear`` (on CPU the int8 kernels: ggml's ``mul_mat_id`` quantizes each
activation row to the weight's vec_dot type and uses the same vec_dot as ``mul_mat``), ggml's
SwiGLU, then the weighting multiply and the adds in slot order (no FMA contraction).

On the int8 CPU kernels (ggml's arithmetic) the experts run as ggml's ``mul_mat_id``, one
kernel call per weight group whatever the token count: the (token, slot) pairs sorted by
expert, each token's row quantized once, every expert's rows read in place, each expert's
products in the order ggml gives them (its tiled order for K-quant and IQ1-IQ3 experts with 8
or more rows, decided per expert as ``ggml_compute_forward_mul_mat_id_tiled`` does; vec_dot's
otherwise, never llamafile's). Elsewhere (float experts, other numerics) one of two
formulations, picked at trace time from the static token count:

* gathered (decode, few tokens): a scan over the (token, slot) pairs, each step one row through
  the chosen expert, so a decode step reads k experts, never all of them;
* grouped (prefill, when tokens × k ≥ n_expert): the pairs sorted by expert, each expert's run
  padded to tiles of C rows, and a ``lax.scan`` over the tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

import jllama.models.ggml_f32 as ggml_f32
from jllama import numerics
from jllama.errors import ModelError
from jllama.kernels import xla_cpu
from jllama.kernels.dispatch import dequantize
from jllama.models.common import (
    SwiGLU,
    Weights,
    in_place_ok,
    linear,
    linear_many,
    swiglu,
    tap,
    tap_layer,
)
from jllama.quant.actquant import opaque
from jllama.quant.qtensor import LayerStack, QTensor

# llama.cpp's llama_expert_gating_func_type
GATING_NONE, GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT = 0, 1, 2, 3
# ggml_clamp of the weight sum before the renormalising divide: the smallest f16 normal
_MIN_WEIGHT_SUM = 6.103515625e-5


@dataclass(frozen=True)
class MoEConfig:
    n_expert: int
    n_used: int
    gating: int = GATING_SOFTMAX
    norm_weights: bool = False
    scale: float = 0.0  # 0 = no scaling (llama.cpp applies it only when set)
    n_group: int = 1  # DeepSeek-V3 group-limited routing: experts in n_group groups,
    n_group_used: int = 1  # only the best n_group_used groups (by their top-2 sum) compete


_ggml = ggml_f32.rounding_on


def _expert(w, e: jax.Array):
    """Expert ``e`` (traced index) of a stacked tensor as a 2-D weight, still in GGUF blocks.
    Where the int8 CPU kernels take it (and always in a scanned block, whose weights are
    ``LayerStack``s) the kernel reads the expert's rows in place; otherwise only its rows are
    copied, and the 2-D quantized matmul kernels then read them."""
    if isinstance(w, LayerStack):
        return LayerStack(w.parts, w.index, e)
    if w.layout != "gguf":
        raise ModelError(f"stacked expert tensor in layout '{w.layout}' is not supported")
    if in_place_ok(w):
        return LayerStack((w,), jnp.int32(0), e)
    w = w.natural()
    return QTensor(jax.lax.dynamic_index_in_dim(w.data, e, 0, keepdims=False), w.qtype,
                   tuple(w.shape[1:]))


def _stacked(w):
    """A stacked expert tensor as the grouped int8 call takes it (all experts, read in place),
    or None where that call does not apply (float or repacked experts, other numerics)."""
    if isinstance(w, LayerStack):
        ok = w.expert is None and all(in_place_ok(p) for p in w.parts)
        return w if ok else None
    return w if len(w.shape) == 3 and in_place_ok(w) else None


def float_matmul(x: jax.Array, qt: QTensor, sgemm: bool = True) -> jax.Array:
    """``x [N, K] @ W.T`` for a weight kept in floats (a router, a shared-expert gate vector, an
    f32 expert): ggml's f32 ``mul_mat`` step by step for F32 (``sgemm=False``: ``mul_mat_id``,
    which never takes llamafile's tinyBLAS), else the ordinary ``linear``."""
    k = x.shape[-1]
    if qt.is_float and int(qt.qtype) == 0 and _ggml():
        w = dequantize(qt, jnp.float32).reshape(-1, k)
        return ggml_f32.mul_mat(x, w, sgemm=sgemm)
    if len(qt.shape) == 1:
        return x @ dequantize(qt, jnp.float32).reshape(-1, k).T
    return linear(x, qt)


def _tap(name: str, v: jax.Array, lead: tuple[int, ...] | None) -> jax.Array:
    """``tap`` of a per-token tensor [N, ...] as [B, T, ...] (``lead``), like the block's taps."""
    if lead is None or not numerics.current().taps:
        return tap(f"{name}-{tap_layer()}", v)
    tap(f"{name}-{tap_layer()}", v.reshape(lead + v.shape[1:]))
    return v


def route(logits: jax.Array, cfg: MoEConfig, bias: jax.Array | None,
          lead: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] → (expert ids [N, k], weights [N, k]), slot 0 the most probable.
    ``lead``: the [B, T] the N rows come from (for the taps)."""
    exact = _ggml()
    if cfg.gating == GATING_SIGMOID:
        probs = ggml_f32.sigmoid(logits) if exact else jax.nn.sigmoid(logits)
    elif cfg.gating == GATING_SOFTMAX_WEIGHT:
        probs = logits
    else:  # softmax (and "none", which llama.cpp maps to softmax)
        probs = ggml_f32.soft_max(logits) if exact else jax.nn.softmax(logits, axis=-1)
    # opaque: each ggml op rounds on its own; XLA must not merge it into the next (a / b / c)
    probs = _tap("ffn_moe_probs", opaque(probs), lead)
    sel = probs + bias if bias is not None else probs
    if cfg.n_group > 1:
        n, e = sel.shape
        grouped = sel.reshape(n, cfg.n_group, e // cfg.n_group)
        top2 = jax.lax.top_k(grouped, 2)[0]
        score = ggml_f32.sum_rows(top2) if exact else jnp.sum(top2, axis=-1)  # [N, G]
        _, gids = jax.lax.top_k(score, cfg.n_group_used)
        keep = jnp.any(gids[:, None, :] == jnp.arange(cfg.n_group)[None, :, None], axis=-1)
        sel = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, ids = jax.lax.top_k(sel, cfg.n_used)
    w = _tap("ffn_moe_weights", jnp.take_along_axis(probs, ids, axis=-1), lead)
    if cfg.gating == GATING_SOFTMAX_WEIGHT:
        w = opaque(ggml_f32.soft_max(w) if exact else jax.nn.softmax(w, axis=-1))
    if cfg.norm_weights:
        s = ggml_f32.sum_rows(w) if exact else jnp.sum(w, axis=-1)
        s = _tap("ffn_moe_weights_sum", opaque(s[:, None]), lead)
        s = jnp.maximum(s, jnp.float32(_MIN_WEIGHT_SUM))
        # a true division, as ggml_div: XLA turns a divide by a broadcast value into a multiply
        # by its reciprocal unless the broadcast is hidden from it
        w = _tap("ffn_moe_weights_norm", opaque(w / opaque(jnp.broadcast_to(s, w.shape))), lead)
    if cfg.scale and cfg.scale != 1.0:
        w = w * jnp.float32(cfg.scale)
    return ids, w


def combine(ys: jax.Array, wts: jax.Array) -> jax.Array:
    """Σ_j wts[:, j] * ys[:, j] over the slots, in slot order: ggml_mul, then ggml_add of one
    slot's view after another (each product rounded before its add)."""
    weighted = opaque(ys * wts[..., None])
    out = weighted[:, 0]
    for j in range(1, ys.shape[1]):
        out = out + weighted[:, j]
    return out


class MoE(nnx.Module):
    """Routed experts (SwiGLU), optionally plus an always-on shared expert (``shared``), which
    qwen2moe scales by ``sigmoid(x · ffn_gate_inp_shexp)`` where the file has that vector."""

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
            self.shared = SwiGLU(w, prefix, "_shexp")
        else:
            self.shared = nnx.data(None)
        sg = prefix + "ffn_gate_inp_shexp.weight"
        self.shared_gate = nnx.Param(w(sg)) if shared and sg in w else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        lead = shape[:-1]
        xf = x.reshape(-1, shape[-1]).astype(jnp.float32)
        logits = _tap("ffn_moe_logits", float_matmul(xf, self.router.get_value()), lead)
        bias = self.bias.get_value() if self.bias is not None else None
        ids, wts = route(logits, self.cfg, bias, lead)
        self._tap_expert_inputs(xf, ids, lead)
        n = xf.shape[0]
        ys = self._mul_mat_id(xf, ids)
        if ys is None:
            few = n * self.cfg.n_used < self.cfg.n_expert
            ys = self._gathered(xf, ids) if few else self._grouped(xf, ids)
        out = _tap("ffn_moe_out", combine(ys, wts), lead)
        if self.shared is not None:
            sh = _tap("ffn_shexp", self.shared(xf), lead)
            if self.shared_gate is not None:
                gi = _tap("ffn_shexp_gate_inp", float_matmul(xf, self.shared_gate.get_value()),
                          lead)  # [N, 1]
                if _ggml():  # llama.cpp's sigmoid here: silu(x) / x
                    gate = opaque(ggml_f32.silu(gi)) / gi
                else:
                    gate = jax.nn.sigmoid(gi)
                sh = opaque(sh * _tap("ffn_shexp_gate", gate, lead))
            out = out + sh
        return out.reshape(lead + (out.shape[-1],)).astype(x.dtype)

    def _ffn(self, x: jax.Array, e: jax.Array, down_input: bool = False) -> jax.Array:
        """SwiGLU of expert ``e`` on rows ``x``: gate and up in one int8 kernel call, each row
        quantized to the weight's vec_dot type as ggml's ``mul_mat_id`` does. ``down_input``:
        stop before ``down`` (what enters it, for the imatrix taps)."""
        gate, up, down = (_expert(p.get_value(), e) for p in (self.gate, self.up, self.down))
        if gate.is_float:
            g, u = (float_matmul(x, qt, sgemm=False) for qt in (gate, up))
            h = swiglu(g, u)
            return h if down_input else float_matmul(h, down, sgemm=False)
        h = swiglu(*linear_many(x, [gate, up]))
        return h if down_input else linear(h, down)

    def _tap_expert_inputs(self, x: jax.Array, ids: jax.Array, lead) -> None:
        """Taps for ``jllama imatrix``: the experts chosen per token (``ffn_moe_topk``, as
        llama.cpp names them) and what enters ``ffn_down_exps`` per (token, slot)
        (``ffn_moe_down_in``), computed again pair by pair; only while taps record."""
        if not numerics.current().taps:
            return
        n, k = ids.shape

        def body(_, p):
            t = p // k
            row = jax.lax.dynamic_index_in_dim(x, t, 0)
            return None, self._ffn(row, ids[t, p % k], down_input=True)[0]

        _, hs = jax.lax.scan(body, None, jnp.arange(n * k))
        _tap("ffn_moe_topk", ids, lead)
        _tap("ffn_moe_down_in", hs.reshape(n, k, -1), lead)

    def _gathered(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """One (token, slot) pair per scan step: a decode step touches exactly the k chosen
        experts' blocks. Returns the unweighted outputs [N, k, n_embd]."""
        n, k = ids.shape

        def body(_, p):
            t = p // k
            return None, self._ffn(jax.lax.dynamic_index_in_dim(x, t, 0), ids[t, p % k])[0]

        _, ys = jax.lax.scan(body, None, jnp.arange(n * k))
        return ys.reshape(n, k, -1)

    def _mul_mat_id(self, x: jax.Array, ids: jax.Array) -> jax.Array | None:
        """ggml's ``mul_mat_id`` through the int8 kernel (kernels/cpu/ffi_qmatvec.cc): the pairs
        sorted by expert, each token's row quantized once, every expert read in place and each
        product in vec_dot's order; the per-expert tiles and their one kernel call each (~200 a
        layer in a 512-token prompt) become two calls. None where the weights do not allow it."""
        ws = [_stacked(p.get_value()) for p in (self.gate, self.up, self.down)]
        if any(w is None for w in ws):
            return None
        n, k = ids.shape
        pairs = n * k
        flat_e = ids.reshape(-1)
        order = jnp.argsort(flat_e, stable=True).astype(jnp.int32)  # sorted position -> pair
        counts = jnp.bincount(flat_e, length=self.cfg.n_expert).astype(jnp.int32)
        gu = xla_cpu.ffi_matmul_id(x, order // k, counts, ws[:2])
        if gu is None:
            return None
        h = swiglu(*gu)  # [pairs, n_ff], sorted
        y = xla_cpu.ffi_matmul_id(h, jnp.arange(pairs, dtype=jnp.int32), counts, ws[2:])
        if y is None:
            return None
        back = jnp.zeros(pairs, jnp.int32).at[order].set(jnp.arange(pairs, dtype=jnp.int32))
        return y[0][back].reshape(n, k, -1)

    def _tile(self, pairs: int) -> int:
        return int(min(128, max(8, 1 << max(0, (pairs // self.cfg.n_expert - 1).bit_length()))))

    def _grouped(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """The (token, slot) pairs sorted by expert, in tiles of one expert each; returns the
        unweighted outputs [N, k, n_embd] in pair order."""
        n_expert = self.cfg.n_expert
        n, k = ids.shape
        pairs = n * k
        tile = self._tile(pairs)
        n_tiles = -(-pairs // tile) + n_expert
        flat_e = ids.reshape(-1)
        order = jnp.argsort(flat_e, stable=True)  # sorted position -> pair
        e_sorted = flat_e[order]
        counts = jnp.bincount(flat_e, length=n_expert)
        padded = (counts + tile - 1) // tile * tile
        pad_end = jnp.cumsum(padded)
        start = jnp.cumsum(counts) - counts
        dest = (pad_end - padded)[e_sorted] + jnp.arange(pairs) - start[e_sorted]  # -> slot
        slots = n_tiles * tile
        tok = jnp.zeros(slots, jnp.int32).at[dest].set((order // k).astype(jnp.int32))
        tile_e = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_tiles) * tile, side="right"),
                             n_expert - 1)

        def body(_, i):
            rows = jax.lax.dynamic_slice_in_dim(tok, i * tile, tile)
            return None, self._ffn(x[rows], tile_e[i])

        _, ys = jax.lax.scan(body, None, jnp.arange(n_tiles))
        ys = ys.reshape(slots, -1)
        slot_of_pair = jnp.zeros(pairs, jnp.int32).at[order].set(dest.astype(jnp.int32))
        return ys[slot_of_pair].reshape(n, k, -1)


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
