"""Importance matrices: llama-imatrix's file formats, llama-quantize's reading of them, and
``jllama quantize --imatrix`` byte for byte llama.cpp's ``llama_model_quantize`` with the same
importance data."""

from __future__ import annotations

import filecmp
import struct

import numpy as np
import pytest
from llamacpp_oracle import ggml_quantize

from jllama.cli.main import main
from jllama.errors import QuantError
from jllama.gguf.constants import QType
from jllama.gguf.reader import read_gguf
from jllama.quant.imatrix import (
    Imatrix,
    ImatrixCollector,
    ImatrixEntry,
    load_for_quantize,
    merge_into,
    quantize_weights,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from jllama.quant.quantize import quantize_tensor
from jllama.quant.testing import llama_cpp_quantize, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_llama(p, n_layer=8)  # 8 layers: the first ffn_down gets llama.cpp's imatrix-only rule
    return p


def _imatrix_for(model, seed: int = 0) -> Imatrix:
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["wiki.test.raw"], chunk_count=3, chunk_size=128)
    for n, t in read_gguf(model).tensors.items():
        if n.startswith("blk.") and "norm" not in n:
            sums = (rng.gamma(0.5, 1, t.shape[-1]) * 384).astype(np.float32)
            im.entries[n] = ImatrixEntry(sums, np.array([384], np.int64))
    return im


def test_gguf_layout_is_llama_imatrix(tmp_path) -> None:
    """What save_imatrix writes: general.type, datasets, chunk count/size; per entry (sorted)
    ``.in_sum2`` [n_mat, n_cols] and ``.counts`` [n_mat, 1] in F32, trailing 1s dropped."""
    im = Imatrix(datasets=["a.txt", "b.txt"], chunk_count=7, chunk_size=64)
    im.entries["blk.1.ffn_up.weight"] = ImatrixEntry(np.arange(8, dtype=np.float32), np.array([5]))
    moe = np.arange(12, dtype=np.float32) / 3
    im.entries["blk.0.ffn_up_exps.weight"] = ImatrixEntry(moe, np.array([3, 0, 9]))
    write_imatrix_gguf(tmp_path / "i.gguf", im)
    g = read_gguf(tmp_path / "i.gguf")
    assert list(g.metadata) == [
        "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size",
    ]  # fmt: skip
    assert g.metadata["general.type"] == "imatrix" and g.metadata["imatrix.chunk_size"] == 64
    assert list(g.tensors) == [
        "blk.0.ffn_up_exps.weight.in_sum2", "blk.0.ffn_up_exps.weight.counts",
        "blk.1.ffn_up.weight.in_sum2", "blk.1.ffn_up.weight.counts",
    ]  # fmt: skip
    assert g.tensors["blk.0.ffn_up_exps.weight.in_sum2"].shape == (3, 4)
    assert g.tensors["blk.0.ffn_up_exps.weight.counts"].shape == (3, 1)
    assert g.tensors["blk.1.ffn_up.weight.in_sum2"].shape == (8,)
    back = read_imatrix(tmp_path / "i.gguf")
    assert back.datasets == im.datasets and back.chunk_count == 7 and not back.legacy
    np.testing.assert_array_equal(back.entries["blk.0.ffn_up_exps.weight"].sums, moe)
    np.testing.assert_array_equal(back.entries["blk.0.ffn_up_exps.weight"].counts, [3, 0, 9])
    # llama-quantize: sums / count per expert, 1 where an expert saw nothing
    w = quantize_weights(back)["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(w, np.concatenate([moe[:4] / 3, np.ones(4), moe[8:] / 9]))


def test_dat_format(tmp_path) -> None:
    """The legacy file byte by byte (save_imatrix_legacy), and its reading rule."""
    im = Imatrix(datasets=["x.txt"], chunk_count=2, chunk_size=4)
    im.entries["b"] = ImatrixEntry(np.array([2.0, 6.0], np.float32), np.array([6]))
    im.entries["a"] = ImatrixEntry(np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([2, 0]))
    im.entries["z"] = ImatrixEntry(np.array([1.0], np.float32), np.array([0]))  # no data: dropped
    assert write_imatrix_dat(tmp_path / "i.dat", im) == ["z"]
    ncall_a, ncall_b = (2 + 3) // 4, (6 + 3) // 4  # ceil(max count / chunk size)
    want = struct.pack("<i", 2)
    want += struct.pack("<i", 1) + b"a" + struct.pack("<ii", ncall_a, 4)
    want += np.array([0.5, 1.0, 1.0, 1.0], "<f4").tobytes()  # (v / count) * ncall, 1 if empty
    want += struct.pack("<i", 1) + b"b" + struct.pack("<ii", ncall_b, 2)
    want += (np.array([2.0, 6.0], np.float32) / 6 * 2).astype("<f4").tobytes()
    want += struct.pack("<i", 2) + struct.pack("<i", 5) + b"x.txt"
    assert (tmp_path / "i.dat").read_bytes() == want
    back = read_imatrix(tmp_path / "i.dat")
    assert back.legacy and back.datasets == ["x.txt"] and back.chunk_count == 2
    w = quantize_weights(back)  # legacy: values / ncall
    np.testing.assert_array_equal(w["b"], np.array([2.0, 6.0], np.float32) / 6 * 2 / 2)


def test_merge_like_in_file(tmp_path) -> None:
    """--in-file: GGUF sums and counts add up; a legacy file's means come back as sums."""
    a = Imatrix(chunk_size=4)
    a.entries["w"] = ImatrixEntry(np.array([1.0, 2.0], np.float32), np.array([8]))
    a.datasets = ["one"]
    write_imatrix_gguf(tmp_path / "a.gguf", a)
    write_imatrix_dat(tmp_path / "a.dat", Imatrix(a.entries, ["two"], 2, 4))
    acc = Imatrix()
    merge_into(acc, read_imatrix(tmp_path / "a.gguf"), 4)
    merge_into(acc, read_imatrix(tmp_path / "a.dat"), 4)
    e = acc.entries["w"]
    # the .dat holds (sums / 8) * ncall(2) -> sums / 4; times the chunk size 4 -> sums again
    np.testing.assert_array_equal(e.sums, [2.0, 4.0])
    np.testing.assert_array_equal(e.counts, [8 + 2 * 4])
    assert acc.datasets == ["one", "two"] and acc.chunk_count == 16 // 4


def test_collector_rule() -> None:
    """Sums of squares per column and token counts; MoE per routed expert."""
    c = ImatrixCollector(chunk_size=2)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    c.add_dense("d", x[:2])
    c.add_dense("d", x[2:])
    np.testing.assert_array_equal(c.im.entries["d"].sums, (x * x).sum(0))
    assert c.im.entries["d"].counts.tolist() == [4] and c.im.chunk_count == 2
    ids = np.array([[0, 2], [2, 1], [0, 2]])  # 3 tokens, 2 experts each, of 3
    c.add_experts("m", x[:3, None, :], ids, 3)
    e = c.im.entries["m"]
    assert e.counts.tolist() == [2, 1, 3]
    sq = x[:3] ** 2
    np.testing.assert_array_equal(e.sums.reshape(3, 3), [sq[0] + sq[2], sq[1], sq.sum(0)])


def test_expert_tensor_gets_its_slice() -> None:
    """A 3-D expert tensor: rows of expert e are quantized with the e-th slice (llama-quantize's
    imatrix + (row / rows_per_expert) * n_per_row), here across a slice boundary too."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 256)).astype(np.float32)
    qw = rng.gamma(0.5, 1, (3, 256)).astype(np.float32)
    ours = quantize_tensor(x, int(QType.F32), int(QType.Q4_K), x.shape, qw.reshape(-1))
    ref = np.concatenate([ggml_quantize(x[e], int(QType.Q4_K), qw[e]) for e in range(3)])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m"])
def test_quantize_with_imatrix_equals_llama_cpp(tiny, tmp_path, ftype, capsys) -> None:
    im = _imatrix_for(tiny)
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    out, ref = tmp_path / "out.gguf", tmp_path / "ref.gguf"
    f = str(tmp_path / "im.gguf")
    rc = main(["quantize", str(tiny), str(out), ftype, "--imatrix", f,
               "--exclude-weights", "attn_k", "--quiet"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    n = len(im.entries)
    assert f"loaded {n} importance matrix entries from {f} computed on 3 chunks" in text
    assert f"have {n - 8} importance matrix entries" in text
    assert "did not find weights for blk.0.attn_k.weight" in text
    qi = load_for_quantize(f, exclude=["attn_k"])
    kv = [("quantize.imatrix.file", f), ("quantize.imatrix.dataset", "wiki.test.raw"),
          ("quantize.imatrix.entries_count", n - 8), ("quantize.imatrix.chunks_count", 3)]  # fmt: skip
    llama_cpp_quantize(tiny, ref, ftype.upper(), imatrix=qi.weights, kv_overrides=kv)
    assert filecmp.cmp(out, ref, shallow=False)
    if ftype == "q4_0":  # the imatrix-only rule: first ffn_down goes to Q4_1
        assert read_gguf(out).tensors["blk.0.ffn_down.weight"].type_name == "Q4_1"


def test_include_weights_and_bad_files(tiny, tmp_path, capsys) -> None:
    im = _imatrix_for(tiny)
    write_imatrix_gguf(tmp_path / "im.gguf", im)
    qi = load_for_quantize(tmp_path / "im.gguf", include=["ffn_down", "attn_v"])
    assert sorted(qi.weights) == sorted(n for n in im.entries if "ffn_down" in n or "attn_v" in n)
    out = tmp_path / "o.gguf"
    args = ["quantize", str(tiny), str(out), "q4_0", "--quiet", "--imatrix"]
    assert (
        main(args + [str(tmp_path / "im.gguf"), "--include-weights", "a", "--exclude-weights", "b"])
        == 1
    )
    (tmp_path / "bad.dat").write_bytes(b"\0\0\0\0")
    assert main(args + [str(tmp_path / "bad.dat")]) == 1
    im.entries["blk.0.attn_q.weight"].sums = np.ones(7, np.float32)  # wrong size
    write_imatrix_gguf(tmp_path / "wrong.gguf", im)
    assert main(args + [str(tmp_path / "wrong.gguf")]) == 1
    err = capsys.readouterr().err
    assert "cannot be used together" in err and "no data in imatrix file" in err
    assert "imatrix size 7 is different from tensor size 256 for blk.0.attn_q.weight" in err
    with pytest.raises(QuantError, match="missing imatrix metadata"):
        quantize_weights(Imatrix(has_metadata=False))


# ----------------------------------------------------------------------------- jllama imatrix


def test_collect_equals_llama_cpp(tmp_path) -> None:
    """``jllama imatrix`` on a tiny model: every weight's sums and counts against what llama.cpp's
    graph feeds its matmuls (read through cb_eval, summed as llama-imatrix does), then the CLI
    writes the same thing and merges it with --in-file."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
    from imatrix_vs_llamacpp import compare, llamacpp_imatrix

    from jllama.api import Llama
    from jllama.eval.imatrix import compute_imatrix
    from jllama.eval.perplexity import chunk_tokens
    from jllama.numerics import Numerics
    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file

    tiny_llama(tmp_path / "f32.gguf", n_layer=2)
    model = tmp_path / "tiny.gguf"  # quantized: jllama's matmuls are then ggml's, bit for bit
    quantize_file(tmp_path / "f32.gguf", model, mix_from_base("q8_0"))
    tokens = [1] + np.random.default_rng(5).integers(3, 320, 99).tolist()
    n_ctx = 32
    chunks = chunk_tokens(tokens, n_ctx, None, 1, True)
    ref = llamacpp_imatrix(str(model), chunks)
    llm = Llama(str(model), ctx_size=n_ctx, numerics=Numerics.from_env(taps=True))
    col = ImatrixCollector(n_ctx)
    shapes = {n: t.shape for n, t in llm.gguf.tensors.items()}
    compute_imatrix(llm.engine, tokens, shapes, col, n_ctx, None, 1, True)
    ours = {n: (e.sums, int(e.counts[0])) for n, e in col.im.entries.items()}
    worst, kinds = compare(ours, ref)
    assert worst < 1e-6, kinds  # float round-off at most (0 where jllama is ggml bit for bit)
    assert len(ref) == 2 * 7 and col.im.chunk_count == 3


def test_imatrix_cli(tmp_path, capsys) -> None:
    """-f/-o/-c/--chunks, then --in-file merging into the legacy format."""
    model = tmp_path / "tiny.gguf"
    tiny_llama(model, n_layer=2)
    rng = np.random.default_rng(2)
    words = ["".join(rng.choice(list("abcdefgh"), 2)) for _ in range(400)]
    (tmp_path / "t.txt").write_text(" ".join(words))
    out = tmp_path / "im.gguf"
    args = ["imatrix", "-m", str(model), "-f", str(tmp_path / "t.txt"), "-o", str(out)]
    assert main(args + ["-c", "32", "--chunks", "3"]) == 0
    text = capsys.readouterr().out
    assert "[1]" in text and "[3]" in text and "Final estimate: PPL = " in text
    im = read_imatrix(out)
    assert len(im.entries) == 14 and im.chunk_count == 3 and im.chunk_size == 32
    assert im.datasets == [str(tmp_path / "t.txt")]
    assert all(e.counts.tolist() == [96] for e in im.entries.values())
    dat = tmp_path / "m.dat"
    merge = ["imatrix", "--in-file", str(out), "--in-file", str(out), "-c", "32"]
    assert main(merge + ["-o", str(dat), "--output-format", "dat"]) == 0
    back = read_imatrix(dat)
    assert back.chunk_count == 6 and back.datasets == [str(tmp_path / "t.txt")]
    e, b = im.entries["blk.1.ffn_down.weight"], back.entries["blk.1.ffn_down.weight"]
    assert b.counts.tolist() == [6]  # ncall = ceil(192 / 32)
    np.testing.assert_allclose(b.sums, e.sums * 2 / 192 * 6, rtol=1e-6)
    assert main(["imatrix", "-m", str(model), "-o", str(dat)]) == 1
    assert "no text (-f)" in capsys.readouterr().err


def test_moe_quantize_with_imatrix_equals_llama_cpp(tmp_path) -> None:
    """Expert tensors [n_expert, rows, cols]: one imatrix slice per expert (an expert that saw no
    token gets 1s), the whole file byte for byte llama.cpp's."""
    from tinymodels_moe import write_llama_moe

    model = write_llama_moe(tmp_path / "moe.gguf")
    rng = np.random.default_rng(4)
    im = Imatrix(datasets=["d"], chunk_count=1, chunk_size=64)
    for n, t in read_gguf(model).tensors.items():
        if not n.startswith("blk.") or "norm" in n:
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        counts = rng.integers(0, 50, n_mat) if n_mat > 1 else np.array([64])
        counts[0] = 0 if n_mat > 1 else counts[0]
        sums = (rng.gamma(0.5, 1, n_mat * t.shape[-1]) * 64).astype(np.float32)
        im.entries[n] = ImatrixEntry(sums, counts.astype(np.int64))
    f = str(tmp_path / "im.gguf")
    write_imatrix_gguf(f, im)
    out, ref = tmp_path / "out.gguf", tmp_path / "ref.gguf"
    assert main(["quantize", str(model), str(out), "q4_0", "--imatrix", f, "--quiet"]) == 0
    qi = load_for_quantize(f)
    kv = [("quantize.imatrix.file", f), ("quantize.imatrix.dataset", "d"),
          ("quantize.imatrix.entries_count", len(qi.weights)),
          ("quantize.imatrix.chunks_count", 1)]  # fmt: skip
    llama_cpp_quantize(model, ref, "Q4_0", imatrix=qi.weights, kv_overrides=kv)
    assert filecmp.cmp(out, ref, shallow=False)


def test_collect_moe_equals_llama_cpp(tmp_path) -> None:
    """MoE: per-expert sums and counts of what mul_mat_id feeds each expert (gate/up: the token,
    down: its SwiGLU per slot), against llama.cpp's graph through cb_eval."""
    import sys
    from pathlib import Path

    import gguf

    sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
    from imatrix_vs_llamacpp import compare, llamacpp_imatrix
    from tinymodels_moe import write_llama_moe

    from jllama.api import Llama
    from jllama.eval.imatrix import compute_imatrix
    from jllama.eval.perplexity import chunk_tokens
    from jllama.numerics import Numerics

    model = write_llama_moe(tmp_path / "moe.gguf", gguf.GGMLQuantizationType.Q8_0)
    llm = Llama(str(model), ctx_size=32, numerics=Numerics.from_env(taps=True))
    tokens = [llm.tokenizer.bos_id] + np.random.default_rng(6).integers(3, 250, 69).tolist()
    chunks = chunk_tokens(tokens, 32, None, llm.tokenizer.bos_id, True)
    ref = llamacpp_imatrix(str(model), chunks)
    col = ImatrixCollector(32)
    shapes = {n: t.shape for n, t in llm.gguf.tensors.items()}
    compute_imatrix(llm.engine, tokens, shapes, col, 32, None, llm.tokenizer.bos_id, True)
    ours = {n: (e.sums, e.counts if e.n_mat > 1 else int(e.counts[0]))
            for n, e in col.im.entries.items()}  # fmt: skip
    assert {"blk.1.ffn_down_exps.weight", "blk.0.ffn_gate_inp.weight"} <= set(ref)
    worst, kinds = compare(ours, ref)
    assert worst < 1e-6, kinds
    assert col.im.entries["blk.0.ffn_up_exps.weight"].counts.sum() == 2 * 64  # top-2
