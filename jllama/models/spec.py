"""ModelSpec: the hyperparameters of a model, read from GGUF metadata once.

Keys follow llama.cpp's ``{arch}.*`` convention; anything optional has llama.cpp's default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jllama.errors import ModelError
from jllama.gguf.reader import GGUFFile


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key_length (= value_length for the archs we know)
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    rope_dim: int
    rope_scale: float  # linear position scaling factor (1.0 = none)
    norm_eps: float
    tied_output: bool
    # M-RoPE (qwen2vl): rotated pairs per position section (t, h, w, e); () for plain rope
    rope_sections: tuple[int, ...] = ()
    # YaRN as ggml_rope_ext receives it: (ext_factor, attn_factor, corr_low, corr_high); None is
    # plain rope (ext_factor 0, attn_factor 1), what every GGUF loads as without RopeOptions
    rope_yarn: tuple[float, float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


def _get(g: GGUFFile, key: str, default: Any = ..., cast=None):
    v = g.metadata.get(key, default)
    if v is ...:
        raise ModelError(f"{g.path}: missing metadata key '{key}'")
    if isinstance(v, list) and cast is int:
        # per-layer arrays (e.g. head_count_kv varying per layer): we need a uniform value
        if len(set(v)) != 1:
            raise ModelError(f"{g.path}: per-layer '{key}' = {v[:8]}... is not supported")
        v = v[0]
    return cast(v) if cast and v is not None else v


def _positive(g: GGUFFile, key: str, default: Any = ...) -> int:
    """A size that must be at least 1 (a zero head count would divide by zero further on)."""
    v = _get(g, key, default, cast=int)
    if v < 1:
        raise ModelError(f"{g.path}: metadata '{key}' = {v}; it must be at least 1")
    return v


def _nonnegative(g: GGUFFile, key: str, default: Any = ...) -> int:
    v = _get(g, key, default, cast=int)
    if v < 0:
        raise ModelError(f"{g.path}: metadata '{key}' = {v}; it must not be negative")
    return v


def spec_from_gguf(g: GGUFFile) -> ModelSpec:
    arch = g.architecture
    if not arch:
        raise ModelError(f"{g.path}: metadata has no general.architecture")
    a = arch
    n_embd = _positive(g, f"{a}.embedding_length")
    n_head = _positive(g, f"{a}.attention.head_count")
    n_head_kv = _positive(g, f"{a}.attention.head_count_kv", n_head)
    head_dim = _positive(g, f"{a}.attention.key_length", n_embd // n_head)
    head_dim_v = _positive(g, f"{a}.attention.value_length", head_dim)
    tok = g.tensors.get("token_embd.weight")
    n_vocab = _get(g, f"{a}.vocab_size", None)
    if n_vocab is None:
        toks = g.metadata.get("tokenizer.ggml.tokens")
        n_vocab = len(toks) if toks else (tok.shape[0] if tok else None)
    if n_vocab is None:
        raise ModelError(f"{g.path}: cannot determine the vocabulary size")
    if int(n_vocab) < 1:
        raise ModelError(f"{g.path}: metadata '{a}.vocab_size' = {n_vocab}; it must be at least 1")
    scale_type = g.metadata.get(f"{a}.rope.scaling.type", "none")
    factor = float(g.metadata.get(f"{a}.rope.scaling.factor", 0.0) or 0.0)
    rope_scale = 1.0 / factor if (scale_type == "linear" and factor > 0) else 1.0
    if n_head % n_head_kv:
        raise ModelError(f"{g.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    return ModelSpec(
        arch=arch,
        n_layer=_positive(g, f"{a}.block_count"),
        n_embd=n_embd,
        n_ff=_nonnegative(g, f"{a}.feed_forward_length", 0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        n_vocab=int(n_vocab),
        n_ctx_train=_positive(g, f"{a}.context_length", 2048),
        rope_base=float(_get(g, f"{a}.rope.freq_base", 10000.0)),
        rope_dim=_nonnegative(g, f"{a}.rope.dimension_count", head_dim),
        rope_scale=rope_scale,
        norm_eps=float(_get(g, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tied_output="output.weight" not in g.tensors,
        rope_sections=_rope_sections(g, f"{a}.rope.dimension_sections"),
    )


def _rope_sections(g: GGUFFile, key: str) -> tuple[int, ...]:
    v = g.metadata.get(key)
    if v is None:
        return ()
    v = [int(x) for x in (v if isinstance(v, list) else [v])]
    if len(v) > 4 or any(x < 0 for x in v) or not any(v):
        raise ModelError(f"{g.path}: metadata '{key}' = {v}: expected up to 4 section sizes, "
                         "not all zero")
    return tuple(v + [0] * (4 - len(v)))


@dataclass
class RopeOptions:
    """llama.cpp's rope context parameters (--rope-scaling, --rope-freq-base, ...; llama_context_
    params): 0 / -1 / None = the model's own value, as there."""

    scaling: str | None = None  # none | linear | yarn
    freq_base: float = 0.0
    freq_scale: float = 0.0  # --rope-scale N is freq_scale 1/N
    yarn_orig_ctx: int = 0
    yarn_ext_factor: float = -1.0
    yarn_attn_factor: float = -1.0
    yarn_beta_fast: float = -1.0
    yarn_beta_slow: float = -1.0

    def is_default(self) -> bool:
        return self == RopeOptions()


_F32 = np.float32
_OWN_ROPE = ("deepseek2", "bert", "nomic-bert", "jina-bert-v2", "clip")


def _logf(x: float) -> float:
    return float(_F32(math.log(float(_F32(x)))))


def with_rope_options(spec: ModelSpec, g: GGUFFile, o: RopeOptions | None) -> ModelSpec:
    """``spec`` with the rope settings llama_context derives from ``o`` and the file's hparams
    (src/llama-context.cpp's constructor; llama-model.cpp's hparams defaults), all in f32."""
    a = g.architecture
    file_yarn = g.metadata.get(f"{a}.rope.scaling.type") == "yarn"
    if o is None or o.is_default():
        # a YaRN GGUF needs llama_context's derivation even without options (deepseek2 has
        # its own, models/deepseek2.py; encoders and M-RoPE keep what they had)
        if not file_yarn or spec.arch in _OWN_ROPE or spec.rope_sections:
            return spec
        o = RopeOptions()
    if o.scaling not in (None, "none", "linear", "yarn"):
        raise ModelError(f"rope scaling {o.scaling!r}: expected none, linear or yarn")
    if spec.arch in _OWN_ROPE or spec.rope_sections:
        raise ModelError(f"rope options are not built for the {spec.arch} architecture")
    meta = g.metadata
    stype = o.scaling or str(meta.get(f"{a}.rope.scaling.type", "linear") or "linear")
    factor = float(meta.get(f"{a}.rope.scaling.factor", meta.get(f"{a}.rope.scale_linear", 0.0))
                   or 0.0)
    scale_train = float(_F32(1.0) / _F32(factor)) if factor else 1.0
    base = float(_F32(o.freq_base)) if o.freq_base else spec.rope_base
    freq_scale = float(_F32(o.freq_scale)) if o.freq_scale else scale_train
    if stype == "none":
        freq_scale = 1.0
    ext = float(_F32(o.yarn_ext_factor)) if o.yarn_ext_factor >= 0 else (
        1.0 if stype == "yarn" else 0.0)
    attn = float(_F32(o.yarn_attn_factor)) if o.yarn_attn_factor >= 0 else 1.0
    if ext != 0:
        f = float(_F32(1.0) / _F32(freq_scale))
        # get_mscale(factor, 1): this arch family has no yarn_log_multiplier
        attn = float(_F32(1.0) if f <= 1.0 else _F32(0.1) * _F32(_logf(f)) + _F32(1.0))
        attn = float(_F32(attn) * (_F32(1.0) / (_F32(1.0) + _F32(0.1) * _F32(_logf(f)))))
    attn = float(_F32(attn) * _F32(meta.get(f"{a}.rope.scaling.attn_factor", 1.0) or 1.0))
    yarn = None
    if ext != 0 or attn != 1.0:
        n_orig = o.yarn_orig_ctx or int(meta.get(f"{a}.rope.scaling.original_context_length", 0)
                                        or 0) or spec.n_ctx_train
        beta_fast = float(_F32(o.yarn_beta_fast)) if o.yarn_beta_fast >= 0 else 32.0
        beta_slow = float(_F32(o.yarn_beta_slow)) if o.yarn_beta_slow >= 0 else 1.0
        low, high = _yarn_corr_dims(spec.rope_dim, n_orig, base, beta_fast, beta_slow)
        yarn = (ext, attn, low, high)
        if spec.arch == "gemma3":
            raise ModelError("YaRN rope scaling (or a YaRN attention factor) is not built for "
                             "gemma3")
    return dataclasses.replace(spec, rope_base=base, rope_scale=freq_scale, rope_yarn=yarn)


def _yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float,
                    beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the first and last rotated pair of YaRN's ramp, in f32."""
    def corr_dim(n_rot: float) -> float:
        num = _F32(n_dims) * _F32(_logf(float(_F32(n_ctx_orig) / (_F32(n_rot) * _F32(2)
                                                                 * _F32(math.pi)))))
        return float(num / (_F32(2) * _F32(_logf(base))))

    return max(0.0, math.floor(corr_dim(beta_fast))), min(n_dims - 1.0,
                                                          math.ceil(corr_dim(beta_slow)))
