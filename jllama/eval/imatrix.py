"""Importance matrix of a model over a text, as llama-imatrix computes it (tools/imatrix).

The text is tokenized once (with the vocabulary's add_bos) and cut into ``n_ctx``-token chunks
exactly as for perplexity (first token of each chunk replaced by BOS, tail dropped). Each chunk
runs from an empty cache with logits for every token; the activations entering every ``blk.*``
matmul weight are read from the forward pass's taps (``Numerics.taps``; models/common.py) and
summed as llama-imatrix's ``collect_imatrix`` does (quant/imatrix.py). The running ``[i]ppl``
values use the second half of each chunk, as llama-imatrix prints them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from jllama.engine.engine import PREFILL_CHUNK
from jllama.errors import JllamaError
from jllama.eval.perplexity import chunk_tokens
from jllama.quant.imatrix import ImatrixCollector

# tap (llama.cpp's tensor name, without the layer) -> the weights of that layer it feeds
WEIGHT_INPUTS: dict[str, tuple[str, ...]] = {
    "attn_norm": ("attn_q", "attn_k", "attn_v", "attn_qkv"),
    "kqv_out": ("attn_output",),
    # a MoE layer's router and shared expert read the block's ffn input too (its routed
    # experts: _MOE_TAPS)
    "ffn_norm": ("ffn_gate", "ffn_up", "ffn_gate_inp", "ffn_gate_shexp", "ffn_up_shexp"),
    "ffn_swiglu": ("ffn_down", "ffn_down_shexp"),
}
# MoE layers: the chosen experts per token, and what enters ffn_down_exps per (token, slot)
_MOE_TAPS = ("ffn_moe_topk", "ffn_moe_down_in")
_TAP = re.compile(r"^(\w+?)-(\d+)$")


def matmul_weights(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The weights llama-imatrix collects for: the blk.* matrices a matmul reads (not the
    norms, biases or the token embedding)."""
    return [
        n for n, s in shapes.items()
        if n.startswith("blk.") and n.endswith(".weight") and len(s) >= 2
    ]  # fmt: skip


class _TapReader:
    """Keeps the taps of one forward pass over ``[1, T]`` tokens; ``flush`` turns them into
    collector updates (callbacks may land in any order)."""

    def __init__(self, collector: ImatrixCollector, shapes: dict[str, tuple[int, ...]]):
        self.c = collector
        self.shapes = shapes
        self.n_tokens = 0
        self.pending: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, name: str, value: np.ndarray) -> None:
        m = _TAP.match(name)
        if m is not None and (m.group(1) in WEIGHT_INPUTS or m.group(1) in _MOE_TAPS):
            self.pending[(m.group(1), int(m.group(2)))] = np.asarray(value)

    def flush(self) -> None:
        p, self.pending = self.pending, {}
        for (tap_name, layer), v in sorted(p.items()):
            for w in WEIGHT_INPUTS.get(tap_name, ()):
                wname = f"blk.{layer}.{w}.weight"
                shape = self.shapes.get(wname)
                if shape is not None and len(shape) == 2:
                    x = np.asarray(v, np.float32).reshape(-1, shape[-1])[: self.n_tokens]
                    self.c.add_dense(wname, x)
        for (tap_name, layer), ids in sorted(p.items()):
            if tap_name != "ffn_moe_topk":
                continue
            k = ids.shape[-1]
            ids = np.asarray(ids).reshape(-1, k)[: self.n_tokens]
            pre = f"blk.{layer}."
            x = p.get(("ffn_norm", layer))
            for part in ("gate", "up"):
                shape = self.shapes.get(f"{pre}ffn_{part}_exps.weight")
                if shape is not None and x is not None:
                    rows = np.asarray(x, np.float32).reshape(-1, shape[-1])[: self.n_tokens]
                    self.c.add_experts(f"{pre}ffn_{part}_exps.weight", rows[:, None], ids, shape[0])
            h = p.get(("ffn_moe_down_in", layer))
            shape = self.shapes.get(f"{pre}ffn_down_exps.weight")
            if shape is not None and h is not None:
                rows = np.asarray(h, np.float32).reshape(-1, k, shape[-1])[: self.n_tokens]
                self.c.add_experts(f"{pre}ffn_down_exps.weight", rows, ids, shape[0])


def compute_imatrix(
    engine,
    tokens: list[int],
    shapes: dict[str, tuple[int, ...]],
    collector: ImatrixCollector,
    n_ctx: int,
    n_chunks: int | None = None,
    bos_id: int | None = None,
    add_bos: bool = False,
    on_chunk: Callable[[int, float], None] | None = None,
    source: str = "text",
) -> tuple[float, float, int]:
    """Run the chunks, collecting into ``collector``; returns (PPL, its ±, chunks run). The
    engine's model must be built with ``Numerics(taps=True)``."""
    import jax

    from jllama.models import common

    chunks = chunk_tokens(tokens, n_ctx, n_chunks, bos_id, add_bos, source)
    reader = _TapReader(collector, shapes)
    first = n_ctx // 2
    nll: list[np.ndarray] = []
    if n_ctx > PREFILL_CHUNK:  # one forward pass per chunk: its taps hold the whole chunk
        raise JllamaError(f"-c {n_ctx}: jllama imatrix takes chunks of at most {PREFILL_CHUNK}")
    common.TAP_LISTENERS.append(reader)
    try:
        for i, chunk in enumerate(chunks):
            reader.n_tokens = n_ctx
            lp, _ = engine.token_logprobs(chunk[None])
            jax.effects_barrier()  # every tap of this chunk has landed
            reader.flush()
            nll.append(-lp[0, first : n_ctx - 1].astype(np.float64))
            if on_chunk:
                on_chunk(i + 1, math.exp(float(np.concatenate(nll).mean())))
    finally:
        common.TAP_LISTENERS.remove(reader)
    v = np.concatenate(nll)
    mean = float(v.mean())
    var = float((v * v).mean()) - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (len(v) - 1)) * ppl if var > 0 and len(v) > 1 else 0.0
    return ppl, err, len(chunks)
