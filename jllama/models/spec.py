"""ModelSpec: the hyperparameters of a model, read from GGUF metadata once.

Keys follow llama.cpp's ``{arch}.*`` convention; anything optional has llama.cpp's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
