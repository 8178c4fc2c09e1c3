"""Tensor -> type maps equal llama.cpp's (llama_model_quantize run on the same files), and the
user controls (overrides, pure, embedding/output types, YAML mixes) behave as llama-quantize's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from jllama.errors import QuantError
from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.mixes import (
    FTYPES,
    MixSpec,
    QuantWarning,
    load_mix,
    mix_from_base,
    parse_override,
    parse_type,
    plan_types,
)
from jllama.quant.testing import llama_cpp_quantize, tiny_llama

pytest.importorskip("llama_cpp")


def _oracle_types(src, tmp_path, ftype: str, **kw) -> dict[str, int]:
    out = tmp_path / f"oracle-{ftype}.gguf"
    llama_cpp_quantize(src, out, ftype, **kw)
    types = {n: t.qtype for n, t in read_gguf(out).tensors.items()}
    out.unlink()
    return types


def _names(types: dict[str, int]) -> dict[str, str]:
    return {n: QType(t).name for n, t in types.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """n_embd 256 (every K-quant applies), GQA 4, 8 layers, separate output matrix."""
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_llama(p)
    return p


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    """No GQA, tied embeddings, 16 layers: the other branches of the rules."""
    p = tmp_path_factory.mktemp("tiny") / "tiny-tied.gguf"
    tiny_llama(p, n_layer=16, n_head=4, n_head_kv=4, tied=True, seed=1)
    return p


# The 1-3 bit file types need an imatrix in llama.cpp: test_mixes_iq.py compares their maps.
_LOW_BIT = {"Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
            "IQ3_M", "TQ1_0", "TQ2_0", "MXFP4_MOE"}  # fmt: skip


# NVFP4: no mix in llama.cpp (it refuses the file type); the bare type's file: test_quantize.py
@pytest.mark.parametrize("ftype", sorted(set(FTYPES) - {"F32", "NVFP4"} - _LOW_BIT))
def test_every_ftype_matches_llama_cpp_on_tiny_model(tiny, tmp_path, ftype: str) -> None:
    ours = plan_types(read_gguf(tiny), ftype)
    assert _names(ours) == _names(_oracle_types(tiny, tmp_path, ftype))


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "IQ4_XS"])
def test_tied_no_gqa_model_matches_llama_cpp(tiny_tied, tmp_path, ftype: str) -> None:
    ours = plan_types(read_gguf(tiny_tied), ftype)
    assert _names(ours) == _names(_oracle_types(tiny_tied, tmp_path, ftype))


@pytest.mark.parametrize("ftype", ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q2_K"])
def test_smollm2_maps_match_llama_cpp(smollm2_path, tmp_path, ftype: str) -> None:
    """The acceptance file types on the real model (rows of 576: the fallbacks)."""
    ours = plan_types(read_gguf(smollm2_path), ftype)
    assert _names(ours) == _names(_oracle_types(smollm2_path, tmp_path, ftype))


def test_smollm2_q4_k_m_counts_match_reference_table(smollm2_path) -> None:
    # /work/shared/reference/llama-cpp-cpu.md, measured with llama-quantize itself
    counts = Counter(QType(t).name for t in plan_types(read_gguf(smollm2_path), "q4_k_m").values())
    assert counts == {"Q4_K": 16, "Q6_K": 14, "Q5_0": 166, "Q8_0": 15, "F32": 61}


def test_gemma3_map_matches_llama_cpp(gemma3_path, tmp_path) -> None:
    ours = plan_types(read_gguf(gemma3_path), "Q4_K_M")
    assert _names(ours) == _names(_oracle_types(gemma3_path, tmp_path, "Q4_K_M"))


def test_user_controls_match_llama_cpp(tiny, tmp_path) -> None:
    overrides = [("attn_v", QType.Q8_0), (r"blk\.[0-3]\.ffn_(up|gate)", QType.Q5_1)]
    spec = MixSpec(
        ftype="Q4_K_M",
        token_embedding_type=QType.Q4_0,
        output_tensor_type=QType.Q5_K,
        overrides=overrides,
    )
    ours = plan_types(read_gguf(tiny), spec)
    want = _oracle_types(
        tiny,
        tmp_path,
        "Q4_K_M",
        token_embedding_type=QType.Q4_0,
        output_tensor_type=QType.Q5_K,
        overrides=overrides,
    )
    assert _names(ours) == _names(want)
    assert QType(ours["blk.2.ffn_up.weight"]) == QType.Q5_1
    assert QType(ours["blk.5.attn_v.weight"]) == QType.Q8_0


def test_pure_matches_llama_cpp(tiny, tmp_path) -> None:
    ours = plan_types(read_gguf(tiny), MixSpec(ftype="Q3_K_M", pure=True))
    assert _names(ours) == _names(_oracle_types(tiny, tmp_path, "Q3_K_M", pure=True))
    assert set(_names(ours).values()) == {"Q3_K", "F32"}


def test_yaml_mix_equals_the_same_flags(tiny, tmp_path) -> None:
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        "base: q4_k_m\n"
        "token_embedding_type: q8_0\n"
        "rules:\n"
        "  - {match: 'blk\\.0\\.', type: q8_0}\n"
        "  - {match: ffn_down, type: q6_k}\n"
    )
    spec = load_mix(mix)
    assert spec.ftype == "Q4_K_M" and spec.token_embedding_type == QType.Q8_0
    assert spec.overrides == [(r"blk\.0\.", QType.Q8_0), ("ffn_down", QType.Q6_K)]
    ours = plan_types(read_gguf(tiny), spec)
    want = _oracle_types(
        tiny, tmp_path, "Q4_K_M", token_embedding_type=QType.Q8_0, overrides=spec.overrides
    )
    assert _names(ours) == _names(want)
    assert QType(ours["blk.0.ffn_down.weight"]) == QType.Q8_0  # first match wins


def test_bare_type_base_means_pure() -> None:
    spec = mix_from_base("q4_k")
    assert spec.pure and spec.ftype == "Q4_K_M"
    assert not mix_from_base("q6_k").pure  # also a file type: the Q6_K mix


def test_unknown_type_names_list_the_known_ones(tmp_path) -> None:
    with pytest.raises(QuantError, match="unknown type 'q9_k'.*q4_0.*q6_k"):
        parse_type("q9_k")
    with pytest.raises(QuantError, match="q4_k_m"):
        mix_from_base("q4_k_x")
    with pytest.raises(QuantError, match="known types"):
        parse_override("attn_v=q3")
    with pytest.raises(QuantError, match="REGEX=TYPE"):
        parse_override("attn_v")
    with pytest.raises(QuantError, match="bad tensor regex"):
        parse_override("attn_v(=q8_0")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: q4_k_m\nrules:\n  - {match: x, type: int4}\n")
    with pytest.raises(QuantError, match="rule 1.*known types"):
        load_mix(bad)
    bad.write_text("base: q4_k_m\nrule: []\n")
    with pytest.raises(QuantError, match="unknown keys"):
        load_mix(bad)


def test_regex_matching_nothing_warns(tiny) -> None:
    spec = MixSpec(ftype="Q4_0", overrides=[("no_such_tensor", QType.Q8_0), ("attn_k", QType.Q8_0)])
    with pytest.warns(QuantWarning, match="'no_such_tensor' matches no"):
        types = plan_types(read_gguf(tiny), spec)
    assert QType(types["blk.1.attn_k.weight"]) == QType.Q8_0


def test_embedding_type_that_does_not_fit_is_refused(smollm2_path) -> None:
    spec = MixSpec(ftype="Q4_0", token_embedding_type=QType.Q4_K)
    with pytest.raises(QuantError, match="rows of 576 cannot be Q4_K"):
        plan_types(read_gguf(smollm2_path), spec)


@pytest.mark.parametrize(
    "config",
    sorted((Path(__file__).parents[1] / "configs" / "quant").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_example_mixes_match_llama_cpp(tiny, tmp_path, config) -> None:
    spec = load_mix(config)
    ours = plan_types(read_gguf(tiny), spec)
    want = _oracle_types(
        tiny,
        tmp_path,
        spec.ftype,
        pure=spec.pure,
        token_embedding_type=spec.token_embedding_type,
        output_tensor_type=spec.output_tensor_type,
        overrides=spec.overrides,
    )
    assert _names(ours) == _names(want)
