"""`quantize_file` writes what llama-quantize writes (compared byte for byte with the oracle's
``llama_model_quantize`` on the same input), and llama.cpp loads and runs the result."""

from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_logits

from jllama.errors import JllamaError, QuantError
from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.mixes import FTYPES, MixSpec, mix_from_base, mix_from_dict
from jllama.quant.quantize import quantize_file, quantize_tensor
from jllama.quant.testing import llama_cpp_quantize, tiny_llama

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_llama(p)
    return p


def _assert_same_file(ours, ref) -> None:
    a, b = read_gguf(ours), read_gguf(ref)
    assert abs(a.file_size - b.file_size) <= 0.001 * b.file_size
    assert {n: t.type_name for n, t in a.tensors.items()} == {
        n: t.type_name for n, t in b.tensors.items()
    }
    assert a.metadata == b.metadata
    differ = [n for n in b.tensors if not np.array_equal(a.tensors[n].data, b.tensors[n].data)]
    assert differ == []
    assert filecmp.cmp(ours, ref, shallow=False)


@pytest.fixture(scope="module")
def smollm2_q4_k_m(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "smollm2-q4_k_m.gguf"
    rep = quantize_file(smollm2_path, out, mix_from_base("q4_k_m"), allow_requantize=True)
    assert rep.file_size == os.path.getsize(out)
    return out


def test_smollm2_q4_k_m_file_identical_to_llama_cpp(smollm2_path, smollm2_q4_k_m, tmp_path):
    ref = tmp_path / "ref.gguf"
    llama_cpp_quantize(smollm2_path, ref, "Q4_K_M")
    _assert_same_file(smollm2_q4_k_m, ref)
    # the figures measured with llama-quantize (shared/reference/llama-cpp-cpu.md)
    assert os.path.getsize(smollm2_q4_k_m) == 105_454_144


@pytest.mark.parametrize(
    "ftype",
    [
        "Q2_K",
        "Q6_K",
        pytest.param("Q8_0", marks=pytest.mark.slow),
        pytest.param("Q4_0", marks=pytest.mark.slow),
    ],
)
def test_smollm2_requantized_file_identical_to_llama_cpp(smollm2_path, tmp_path, ftype) -> None:
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    rep = quantize_file(smollm2_path, ours, mix_from_base(ftype), allow_requantize=True)
    llama_cpp_quantize(smollm2_path, ref, ftype)
    _assert_same_file(ours, ref)
    assert rep.file_size == os.path.getsize(ref)
    assert rep.ftype == ftype and read_gguf(ours).metadata["general.file_type"] == FTYPES[ftype][0]


# Every file type's map and every type's bytes are tested in test_mixes / test_quant_formats;
# whole files for a representative set by default, the rest marked slow.
_NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XS", "IQ3_XXS", "Q2_K_S"}
# The lattice file types cost 10-20 s each here (ggml builds its grids' tables, our searches are
# numpy): two whole files stand for them (IQ2_M mixes IQ2_S/IQ3_S/IQ4_XS..., IQ1_S), the others'
# tensor maps are llama.cpp's in test_mixes_iq and every type's bytes ggml's in test_quant_iq.
_LATTICE_MAPS_ONLY = {"IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"}
_FILE_DEFAULT = {"Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "Q8_0", "IQ4_XS"}


@pytest.mark.parametrize(
    "ftype",
    [
        f if f in _FILE_DEFAULT else pytest.param(f, marks=pytest.mark.slow)
        for f in sorted(set(FTYPES) - {"F32", "NVFP4"} - _LATTICE_MAPS_ONLY)
    ],
)
def test_tiny_model_file_identical_to_llama_cpp(tiny, tmp_path, ftype) -> None:
    from jllama.quant.imatrix import QuantImatrix, quantize_metadata

    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    qi = kv = None
    if ftype in _NEEDS_IMATRIX:  # llama-quantize refuses these without one: a random one here
        rng = np.random.default_rng(7)
        weights = {
            n: rng.lognormal(0.0, 1.0, t.shape[-1]).astype(np.float32)
            for n, t in read_gguf(tiny).tensors.items()
            if len(t.shape) >= 2
        }
        qi = QuantImatrix(weights, "im.gguf", ["random"], 1, len(weights))
        kv = [(k, v) for k, v, _ in quantize_metadata(qi)]
    quantize_file(tiny, ours, mix_from_base(ftype), imatrix=qi)
    llama_cpp_quantize(
        tiny, ref, ftype, allow_requantize=False, imatrix=qi and qi.weights, kv_overrides=kv
    )
    _assert_same_file(ours, ref)


def test_nvfp4_file_is_llama_cpps_but_for_its_file_type(tiny, tmp_path) -> None:
    """The bare type nvfp4 (every quantizable tensor NVFP4) writes llama.cpp's file for
    ``--pure --tensor-type .=nvfp4 Q8_0``, byte for byte except general.file_type: 39
    (LLAMA_FTYPE_MOSTLY_NVFP4, which llama.cpp's loader names) where llama.cpp must record its
    base type, its quantize refusing file type 39 itself (test below)."""
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    rep = quantize_file(tiny, ours, mix_from_base("nvfp4"))
    assert rep.ftype == "NVFP4"
    g = read_gguf(ours)
    assert {t.type_name for t in g.tensors.values()} == {"NVFP4", "F32"}
    assert g.tensors["token_embd.weight"].type_name == "NVFP4"
    assert g.tensors["output.weight"].type_name == "NVFP4"
    llama_cpp_quantize(tiny, ref, "Q8_0", allow_requantize=False, pure=True,
                       overrides=[(".", QType.NVFP4)])  # fmt: skip
    raw = bytearray(ref.read_bytes())
    key = b"general.file_type"
    at = raw.index(key) + len(key)  # then the value type (UINT32 = 4) and the value
    assert raw[at : at + 8] == (4).to_bytes(4, "little") + (7).to_bytes(4, "little")
    raw[at + 4 : at + 8] = (39).to_bytes(4, "little")
    assert ours.read_bytes() == bytes(raw)


def test_nvfp4_refusals_like_llama_cpp(tmp_path) -> None:
    """llama.cpp has no NVFP4 mix (file type 39 is refused) and no fallback type for NVFP4:
    a row that is no multiple of 64 stops the quantization. Both refuse where we do."""
    src = tmp_path / "ff96.gguf"
    tiny_llama(src, n_layer=2, n_ff=96)  # ffn_down rows of 96: 32-blocks fit, 64-blocks not
    with pytest.raises(QuantError, match="no NVFP4 mix"):
        quantize_file(src, tmp_path / "a.gguf", MixSpec(ftype="NVFP4"))
    with pytest.raises(RuntimeError):
        llama_cpp_quantize(src, tmp_path / "ra.gguf", "NVFP4")
    mix = mix_from_dict({"base": "q8_0", "rules": [{"match": "ffn_down", "type": "nvfp4"}]})
    with pytest.raises(QuantError, match="no fallback type for NVFP4 with rows of 96"):
        quantize_file(src, tmp_path / "b.gguf", mix)
    with pytest.raises(RuntimeError):
        llama_cpp_quantize(src, tmp_path / "rb.gguf", "Q8_0", overrides=[("ffn_down", QType.NVFP4)])
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
    # where the rows fit, the same rule gives llama.cpp's file
    ok = mix_from_dict({"base": "q8_0", "rules": [{"match": "attn_(q|v)", "type": "nvfp4"}]})
    quantize_file(src, tmp_path / "c.gguf", ok)
    llama_cpp_quantize(src, tmp_path / "rc.gguf", "Q8_0", overrides=[("attn_(q|v)", QType.NVFP4)])
    assert read_gguf(tmp_path / "c.gguf").tensors["blk.1.attn_v.weight"].type_name == "NVFP4"
    _assert_same_file(tmp_path / "c.gguf", tmp_path / "rc.gguf")


def test_llama_cpp_runs_our_files(tiny, tmp_path) -> None:
    """llama.cpp loads and runs what we wrote (the bytes are llama.cpp's own, tested above);
    the logits drift from the F32 model's in order of bits."""
    tokens = [1, 300, 301, 17, 302, 303, 42, 304]
    f32 = llama_cpp_logits(tiny, tokens)
    rel = {}
    for ftype in ("Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K"):
        ours = tmp_path / f"ours-{ftype}.gguf"
        quantize_file(tiny, ours, mix_from_base(ftype))
        got = llama_cpp_logits(ours, tokens)
        assert np.isfinite(got).all()
        rel[ftype] = float(np.linalg.norm(got - f32) / np.linalg.norm(f32))
    assert rel["Q8_0"] < 0.05 and rel["Q8_0"] < rel["Q4_K_M"] < rel["Q2_K"] < 1.0, rel


@pytest.mark.slow
def test_llama_cpp_runs_requantized_smollm2(smollm2_path, smollm2_q4_k_m) -> None:
    out = smollm2_q4_k_m
    tokens = [1, 504, 3458, 314, 260, 1345, 28]
    src = llama_cpp_logits(smollm2_path, tokens)
    got = llama_cpp_logits(out, tokens)
    assert np.isfinite(got).all()
    # same next-token choice on most positions as the Q4_1 original
    assert (got.argmax(-1) == src.argmax(-1)).mean() >= 0.7


def test_requantize_is_refused_like_llama_cpp(smollm2_path, tmp_path) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(QuantError, match="requantizing from type Q4_1 is disabled"):
        quantize_file(smollm2_path, out, mix_from_base("q4_k_m"))
    with pytest.raises(RuntimeError):  # the oracle refuses too
        llama_cpp_quantize(smollm2_path, tmp_path / "ref.gguf", "Q4_K_M", allow_requantize=False)
    assert not out.exists()


def test_read_only_output_directory_leaves_no_file(tiny, tmp_path, monkeypatch) -> None:
    import errno
    import stat
    import tempfile

    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root ignores permission bits: fail the create as the kernel would

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(JllamaError, match="Permission denied"):
            quantize_file(tiny, d / "out.gguf", mix_from_base("q4_0"))
        assert list(d.iterdir()) == []
    finally:
        d.chmod(stat.S_IRWXU)


def test_quantize_tensor_api(smollm2_path) -> None:
    t = read_gguf(smollm2_path).tensors["blk.0.ffn_down.weight"]
    same = quantize_tensor(t.data, t.qtype, t.qtype, t.shape)
    assert np.array_equal(same.reshape(-1), np.asarray(t.data).reshape(-1))
    q = quantize_tensor(t.data, t.qtype, QType.Q4_K, t.shape)
    assert q.shape == (576, 1536 // 256 * 144) and q.dtype == np.uint8
    from jllama.quant.formats import dequantize_np
    from jllama.quant.quantizers import quantize_np

    x = dequantize_np(np.asarray(t.data).reshape(576, -1), t.qtype, 1536)
    assert np.array_equal(quantize_tensor(x, QType.F32, QType.Q4_K, t.shape), q)
    with pytest.raises(QuantError, match="bytes per row"):
        quantize_tensor(np.zeros((576, 10), np.uint8), t.qtype, QType.Q8_0, t.shape)
    assert np.array_equal(quantize_np(x, QType.Q4_K), q)


def test_quantize_on_load_gives_the_file_bytes(tiny, tmp_path) -> None:
    from jllama.quant.quantize import quantize_on_load

    out = tmp_path / "q.gguf"
    mix = {"base": "q4_k_m", "rules": [{"match": "attn_v", "type": "q8_0"}]}
    quantize_file(tiny, out, mix_from_dict(dict(mix)))
    q = read_gguf(out)
    transform = quantize_on_load(read_gguf(tiny), mix)
    for name, t in read_gguf(tiny).tensors.items():
        raw, qtype = transform(name, t.data, t.qtype, t.shape)
        assert qtype == q.tensors[name].qtype, name
        assert np.array_equal(np.asarray(raw).reshape(-1), np.asarray(q.tensors[name].data)), name


def test_quantize_on_load_requantize_switch(smollm2_path) -> None:
    from jllama.quant.quantize import quantize_on_load

    g = read_gguf(smollm2_path)
    with pytest.raises(QuantError, match="allow_requantize"):
        quantize_on_load(g, {"base": "q8_0", "allow_requantize": False})
    transform = quantize_on_load(g, "q8_0")  # asking for a mix on load allows it
    t = g.tensors["blk.3.attn_q.weight"]
    raw, qtype = transform(t.name, t.data, t.qtype, t.shape)
    assert QType(qtype) == QType.Q8_0 and raw.shape == (576, 576 // 32 * 34)


_PURE_FTYPE = {
    "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M",
    "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "NVFP4": "NVFP4",
}  # fmt: skip
_DEFAULT_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "NVFP4")


@pytest.mark.parametrize(
    "qtype",
    [t if t in _DEFAULT_TYPES else pytest.param(t, marks=pytest.mark.slow) for t in _PURE_FTYPE],
)
def test_jllama_logits_match_llama_cpp_per_type(tiny, tmp_path, qtype) -> None:
    """Every weight of the tiny model in one type (n_embd 256: K-quants apply everywhere);
    jllama and llama.cpp run the same file. They differ by llama.cpp quantizing activations to
    Q8 for its dot products (about 1-3 % of the logits' norm), not by the weights."""
    from jllama.api import Llama
    from jllama.quant.mixes import MixSpec

    path = tmp_path / f"tiny-{qtype}.gguf"
    quantize_file(tiny, path, MixSpec(ftype=_PURE_FTYPE[qtype], pure=True))
    types = {t.type_name for t in read_gguf(path).tensors.values()}
    assert types == {qtype, "F32"}
    tokens = [1, 300, 301, 17, 302, 303, 42, 304]
    ref = llama_cpp_logits(path, tokens)
    ours = np.asarray(Llama(path, ctx_size=64).logits(tokens), dtype=np.float32)
    assert ours.shape == ref.shape
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert rel < (0.005 if qtype in ("F16", "BF16") else 0.05), rel
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_run_config_quant_on_load_matches_llama_cpp(tiny, tmp_path) -> None:
    """``Llama(path, quant=...)`` (the run config's ``quant:`` section) quantizes on load to the
    bytes llama.cpp writes, so its logits track llama.cpp's on llama.cpp's own file."""
    from jllama.api import Llama

    ref_file = tmp_path / "ref.gguf"
    llama_cpp_quantize(tiny, ref_file, "Q4_K_M", overrides=[("ffn_down", QType.Q8_0)])
    tokens = [1, 305, 306, 307, 18, 308]
    ref = llama_cpp_logits(ref_file, tokens)
    mix = {"base": "q4_k_m", "rules": [{"match": "ffn_down", "type": "q8_0"}]}
    ours = np.asarray(Llama(tiny, ctx_size=64, quant=mix).logits(tokens), dtype=np.float32)
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert rel < 0.05, rel


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M", "Q2_K", "Q1_0", "Q2_0"])
def test_gemma3_requantized_file_identical_to_llama_cpp(gemma3_path, tmp_path, ftype) -> None:
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_file(gemma3_path, ours, mix_from_base(ftype), allow_requantize=True)
    llama_cpp_quantize(gemma3_path, ref, ftype)
    _assert_same_file(ours, ref)


@pytest.mark.parametrize("arch", ["llama_moe", "qwen3moe", "deepseek2"])
def test_moe_files_identical_to_llama_cpp(tmp_path, arch) -> None:
    """3-D expert tensors, routers kept F32, MLA's attn_kv_b (tiny models of test_arch_*)."""
    import tinymodels_moe as tm

    src = getattr(tm, f"write_{arch}")(tmp_path / "src.gguf")
    for ftype in ("Q4_K_M", "Q2_K"):
        ours, ref = tmp_path / f"ours-{ftype}.gguf", tmp_path / f"ref-{ftype}.gguf"
        quantize_file(src, ours, mix_from_base(ftype))
        llama_cpp_quantize(src, ref, ftype)
        _assert_same_file(ours, ref)
