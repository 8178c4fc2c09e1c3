"""The qwen2 and qwen3 architectures against llama.cpp on tiny random GGUF models.

Both programs load the same file (written by tests/tinymodels.py, F32 and Q8_0): logits at every
position of token sequences must agree, and 32 greedy tokens must be identical. Also: an
architecture jllama does not know is refused with a message naming it and the known ones.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tinymodels import dense_hparams, dense_tensors, write_gguf

pytestmark = pytest.mark.oracle

N_VOCAB = 320
# (arch, qtype, shape) — qwen3 uses head_dim != n_embd / n_head, as the real Qwen3 models do
CASES = {
    "qwen2-f32": ("qwen2", None, dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2,
                                      head_dim=32)),
    "qwen2-q8_0": ("qwen2", gguf.GGMLQuantizationType.Q8_0,
                   dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)),
    "qwen3-f32": ("qwen3", None, dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2,
                                      head_dim=64)),
    "qwen3-q8_0": ("qwen3", gguf.GGMLQuantizationType.Q8_0,
                   dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=64)),
}
# Both sides use an f16 KV cache (llama.cpp's default) and flash attention. Q8_0 weights go
# through the int8 kernels (ggml's vec_dot / tiled GEMM order) and every other op rounds as
# ggml's: bit for bit. F32 weight matrices go through XLA's f32 GEMM, whose summation order is
# not ggml's, so those models agree to float noise only.
TOL = {None: 0.02, gguf.GGMLQuantizationType.Q8_0: 0.0}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp",
                                    reason="install the oracle: pip install -e .[oracle]")
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics

    arch, qtype, shp = CASES[request.param]
    tensors = dense_tensors(7, n_vocab=N_VOCAB, qkv_bias=arch == "qwen2",
                            qk_norm=arch == "qwen3", tied=arch == "qwen3", **shp)
    hp = dense_hparams(**shp, **{"rope.freq_base": 1e6})
    path = write_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", arch, hp, tensors,
                      qtype=qtype)
    # flash attention on, as llama.cpp's CPU default and ours (runtime.flash_attn)
    oracle = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False,
                             n_threads=2, seed=0, flash_attn=True)
    spec, model = build_model(read_gguf(path))
    assert spec.arch == arch
    return request.param, qtype, oracle, Engine(spec, model, ctx_size=256, numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))


def _sequences() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, N_VOCAB, 48).tolist(), [5, 17, 300, 42]]


def test_logits_match(pair):
    name, qtype, oracle, engine = pair
    for ids in _sequences():
        oracle.reset()
        oracle.eval(ids)
        ref = np.array(oracle.scores[: len(ids)], np.float32)
        ours = engine.logits(ids)
        diff = float(np.abs(ours - ref).max())
        print(f"\n{name} T={len(ids)}: max|Δlogit| = {diff:.5f} (logit std {ref.std():.2f})")
        assert diff <= TOL[qtype]
        assert int(np.argmax(ours[-1])) == int(np.argmax(ref[-1]))


def test_greedy_32_tokens_identical(pair):
    from jllama.engine.sampling import SamplingParams

    _, _, oracle, engine = pair
    prompt = _sequences()[0][:8]
    oracle.reset()
    ref = []
    for tok in oracle.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        ref.append(tok)
        if len(ref) == 32:
            break
    engine.reset()
    ours = list(engine.generate(prompt, SamplingParams.greedy(), max_tokens=32))
    assert ours == ref


def test_unknown_architecture_is_named(tmp_path):
    from jllama.errors import ModelError
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    shp = dict(n_layer=1, n_embd=64, n_ff=64, n_head=2, n_head_kv=2, head_dim=32)
    path = write_gguf(tmp_path / "x.gguf", "notanarch", dense_hparams(**shp),
                      dense_tensors(0, n_vocab=N_VOCAB, **shp))
    with pytest.raises(ModelError, match=r"'notanarch' is not supported; jllama knows: .*qwen2"):
        build_model(read_gguf(path))
