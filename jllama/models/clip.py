"""Vision encoders of llama.cpp's ``mmproj`` GGUF files (``general.architecture = clip``), as
libmtmd runs them (tools/mtmd/clip.cpp, models/siglip.cpp, models/llava.cpp).

Also LLaVA-1.5 (``clip.projector_type = mlp`` without image_grid_pinpoints): CLIP with a class
embedding (appended after the patches, as clip.cpp does), a pre-LayerNorm, all layers but the
last (or up to the deepest ``clip.vision.feature_layer``), then the MLP projector (mm.0, GELU,
mm.2) over the patch rows; images padded to a square with llava's grey (122, 116, 104) and
resized bicubically. LLaVA-1.6 (the same with ``clip.vision.image_grid_pinpoints``) runs as
libmtmd 0c1e570 runs it: its llava-uhd preprocessor (clip_image.llava_next_tiles) gives square
tiles plus an overview, each encoded on its own into its own image chunk (no unpadding, no
``image_newline``: clip.cpp loads that tensor for mlp but never uses it).

Supported: the SigLIP ViT with the Gemma 3 projector (``clip.projector_type = gemma3``):
patch embedding (a stride-``patch_size`` convolution, ggml's im2col + mul_mat), learned
position embeddings, pre-norm blocks (LayerNorm, attention with biases, LayerNorm, GELU MLP),
the post LayerNorm, then the projector: average pooling of the patch grid by ``n_merge``
(default 4, ``clip.vision.projector.scale_factor``), RMSNorm times ``mm.soft_emb_norm`` and
the ``mm.input_projection`` matmul to the text model's width.

SmolVLM / Idefics3 (``clip.projector_type = idefics3``): the same SigLIP tower (eps 1e-5),
then the pixel shuffle (each ``scale_factor``-square block of patches concatenated into one
row) and ``mm.model.fc``; an image is Lanczos-resized to ``clip.vision.preproc_image_size`` on
its longer side, cut into ``image_size`` tiles, plus a global image (``encode_idefics3``).

When matching llama.cpp (``Numerics.match_llamacpp``) every op rounds as ggml's CPU backend:
matmuls through ``ggml_f32.mul_mat`` (an f16 weight first rounds the activations to f16, as
ggml converts them to the weight's vec_dot type), LayerNorm as ``ggml_norm`` (f64 sums),
GELU through ggml's f16 table, and attention through ggml's flash-attention kernel (libmtmd
enables flash attention on the CPU) with no mask.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jllama.models.ggml_f32 as ggml_f32
from jllama import numerics
from jllama.errors import ModelError
from jllama.gguf.reader import GGUFFile, read_gguf
from jllama.kernels import cpu_attention
from jllama.kernels.dispatch import dequantize
from jllama.models import clip_image, load_weights
from jllama.models.common import (
    Weights,
    gelu,
    gelu_quick,
    linear,
    mrope_angles,
    rms_norm,
    rope_rotate,
    swiglu,
)
from jllama.numerics import DEFAULT, Numerics
from jllama.quant.actquant import opaque
from jllama.quant.qtensor import QTensor

QWEN2VL, QWEN25VL = "qwen2vl_merger", "qwen2.5vl_merger"
PROJECTORS = ("gemma3", "mlp", "idefics3", QWEN2VL, QWEN25VL)
_F16, _F32 = 1, 0


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    projector: str
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    eps: float
    n_embd_out: int  # the text model's width the projector maps to
    n_merge: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_algo: str
    resize_pad: str
    pad_color: tuple[int, int, int] = (0, 0, 0)
    ffn_op: str = "gelu"  # gelu | gelu_quick | silu (clip.use_gelu / clip.use_silu)
    n_layer_run: int = 0  # layers evaluated (llava: all but the last, its feature layer)
    # llava: explicit feature layers (clip.vision.feature_layer; the input of each listed layer,
    # the last one after the post-norm), concatenated along the features
    feature_layers: tuple[int, ...] = ()
    # LLaVA-1.6: candidate (width, height) resolutions (clip.vision.image_grid_pinpoints)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    longest_edge: int = 0  # idefics3: the preprocessor's longest side before tiling
    # dynamic resolution (Qwen2-VL): the image keeps its aspect, resized to multiples of
    # patch_size * n_merge holding between min_pixels and max_pixels (0: fixed image_size)
    min_pixels: int = 0
    max_pixels: int = 0
    norm: str = "layer"  # layer | rms (Qwen2.5-VL)
    n_wa_pattern: int = 0  # Qwen2.5-VL: every n-th layer full attention, the others windowed

    @property
    def n_patches_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        if self.projector == "mlp":
            return self.n_patches_side ** 2
        return (self.n_patches_side // self.n_merge) ** 2


def spec_from_gguf(g: GGUFFile) -> VisionSpec:
    md = g.metadata
    if md.get("general.architecture") != "clip":
        raise ModelError(f"{g.path}: not an mmproj file (general.architecture is "
                         f"'{md.get('general.architecture')}', expected 'clip')")
    if not md.get("clip.has_vision_encoder", False):
        raise ModelError(f"{g.path}: this mmproj has no vision encoder")
    proj = md.get("clip.vision.projector_type", md.get("clip.projector_type"))
    if proj not in PROJECTORS:
        raise ModelError(f"{g.path}: projector type '{proj}' is not supported "
                         f"(jllama runs: {', '.join(PROJECTORS)})")

    def need(key: str):
        v = md.get(f"clip.vision.{key}")
        if v is None:
            raise ModelError(f"{g.path}: missing clip.vision.{key}")
        return v

    image_size, patch = int(need("image_size")), int(need("patch_size"))
    side = image_size // patch
    if side * patch != image_size:
        raise ModelError(f"{g.path}: image_size {image_size} is not a multiple of patch_size "
                         f"{patch}")
    n_layer = int(need("block_count"))
    if md.get("clip.use_gelu", False) and md.get("clip.use_silu", False):
        raise ModelError(f"{g.path}: both clip.use_gelu and clip.use_silu are set")
    ffn_op = ("gelu" if md.get("clip.use_gelu", False)
              else "silu" if md.get("clip.use_silu", False) else "gelu_quick")
    if proj in (QWEN2VL, QWEN25VL):
        return _qwen2vl_spec(g, md, need, proj)
    if proj == "gemma3":
        n_merge = int(md.get("clip.vision.projector.scale_factor", 4))  # clip.cpp's default
        if side % n_merge:
            raise ModelError(f"{g.path}: {side} patches per side do not pool by {n_merge}")
        out_w, out_axis = "mm.input_projection.weight", -1
        extra = dict(resize_algo="bilinear", resize_pad="ceil", n_layer_run=n_layer)
    elif proj == "idefics3":
        n_merge, out_w, out_axis, extra = _idefics3_spec(g)
    else:  # mlp: LLaVA-1.5, or LLaVA-1.6 with image_grid_pinpoints
        n_merge = 1
        out_w, out_axis = ("mm.2.weight" if "mm.2.weight" in g.tensors else "mm.0.weight"), 0
        # clip.cpp: llava's pad colour; the second-to-last layer is the feature layer
        extra = dict(resize_algo="bicubic", resize_pad="ceil", pad_color=(122, 116, 104),
                     n_layer_run=n_layer - 1)
        extra.update(_llava_next_keys(g, image_size, n_layer))
    proj_w = g.tensors.get(out_w)
    if proj_w is None:
        raise ModelError(f"{g.path}: missing tensor '{out_w}'")
    return VisionSpec(
        projector=proj, image_size=image_size, patch_size=patch,
        n_embd=int(need("embedding_length")), n_ff=int(need("feed_forward_length")),
        n_layer=n_layer, n_head=int(need("attention.head_count")),
        eps=float(md.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        n_embd_out=int(proj_w.shape[out_axis]), n_merge=n_merge,
        mean=tuple(float(v) for v in need("image_mean")),
        std=tuple(float(v) for v in need("image_std")),
        ffn_op=ffn_op, **extra,
    )


def _llava_next_keys(g: GGUFFile, image_size: int, n_layer: int) -> dict:
    """LLaVA-1.6's keys (legacy/convert_image_encoder_to_gguf.py writes them): the pinpoint
    resolutions and the feature layers. libmtmd builds square tiles of image_size only (its
    llava graph asserts square inputs), so pinpoints that are not multiples are refused here."""
    md, out = g.metadata, {}
    pins = [int(v) for v in md.get("clip.vision.image_grid_pinpoints") or ()]
    if len(pins) % 2:
        raise ModelError(f"{g.path}: image_grid_pinpoints must have an even number of "
                         f"elements, got {len(pins)}")
    if pins:
        pairs = tuple(zip(pins[::2], pins[1::2]))
        for w, h in pairs:
            if w <= 0 or h <= 0 or w % image_size or h % image_size:
                raise ModelError(f"{g.path}: image_grid_pinpoints {w}x{h} is not a multiple "
                                 f"of image_size {image_size}")
        out["grid_pinpoints"] = pairs
    layers = tuple(int(v) for v in md.get("clip.vision.feature_layer") or ())
    if layers:
        for v in layers:
            if v > n_layer or v < 0:
                raise ModelError(f"{g.path}: feature layer index {v} is out of range "
                                 f"(n_layer: {n_layer})")
        out["feature_layers"] = layers
        out["n_layer_run"] = max(layers)
    return out


def _idefics3_spec(g: GGUFFile) -> tuple[int, str, int, dict]:
    """SmolVLM / Idefics3 (clip.cpp's PROJECTOR_TYPE_IDEFICS3): SigLIP, the pixel shuffle by
    ``clip.vision.projector.scale_factor`` and ``mm.model.fc``; Lanczos resizing into tiles
    after a resize to ``clip.vision.preproc_image_size`` on the longer side."""
    md = g.metadata
    n_merge = md.get("clip.vision.projector.scale_factor")
    if n_merge is None or int(n_merge) < 2:
        raise ModelError(f"{g.path}: an idefics3 mmproj needs clip.vision.projector.scale_factor "
                         "of 2 or more")
    side = int(md["clip.vision.image_size"]) // int(md["clip.vision.patch_size"])
    if side % int(n_merge):
        # clip.cpp's graph would pad the grid but its token count truncates: libmtmd aborts
        raise ModelError(f"{g.path}: {side} patches per side do not merge by {n_merge}")
    edge = int(md.get("clip.vision.preproc_image_size", 0))
    if edge <= 0:
        # libmtmd then falls back to llava-uhd style slicing, which jllama does not run
        raise ModelError(f"{g.path}: an idefics3 mmproj without clip.vision.preproc_image_size "
                         "(an old conversion) is not supported: convert it again")
    extra = dict(resize_algo="lanczos", resize_pad="none", longest_edge=edge,
                 n_layer_run=int(md["clip.vision.block_count"]))
    return int(n_merge), "mm.model.fc.weight", 0, extra


# ----------------------------------------------------------------------------- ggml's ops
def _mul_mat(x: jax.Array, qt: QTensor) -> jax.Array:
    """ggml_mul_mat(w, x): [N, K] x [M, K] -> [N, M]."""
    if not numerics.current().match_llamacpp:
        if qt.is_float:
            return x @ dequantize(qt, jnp.float32).T
        return linear(x, qt)
    if not qt.is_float:
        return linear(x, qt)  # the text model's quantized kernels, ggml's Q8 activations
    w = dequantize(qt, jnp.float32)
    if qt.qtype == _F16:  # ggml converts the activations to the f16 vec_dot type
        return mul_mat_f16(x.astype(jnp.float16).astype(jnp.float32), w)
    if qt.qtype != _F32:
        raise ModelError(f"mmproj weight type {qt.type_name} is not supported")
    return ggml_f32.mul_mat(x, w)


def mul_mat_f16(x: jax.Array, w: jax.Array) -> jax.Array:
    """ggml's CPU mul_mat of f16 values (given as f32 arrays holding f16 values): x [N, K],
    w [M, K] -> [N, M]. llamafile's tinyBLAS takes it where ggml_f32.mul_mat's f32 product
    does (K a multiple of the lane count), with the same FMA chains; otherwise
    ggml_vec_dot_f16, whose main part is vec_dot_f32's but whose sum is an f64: the K % 32
    leftover products (each rounded to f32) are added to it in f64, then rounded once."""
    n, k = x.shape
    m = w.shape[0]
    lanes = ggml_f32.simd_lanes()
    if (n >= 2 and m % 4 == 0 and k % lanes == 0) or not ggml_f32.rounding_on():
        return ggml_f32.mul_mat(x, w)
    step = 4 * lanes
    kk = k - k % step
    main = (ggml_f32.mul_mat(x[:, :kk], w[:, :kk], sgemm=False) if kk
            else jnp.zeros((n, m), jnp.float32))
    if kk == k:
        return main
    with jax.enable_x64(True):
        acc = main.astype(jnp.float64)
        for i in range(kk, k):
            acc = acc + opaque(x[:, i][:, None] * w[:, i][None, :]).astype(jnp.float64)
        return acc.astype(jnp.float32)


def _div_f32(a: jax.Array, b) -> jax.Array:
    """An f32 division rounded correctly, as C's: done in f64 and rounded once (exact for
    f32 operands), since XLA:CPU may divide through a reciprocal."""
    with jax.enable_x64(True):
        return (a.astype(jnp.float64) / opaque(jnp.asarray(b, jnp.float64))).astype(jnp.float32)


def _layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """ggml_norm (mean from an f64 sum, variance of the centred values from f64 sums of
    8-lane partial sums on AVX2) times w plus b."""
    if not (numerics.current().match_llamacpp and ggml_f32.rounding_on()):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        return xc * jax.lax.rsqrt(var + eps) * w + b
    n = x.shape[-1]
    mean = _div_f32(ggml_f32.sum_rows(x)[..., None], n)
    xc = opaque(x - mean)
    sq = opaque(xc * xc)
    lanes = ggml_f32.simd_lanes()
    nb = n - n % lanes
    with jax.enable_x64(True):
        parts = []
        if nb:
            blocks = sq[..., :nb].reshape(*sq.shape[:-1], nb // lanes, lanes)
            if lanes == 8:  # _mm256 upper + lower half, then movehl, then movehdup (f32)
                v = opaque(blocks[..., 4:] + blocks[..., :4])
                v2 = opaque(v[..., :2] + v[..., 2:])
                s = opaque(v2[..., 0] + v2[..., 1])
            else:
                s = opaque(ggml_f32._hsum_tree(blocks))
            parts += [s[..., i] for i in range(s.shape[-1])]
        parts += [sq[..., i] for i in range(nb, n)]
        acc = jnp.zeros(sq.shape[:-1], jnp.float64)
        for p in parts:
            acc = acc + p.astype(jnp.float64)
        var = (acc / opaque(jnp.float64(n))).astype(jnp.float32)
    scale = _div_f32(jnp.ones_like(var), opaque(jnp.sqrt(var + jnp.float32(eps))))
    y = opaque(xc * scale[..., None])
    return opaque(y * w) + b


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
               segments: jax.Array | None = None) -> jax.Array:
    """Multi-head attention, q/k/v [N, H, D] -> [N, H * D]: unmasked, or with ``segments``
    [N] each token seeing the run of tokens with its id (a block-diagonal mask)."""
    num = numerics.current()
    n, h, d = q.shape
    if (num.match_llamacpp and jax.default_backend() == "cpu" and num.cpu_kernels
            and cpu_attention.available()):
        # libmtmd's flash attention: f16 K/V, f32 Q; every key visible
        kc = k.transpose(1, 0, 2)[None].astype(jnp.float16)
        vc = v.transpose(1, 0, 2)[None].astype(jnp.float16)
        return cpu_attention.ggml_flash_attn(q[None], kc, vc, jnp.zeros(1, jnp.int32), n, scale,
                                             bidir=True, segments=segments)[0]
    s = jnp.einsum("qhd,khd->hqk", q, k) * scale
    if segments is not None:
        s = jnp.where(segments[:, None] == segments[None, :], s, -jnp.inf)
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), v).reshape(n, h * d)


# ----------------------------------------------------------------------------- the model
class VisionEncoder(nnx.Module):
    """The mmproj's encoder and projector: ``__call__(pixels f32 [H, W, 3]) -> [n_tokens,
    n_embd_out]``."""

    def __init__(self, spec: VisionSpec, w: Weights):
        self.spec = spec
        self.w = nnx.data({k: v for k, v in w.tensors.items()})

    def _vec(self, name: str) -> jax.Array:
        return dequantize(self.w[name], jnp.float32)

    def _dense(self, x: jax.Array, name: str) -> jax.Array:
        y = _mul_mat(x, self.w[name + ".weight"])
        return y + self._vec(name + ".bias") if name + ".bias" in self.w else y

    def _ffn_names(self, b: str) -> tuple[str, str]:
        """(up, down) of a block. Older converters (legacy/convert_image_encoder_to_gguf.py)
        named fc1 ffn_down and fc2 ffn_up; clip.cpp swaps them back whenever ffn_down's
        input width is n_embd (so also when n_ff == n_embd), and so do we."""
        up, down = b + "ffn_up", b + "ffn_down"
        if (up + ".weight" in self.w and down + ".weight" in self.w
                and self.w[down + ".weight"].shape[-1] == self.spec.n_embd):
            return down, up
        return up, down

    def _conv_patches(self, cols: jax.Array, name: str) -> jax.Array:
        """The patch embedding's stride-``patch_size`` convolution of im2col rows
        [n_patches, C*p*p] -> [n_patches, n_embd]."""
        kw = dequantize(self.w[name], jnp.float32).reshape(self.spec.n_embd, -1)
        # ggml_conv_2d: mul_mat(im2col, kernel) with im2col made in f16 (whatever the kernel's
        # type), so the kernel is rounded to f16 too (the f16 vec_dot type); the result
        # transposed to [n_patches, n_embd]
        if numerics.current().match_llamacpp:
            def f16(a):
                return a.astype(jnp.float16).astype(jnp.float32)
            return mul_mat_f16(f16(kw), f16(cols)).T
        return cols @ kw.T

    def __call__(self, pixels: jax.Array) -> jax.Array:
        s = self.spec
        p, side = s.patch_size, s.n_patches_side
        # im2col rows [n_patches, C*p*p] in (c, ky, kx) order, patches in (py, px) order
        img = pixels.transpose(2, 0, 1)  # planar, as clip.cpp feeds inp_raw
        cols = img.reshape(3, side, p, side, p).transpose(1, 3, 0, 2, 4).reshape(side * side, -1)
        x = self._conv_patches(cols, "v.patch_embd.weight")
        if "v.patch_embd.bias" in self.w:
            x = x + self._vec("v.patch_embd.bias")
        if "v.class_embd" in self.w:  # clip.cpp concatenates it after the patches
            x = jnp.concatenate([x, self._vec("v.class_embd").reshape(1, -1)], axis=0)
        x = x + dequantize(self.w["v.position_embd.weight"], jnp.float32)[: x.shape[0]]
        if "v.pre_ln.weight" in self.w:
            x = _layer_norm(x, self._vec("v.pre_ln.weight"), self._vec("v.pre_ln.bias"), s.eps)
        n, hd = x.shape[0], s.n_embd // s.n_head
        scale = 1.0 / math.sqrt(hd)
        act = {"gelu": gelu, "gelu_quick": gelu_quick, "silu": ggml_f32.silu}[s.ffn_op]
        feats = []
        for i in range(s.n_layer_run):
            b = f"v.blk.{i}."
            if i in s.feature_layers:
                feats.append(x)
            h = _layer_norm(x, self._vec(b + "ln1.weight"), self._vec(b + "ln1.bias"), s.eps)
            q = self._dense(h, b + "attn_q").reshape(n, s.n_head, hd)
            k = self._dense(h, b + "attn_k").reshape(n, s.n_head, hd)
            v = self._dense(h, b + "attn_v").reshape(n, s.n_head, hd)
            a = self._dense(_attention(q, k, v, scale), b + "attn_out")
            x = a + x
            h = _layer_norm(x, self._vec(b + "ln2.weight"), self._vec(b + "ln2.bias"), s.eps)
            up, down = self._ffn_names(b)
            h = self._dense(act(self._dense(h, up)), down)
            x = x + h
        if "v.post_ln.weight" in self.w:
            x = _layer_norm(x, self._vec("v.post_ln.weight"), self._vec("v.post_ln.bias"),
                            s.eps)
        if s.feature_layers:
            if s.n_layer_run in s.feature_layers:
                feats.append(x)
            x = jnp.concatenate(feats, axis=-1)  # ggml_concat along the features
        if s.projector == "mlp":
            return self._mlp_projector(x)
        if s.projector == "idefics3":
            return self._idefics3_projector(x)
        return self._gemma3_projector(x)

    def _mlp_projector(self, x: jax.Array) -> jax.Array:
        """LLaVA's: rows 1..n_patches (clip.cpp skips row 0 when there is a class embedding,
        which it appended last), then mm.0, GELU, mm.2 (each with its bias)."""
        n = self.spec.n_patches_side ** 2
        off = 1 if "v.class_embd" in self.w else 0
        x = x[off:off + n]
        x = self._dense(x, "mm.0")
        if "mm.2.weight" in self.w:
            x = self._dense(gelu(x), "mm.2")
        else:
            x = gelu(x)
        return x

    def _idefics3_projector(self, x: jax.Array) -> jax.Array:
        """clip.cpp's build_patch_merge_permute (the pixel shuffle: each n_merge x n_merge
        block of patches becomes one row of its patches' features in (row, column) order),
        then ``mm.model.fc`` without bias."""
        s = self.spec
        side, m = s.n_patches_side, s.n_merge
        o = side // m
        g = x.reshape(o, m, o, m, s.n_embd).transpose(0, 2, 1, 3, 4)
        return _mul_mat(g.reshape(o * o, m * m * s.n_embd), self.w["mm.model.fc.weight"])

    def _gemma3_projector(self, x: jax.Array) -> jax.Array:
        s = self.spec
        side, m = s.n_patches_side, s.n_merge
        o = side // m
        # ggml_pool_2d (avg): an f32 sum over the window, rows (ky) outer, then / (m * m)
        g = x.reshape(o, m, o, m, s.n_embd)
        acc = jnp.zeros((o, o, s.n_embd), jnp.float32)
        for ky in range(m):
            for kx in range(m):
                acc = opaque(acc + g[:, ky, :, kx])
        x = _div_f32(acc, m * m).reshape(o * o, s.n_embd)
        x = rms_norm(x, self._vec("mm.soft_emb_norm.weight"), s.eps)
        # the projection is mul_mat(cont(transpose(W)), x): W [n_embd, n_out] as rows of n_out
        wt = self.w["mm.input_projection.weight"]
        wf = dequantize(wt, jnp.float32).T
        if not numerics.current().match_llamacpp:
            return x @ wf.T
        if wt.qtype == _F16:  # cont(transpose) keeps the weight's type: an f16 product
            return mul_mat_f16(x.astype(jnp.float16).astype(jnp.float32), wf)
        return ggml_f32.mul_mat(x, wf)


@dataclasses.dataclass
class Vision:
    """A loaded mmproj: its spec, encoder and the compiled encode.

    The embeddings of the last few images are kept: a chat (jllama chat, the server's
    /v1/chat/completions) sends its earlier images again every turn."""
    spec: VisionSpec
    encoder: VisionEncoder
    path: str
    cache_images: int = 4
    _cache: collections.OrderedDict = dataclasses.field(
        default_factory=collections.OrderedDict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the encoder sees an image of this size at: image_size square, or
        (dynamic resolution) libmtmd's aspect-preserving multiple of patch_size * n_merge."""
        s = self.spec
        if not s.max_pixels:
            return s.image_size, s.image_size
        w, h = clip_image.preserved_ratio_size(width, height, s.patch_size * s.n_merge,
                                               s.min_pixels, s.max_pixels)
        return h, w

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(nx, ny): the image's tokens per row and rows (libmtmd's M-RoPE grid); projectors
        without one give (n_tokens, 1), as libmtmd does."""
        s = self.spec
        if not s.max_pixels:
            return s.n_image_tokens, 1
        h, w = self.input_size(height, width)
        m = s.patch_size * s.n_merge
        return w // m, h // m

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> normalised f32 [h, w, 3] at ``input_size`` (libmtmd's fixed-size
        or dyn_size preprocessor)."""
        s = self.spec
        h, w = self.input_size(*image.shape[:2])
        img = clip_image.resize(image, w, h, s.resize_algo, s.resize_pad, s.pad_color)
        return clip_image.normalize(img, s.mean, s.std)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> image embeddings f32 [n_tokens, n_embd_out] (all of the
        image's chunks, in prompt order)."""
        return np.concatenate(self.encode_chunks(image), axis=0)

    def encode_chunks(self, image: np.ndarray) -> list[np.ndarray]:
        """The image's embeddings as libmtmd's image chunks: one for a fixed-size projector;
        LLaVA-1.6's tiles (row-major) then its overview, each its own chunk."""
        if self.spec.projector == "idefics3":  # tiles wrapped in text markers
            raise ModelError("an idefics3 image is encoded by tiles: use encode_idefics3")
        img = np.ascontiguousarray(image)
        key = (img.shape, str(img.dtype), numerics.current(),
               hashlib.blake2b(img.tobytes(), digest_size=16).digest())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return list(hit)
        out = []
        for p in self.preprocess_chunks(img):
            e = np.array(_encode(self.encoder, jnp.asarray(p)))
            e.setflags(write=False)  # shared by the cache's later hits
            out.append(e)
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        return list(out)

    def preprocess_chunks(self, image: np.ndarray) -> list[np.ndarray]:
        s = self.spec
        if not s.grid_pinpoints:
            return [self.preprocess(image)]
        return [clip_image.normalize(t, s.mean, s.std)
                for t in clip_image.llava_next_tiles(image, s.image_size, s.grid_pinpoints)]

    def encode_idefics3(self, image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, int, int]:
        """idefics3's tiling: (tile embeddings row by row, the global image's, grid_x,
        grid_y); every tile and the global image is one image_size square."""
        s = self.spec
        overview, tiles, gx, gy = clip_image.idefics3_tiles(image, s.image_size, s.longest_edge,
                                                            s.resize_algo)

        def enc(img):
            px = clip_image.normalize(img, s.mean, s.std)
            return np.asarray(_encode(self.encoder, jnp.asarray(px)))

        return [enc(t) for t in tiles], enc(overview), gx, gy


@nnx.jit
def _encode(encoder: VisionEncoder, pixels: jax.Array) -> jax.Array:
    return encoder(pixels)


def load_vision(path: str | os.PathLike, numerics: Numerics = DEFAULT) -> Vision:
    """Read an mmproj GGUF; raises ModelError for files that are not one jllama runs. Its
    weights load as the text model's do (``load_weights``): each in the layout the backend's
    quantized kernels read (GGUF blocks for the C++ int8 kernels, Pallas planes on GPU/TPU),
    so the encoder's products go through the same kernels as the text model's."""
    g = read_gguf(path)
    spec = spec_from_gguf(g)
    w = load_weights(g, repack=True, numerics=numerics)
    enc = Qwen2VLEncoder if spec.projector in (QWEN2VL, QWEN25VL) else VisionEncoder
    return Vision(spec, enc(spec, w), str(path))


# ----------------------------------------------------------------------------- Qwen2-VL
def _qwen2vl_spec(g: GGUFFile, md: dict, need, proj: str) -> VisionSpec:
    """Qwen2-VL's ViT (``qwen2vl_merger``, tools/mtmd/models/qwen2vl.cpp): no position
    embeddings but 2D rope, dynamic resolution between 8 and 4096 merged tokens (clip.cpp's
    limits), bicubic resize, the 2x2 patch merger MLP. Qwen2.5-VL (``qwen2.5vl_merger``): RMS
    norms, a gated MLP, window attention in all but every ``n_wa_pattern``-th layer."""
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.2.weight"):
        if name not in g.tensors:
            raise ModelError(f"{g.path}: missing tensor '{name}'")
    if "v.patch_embd.bias" in g.tensors or "v.class_embd" in g.tensors:
        raise ModelError(f"{g.path}: a qwen2vl_merger mmproj has no patch bias or class "
                         "embedding")
    if md.get("clip.use_gelu", False) and md.get("clip.use_silu", False):
        raise ModelError(f"{g.path}: both clip.use_gelu and clip.use_silu are set")
    patch, n_embd, n_head = (int(need("patch_size")), int(need("embedding_length")),
                             int(need("attention.head_count")))
    n_merge = int(md.get("clip.vision.spatial_merge_size", 2))
    if n_merge != 2:  # the graph merges 2x2 (its positions and reshapes are written for 2)
        raise ModelError(f"{g.path}: spatial_merge_size {n_merge} is not supported (2 is)")
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ModelError(f"{g.path}: head size {n_embd}/{n_head} is not a multiple of 4 "
                         "(2D rope)")
    area = patch * patch * n_merge * n_merge
    n_layer = int(need("block_count"))
    n_wa = int(md.get("clip.vision.n_wa_pattern", 0))
    if proj == QWEN25VL and n_wa <= 0:  # clip.cpp requires it for 2.5
        raise ModelError(f"{g.path}: missing clip.vision.n_wa_pattern")
    return VisionSpec(
        projector=proj, norm="rms" if proj == QWEN25VL else "layer", n_wa_pattern=n_wa, image_size=int(need("image_size")), patch_size=patch,
        n_embd=n_embd, n_ff=int(need("feed_forward_length")), n_layer=n_layer, n_head=n_head,
        eps=float(md.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        n_embd_out=int(g.tensors["mm.2.weight"].shape[0]), n_merge=n_merge,
        mean=tuple(float(v) for v in need("image_mean")),
        std=tuple(float(v) for v in need("image_std")),
        resize_algo="bicubic", resize_pad="ceil", n_layer_run=n_layer,
        ffn_op=("gelu" if md.get("clip.use_gelu", False)
                else "silu" if md.get("clip.use_silu", False) else "gelu_quick"),
        min_pixels=8 * area, max_pixels=4096 * area)


def qwen2vl_positions(ph: int, pw: int) -> np.ndarray:
    """The encoder's rope positions [n_patches, 4] (row, col, row, col) in its token order:
    2x2 blocks in raster order, the block's patches in raster order within (clip.cpp)."""
    out = np.zeros((ph * pw, 4), np.int32)
    i = 0
    for y in range(0, ph, 2):
        for x in range(0, pw, 2):
            for dy in range(2):
                for dx in range(2):
                    out[i] = (y + dy, x + dx, y + dy, x + dx)
                    i += 1
    return out


def qwen25vl_windows(ph: int, pw: int, patch: int,
                     window_px: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window attention layout (clip.cpp; the window is 112 pixels, clip.cpp's
    default, which it does not read from the file for this projector): ``inv`` [n/4], the
    merge units (2x2 blocks) in window order (window by window in raster order, raster within
    each), and ``seg`` [n], each patch's window in that order."""
    mh, mw = ph // 2, pw // 2
    g = window_px // patch // 2
    inv, seg = [], []
    w = 0
    for y in range(0, mh, g):
        for x in range(0, mw, g):
            for dy in range(min(g, mh - y)):
                for dx in range(min(g, mw - x)):
                    inv.append((y + dy) * mw + x + dx)
                    seg.extend([w] * 4)
            w += 1
    return np.asarray(inv, np.int32), np.asarray(seg, np.int32)


class Qwen2VLEncoder(VisionEncoder):
    """Qwen2-VL's vision tower as libmtmd builds it: the Conv3d patch embedding as two
    convolutions of the same image summed (a still image is both temporal frames), patches
    regrouped by 2x2 block, pre-norm blocks with 2D rope (GGML_ROPE_TYPE_VISION: the first
    quarter of each head's pairs turns by the row, the second by the column), the post norm,
    then each 2x2 block's 4 rows concatenated through mm.0, GELU, mm.2.

    Qwen2.5-VL's (``n_wa_pattern``): the merge units reordered window by window before the
    blocks (their rope positions with them), each layer but every n_wa_pattern-th attending
    within its window only, the output put back in raster order; RMS norms and a gated MLP
    (SiLU(gate) * up)."""

    def __call__(self, pixels: jax.Array) -> jax.Array:
        s = self.spec
        p = s.patch_size
        ph, pw = pixels.shape[0] // p, pixels.shape[1] // p
        img = pixels.transpose(2, 0, 1)
        cols = img.reshape(3, ph, p, pw, p).transpose(1, 3, 0, 2, 4).reshape(ph * pw, -1)
        x = (self._conv_patches(cols, "v.patch_embd.weight")
             + self._conv_patches(cols, "v.patch_embd.weight.1"))
        # raster patches -> 2x2 blocks (clip.cpp's permute/cont/reshape sequence)
        x = x.reshape(ph // 2, 2, pw // 2, 2, s.n_embd).transpose(0, 2, 1, 3, 4)
        n = ph * pw
        x = x.reshape(n, s.n_embd)
        if "v.pre_ln.weight" in self.w:
            x = self._norm(x, "v.pre_ln")
        hd = s.n_embd // s.n_head
        pos_np = qwen2vl_positions(ph, pw)
        seg = None
        if s.n_wa_pattern:
            inv, seg_np = qwen25vl_windows(ph, pw, s.patch_size)
            x = x.reshape(n // 4, 4 * s.n_embd)[jnp.asarray(inv)].reshape(n, s.n_embd)
            pos_np = pos_np.reshape(n // 4, 4, 4)[inv].reshape(n, 4)
            seg = jnp.asarray(seg_np)
        pos = jnp.asarray(pos_np)[None]
        ang = mrope_angles(pos, 10000.0, hd // 2, (hd // 4,) * 4, vision=True,
                           n_pairs=hd // 2)
        scale = 1.0 / math.sqrt(hd)
        act = {"gelu": gelu, "gelu_quick": gelu_quick, "silu": ggml_f32.silu}[s.ffn_op]
        for i in range(s.n_layer_run):
            b = f"v.blk.{i}."
            h = self._norm(x, b + "ln1")
            q = self._dense(h, b + "attn_q").reshape(1, n, s.n_head, hd)
            k = self._dense(h, b + "attn_k").reshape(1, n, s.n_head, hd)
            v = self._dense(h, b + "attn_v").reshape(n, s.n_head, hd)
            q = rope_rotate(q, ang, hd, neox=True)[0]
            k = rope_rotate(k, ang, hd, neox=True)[0]
            full = not s.n_wa_pattern or (i + 1) % s.n_wa_pattern == 0
            a = _attention(q, k, v, scale, None if full else seg)
            x = self._dense(a, b + "attn_out") + x
            h = self._norm(x, b + "ln2")
            if b + "ffn_gate.weight" in self.w:  # ggml_swiglu_split(gate, up)
                h = swiglu(self._dense(h, b + "ffn_gate"), self._dense(h, b + "ffn_up"))
            else:
                h = act(self._dense(h, b + "ffn_up"))
            x = x + self._dense(h, b + "ffn_down")
        if "v.post_ln.weight" in self.w:
            x = self._norm(x, "v.post_ln")
        x = x.reshape(n // 4, 4 * s.n_embd)
        out = self._dense(gelu(self._dense(x, "mm.0")), "mm.2")
        if s.n_wa_pattern:  # back to raster order: row u of the output is unit u's
            out = out[jnp.asarray(np.argsort(inv))]
        return out

    def _norm(self, x: jax.Array, name: str) -> jax.Array:
        bias = self._vec(name + ".bias") if name + ".bias" in self.w else None
        if self.spec.norm == "rms":  # build_norm: ggml_rms_norm, times w, plus b
            y = rms_norm(x, self._vec(name + ".weight"), self.spec.eps)
            return y + bias if bias is not None else y
        return _layer_norm(x, self._vec(name + ".weight"), bias, self.spec.eps)
