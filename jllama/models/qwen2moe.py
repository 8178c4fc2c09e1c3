"""``qwen2moe`` (Qwen1.5-MoE, Qwen2-57B-A14B) as llama.cpp builds it: Q/K/V biases, NEOX rope,
softmax-gated experts whose top-k weights are *not* renormalised, plus a shared expert scaled by
``sigmoid(x · ffn_gate_inp_shexp)``.
"""

from __future__ import annotations

from jllama.models.common import Weights
from jllama.models.llama_moe import MoEDecoder, Variant
from jllama.models.moe import GATING_SOFTMAX, moe_config
from jllama.models.spec import ModelSpec


def build(spec: ModelSpec, w: Weights, gguf) -> MoEDecoder:
    cfg = moe_config(gguf.metadata, spec.arch, norm=False, scale=0.0, gating=GATING_SOFTMAX)
    return MoEDecoder(spec, w, cfg, Variant(neox=True, qk_norm=False, shared_expert=True))
