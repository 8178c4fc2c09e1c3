"""experiments/sweep.py: YAML validation, and resuming from the CSV (points already measured are
not run again), on a tiny random model with two points."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from jllama.errors import JllamaError

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def sweep_mod():
    path = HERE.parent / "experiments" / "sweep.py"
    spec = importlib.util.spec_from_file_location("jllama_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["jllama_sweep"] = mod
    spec.loader.exec_module(mod)
    return mod


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
