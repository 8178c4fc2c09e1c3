"""``qwen3moe`` (Qwen3-30B-A3B family) as llama.cpp builds it: GQA with per-head Q/K RMS norms,
NEOX rope, every layer a softmax-gated MoE whose top-k weights are renormalised (llama.cpp
hard-codes ``norm_w=true`` for this arch), no shared expert.
"""

from __future__ import annotations

from jllama.models.common import Weights
from jllama.models.llama_moe import MoEDecoder, Variant
from jllama.models.moe import GATING_SOFTMAX, moe_config
from jllama.models.spec import ModelSpec


def build(spec: ModelSpec, w: Weights, gguf) -> MoEDecoder:
    cfg = moe_config(gguf.metadata, spec.arch, norm=True, scale=0.0, gating=GATING_SOFTMAX)
    return MoEDecoder(spec, w, cfg, Variant(neox=True, qk_norm=True))
