"""Tiny models whose weights mix the newer types run end to end, bit-identical to llama.cpp.

Two tiny random llamas, their tensors spread over the types under test:

- ``ternary_iq3``: TQ1_0, TQ2_0, MXFP4, IQ3_XXS and IQ3_S (IQ3_XXS only on output.weight:
  llama-quantize wants an importance matrix for it anywhere else);
- ``iq4``: IQ4_NL and IQ4_XS (q/k/v of block 0 all IQ4_NL: one grouped int8 call; block 1
  mixed, so each weight takes its own activation format);
- ``nvfp4``: NVFP4 everywhere in block 0, the embedding and the output, beside MXFP4, Q8_0
  and Q4_0 in block 1 (ggml's vec_dot for NVFP4 at every row count);
- ``q1_q2``: Q1_0 and Q2_0, ggml 0c1e570's 1- and 2-bit types.

Our ``quantize_file`` writes the same file as llama.cpp's ``llama_model_quantize``, and jllama
runs it against llama.cpp with stock kernels (no repacked layouts, see llamacpp_oracle). The
prompt exercises ggml's multi-row paths (IQ3/IQ4_XS: its tiled GEMM from 8 rows; IQ4_NL:
llamafile's tinyBLAS from 2 rows), the greedy tokens its one-row vec_dot.

With the int8 kernels (built where the CPU has AVX2 + FMA + F16C) every logit and token is
identical. Without them (``Numerics.q8_kernels`` off, or no such CPU) the weights are
dequantized and multiplied in f32 by activations rounded as ggml's q8 would round them: close
(relative L2 error about 1e-2 on these chaotic random models) but not bit for bit.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_logits_and_greedy, llama_cpp_module

from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.mixes import mix_from_dict
from jllama.quant.quantize import quantize_file
from jllama.quant.testing import llama_cpp_quantize, tiny_llama

pytestmark = pytest.mark.oracle

# first match wins, in llama.cpp's --tensor-type as in our mixes
TERNARY_IQ3 = [
    ("^token_embd", "IQ3_S"),  # the row lookup
    ("^output", "IQ3_XXS"),
    ("blk\\.0\\.attn_q", "TQ1_0"),
    ("blk\\.0\\.attn_k", "TQ2_0"),
    ("blk\\.0\\.attn_v", "MXFP4"),
    ("blk\\.0\\.attn_output", "IQ3_S"),
    ("blk\\.0\\.ffn_gate", "MXFP4"),
    ("blk\\.0\\.ffn_up", "TQ2_0"),
    ("blk\\.0\\.ffn_down", "IQ3_S"),
    ("blk\\.1\\.attn_q", "IQ3_S"),
    ("blk\\.1\\.attn_k", "MXFP4"),
    ("blk\\.1\\.attn_v", "TQ1_0"),
    ("blk\\.1\\.attn_output", "MXFP4"),
    ("blk\\.1\\.ffn_gate", "TQ1_0"),
    ("blk\\.1\\.ffn_up", "IQ3_S"),
    ("blk\\.1\\.ffn_down", "TQ2_0"),
]
IQ4 = [
    ("^token_embd", "IQ4_XS"),  # the row lookup
    ("^output", "IQ4_NL"),
    ("blk\\.0\\.attn_(q|k|v)", "IQ4_NL"),
    ("blk\\.0\\.attn_output", "IQ4_XS"),
    ("blk\\.0\\.ffn_gate", "IQ4_XS"),
    ("blk\\.0\\.ffn_up", "IQ4_XS"),
    ("blk\\.0\\.ffn_down", "IQ4_NL"),
    ("blk\\.1\\.attn_q", "IQ4_XS"),
    ("blk\\.1\\.attn_k", "IQ4_NL"),
    ("blk\\.1\\.attn_v", "IQ4_XS"),
    ("blk\\.1\\.attn_output", "IQ4_NL"),
    ("blk\\.1\\.ffn_gate", "IQ4_NL"),
    ("blk\\.1\\.ffn_up", "IQ4_NL"),
    ("blk\\.1\\.ffn_down", "IQ4_XS"),
]
NVFP4 = [
    ("^token_embd", "NVFP4"),  # the row lookup
    ("^output", "NVFP4"),
    ("blk\\.0\\.", "NVFP4"),  # q/k/v (and gate/up) in one int8 call each
    ("blk\\.1\\.attn_(q|output)", "NVFP4"),
    ("blk\\.1\\.attn_k", "MXFP4"),
    ("blk\\.1\\.attn_v", "Q8_0"),
    ("blk\\.1\\.ffn_(gate|down)", "NVFP4"),
    ("blk\\.1\\.ffn_up", "Q4_0"),
]
# ggml 0c1e570's 1- and 2-bit Q8_0-activation types (no llamafile or tiled path: vec_dot for
# every row count; Q1_0's AVX2 form, Q2_0's scalar C)
Q1_Q2 = [
    ("^token_embd", "Q2_0"),  # the row lookup
    ("^output", "Q1_0"),
    ("blk\\.0\\.attn_(q|k|v)", "Q1_0"),
    ("blk\\.0\\.attn_output", "Q2_0"),
    ("blk\\.0\\.ffn_gate", "Q2_0"),
    ("blk\\.0\\.ffn_up", "Q1_0"),
    ("blk\\.0\\.ffn_down", "Q2_0"),
    ("blk\\.1\\.attn_q", "Q2_0"),
    ("blk\\.1\\.attn_k", "Q1_0"),
    ("blk\\.1\\.attn_v", "Q2_0"),
    ("blk\\.1\\.attn_output", "Q1_0"),
    ("blk\\.1\\.ffn_gate", "Q1_0"),
    ("blk\\.1\\.ffn_up", "Q2_0"),
    ("blk\\.1\\.ffn_down", "Q1_0"),
]
MIXES = {"ternary_iq3": TERNARY_IQ3, "iq4": IQ4, "nvfp4": NVFP4, "q1_q2": Q1_Q2}
TOKENS = [1, 300, 301, 17, 302, 303, 42, 304, 305, 306, 20, 307]


@pytest.fixture(scope="module", params=sorted(MIXES))
def model(request, tmp_path_factory):
    """(our file, llama.cpp's file, the rules) of one mixed-type tiny llama."""
    RULES = MIXES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    src = d / "f32.gguf"
    tiny_llama(src, n_layer=2, n_ff=256)
    ours, ref = d / "ours.gguf", d / "ref.gguf"
    rules = [{"match": m, "type": t} for m, t in RULES]
    quantize_file(src, ours, mix_from_dict({"base": "q8_0", "pure": True, "rules": rules}))
    llama_cpp_module()
    llama_cpp_quantize(src, ref, "Q8_0", pure=True, overrides=[(m, QType[t]) for m, t in RULES])
    return ours, ref, RULES


def test_file_identical_to_llama_cpp(model) -> None:
    ours, ref, rules = model
    types = {t.type_name for t in read_gguf(ours).tensors.values()}
    assert types == {"F32"} | {t for _, t in rules}
    assert filecmp.cmp(ours, ref, shallow=False)


@pytest.fixture(scope="module")
def oracle_run(model):
    """llama.cpp's logits at every position of TOKENS, and its 16 greedy tokens after them."""
    return llama_cpp_logits_and_greedy(model[0], TOKENS)


def test_logits_and_greedy_tokens_vs_llama_cpp(model, oracle_run) -> None:
    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams
    from jllama.kernels import xla_cpu

    ref, ref_greedy = oracle_run
    RULES = model[2]
    llm = Llama(model[0], ctx_size=64)
    got = llm.engine.logits(TOKENS)
    ours = list(llm.engine.generate(TOKENS, SamplingParams.greedy(), max_tokens=16))
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"\nrel L2 {rel:.2e}, max|diff| {float(np.abs(got - ref).max()):.3g}")
    if not all(xla_cpu.q8_on(int(QType[t])) for _, t in RULES):
        pytest.skip("no int8 kernels on this CPU (AVX2 + FMA + F16C): the f32 test below runs")
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert ours == ref_greedy


# The mixes of single-scale types (nvfp4, q1_q2) share this path; their dequantizers are
# checked against ggml's bit for bit (test_quant_formats), so only these two pay its compile.
@pytest.mark.parametrize("model", ["ternary_iq3", "iq4"], indirect=True)
def test_f32_fallback_close_to_llama_cpp(model, oracle_run) -> None:
    """Without the int8 kernels (``JLLAMA_NO_Q8``, GPUs, other CPUs) the weights go through the
    dequantizers and an f32 dot on activations rounded as ggml's q8 rounds them."""
    from jllama.api import Llama
    from jllama.numerics import Numerics

    ref, _ = oracle_run
    llm = Llama(model[0], ctx_size=64, numerics=Numerics().replace(q8_kernels=False))
    got = llm.engine.logits(TOKENS)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"\nf32 path: rel L2 {rel:.2e}, max|diff| {float(np.abs(got - ref).max()):.3g}")
    assert rel < 0.03  # measured 1.0e-2 (module docstring)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8

