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
    assert err.count("\n") == 0 and "invalid ftype 'q4_k_xl'" in err and "q4_k_m" in err
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


# ---------------------------------------------------------------- llama-quantize's command line


@pytest.fixture(scope="module")
def oracle():
    from llamacpp_oracle import llama_cpp_module

    return llama_cpp_module()


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jllama quantize: error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize(
    ("form", "default_name", "ftype"),
    [
        (["q4_k_m", "2"], "ggml-model-Q4_K_M.gguf", "Q4_K_M"),  # IN TYPE N
        (["{out}", "Q4_K", "1"], None, "Q4_K_M"),  # llama-quantize's alias: the _M mix
        (["15"], "ggml-model-Q4_K.gguf", "Q4_K_M"),  # a llama_ftype number: its first name
        (["{out}", "7", "2"], None, "Q8_0"),
        (["q5_k"], "ggml-model-Q5_K.gguf", "Q5_K_M"),
        (["copy"], "ggml-model-COPY.gguf", "COPY"),
    ],
)
def test_positional_forms_equal_llama_cpp(oracle, tiny, tmp_path, form, default_name, ftype):
    src = tmp_path / "in.gguf"
    src.write_bytes(tiny.read_bytes())  # IN TYPE writes next to IN
    out = tmp_path / (default_name or "out.gguf")
    args = [a.format(out=out) for a in form]
    assert main(["quantize", str(src), *args, "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.gguf", out.name])
    ref = tmp_path / "ref" / "ref.gguf"
    ref.parent.mkdir()
    llama_cpp_quantize(src, ref, ftype, allow_requantize=False)
    assert filecmp.cmp(out, ref, shallow=False)


def test_thread_counts_give_identical_files(tmp_path, monkeypatch) -> None:
    """Row chunks quantized on 1 and 2 threads (and on chunks smaller than a tensor) give the
    same file; with an imatrix too, whose weights each chunk must take from its own rows."""
    import numpy as np

    from jllama.quant import quantize as qmod
    from jllama.quant.imatrix import QuantImatrix
    from jllama.quant.mixes import mix_from_base

    tiny = tmp_path / "tiny2.gguf"
    tiny_llama(tiny, n_layer=2)
    rng = np.random.default_rng(3)
    g = read_gguf(tiny)
    qi = QuantImatrix(
        {n: rng.lognormal(0, 1, t.shape[-1]).astype(np.float32) for n, t in g.tensors.items()},
        "im.gguf", ["random"], 1, len(g.tensors),
    )  # fmt: skip
    # chunks of 100 rows (tensors of 512, 320, 256 or 64 rows): uneven splits
    monkeypatch.setattr(qmod, "_ROWS_ELEMS", 100 * 256)
    assert len(qmod._row_jobs(512, 256, 1, 2, None)) == 6
    for ftype, im in (("Q4_K_M", None), ("IQ4_XS", qi)):
        files = []
        for n in (1, 2):
            out = tmp_path / f"{ftype}-{n}.gguf"
            qmod.quantize_file(tiny, out, mix_from_base(ftype), imatrix=im, nthread=n)
            files.append(out)
        assert filecmp.cmp(files[0], files[1], shallow=False), ftype


def test_threaded_expert_tensor_takes_each_experts_weights() -> None:
    """A 3-D expert tensor cut into chunks that straddle experts: each row is quantized with
    its expert's imatrix slice, whatever the thread count."""
    import numpy as np

    from jllama.quant.quantize import quantize_tensor
    from jllama.quant.quantizers import quantize_np

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 20, 256)).astype(np.float32)
    qw = rng.lognormal(0, 1, (3, 256)).astype(np.float32)
    ref = np.concatenate([quantize_np(x[e], QType.IQ4_XS, qw[e]) for e in range(3)])
    for n in (1, 2, 4):
        got = quantize_tensor(x, QType.F32, QType.IQ4_XS, x.shape, qw, nthread=n, max_buf_size=1)
        assert np.array_equal(got, ref), n


@pytest.mark.parametrize(
    "case",
    ["leave-output", "tensor-type-file", "override-kv", "prune", "keep-split", "max-buffer"],
)
def test_flags_equal_llama_cpp(oracle, tiny, tmp_path, case) -> None:
    out, ref = tmp_path / "out.gguf", tmp_path / "ref.gguf"
    args = ["quantize", "--quiet"]
    kw: dict = {}
    if case == "leave-output":
        args += ["--leave-output-tensor", "--output-tensor-type", "q8_0"]  # the type is moot
        kw = dict(quantize_output_tensor=False, output_tensor_type=QType.Q8_0)
    elif case == "tensor-type-file":
        f = tmp_path / "types.txt"
        f.write_text("attn_k=q4_0  ffn_up=q8_0\n\nBLK\\.1\\.=q5_1\n")
        # file and flag rules keep their command-line order (first match wins)
        args += ["--tensor-type", "blk\\.2\\.ffn_up=q6_k", "--tensor-type-file", str(f)]
        kw = dict(overrides=[("blk\\.2\\.ffn_up", QType.Q6_K), ("attn_k", QType.Q4_0),
                             ("ffn_up", QType.Q8_0), ("blk\\.1\\.", QType.Q5_1)])  # fmt: skip
    elif case == "override-kv":
        args += ["--override-kv", "general.name=str:re,named", "--override-kv",
                 "llama.context_length=int:-4096", "--override-kv", "x.f=float:0.1",
                 "--override-kv", "tokenizer.ggml.add_bos_token=bool:false", "--override-kv",
                 "general.name=str:again"]  # fmt: skip
        kw = dict(kv_overrides=[("general.name", "re,named"), ("llama.context_length", -4096),
                                ("x.f", 0.1), ("tokenizer.ggml.add_bos_token", False),
                                ("general.name", "again")])  # fmt: skip
    elif case == "prune":
        args += ["--prune-layers", "2,0,2"]
        kw = dict(prune_layers=[0, 2])
    elif case == "keep-split":
        args += ["--keep-split"]
        kw = dict(keep_split=True)
    elif case == "max-buffer":
        args += ["--max-buffer-size", "1"]
        kw = dict(max_buf_size=2**20)
    assert main([*args, str(tiny), str(out), "Q4_K_M", "2"]) == 0
    if case == "keep-split":  # llama-quantize drops '.gguf' and llama_model_quantize adds this
        out, ref = tmp_path / "out-00001-of-00001.gguf", tmp_path / "ref-00001-of-00001.gguf"
        llama_cpp_quantize(tiny, tmp_path / "ref", "Q4_K_M", **kw)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, ref.name])
    else:
        llama_cpp_quantize(tiny, ref, "Q4_K_M", **kw)
    assert filecmp.cmp(out, ref, shallow=False)
    md = read_gguf(out).metadata
    if case == "prune":
        assert md["llama.block_count"] == 2 and "blk.1.attn_q.weight" in read_gguf(out).tensors
        assert "blk.2.attn_q.weight" not in read_gguf(out).tensors
    if case == "override-kv":
        assert md["general.name"] == "again" and md["llama.context_length"] == 4096


def test_prune_with_imatrix_uses_the_original_names(oracle, tiny, tmp_path) -> None:
    """Pruned and renumbered blocks find their imatrix under their old names (remap_imatrix)."""
    import numpy as np

    from jllama.quant.imatrix import QuantImatrix, quantize_metadata
    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file

    rng = np.random.default_rng(9)
    g = read_gguf(tiny)
    w = {n: rng.lognormal(0, 1, t.shape[-1]).astype(np.float32) for n, t in g.tensors.items()}
    qi = QuantImatrix(w, "im.gguf", ["random"], 1, len(w))
    out, ref = tmp_path / "out.gguf", tmp_path / "ref.gguf"
    quantize_file(tiny, out, mix_from_base("IQ4_XS"), imatrix=qi, prune_layers=[1], nthread=2)
    kv = [(k, v) for k, v, _ in quantize_metadata(qi)]
    llama_cpp_quantize(tiny, ref, "IQ4_XS", imatrix=w, kv_overrides=kv, prune_layers=[1])
    assert filecmp.cmp(out, ref, shallow=False)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ2_XXS"])
def test_dry_run_prints_llama_quantize_lines(oracle, tiny, tmp_path, capfd, ftype) -> None:
    """--dry-run writes nothing and prints llama_model_quantize_impl's per-tensor and size
    lines (and, for a type that needs one, its imatrix warning)."""
    import logging
    import re

    lg = logging.getLogger("llama-cpp-python")
    level = lg.level
    lg.setLevel(logging.DEBUG)
    try:
        capfd.readouterr()
        llama_cpp_quantize(tiny, tmp_path / "ref.gguf", ftype, dry_run=True, prune_layers=[3])
        log = capfd.readouterr().err
    finally:
        lg.setLevel(level)
    assert main(["quantize", "--dry-run", "--prune-layers", "3", str(tiny), ftype, "1"]) == 0
    ours = capfd.readouterr().out
    assert list(tmp_path.iterdir()) == [] and [p.name for p in tiny.parent.iterdir()] == [
        tiny.name
    ]
    pat = re.compile(r"^(\[ *\d+/ *\d+\] .*|llama_model_quantize_impl: (model|quant) size .*|"
                     r"llama_model_quantize_impl: WARNING: dry run.*)$", re.M)  # fmt: skip
    ref_lines = [m.group(0) for m in pat.finditer(log)]
    assert len(ref_lines) > 30 and ref_lines == [m.group(0) for m in pat.finditer(ours)]
    assert ("will require an imatrix" in ours) == (ftype == "IQ2_XXS")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["{tiny}"], ["bad arguments"]),
        (["{tiny}", "{out}"], ["missing ftype"]),
        (["{tiny}", "{out}", "q4_k_xl"], ["invalid ftype 'q4_k_xl'", "q4_k_m"]),
        (["{tiny}", "{out}", "q4_0", "two"], ["invalid nthread 'two'"]),
        (["{tiny}", "{tiny}", "q4_0"], ["input and output files are the same"]),
        (["--prune-layers", "1,x", "{tiny}", "{out}", "q4_0"], ["invalid layer id 'x'"]),
        (["--max-buffer-size", "0", "{tiny}", "{out}", "q4_0"], ["invalid --max-buffer-size"]),
        (["--override-kv", "a.b=num:1", "{tiny}", "{out}", "q4_0"], ["invalid type"]),
        (["--tensor-type-file", "{tiny}.nope", "{tiny}", "{out}", "q4_0"], ["failed to open"]),
        (["--tensor-type", "attn_v", "{tiny}", "{out}", "q4_0"], ["REGEX=TYPE"]),
    ],
)
def test_bad_command_lines_are_one_line_errors(tiny, tmp_path, capsys, args, needles) -> None:
    out = tmp_path / "x.gguf"
    argv = [a.format(tiny=tiny, out=out) for a in args]
    assert main(["quantize", *argv]) == 1
    _one_line_error(capsys, *needles)
    assert not out.exists()


def test_split_input_is_refused(tiny, tmp_path, capsys) -> None:
    """jllama reads single GGUF files: the first shard of a split model is refused, not
    quantized alone (llama-quantize would read every shard)."""
    from jllama.gguf.constants import ValueType
    from jllama.gguf.writer import TensorSpec, write_gguf

    g = read_gguf(tiny)
    md = dict(g.metadata, **{"split.no": 0, "split.count": 2, "split.tensors.count": 39})
    types = dict(g.metadata_types)
    types.update({k: (ValueType.UINT16, None) for k in ("split.no", "split.count")})
    specs = [TensorSpec(n, t.shape, t.qtype, lambda t=t: t.data) for n, t in g.tensors.items()]
    shard = tmp_path / "m-00001-of-00002.gguf"
    write_gguf(shard, md, specs, types)
    out = tmp_path / "o.gguf"
    assert main(["quantize", "--keep-split", str(shard), str(out), "q8_0", "--quiet"]) == 1
    _one_line_error(capsys, "shard 1 of a 2-file split model", "llama-gguf-split --merge")
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard.name]
