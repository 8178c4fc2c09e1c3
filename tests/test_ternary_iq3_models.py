"""A model whose weights are TQ1_0, TQ2_0, MXFP4, IQ3_XXS and IQ3_S runs end to end.

One tiny random llama, its tensors spread over the five types (IQ3_XXS only on output.weight:
llama-quantize wants an importance matrix for it anywhere else): our ``quantize_file`` writes
the same file as llama.cpp's ``llama_model_quantize``, and jllama runs it against llama.cpp.

These types have no int8 kernel here yet, so their matmuls dequantize the weight and take an f32
dot, while llama.cpp quantizes the activations (q8_K for the 256-blocks, q8_0 for MXFP4) and
takes an integer dot: the logits agree only to that rounding (measured on this model: relative
L2 error 2.0e-2, max |diff| 0.148 over 12 positions; the argmax at every position and 16 greedy
tokens equal), not bit for bit.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module

from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.mixes import mix_from_dict
from jllama.quant.quantize import quantize_file
from jllama.quant.testing import llama_cpp_quantize, tiny_llama

pytestmark = pytest.mark.oracle

# first match wins, in llama.cpp's --tensor-type as in our mixes
RULES = [
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
TOKENS = [1, 300, 301, 17, 302, 303, 42, 304, 305, 306, 20, 307]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(our file, llama.cpp's file) of the mixed-type tiny llama."""
    d = tmp_path_factory.mktemp("mixed")
    src = d / "f32.gguf"
    tiny_llama(src, n_layer=2, n_ff=256)
    ours, ref = d / "ours.gguf", d / "ref.gguf"
    rules = [{"match": m, "type": t} for m, t in RULES]
    quantize_file(src, ours, mix_from_dict({"base": "q8_0", "pure": True, "rules": rules}))
    llama_cpp_module()
    llama_cpp_quantize(src, ref, "Q8_0", pure=True, overrides=[(m, QType[t]) for m, t in RULES])
    return ours, ref


def test_file_identical_to_llama_cpp(model) -> None:
    ours, ref = model
    types = {t.type_name for t in read_gguf(ours).tensors.values()}
    assert types == {"F32", "TQ1_0", "TQ2_0", "MXFP4", "IQ3_XXS", "IQ3_S"}
    assert filecmp.cmp(ours, ref, shallow=False)


def test_logits_and_greedy_tokens_vs_llama_cpp(model) -> None:
    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams

    path = model[0]
    llama_cpp = llama_cpp_module()
    oracle = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                             seed=0, flash_attn=True)  # fmt: skip
    try:
        oracle.eval(TOKENS)
        ref = np.array(oracle.scores[: len(TOKENS)], np.float32)
        oracle.reset()
        ref_greedy = []
        for tok in oracle.generate(TOKENS, top_k=1, temp=0.0, repeat_penalty=1.0):
            ref_greedy.append(tok)
            if len(ref_greedy) == 16:
                break
    finally:
        oracle.close()
    llm = Llama(path, ctx_size=64)
    got = llm.engine.logits(TOKENS)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    diff = float(np.abs(got - ref).max())
    print(f"\nrel L2 {rel:.2e}, max|diff| {diff:.3f}")
    # f32 dot on dequantized weights vs ggml's q8 activations (module docstring)
    assert rel < 0.04 and diff < 0.3
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    ours = list(llm.engine.generate(TOKENS, SamplingParams.greedy(), max_tokens=16))
    assert ours == ref_greedy
