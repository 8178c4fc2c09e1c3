"""``jllama quantize``: llama-quantize's command line on top of quantize_file."""

from __future__ import annotations

import filecmp

import pytest

from jllama.cli.main import main
from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.testing import llama_cpp_quantize, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_llama(p, n_layer=4)
    return p


def _types(path) -> dict[str, str]:
    return {n: t.type_name for n, t in read_gguf(path).tensors.items()}


def test_quantize_with_flags_equals_llama_cpp(tiny, tmp_path, capsys) -> None:
    pytest.importorskip("llama_cpp")
    out, ref = tmp_path / "out.gguf", tmp_path / "ref.gguf"
    rc = main(
        [
            "quantize", str(tiny), str(out), "q4_k_m",
            "--token-embedding-type", "q8_0", "--output-tensor-type", "q5_k",
            "--tensor-type", "attn_k=q4_0", "--tensor-type", r"blk\.1\.=q6_k",
        ]
    )  # fmt: skip
    assert rc == 0
    llama_cpp_quantize(
        tiny,
        ref,
        "Q4_K_M",
        token_embedding_type=QType.Q8_0,
        output_tensor_type=QType.Q5_K,
        overrides=[("attn_k", QType.Q4_0), (r"blk\.1\.", QType.Q6_K)],
    )
    assert filecmp.cmp(out, ref, shallow=False)
    text = capsys.readouterr().out
    assert "blk.0.ffn_down.weight" in text and "F32 -> Q6_K" in text
    assert "quant size:" in text and "BPW" in text and f"{out.stat().st_size:,} bytes" in text


def test_pure_and_config(tiny, tmp_path) -> None:
    out = tmp_path / "pure.gguf"
    assert main(["quantize", str(tiny), str(out), "q3_k_m", "--pure", "--quiet"]) == 0
    assert set(_types(out).values()) == {"Q3_K", "F32"}
    mix = tmp_path / "mix.yaml"
    mix.write_text("base: q4_0\nrules:\n  - {match: ffn_down, type: q8_0}\n")
    out2 = tmp_path / "mix.gguf"
    assert main(["quantize", str(tiny), str(out2), "--config", str(mix), "--quiet"]) == 0
    t = _types(out2)
    assert t["blk.2.ffn_down.weight"] == "Q8_0" and t["blk.2.ffn_up.weight"] == "Q4_0"
    assert read_gguf(out2).metadata["general.file_type"] == 2  # LLAMA_FTYPE_MOSTLY_Q4_0


def test_requantize_needs_the_flag(tiny, tmp_path, capsys) -> None:
    q = tmp_path / "q.gguf"
    assert main(["quantize", str(tiny), str(q), "q4_0", "--quiet"]) == 0
    out = tmp_path / "re.gguf"
    assert main(["quantize", str(q), str(out), "q8_0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "requantizing from type Q6_K is disabled (output.weight)" in err  # llama.cpp order
    assert "--allow-requantize" in err
    assert not out.exists()
    args = ["quantize", str(q), str(out), "q8_0", "--quiet", "--allow-requantize"]
    assert main(args) == 0
    assert "Q8_0" in _types(out).values()


def test_bad_input_is_one_line_error(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(tiny), str(out), "q4_k_xl"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown mix base 'q4_k_xl'" in err and "q4_k_m" in err
    assert main(["quantize", str(tiny), str(out), "q4_0", "--tensor-type", "attn_v=q5"]) == 1
    assert "unknown type" in capsys.readouterr().err
    assert main(["quantize", str(tiny), str(tmp_path / "no" / "x.gguf"), "q4_0"]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert not out.exists()


def test_regex_matching_nothing_warns(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "x.gguf"
    rc = main(["quantize", str(tiny), str(out), "q4_0", "--quiet", "--tensor-type", "nope=q8_0"])
    assert rc == 0
    assert "warning: --tensor-type 'nope' matches no quantized tensor" in capsys.readouterr().err


def test_size_summary_equals_llama_quantize_log(tiny, tmp_path, capfd) -> None:
    """'model size' / 'quant size' lines: the same MiB and BPW llama.cpp prints."""
    import logging
    import re

    pytest.importorskip("llama_cpp")
    # llama-cpp-python drops llama.cpp's log once any Llama(verbose=False) ran: re-enable it
    lg = logging.getLogger("llama-cpp-python")
    level = lg.level
    lg.setLevel(logging.DEBUG)
    try:
        capfd.readouterr()
        llama_cpp_quantize(tiny, tmp_path / "ref.gguf", "Q3_K_M")
        log = capfd.readouterr().err
    finally:
        lg.setLevel(level)
    assert main(["quantize", str(tiny), str(tmp_path / "o.gguf"), "q3_k_m", "--quiet"]) == 0
    ours = capfd.readouterr().out
    for what in ("model size", "quant size"):
        ref = re.search(what + r"\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)", log)
        got = re.search(what + r":\s*([\d.]+) MiB \(([\d.]+) BPW\)", ours)
        assert ref and got and ref.groups() == got.groups(), (what, log[-500:], ours)


@pytest.mark.parametrize("ftype", ["iq2_xxs", "iq1_s", "iq2_m", "iq3_xxs"])
def test_low_bit_types_without_imatrix_are_refused_like_llama_quantize(
    tiny, tmp_path, capsys, ftype
) -> None:
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(tiny), str(out), ftype, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "requires an importance matrix" in err
    assert "blk.0.attn_k.weight" in err  # the first offending tensor, as llama.cpp names it
    assert not out.exists()
    with pytest.raises(RuntimeError):  # llama.cpp refuses the same request
        llama_cpp_quantize(tiny, tmp_path / "ref.gguf", ftype)


def test_nvfp4_bare_type_and_tensor_type(tiny, tmp_path, capsys) -> None:
    """``nvfp4``: every quantizable tensor NVFP4, file type 39; ``--tensor-type R=nvfp4``
    beside a mix; rows that are no multiple of 64 stop it with one line (llama.cpp throws)."""
    out = tmp_path / "nv.gguf"
    assert main(["quantize", str(tiny), str(out), "nvfp4", "--quiet"]) == 0
    assert set(_types(out).values()) == {"NVFP4", "F32"}
    assert read_gguf(out).metadata["general.file_type"] == 39  # LLAMA_FTYPE_MOSTLY_NVFP4
    out2 = tmp_path / "mix.gguf"
    args = ["quantize", str(tiny), str(out2), "q8_0", "--tensor-type", "ffn_up=nvfp4", "--quiet"]
    assert main(args) == 0
    t = _types(out2)
    assert t["blk.1.ffn_up.weight"] == "NVFP4" and t["blk.1.ffn_down.weight"] == "Q8_0"
    odd = tmp_path / "ff96.gguf"
    tiny_llama(odd, n_layer=1, n_ff=96)
    capsys.readouterr()
    assert main(["quantize", str(odd), str(tmp_path / "x.gguf"), "nvfp4", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no fallback type for NVFP4 with rows of 96" in err
    assert not (tmp_path / "x.gguf").exists()
