"""jllama synth: published shapes, files llama.cpp loads, quantization byte-identical to
llama.cpp's.

Expected numbers come from the models' published config.json files and model cards (parameter
counts: Meta's, Qwen's, Google's and DeepSeek's), never from the generator; file validity from
llama.cpp itself (llama-cpp-python loads and runs each architecture), quantized bytes from
llama.cpp's llama_model_quantize.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import testdata

from jllama.convert import synth

# name: (published parameter count, {tensor: shape in numpy order} from config.json)
PUBLISHED = {
    "smollm2-135m": (135e6, {"token_embd.weight": (49152, 576),
                               "blk.29.attn_k.weight": (192, 576),
                               "blk.0.ffn_down.weight": (576, 1536)}),
    "gemma-3-270m": (270e6, {"token_embd.weight": (262144, 640),
                             "blk.17.attn_q.weight": (1024, 640),
                             "blk.0.attn_k.weight": (256, 640),
                             "blk.0.ffn_up.weight": (2048, 640)}),
    "llama-3.2-1b": (1.24e9, {"token_embd.weight": (128256, 2048),
                              "blk.15.attn_k.weight": (512, 2048),
                              "blk.0.ffn_down.weight": (2048, 8192),
                              "rope_freqs.weight": (32,)}),
    "llama-3.2-3b": (3.21e9, {"blk.27.attn_q.weight": (3072, 3072),
                              "blk.0.attn_v.weight": (1024, 3072)}),
    "llama-3.1-8b": (8.03e9, {"output.weight": (128256, 4096),
                              "blk.31.ffn_up.weight": (14336, 4096)}),
    "qwen2.5-1.5b": (1.54e9, {"blk.27.attn_k.bias": (256,), "blk.0.attn_q.bias": (1536,),
                              "blk.0.ffn_gate.weight": (8960, 1536)}),
    "qwen2.5-7b": (7.62e9, {"token_embd.weight": (152064, 3584),
                            "blk.0.attn_k.weight": (512, 3584)}),
    "qwen3-4b": (4.02e9, {"blk.35.attn_q_norm.weight": (128,),
                          "blk.0.attn_q.weight": (4096, 2560)}),
    "gemma-3-1b": (1.0e9, {"token_embd.weight": (262144, 1152),
                           "blk.25.attn_q.weight": (1024, 1152),
                           "blk.0.post_ffw_norm.weight": (1152,)}),
    "gemma-3-4b": (3.88e9, {"token_embd.weight": (262208, 2560),
                            "blk.33.attn_k.weight": (1024, 2560)}),
    "qwen3-30b-a3b": (30.5e9, {"blk.47.ffn_gate_exps.weight": (128, 768, 2048),
                               "blk.0.ffn_gate_inp.weight": (128, 2048),
                               "blk.0.attn_k.weight": (512, 2048)}),
    "deepseek-v2-lite": (15.7e9, {"blk.0.ffn_gate.weight": (10944, 2048),
                                  "blk.26.ffn_up_exps.weight": (64, 1408, 2048),
                                  "blk.1.ffn_up_shexp.weight": (2816, 2048),
                                  "blk.0.attn_q.weight": (3072, 2048),
                                  "blk.0.attn_kv_a_mqa.weight": (576, 2048),
                                  "blk.0.attn_k_b.weight": (16, 512, 128),
                                  "blk.0.attn_v_b.weight": (16, 128, 512)}),
}


def test_every_shape_is_checked():
    assert set(PUBLISHED) == set(synth.SHAPES)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_plan(name):
    want_params, shapes = PUBLISHED[name]
    s = synth.SHAPES[name]
    got = synth.n_params(s)
    assert abs(got / want_params - 1) < 0.01, f"{name}: {got / 1e9:.3f}B"
    tensors = {t.name: t for t in synth.plan(s)}
    for tname, shape in shapes.items():
        assert tensors[tname].shape == shape, tname
    md, _ = synth.hparams(s)
    assert md[f"{s.arch}.block_count"] == s.n_layer
    # F16 matrices, F32 vectors and MoE routers: what convert_hf_to_gguf.py --outtype f16
    # writes (conversion/base.py forces FFN_GATE_INP to F32)
    assert {t.qtype.name for t in tensors.values() if len(t.shape) == 1} == {"F32"}
    assert {t.qtype.name for t in tensors.values()
            if len(t.shape) > 1 and "ffn_gate_inp" not in t.name} == {"F16"}
    assert {t.qtype.name for t in tensors.values() if "ffn_gate_inp" in t.name} <= {"F32"}


def test_deepseek_lite_needs_its_layer_count():
    with pytest.raises(synth.JllamaError, match="26 or 27"):
        synth.scaled(synth.SHAPES["deepseek-v2-lite"], layers=2)


def _vocab(shape):
    if shape.vocab.startswith("registry:"):
        return synth.find_vocab(shape)
    return testdata.vocab(shape.vocab)


# one per architecture; V2-Lite only loads with its 27 layers
ARCHS = {"llama-3.2-1b": 2, "qwen2.5-1.5b": 1, "qwen3-4b": 1, "gemma-3-1b": 2,
         "qwen3-30b-a3b": 1, "deepseek-v2-lite": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}

    def get(name):
        if name not in out:
            s = synth.scaled(synth.SHAPES[name], ARCHS[name], tiny=True)
            p = tmp_path_factory.mktemp("synth") / f"{name}.gguf"
            synth.write(s, p, _vocab(s), seed=1)
            out[name] = p
        return out[name]

    return get


# llama runs in the quick set; each other architecture compiles its own programs (10-40 s here)
@pytest.mark.oracle
@pytest.mark.parametrize("name", [n if n == "llama-3.2-1b" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ARCHS])
def test_tiny_model_runs_in_llama_cpp_and_jllama(tiny, name):
    from llamacpp_oracle import llama_cpp_module

    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams

    path = tiny(name)
    ref = llama_cpp_module().Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=1)
    ids = ref.tokenize(b"The capital of France is")
    want = []
    for tok in ref.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        want.append(tok)
        if len(want) == 6:
            break
    llm = Llama(str(path), ctx_size=64)
    assert llm.tokenize("The capital of France is") == ids  # the real tokenizer, both sides
    got = llm.complete(ids, 6, SamplingParams.greedy()).tokens
    assert got == want


@pytest.mark.oracle
@pytest.mark.parametrize("name,ftype", [
    ("llama-3.2-1b", "q4_k_m"), ("llama-3.2-1b", "q4_0"), ("llama-3.2-1b", "q8_0"),
    pytest.param("qwen3-30b-a3b", "q4_k_m", marks=pytest.mark.slow),  # 3-D expert tensors
])
def test_quantize_is_byte_identical_to_llama_cpp(tiny, tmp_path, name, ftype):
    from llamacpp_oracle import llama_cpp_module

    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file
    from jllama.quant.testing import llama_cpp_quantize

    llama_cpp_module()  # the oracle, or a skip off CI / a failure in CI
    src = tiny(name)
    quantize_file(src, tmp_path / "ours.gguf", mix_from_base(ftype))
    llama_cpp_quantize(src, tmp_path / "ref.gguf", ftype)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_cli(tmp_path, capsys):
    from jllama.cli.main import main

    assert main(["synth", "list"]) == 0
    assert "deepseek-v2-lite" in capsys.readouterr().out
    assert main(["synth", "llama-9b", str(tmp_path / "x.gguf")]) == 1
    assert "unknown model shape" in capsys.readouterr().err
    assert main(["synth", "deepseek-v2-lite", str(tmp_path / "x.gguf"), "--layers", "2"]) == 1
    out = tmp_path / "q.gguf"
    vocab = testdata.vocab("llama-bpe").parent
    assert main(["synth", "llama-3.2-1b", str(out), "--tiny", "--layers", "1", "--type", "q8_0",
                 "--vocab", str(vocab)]) == 0
    from jllama.gguf.reader import read_gguf

    g = read_gguf(out)
    assert g.metadata["general.file_type"] == 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
    assert g.tensors["blk.0.ffn_up.weight"].type_name == "Q8_0"
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 128256
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]  # the F16 intermediate is gone


# ------------------------------------------------------------------------ --random-blocks
@pytest.mark.parametrize("qtype", [t.name for t in __import__(
    "jllama.quant.randblocks", fromlist=["x"]).RANDOM_BLOCK_TYPES])
def test_random_block_scales_are_the_scale_fields(qtype):
    """gguf-py's dequantizer (not ours; ggml's own for types gguf-py cannot decode) reads
    finite, small values from random blocks, and one binade more in the fields set as scales
    doubles every value exactly: they are the scales."""
    import gguf
    import gguf.quants
    import numpy as np
    from llamacpp_oracle import ggml_to_float

    from jllama.gguf.constants import QType, qtype_info
    from jllama.quant.randblocks import fix_scales, random_blocks

    t = QType[qtype]

    def dequantize(b):
        try:
            return gguf.quants.dequantize(b.reshape(-1), gguf.GGMLQuantizationType(int(t)))
        except (ValueError, NotImplementedError):  # a type newer than this gguf-py
            return ggml_to_float(b.reshape(1, -1), int(t), b.shape[0] * qtype_info(t).block_size)

    b = random_blocks(t, 256, np.random.default_rng(0))
    v = dequantize(b)
    assert np.isfinite(v).all() and 0.005 < v.std() < 0.2 and np.abs(v).max() < 1
    v2 = dequantize(fix_scales(b.copy(), t, 1))
    assert np.array_equal(v2, 2 * v)


def test_random_blocks_cover_the_mixes():
    """Every tensor type a legacy or K-quant mix can choose (fallbacks included) has a layout."""
    from jllama.quant.mixes import FTYPES
    from jllama.quant.randblocks import RANDOM_BLOCK_TYPES

    for name, (_, t) in FTYPES.items():
        if name[0] == "Q" or name.startswith("IQ4"):
            assert t in RANDOM_BLOCK_TYPES, name
    names = {t.name for t in RANDOM_BLOCK_TYPES}
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
            "Q6_K"} <= names


# smollm2-135m at full width: rows of 576 and 1536 are no multiple of 256, so K-quant mixes
# fall back to 32-blocks (Q5_0, Q8_0, ...) as llama-quantize does. NAME:starcoder takes
# StarCoder's 49152-token vocabulary: quantizing a 128256- or 262144-row embedding in the
# reference path would take most of the test's time and decides nothing a smaller one does not
RANDOM = [("llama-3.2-1b:starcoder", True, "q4_k_m"), ("gemma-3-270m:starcoder", True, "q4_k_m"),
          ("smollm2-135m", True, "q4_0"), ("smollm2-135m", True, "q8_0"),
          ("smollm2-135m", False, "q4_k_m"), ("smollm2-135m", False, "q4_1")]


def _shape(name, tiny, layers=2):
    name, _, vocab = name.partition(":")
    s = synth.scaled(synth.SHAPES[name], layers, tiny=tiny)
    return replace(s, vocab=vocab, n_vocab=49152) if vocab else s


@pytest.mark.parametrize("name,tiny,ftype", RANDOM)
def test_random_blocks_header_is_quantizes(tmp_path, name, tiny, ftype):
    """The --random-blocks file's header (metadata, tensor order, types, offsets) is byte for
    byte the one 'jllama quantize' writes for the F16 file of the same shape."""
    from jllama.gguf.reader import read_gguf
    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file

    s = _shape(name, tiny)
    vocab = _vocab(s)
    synth.write(s, tmp_path / "f16.gguf", vocab, seed=1)
    quantize_file(tmp_path / "f16.gguf", tmp_path / "q.gguf", mix_from_base(ftype))
    size = synth.write_random_blocks(s, tmp_path / "r.gguf", vocab, ftype, seed=1, threads=2)
    q, r = read_gguf(tmp_path / "q.gguf"), read_gguf(tmp_path / "r.gguf")
    assert [(n, t.type_name) for n, t in r.tensors.items()] == \
        [(n, t.type_name) for n, t in q.tensors.items()]
    assert size == (tmp_path / "q.gguf").stat().st_size
    with open(tmp_path / "q.gguf", "rb") as fq, open(tmp_path / "r.gguf", "rb") as fr:
        assert fq.read(q.data_offset) == fr.read(r.data_offset)
    if name == "smollm2-135m" and not tiny and ftype == "q4_k_m":
        assert {"Q5_0", "Q8_0"} <= {t.type_name for t in r.tensors.values()}  # fallbacks


def test_random_blocks_are_reproducible_and_random(tmp_path):
    s = _shape("llama-3.2-1b", True, 1)
    vocab = _vocab(s)
    a = synth.write_random_blocks(s, tmp_path / "a.gguf", vocab, "q4_0", seed=3, threads=1)
    b = synth.write_random_blocks(s, tmp_path / "b.gguf", vocab, "q4_0", seed=3, threads=2)
    assert a == b
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    from jllama.gguf.reader import read_gguf

    g = read_gguf(tmp_path / "a.gguf")
    raw = g.tensors["blk.0.ffn_up.weight"].data
    assert len(set(raw.tobytes()[:4096])) > 200  # random codes, not zeros


def _finite_logits_both(path, text="The capital of France is"):
    import numpy as np
    from llamacpp_oracle import llama_cpp_logits, llama_cpp_module

    from jllama.api import Llama

    llama_cpp_module()  # the oracle, or a skip off CI / a failure in CI
    llm = Llama(str(path), ctx_size=64)
    ids = llm.tokenize(text)
    ours = np.asarray(llm.logits(ids))
    ref = llama_cpp_logits(path, ids)
    assert ours.shape[-1] == ref.shape[-1]
    assert np.isfinite(ours).all() and np.isfinite(ref).all()
    # the same model in both engines (a block misread by one would give other logits); not
    # bit-identical with these settings (llama.cpp on one thread, jllama's defaults)
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert rel < 0.05, rel
    return ours, ref


@pytest.mark.oracle
def test_random_blocks_run_in_jllama_and_llama_cpp(tmp_path):
    s = _shape("llama-3.2-1b", True)
    p = tmp_path / "r.gguf"
    synth.write_random_blocks(s, p, _vocab(s), "q4_k_m", seed=1)
    _finite_logits_both(p)


@pytest.mark.oracle
@pytest.mark.slow  # a few seconds of compiling per file type
@pytest.mark.parametrize("ftype", ["q2_k", "q3_k_m", "q5_k_m", "q6_k", "q5_1", "iq4_xs",
                                   "iq2_xxs", "iq1_m", "tq1_0", "bf16"])
def test_random_blocks_of_other_file_types_run(tmp_path, ftype):
    """Any 'jllama quantize' file type (IQ types without an importance matrix too): every tensor
    type its mix picks has a random-block layout both engines read the same way."""
    s = _shape("smollm2-135m", True, 1)
    p = tmp_path / "r.gguf"
    synth.write_random_blocks(s, p, _vocab(s), ftype, seed=1)
    _finite_logits_both(p)


@pytest.mark.oracle
@pytest.mark.slow  # a gemma3 model compiles its own programs
def test_gemma_with_a_padded_llama_vocabulary(tmp_path):
    """The GPU machine has no registry: gemma shapes must work with a llama.cpp test vocabulary
    (llama-bpe, 128256 tokens padded to 262144) in jllama and llama.cpp."""
    s = _shape("gemma-3-270m", True)
    p = tmp_path / "g.gguf"
    synth.write_random_blocks(s, p, testdata.vocab("llama-bpe"), "q4_k_m", seed=1)
    _finite_logits_both(p)


def test_cli_random_blocks(tmp_path, capsys):
    from jllama.cli.main import main
    from jllama.gguf.reader import read_gguf

    vocab = str(testdata.vocab("starcoder").parent)
    out = tmp_path / "r.gguf"
    assert main(["synth", "smollm2-135m", str(out), "--tiny", "--layers", "1", "--type",
                 "q4_1", "--random-blocks", "--vocab", vocab]) == 0
    g = read_gguf(out)
    assert g.metadata["general.file_type"] == 3  # LLAMA_FTYPE_MOSTLY_Q4_1
    assert g.tensors["blk.0.ffn_up.weight"].type_name == "Q4_1"
    capsys.readouterr()
    assert main(["synth", "smollm2-135m", str(out), "--type", "q4_9", "--random-blocks",
                 "--vocab", vocab]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown mix base 'q4_9'" in err and len(err.splitlines()) == 1
    assert main(["synth", "smollm2-135m", str(out), "--type", "q4_1", "--vocab", vocab]) == 1
    assert "--random-blocks" in capsys.readouterr().err
    assert main(["synth", "list"]) == 0
    listed = capsys.readouterr().out
    assert "smollm2-135m" in listed and "gemma-3-270m" in listed
