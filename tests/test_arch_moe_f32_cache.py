"""Mixture-of-experts architectures (Mixtral-style ``llama``, ``qwen3moe``, ``qwen2moe``) against
llama.cpp without flash attention and with an f32 cache (paths jllama only approximates): on the
tiny random GGUF models of test_arch_moe.py, all-position logits on a 41-token sequence and 32
greedy tokens; F32 models agree to float rounding, quantized ones within the spread of
llama.cpp's activation rounding (test_arch_moe.py has the bit-exact comparisons).
"""

from __future__ import annotations

import pytest
import tinymodels_moe as tm

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tm.write_test_models(tmp_path_factory.mktemp("moe"))


@pytest.mark.parametrize("name,tol", [("llama_f32", 1e-3), ("llama_q8_0", 0.5)])
def test_llama_moe_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)  # llama with experts: the decoder's MoE layers


@pytest.mark.parametrize("name,tol", [("qwen3moe_f32", 1e-3), ("qwen3moe_q4_0", 0.5)])
def test_qwen3moe_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)


@pytest.mark.parametrize("name,tol", [("qwen2moe_f32", 1e-3), ("qwen2moe_q8_0", 0.5)])
def test_qwen2moe_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)
