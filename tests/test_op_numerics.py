"""Each op of a llama-arch forward pass, fed llama.cpp's own inputs, reproduces llama.cpp's output.

A tiny random llama model with SmolLM2's types (Q4_1 weights, so Q8_1 activations; tied Q8_0
embedding, Q8_0 activations for the logits) runs 96 tokens through llama.cpp with flash
attention (>= 64 rows: ggml's tiled f32 kernel, as llama-perplexity runs it); ggml's eval
callback dumps every tensor. jllama's rms_norm, matmul (with ggml's activation rounding), rope,
attention and SwiGLU then recompute each op from llama.cpp's inputs, and the result is compared
with llama.cpp's output and with the exact (float64, unrounded) value of the op.

What must hold: our difference from llama.cpp is f32 summation noise (<= 1e-5 of the op's
magnitude), and for every matmul it is at most 1 % of llama.cpp's own rounding error against the
exact product; i.e. we inject the same rounding, not less. A missing rounding (an f16 step, an
activation quantization, a different FA kernel) shows up here as lc_jl ~ lc_ex.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pytest
from llamacpp_oracle import llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, write_gguf

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))

pytestmark = pytest.mark.oracle

Q = gguf.GGMLQuantizationType
SHAPE = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)


def _qtype(name, arr):
    if arr.ndim < 2:
        return None
    return Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    llama_cpp_module()  # the stock-kernel oracle (or a skip off CI)
    from op_errors_vs_llamacpp import analyse

    tensors = dense_tensors(3, n_vocab=320, tied=True, **SHAPE)
    path = write_gguf(tmp_path_factory.mktemp("opnum") / "tiny.gguf", "llama",
                      dense_hparams(**SHAPE), tensors, qtype=_qtype)
    ids = [(i * 37 + 11) % 320 for i in range(96)]
    return {s["op"]: s for s in analyse(str(path), ids, [0, 1], 256)}


def test_every_op_was_compared(stats):
    for il in (0, 1):
        for op in ("attn_norm", "Qmat", "Kmat", "Vmat", "ropeQ", "ropeK", "attn", "Omat",
                   "ffn_norm", "gate", "up", "swiglu", "down"):
            assert f"{op}-{il}" in stats
    assert "output" in stats


def test_ops_reproduce_llamacpp(stats):
    for op, s in stats.items():
        assert s["lc_jl"] < 1e-5, (op, s)
        assert abs(s["mean_lc_jl"]) < 1e-6, (op, s)


def test_matmuls_inject_llamacpps_rounding(stats):
    mats = [op for op in stats if op.split("-")[0] in
            ("Qmat", "Kmat", "Vmat", "Omat", "gate", "up", "down", "output")]
    for op in mats:
        s = stats[op]
        assert s["lc_ex"] > 1e-4, (op, s)  # the Q8 rounding is there and visible
        assert s["lc_jl"] < 0.01 * s["lc_ex"], (op, s)
        assert abs(s["jl_ex"] / s["lc_ex"] - 1) < 0.01, (op, s)
