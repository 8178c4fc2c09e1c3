"""The shared decoder (models/decoder.py): one block for llama, qwen2, qwen3, qwen2moe, qwen3moe and
Mixtral-style llama, its variants as data, and identical blocks traced once.

No oracle here: tests/test_arch_qwen.py, tests/test_arch_moe.py and tests/test_llama_oracle.py
compare the numbers with llama.cpp.
"""

from __future__ import annotations

import numpy as np
import pytest
from tinymodels import dense_hparams, dense_tensors, write_gguf

SHP = dict(n_layer=3, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, head_dim=16)


def _dense(tmp_path, arch: str, **kw):
    from jllama.gguf.reader import read_gguf

    t = dense_tensors(3, n_vocab=300, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                      **SHP, **kw)
    return read_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, dense_hparams(**SHP), t))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_dense_archs_are_the_decoder_with_their_variant(tmp_path, arch):
    from flax import nnx

    from jllama.models import build_model
    from jllama.models.common import SwiGLU
    from jllama.models.decoder import VARIANTS, Decoder

    _, m = build_model(_dense(tmp_path, arch))
    assert isinstance(m, Decoder) and m.variant == VARIANTS[arch]
    assert all(isinstance(b.ffn, SwiGLU) for b in m.blocks)
    assert (m.blocks[0].wq.bias is not None) == (arch == "qwen2")
    assert (m.blocks[0].q_norm is not None) == (arch == "qwen3")
    assert m.kv_rope(0)[2] == (arch != "llama")  # NEOX rope for Qwen
    gd = nnx.graphdef(m.blocks[0])
    assert all(nnx.graphdef(b) == gd for b in m.blocks[1:])


def test_qwen2_requires_qkv_biases_llama_takes_them_optionally(tmp_path):
    from jllama.errors import ModelError
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    t = dense_tensors(3, n_vocab=300, **SHP)
    g = read_gguf(write_gguf(tmp_path / "q2.gguf", "qwen2", dense_hparams(**SHP), t))
    with pytest.raises(ModelError, match="attn_q.bias"):
        build_model(g)
    t = dense_tensors(3, n_vocab=300, qkv_bias=True, **SHP)
    g = read_gguf(write_gguf(tmp_path / "ll.gguf", "llama", dense_hparams(**SHP), t))
    _, m = build_model(g)
    assert m.blocks[0].wk.bias is not None


@pytest.mark.parametrize("writer", ["write_llama_moe", "write_qwen3moe", "write_qwen2moe"])
def test_identical_blocks_are_traced_once(tmp_path, writer, monkeypatch):
    """decoder_forward's nested jit traces a block once per forward pass when all blocks have
    equal graphdefs (no per-layer static data), and once per layer with numerics taps on; the
    results are the same bits either way."""
    import tinymodels_moe as tm

    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.decoder import Block
    from jllama.numerics import Numerics

    g = read_gguf(getattr(tm, writer)(tmp_path / f"{writer}.gguf"))
    calls = []
    orig = Block.__call__

    def counted(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(Block, "__call__", counted)
    ids = tm.prompt_ids(len(g.metadata["tokenizer.ggml.tokens"]))[:9]
    out = {}
    for taps in (False, True):
        num = Numerics(cache_type_k="f32", cache_type_v="f32", taps=taps)
        spec, m = build_model(g, numerics=num)
        calls.clear()
        out[taps] = Engine(spec, m, ctx_size=64, numerics=num).logits(ids)
        assert len(calls) == (spec.n_layer if taps else 1)
    np.testing.assert_array_equal(out[False], out[True])
