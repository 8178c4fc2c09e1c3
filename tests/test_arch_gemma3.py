"""The gemma3 architecture against llama.cpp (llama-cpp-python 0.3.36).

Real model: Gemma 3 270M Q4_K_M (Q5_0/Q4_K/Q6_K/Q8_0/F32): last-position logits agree on three
prompts (top-1 identical, max abs diff reported) and 64 greedy tokens are identical up to steps
llama.cpp itself cannot decide (see TIE). Prompt ids come from the oracle's tokenizer so this
test does not depend on ours.

Tiny random models cover what the 270M model cannot show on short prompts: the sliding window
(window 8 on 40-token sequences, 7 layers so both local and global layers run), linear rope
scaling on the global layers, the no-window configuration, and final-logit soft-capping when
the file sets it.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module
from tinymodels import dense_hparams, dense_tensors, write_gguf

pytestmark = pytest.mark.oracle

PROMPTS = [
    "The capital of France is",
    "<start_of_turn>user\nWrite a short poem about the sea.<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def _oracle(path, n_ctx: int):
    llama_cpp = llama_cpp_module()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=2, seed=0, flash_attn=True)


def _engine(path, ctx: int):
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics

    spec, model = build_model(read_gguf(path))
    assert spec.arch == "gemma3"
    # llama.cpp's default KV cache is f16; the model then rounds inside attention as it does
    return Engine(spec, model, ctx_size=ctx, numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))


def _oracle_logits(oracle, ids) -> np.ndarray:
    oracle.reset()
    oracle.eval(ids)
    return np.array(oracle.scores[: len(ids)], np.float32)


# ----------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def real(gemma3_path):
    return _oracle(gemma3_path, 512), _engine(gemma3_path, 512)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_last_logits_match(real, prompt):
    oracle, engine = real
    ids = oracle.tokenize(prompt.encode(), add_bos=True, special=True)
    ref = _oracle_logits(oracle, ids)[-1]
    ours = engine.logits(ids)[-1]
    diff = float(np.abs(ours - ref).max())
    overlap = len(set(np.argsort(-ref)[:10].tolist()) & set(np.argsort(-ours)[:10].tolist()))
    print(f"\ngemma3-270m {prompt[:24]!r}: max|Δlogit| = {diff:.4f} "
          f"(logit std {ref.std():.2f}), top-10 overlap {overlap}/10")
    assert diff == 0.0  # every op rounds as ggml's, flash attention on as llama.cpp's default


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_greedy_64_tokens(real, prompt):
    """64 greedy tokens identical to llama.cpp's (flash attention on): the prompt and every
    decode step give llama.cpp's logits bit for bit, so no near-tie can part the texts."""
    from jllama.engine.sampling import SamplingParams

    oracle, engine = real
    ids = oracle.tokenize(prompt.encode(), add_bos=True, special=True)
    eos = oracle.token_eos()
    oracle.reset()
    ref = []
    for tok in oracle.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if tok == eos:
            break
        ref.append(tok)
        if len(ref) == 64:
            break
    engine.reset()
    ours = list(engine.generate(ids, SamplingParams.greedy(), max_tokens=64, stop_ids={eos}))
    print(f"\n{prompt[:24]!r}: {len(ours)} greedy tokens, llama.cpp {len(ref)}")
    assert ours == ref


# ----------------------------------------------------------------------------- tiny models
SHAPE = dict(n_layer=7, n_embd=128, n_ff=256, n_head=4, n_head_kv=1, head_dim=64)
TINY = {
    # name: (extra hparams, qtype, tolerance)
    # linear rope scaling applies to the global layers only (Gemma 3 4B and larger)
    "swa8-linrope-f32": ({"attention.sliding_window": 8, "rope.scaling.type": "linear",
                          "rope.scaling.factor": 4.0}, None, 0.01),
    "swa8-q8_0": ({"attention.sliding_window": 8}, gguf.GGMLQuantizationType.Q8_0, 0.3),
    "global-softcap-f32": ({"final_logit_softcapping": 1.5}, None, 0.01),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    extra, qtype, tol = TINY[request.param]
    tensors = dense_tensors(3, n_vocab=320, qk_norm=True, post_norms=True, tied=True,
                            embd_std=0.05, **SHAPE)
    hp = dense_hparams(**SHAPE, **{"rope.freq_base": 1e6}, **extra)
    path = write_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", "gemma3", hp,
                      tensors, qtype=qtype)
    return request.param, tol, _oracle(path, 256), _engine(path, 256)


def test_tiny_logits_match(tiny):
    name, tol, oracle, engine = tiny
    ids = np.random.default_rng(0).integers(0, 300, 40).tolist()
    ref = _oracle_logits(oracle, ids)
    ours = engine.logits(ids)
    diff = float(np.abs(ours - ref).max())
    print(f"\ngemma3 tiny {name}: max|Δlogit| = {diff:.5f} (logit std {ref.std():.2f})")
    assert diff < tol
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_tiny_greedy_32_tokens_identical(tiny):
    from jllama.engine.sampling import SamplingParams

    _, _, oracle, engine = tiny
    prompt = [11, 200, 37, 5, 90]
    oracle.reset()
    ref = []
    for tok in oracle.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        ref.append(tok)
        if len(ref) == 32:
            break
    engine.reset()
    assert list(engine.generate(prompt, SamplingParams.greedy(), max_tokens=32)) == ref
