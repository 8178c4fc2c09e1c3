"""`jllama convert-hf` on dense non-llama architectures: the same bytes as convert_hf_to_gguf.py.

One tiny random checkpoint per architecture (tests/hfcheckpoints.py), converted once by the
reference (all in one process) and once by jllama:

- Qwen2ForCausalLM: q/k/v biases, tied embeddings, Qwen2's BPE tokenizer, bf16, -> f16; in a
  folder named like a Hub model, with a model card and generation_config.json (general.*);
- Qwen3ForCausalLM: q/k norms, head_dim != hidden/heads, f16 weights, -> bf16;
- Gemma3ForCausalLM: (1 + w) norms, four norms a layer, sliding window, SPM, -> f16.

The MoE architectures are in test_convert_hf_moe.py.
"""

from __future__ import annotations

import hfcheckpoints as H
import numpy as np
import pytest
from convert_reference import check_cases, convert_cases

pytestmark = [pytest.mark.oracle, pytest.mark.data]

rng = np.random.default_rng
q2, q3, g3 = H.qwen2_config(), H.qwen3_config(), H.gemma3_config()
# name: (config, tensors, tokenizer, checkpoint dtype, shards, outtype)
CASES = {
    "Qwen2.5-0.5B-Instruct": (q2, lambda: H.dense_tensors(q2, rng(2), qkv_bias=True, tied=True), "qwen2",
              "bfloat16", 1, "f16"),
    "qwen3": (q3, lambda: H.dense_tensors(q3, rng(3), qk_norm=True, tied=True), "qwen2",
              "float16", 1, "bf16"),
    "gemma3": (g3, lambda: H.gemma3_tensors(g3, rng(7)), "spm", "bfloat16", 1, "f16"),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return convert_cases(tmp_path_factory.mktemp("convert_hf_archs"), CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_byte_identical(references, tmp_path, name):
    check_cases(references, tmp_path, name, CASES)
