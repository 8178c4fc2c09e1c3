"""`jllama convert-hf` beyond llama: the same bytes as llama.cpp's convert_hf_to_gguf.py.

One tiny random checkpoint per architecture (tests/hfcheckpoints.py), converted once by the
reference (all in one process) and once by jllama:

- Qwen2ForCausalLM: q/k/v biases, tied embeddings, Qwen2's BPE tokenizer, bf16, -> f16;
- Qwen3ForCausalLM: q/k norms, head_dim != hidden/heads, f16 weights, -> bf16;
- Qwen2MoeForCausalLM: experts stacked, shared expert and its gate, three shards, -> q8_0;
- Qwen3MoeForCausalLM: experts with q/k norms, -> q8_0;
- MixtralForCausalLM: llama's block_sparse_moe experts, SentencePiece tokenizer, -> f32;
- Gemma3ForCausalLM: (1 + w) norms, four norms a layer, sliding window, SPM, -> f16.
"""

from __future__ import annotations

import hfcheckpoints as H
import numpy as np
import pytest
from convert_reference import run_reference
from test_convert_hf import _needs_reference_deps, _same_file

pytestmark = [pytest.mark.oracle, pytest.mark.data]


def _cases():
    rng = np.random.default_rng
    q2, q3 = H.qwen2_config(), H.qwen3_config()
    m2, m3 = H.qwen_moe_config("qwen2moe"), H.qwen_moe_config("qwen3moe")
    mx, g3 = H.mixtral_config(), H.gemma3_config()
    return {
        "qwen2": (q2, lambda: H.dense_tensors(q2, rng(2), qkv_bias=True, tied=True), "qwen2",
                  "bfloat16", 1, "f16"),
        "qwen3": (q3, lambda: H.dense_tensors(q3, rng(3), qk_norm=True, tied=True), "qwen2",
                  "float16", 1, "bf16"),
        "qwen2moe": (m2, lambda: H.dense_tensors(m2, rng(4), qkv_bias=True, moe="qwen2moe"),
                     "qwen2", "bfloat16", 3, "q8_0"),
        "qwen3moe": (m3, lambda: H.dense_tensors(m3, rng(5), qk_norm=True, moe="qwen3moe"),
                     "qwen2", "bfloat16", 1, "q8_0"),
        "mixtral": (mx, lambda: H.dense_tensors(mx, rng(6), moe="mixtral"), "spm", "bfloat16", 1,
                    "f32"),
        "gemma3": (g3, lambda: H.gemma3_tensors(g3, rng(7)), "spm", "bfloat16", 1, "f16"),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    _needs_reference_deps()
    root = tmp_path_factory.mktemp("convert_hf_archs")
    jobs, dirs = [], {}
    for name, (cfg, tensors, tok, dtype, shards, outtype) in CASES.items():
        dirs[name] = H.write_checkpoint(root / name, cfg, tensors(), tok, dtype=dtype,
                                        shards=shards)
        jobs.append((dirs[name], root / f"ref-{name}.gguf", outtype))
    run_reference(jobs)
    return root, dirs


@pytest.mark.parametrize("name", list(CASES))
def test_byte_identical(references, tmp_path, name):
    from jllama.convert import convert_hf

    root, dirs = references
    ours = tmp_path / "ours.gguf"
    convert_hf(dirs[name], ours, CASES[name][-1])
    _same_file(ours, root / f"ref-{name}.gguf")
