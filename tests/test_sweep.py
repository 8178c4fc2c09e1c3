"""experiments/sweep.py: YAML validation, and resuming from the CSV (points already measured are
not run again), on a tiny random model with two points."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from jllama.errors import JllamaError
from jllama.registry import sha256_of


@pytest.fixture(scope="module")
def sweep_mod(experiment):
    return experiment("sweep")


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from jllama.quant.testing import tiny_llama

    d = tmp_path_factory.mktemp("sweep")
    tiny_llama(d / "tiny.gguf", n_embd=256, n_layer=2, n_head=2, n_head_kv=1, n_ff=256)
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (d / "s.yaml").write_text(
        "name: tiny\nmodel: tiny.gguf\ntext: text.txt\nn_ctx: 64\nchunks: 2\nbatch: 2\n"
        "speed: false\n"
        "points:\n"
        "  - {name: F32, quant: null}\n"
        "  - {name: Q4_0 mix, quant: {base: q4_0, rules: [{match: ffn_down, type: q8_0}]}}\n")
    return d


def test_yaml_parsing(sweep_mod, tiny_sweep):
    sw = sweep_mod.load_sweep(tiny_sweep / "s.yaml")
    assert sw.name == "tiny" and sw.base == "F32" and sw.n_ctx == 64 and sw.chunks == 2
    assert Path(sw.model) == (tiny_sweep / "tiny.gguf").resolve()
    assert [p.name for p in sw.points] == ["F32", "Q4_0 mix"]
    assert sw.points[1].quant == {"base": "q4_0",
                                  "rules": [{"match": "ffn_down", "type": "q8_0"}]}
    assert sw.pp == 0 and sw.tg == 0


@pytest.mark.parametrize("body,message", [
    ("model: m\ntext: t\npoints: []\n", "no points"),
    ("model: m\ntext: t\npoints: [{name: a, quant: {base: q9_9}}]\n", "unknown mix base"),
    ("model: m\ntext: t\npoints: [{name: a, quant: {base: q4_0, rules: [{match: x}]}}]\n",
     "exactly 'match' and 'type'"),
    ("model: m\ntext: t\npoints: [{name: a, quant: null}, {name: a, quant: null}]\n",
     "duplicate point"),
    ("model: m\ntext: t\nbase: zz\npoints: [{name: a, quant: null}]\n", "base 'zz'"),
    ("model: m\npoints: [{name: a, quant: null}]\n", "'text' is required"),
    ("model: m\ntext: t\nchunk: 3\npoints: [{name: a, quant: null}]\n", "unknown keys"),
])
def test_yaml_errors(sweep_mod, tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(JllamaError, match=message):
        sweep_mod.load_sweep(p)


def test_run_and_resume(sweep_mod, tiny_sweep, tmp_path):
    from jllama.gguf.reader import read_gguf

    sw = sweep_mod.load_sweep(tiny_sweep / "s.yaml")
    out, work = tmp_path / "out", tmp_path / "work"
    calls: list[str] = []

    def counting(sw_, p, *a):
        calls.append(p.name)
        return sweep_mod.run_jllama_point(sw_, p, *a)

    rows = sweep_mod.run_sweep(sw, out, work, speed=False, llamacpp=False, log=lambda s: None,
                               run_point=counting)
    assert calls == ["F32", "Q4_0 mix"]
    assert [r["point"] for r in rows] == ["F32", "Q4_0 mix"]
    f32, mix = rows
    assert float(f32["kld"]) == 0.0 and float(mix["kld"]) > 0.0
    # bits per weight from the GGUF's own tensor table (F32 file: 32 bits per weight)
    g = read_gguf(tiny_sweep / "tiny.gguf")
    assert float(f32["bpw"]) == pytest.approx(32.0)
    assert int(f32["bytes"]) == sum(t.nbytes for t in g.tensors.values())
    assert 4.5 < float(mix["bpw"]) < 32.0

    # a rerun finds both points in the CSV: nothing runs
    calls.clear()
    sweep_mod.run_sweep(sw, out, work, speed=False, llamacpp=False, log=lambda s: None,
                        run_point=counting)
    assert calls == []

    # drop the second point from the CSV (an interrupted sweep): only it runs again, against
    # the saved base file (the base point is not rerun)
    csv_path = out / "sweep_tiny.csv"
    with open(csv_path, newline="") as f:
        kept = list(csv.DictReader(f))[:1]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, sweep_mod.FIELDS)
        w.writeheader()
        w.writerows(kept)
    rows = sweep_mod.run_sweep(sw, out, work, speed=False, llamacpp=False, log=lambda s: None,
                               run_point=counting)
    assert calls == ["Q4_0 mix"] and [r["point"] for r in rows] == ["F32", "Q4_0 mix"]
    assert float(rows[1]["kld"]) == pytest.approx(float(mix["kld"]), rel=1e-6)

    md = sweep_mod.write_markdown(sw, rows, out)
    assert "| jllama | Q4_0 mix |" in md.read_text()


def test_ftype_points_parsing(sweep_mod, tiny_sweep, tmp_path):
    (tmp_path / "f.yaml").write_text(
        f"model: {tiny_sweep / 'tiny.gguf'}\ntext: t\npoints: [{{name: F32, quant: null}}]\n"
        "imatrix: {text: t, n_ctx: 64, chunks: 2}\nftypes: [q4_0, Q4_K_M imatrix]\n")
    sw = sweep_mod.load_sweep(tmp_path / "f.yaml")
    assert [(p.name, p.ftype, p.imatrix) for p in sw.ftypes] == [
        ("Q4_0", "Q4_0", False), ("Q4_K_M imatrix", "Q4_K_M", True)]
    assert sw.imatrix.n_ctx == 64 and sw.imatrix.chunks == 2
    for body, message in [("ftypes: [Q4_K_M imatrix]\n", "needs an 'imatrix' block"),
                          ("ftypes: [q9_9]\n", "unknown quantization type"),
                          ("ftypes: [Q4_0 imx]\n", "not FTYPE or 'FTYPE imatrix'"),
                          ("ftypes: [Q4_0, q4_0]\n", "duplicate file types")]:
        (tmp_path / "b.yaml").write_text(
            "model: m\ntext: t\npoints: [{name: F32, quant: null}]\n" + body)
        with pytest.raises(JllamaError, match=message):
            sweep_mod.load_sweep(tmp_path / "b.yaml")


def test_ftype_points_with_imatrix(sweep_mod, tiny_sweep, tmp_path):
    """A file-type point with the sweep's imatrix: the file jllama writes is llama.cpp's own
    (sha256 of llama_model_quantize's output, made here by the oracle with the same imatrix),
    and its scores by jllama agree with llama-cpp-python's on the same file."""
    from jllama.gguf.reader import read_gguf
    from jllama.quant.imatrix import (
        Imatrix,
        ImatrixEntry,
        load_for_quantize,
        quantize_metadata,
        write_imatrix_gguf,
    )
    from jllama.quant.testing import llama_cpp_quantize

    (tmp_path / "s.yaml").write_text(
        (tiny_sweep / "s.yaml").read_text().replace("name: tiny", "name: tinyft")
        .replace("model: tiny.gguf", f"model: {tiny_sweep / 'tiny.gguf'}")
        .replace("text: text.txt", f"text: {tiny_sweep / 'text.txt'}")
        .split("  - {name: Q4_0 mix")[0]
        + f"imatrix: {{text: {tiny_sweep / 'text.txt'}, n_ctx: 64, chunks: 2}}\n"
        "ftypes: [Q4_K_M imatrix]\n")
    sw = sweep_mod.load_sweep(tmp_path / "s.yaml")
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    # the imatrix the sweep would make with llama-imatrix, placed where it looks for it (its
    # values are only input here: random positive column weights)
    g = read_gguf(tiny_sweep / "tiny.gguf")
    rng = np.random.default_rng(3)
    im = Imatrix({n: ImatrixEntry(rng.lognormal(0, 1, t.shape[-1]).astype(np.float32) * 5,
                                  np.array([5], np.int64))
                  for n, t in g.tensors.items() if n.startswith("blk.") and "norm" not in n},
                 ["text.txt"], 2, 64)
    im_path = work / "tinyft.imatrix-c64-n2.gguf"
    write_imatrix_gguf(im_path, im)

    rows = sweep_mod.run_sweep(sw, out, work, speed=False, llamacpp=False, log=lambda s: None,
                               score_identical=True)
    assert [(r["engine"], r["point"]) for r in rows] == [
        ("jllama", "F32"), ("jllama", "Q4_K_M imatrix"), ("llama.cpp", "Q4_K_M imatrix")]
    _, j, lc = rows

    ref = tmp_path / "ref.gguf"
    qi = load_for_quantize(str(im_path))
    llama_cpp_quantize(tiny_sweep / "tiny.gguf", ref, "Q4_K_M", imatrix=qi.weights,
                       kv_overrides=[(k, v) for k, v, _ in quantize_metadata(qi)])
    assert j["identical"] == lc["identical"] == "1"
    assert j["sha256"] == lc["sha256"] == sha256_of(ref)
    assert j["imatrix"] == "1" and j["ftype"] == "Q4_K_M"
    nbytes, elems = sweep_mod.weight_bytes(read_gguf(ref), None)
    assert int(j["bytes"]) == int(lc["bytes"]) == nbytes
    # same file, two engines: PPL and KLD against the same base agree to runtime rounding
    assert float(j["kld"]) > 0
    assert float(j["ppl"]) == pytest.approx(float(lc["ppl"]), rel=1e-3)
    assert float(j["kld"]) == pytest.approx(float(lc["kld"]), rel=0.05)
    assert not list(work.glob("*.jllama-*.gguf"))  # quantized files are not kept

    md = sweep_mod.write_markdown(sw, rows, out).read_text()
    assert "| jllama | Q4_K_M imatrix |" in md and f"identical ({j['sha256'][:12]})" in md
