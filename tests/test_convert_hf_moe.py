"""`jllama convert-hf` on mixture-of-experts architectures: the same bytes as convert_hf_to_gguf.py.

One tiny random checkpoint per architecture (tests/hfcheckpoints.py), converted once by the
reference (all in one process) and once by jllama:

- Qwen2MoeForCausalLM: experts stacked, shared expert and its gate, three shards, -> q8_0;
- Qwen3MoeForCausalLM: experts with q/k norms, -> q8_0;
- MixtralForCausalLM: llama's block_sparse_moe experts, SentencePiece tokenizer, -> f32;
- DeepseekV2ForCausalLM: MLA (kv_b_proj split into k_b/v_b, k_b transposed), a leading dense
  layer, routed + shared experts, Llama 3's tokenizer, two shards, -> q8_0.
"""

from __future__ import annotations

import hfcheckpoints as H
import numpy as np
import pytest
from convert_reference import check_cases, convert_cases

pytestmark = [pytest.mark.oracle, pytest.mark.data]

rng = np.random.default_rng
m2, m3 = H.qwen_moe_config("qwen2moe"), H.qwen_moe_config("qwen3moe")
mx, ds = H.mixtral_config(), H.deepseek2_config()
# name: (config, tensors, tokenizer, checkpoint dtype, shards, outtype)
CASES = {
    "qwen2moe": (m2, lambda: H.dense_tensors(m2, rng(4), qkv_bias=True, moe="qwen2moe"),
                 "qwen2", "bfloat16", 3, "q8_0"),
    "qwen3moe": (m3, lambda: H.dense_tensors(m3, rng(5), qk_norm=True, moe="qwen3moe"),
                 "qwen2", "bfloat16", 1, "q8_0"),
    "mixtral": (mx, lambda: H.dense_tensors(mx, rng(6), moe="mixtral"), "spm", "bfloat16", 1,
                "f32"),
    "deepseek2": (ds, lambda: H.deepseek2_tensors(ds, rng(8)), "llama3", "bfloat16", 2, "q8_0"),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return convert_cases(tmp_path_factory.mktemp("convert_hf_moe"), CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_byte_identical(references, tmp_path, name):
    check_cases(references, tmp_path, name, CASES)
