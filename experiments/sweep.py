"""Quantization sweep: size, bits per weight, PPL, KLD and speed for a list of mixes of one model.

    python experiments/sweep.py experiments/sweeps/smollm2.yaml [--chunks N] [--no-speed]
                                [--no-llamacpp] [--out experiments/results]

The YAML names a model, a text and the points; each point is a quantize-on-load mix in the form
``jllama quantize --config`` reads (``{base: q4_k_m, rules: [{match: REGEX, type: T}]}``) or
``null`` for the file as it is. For every point: weight bytes and bits per weight (of all
tensors, as llama-quantize prints), PPL with llama-perplexity's method, KL-divergence against
the base point (the first, or ``base:``; its log-probs are saved once with the base-file
writer of ``jllama perplexity --kl-divergence-base``), and pp/tg speed. ``llamacpp:`` points
are quantized by llama.cpp itself (``llama_model_quantize``) and scored by llama-cpp-python on
the same windows, with their KLD against the same base file.

Results go to ``{out}/sweep_{name}.csv`` after every point; a rerun skips the points already
in the CSV (same n_ctx and chunks), so an interrupted sweep resumes. The markdown table and the
plot (bits/weight vs KLD and vs PPL) are rewritten from the CSV at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
FIELDS = ["engine", "point", "quant", "n_ctx", "chunks", "bytes", "bpw", "ppl", "ppl_err",
          "kld", "kld_err", "kld_p99", "kld_max", "rms_dp", "same_top", "pp_tps", "tg_tps",
          "seconds"]


# ----------------------------------------------------------------------------- the YAML


@dataclass
class Point:
    name: str
    quant: dict[str, Any] | None  # None: the model file as it is


@dataclass
class Sweep:
    name: str
    model: str
    text: Path
    n_ctx: int = 512
    chunks: int = 10
    batch: int = 2
    pp: int = 128
    tg: int = 32
    reps: int = 1
    base: str = ""
    points: list[Point] = field(default_factory=list)
    llamacpp: list[Point] = field(default_factory=list)  # quant: {base: FTYPE} or None
    llamacpp_chunks: int = 0  # 0: same as chunks
    notes: str = ""  # appended to the markdown report

    @property
    def base_point(self) -> Point:
        return next(p for p in self.points if p.name == self.base)


_KEYS = {"name", "model", "text", "n_ctx", "chunks", "batch", "speed", "base", "points",
         "llamacpp", "llamacpp_chunks", "notes"}


def _points(raw: Any, where: str, source: str) -> list[Point]:
    from jllama.errors import ConfigError
    from jllama.quant.mixes import mix_from_dict

    if not isinstance(raw, list):
        raise ConfigError(f"{source}: '{where}' must be a list of {{name, quant}}")
    out = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or "name" not in p or set(p) - {"name", "quant"}:
            raise ConfigError(f"{source}: {where}[{i}] must be {{name: ..., quant: MIX or null}}")
        q = p.get("quant")
        if q is not None:
            if isinstance(q, str):
                q = {"base": q}
            mix_from_dict({k: v for k, v in q.items() if k != "allow_requantize"},
                          f"{source} {where}[{i}].quant")  # validate now, not mid-sweep
        out.append(Point(str(p["name"]), q))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate point names in '{where}'")
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep YAML; relative paths are relative to the YAML's folder."""
    import yaml

    from jllama.errors import ConfigError

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read sweep {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping")
    unknown = set(d) - _KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    for k in ("model", "text", "points"):
        if k not in d:
            raise ConfigError(f"{path}: '{k}' is required")
    model = str(d["model"])
    if (path.parent / model).is_file():
        model = str((path.parent / model).resolve())
    speed = d.get("speed", {})
    if speed is False:  # `speed: false`: no pp/tg measurements
        speed = {"pp": 0, "tg": 0}
    elif not isinstance(speed, dict):
        raise ConfigError(f"{path}: 'speed' must be false or {{pp: N, tg: N, reps: N}}")
    sw = Sweep(name=str(d.get("name") or path.stem), model=model,
               text=(path.parent / str(d["text"])).resolve(), n_ctx=int(d.get("n_ctx", 512)),
               chunks=int(d.get("chunks", 10)), batch=int(d.get("batch", 2)),
               pp=int(speed.get("pp", 128)), tg=int(speed.get("tg", 32)),
               reps=int(speed.get("reps", 1)),
               points=_points(d["points"], "points", str(path)),
               llamacpp=_points(d.get("llamacpp") or [], "llamacpp", str(path)),
               llamacpp_chunks=int(d.get("llamacpp_chunks", 0)),
               notes=str(d.get("notes") or "").strip())
    if not sw.points:
        raise ConfigError(f"{path}: no points")
    sw.base = str(d.get("base") or sw.points[0].name)
    if sw.base not in {p.name for p in sw.points}:
        raise ConfigError(f"{path}: base '{sw.base}' is not one of the points")
    for p in sw.llamacpp:
        if p.quant is not None and set(p.quant) != {"base"}:
            raise ConfigError(f"{path}: llamacpp point '{p.name}' takes a file type only")
    return sw


# ----------------------------------------------------------------------------- measurements


def weight_bytes(gguf_file, quant: dict | None) -> tuple[int, int]:
    """(bytes of all tensors after the mix, number of elements)."""
    from jllama.gguf.constants import qtype_info
    from jllama.quant.mixes import mix_from_dict, plan_types

    types = {n: t.qtype for n, t in gguf_file.tensors.items()}
    if quant is not None:
        spec = mix_from_dict({k: v for k, v in quant.items() if k != "allow_requantize"})
        types = plan_types(gguf_file, spec)
    total = elems = 0
    for n, t in gguf_file.tensors.items():
        info = qtype_info(types[n])
        total += t.n_elements // info.block_size * info.type_size
        elems += t.n_elements
    return total, elems


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _append_row(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.is_file()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})


def _done(rows: list[dict[str, str]], engine: str, point: str, n_ctx: int, chunks: int) -> bool:
    return any(r["engine"] == engine and r["point"] == point and int(r["n_ctx"]) == n_ctx
               and int(r["chunks"]) == chunks for r in rows)


def _kld_fields(s: dict[str, float]) -> dict[str, Any]:
    return {"ppl": s["ppl"], "ppl_err": s["ppl_unc"], "kld": s["kld"], "kld_err": s["kld_unc"],
            "kld_p99": s["kld_p99_0"], "kld_max": s["kld_max"], "rms_dp": s["rms_dp"],
            "same_top": s["same_top"]}


def run_jllama_point(sw: Sweep, p: Point, tokens: list[int], base_file: Path,
                     speed: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from jllama.api import Llama
    from jllama.eval.bench import jllama_pp, jllama_tg, time_reps
    from jllama.eval.kld import kl_divergence, save_base

    t0 = time.perf_counter()
    llm = Llama(sw.model, ctx_size=max(sw.n_ctx, sw.pp + sw.tg + 16), quant=p.quant)
    nbytes, elems = weight_bytes(llm.gguf, p.quant)
    row: dict[str, Any] = {"engine": "jllama", "point": p.name,
                           "quant": json.dumps(p.quant), "n_ctx": sw.n_ctx, "chunks": sw.chunks,
                           "bytes": nbytes, "bpw": 8.0 * nbytes / elems}
    if p.name == sw.base:
        r = save_base(llm, tokens, base_file, sw.n_ctx, sw.chunks, sw.batch)
        row.update(ppl=r.ppl, ppl_err=r.ppl_err, kld=0.0, kld_err=0.0, kld_p99=0.0,
                   kld_max=0.0, rms_dp=0.0, same_top=1.0)
    else:
        r = kl_divergence(llm, tokens, base_file, sw.n_ctx, sw.chunks, sw.batch)
        row.update(_kld_fields(r.stats()))
    if speed and sw.pp and sw.tg:
        row["pp_tps"] = sw.pp / min(time_reps(jllama_pp(llm, sw.pp), sw.reps))
        row["tg_tps"] = sw.tg / min(time_reps(jllama_tg(llm, sw.tg), sw.reps))
    row["seconds"] = time.perf_counter() - t0
    log(f"jllama {p.name}: {row['bpw']:.3f} bpw, PPL {row['ppl']:.4f}, KLD {row['kld']:.5f}")
    return row


def run_llamacpp_point(sw: Sweep, p: Point, chunks: np.ndarray, base_file: Path,
                       work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """llama.cpp quantizes (``llama_model_quantize``) and scores with llama-cpp-python; its
    logits are compared with the same base file (numpy on the host)."""
    import jax.numpy as jnp

    from jllama.eval.kld import KLDResult, _compare_rows, read_header
    from jllama.gguf.reader import read_gguf
    from jllama.quant.testing import llama_cpp_quantize
    from jllama.registry import resolve_model

    sys.path.insert(0, str(HERE))
    from bench_perplexity import open_llamacpp

    t0 = time.perf_counter()
    src = resolve_model(sw.model)
    path = Path(src)
    if p.quant is not None:
        path = work / f"{Path(src).stem}.llamacpp-{p.quant['base'].lower()}.gguf"
        if not path.is_file():
            llama_cpp_quantize(src, path, p.quant["base"])
    nbytes, elems = weight_bytes(read_gguf(path), None)
    hdr, off = read_header(base_file)
    rows = np.memmap(base_file, "<u2", "r", off + 4 * hdr.n_chunks * hdr.n_ctx,
                     (hdr.n_chunks, hdr.n_scored, hdr.row_u16))
    ref = open_llamacpp(str(path), sw.n_ctx, 2)
    first, v = hdr.first, hdr.n_vocab
    res = KLDResult(sw.n_ctx, len(chunks))
    parts = []
    for i, ch in enumerate(chunks):
        ref.reset()
        ref.eval(ch.tolist())
        logits = np.asarray(ref.scores[first : sw.n_ctx - 1], np.float32)[None]
        r = np.asarray(rows[i])[None]
        sm = np.ascontiguousarray(r[..., :4]).view("<f4")
        out = _compare_rows(jnp.asarray(logits), jnp.asarray(ch[None, first + 1 :]),
                            jnp.asarray(r[..., 4 : 4 + v]), jnp.asarray(sm[..., 0]),
                            jnp.asarray(sm[..., 1]))
        nll, nll_b, kld, dp, same = (np.asarray(x[0], np.float64) for x in out)
        parts.append((nll, nll_b, kld, dp))
        res.same_top += int(same.sum())
    del ref, rows
    res.nll, res.nll_base, res.kld, res.p_diff = (
        np.concatenate([q[k] for q in parts]) for k in range(4))
    row = {"engine": "llama.cpp", "point": p.name, "quant": json.dumps(p.quant),
           "n_ctx": sw.n_ctx, "chunks": len(chunks), "bytes": nbytes, "bpw": 8.0 * nbytes / elems,
           **_kld_fields(res.stats()), "seconds": time.perf_counter() - t0}
    log(f"llama.cpp {p.name}: {row['bpw']:.3f} bpw, PPL {row['ppl']:.4f}, KLD {row['kld']:.5f}")
    return row


def run_sweep(sw: Sweep, out_dir: Path, work_dir: Path, speed: bool = True,
              llamacpp: bool = True, log: Callable[[str], None] = print,
              run_point: Callable[..., dict[str, Any]] = run_jllama_point) -> list[dict[str, str]]:
    """Measure every point not yet in the CSV; returns the CSV's rows."""
    from jllama.eval.kld import read_header
    from jllama.eval.perplexity import chunk_tokens, read_text
    from jllama.tokenizer import Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"sweep_{sw.name}.csv"
    rows = read_rows(csv_path)
    tk = Tokenizer.from_path(_resolve(sw.model))
    tokens = tk.encode(read_text(sw.text), add_special=True)
    base_file = work_dir / f"{sw.name}_{sw.base}_c{sw.n_ctx}_n{sw.chunks}.kld".replace(" ", "_")
    base = sw.base_point
    todo = [p for p in sw.points if not _done(rows, "jllama", p.name, sw.n_ctx, sw.chunks)]
    lc_chunks = sw.llamacpp_chunks or sw.chunks
    lc_todo = [p for p in sw.llamacpp
               if llamacpp and not _done(rows, "llama.cpp", p.name, sw.n_ctx, lc_chunks)]
    need_base = bool(todo or lc_todo)
    if need_base and base_file.is_file():
        try:
            read_header(base_file)
        except Exception:  # a corrupt leftover: recompute
            base_file.unlink()
    if need_base and not base_file.is_file():
        row = run_point(sw, base, tokens, base_file, speed and base in todo, log)
        if base in todo:
            _append_row(csv_path, row)
            todo.remove(base)
    for p in todo:
        _append_row(csv_path, run_point(sw, p, tokens, base_file, speed, log))
    if lc_todo:
        chunks = chunk_tokens(tokens, sw.n_ctx, lc_chunks, tk.bos_id, tk.add_bos, str(sw.text))
        for p in lc_todo:
            _append_row(csv_path, run_llamacpp_point(sw, p, chunks, base_file, work_dir, log))
    return read_rows(csv_path)


def _resolve(model: str) -> str:
    from jllama.registry import resolve_model

    return str(resolve_model(model))


# ----------------------------------------------------------------------------- reports


def _f(x: str, fmt: str) -> str:
    return format(float(x), fmt) if x not in ("", None) else ""


def write_markdown(sw: Sweep, rows: list[dict[str, str]], out_dir: Path) -> Path:
    lines = [f"# Quantization sweep: {sw.name} ({Path(_resolve(sw.model)).name})", "",
             f"WikiText-2 test, -c {sw.n_ctx}; KLD against '{sw.base}' (jllama); "
             f"speeds pp{sw.pp} / tg{sw.tg} t/s, 2 threads, shared machine. "
             "Sizes are bytes of all tensors (bits per weight as llama-quantize prints).", "",
             "| engine | point | chunks | MiB | bpw | PPL | ± | mean KLD | 99% KLD | RMS Δp "
             "| same top | pp t/s | tg t/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in sorted(rows, key=lambda r: (r["engine"] != "jllama", -float(r["bpw"]))):
        lines.append(
            f"| {r['engine']} | {r['point']} | {r['chunks']} | {float(r['bytes']) / 2**20:.2f} "
            f"| {_f(r['bpw'], '.3f')} | {_f(r['ppl'], '.4f')} | {_f(r['ppl_err'], '.4f')} "
            f"| {_f(r['kld'], '.5f')} | {_f(r['kld_p99'], '.4f')} "
            f"| {_f(str(100 * float(r['rms_dp'])), '.2f')} % "
            f"| {_f(str(100 * float(r['same_top'])), '.2f')} % "
            f"| {_f(r['pp_tps'], '.1f')} | {_f(r['tg_tps'], '.1f')} |")
    if sw.notes:
        lines += ["", sw.notes]
    path = out_dir / f"sweep_{sw.name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(sw: Sweep, rows: list[dict[str, str]], out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[experiments]): no plot",
              file=sys.stderr)
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    # the base point (KLD 0 by definition, often 16/32 bits) is a reference line, not a dot
    is_base = [r["engine"] == "jllama" and r["point"] == sw.base for r in rows]
    for r, b in zip(rows, is_base):
        if b:
            a2.axhline(float(r["ppl"]), ls="--", c="gray", lw=1,
                       label=f"{sw.base} (base, {float(r['bpw']):.1f} bpw)")
    for engine, marker in (("jllama", "o"), ("llama.cpp", "x")):
        rs = [r for r, b in zip(rows, is_base) if r["engine"] == engine and not b]
        if not rs:
            continue
        bpw = [float(r["bpw"]) for r in rs]
        kld = [max(float(r["kld"]), 1e-6) for r in rs]
        ppl = [float(r["ppl"]) for r in rs]
        a1.scatter(bpw, kld, marker=marker, label=engine, s=40)
        a2.scatter(bpw, ppl, marker=marker, label=engine, s=40)
        if engine == "jllama":
            for r, x, y1, y2 in zip(rs, bpw, kld, ppl):
                a1.annotate(r["point"], (x, y1), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
                a2.annotate(r["point"], (x, y2), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    a1.set_yscale("log")
    a1.set_xlabel("bits per weight")
    a1.set_ylabel(f"mean KLD vs {sw.base}")
    a2.set_xlabel("bits per weight")
    a2.set_ylabel(f"PPL (-c {sw.n_ctx})")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"{sw.name}: quantization sweep (WikiText-2)")
    fig.tight_layout()
    path = out_dir / f"sweep_{sw.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep YAML (experiments/sweeps/*.yaml)")
    ap.add_argument("--chunks", type=int, default=None, help="override the YAML's chunks")
    ap.add_argument("--no-speed", action="store_true", help="skip pp/tg measurements")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp points")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default=None,
                    help="folder for the base log-probs and llama.cpp's files "
                         "(default: ~/.cache/jllama/sweeps)")
    args = ap.parse_args(argv)

    from jllama.errors import JllamaError
    from jllama.registry import cache_dir

    try:
        sw = load_sweep(args.sweep)
        if args.chunks:
            sw.chunks = args.chunks
        work = Path(args.work) if args.work else cache_dir() / "sweeps"
        rows = run_sweep(sw, Path(args.out), work, not args.no_speed, not args.no_llamacpp)
    except JllamaError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 1
    md = write_markdown(sw, rows, Path(args.out))
    png = write_plot(sw, rows, Path(args.out))
    print(md.read_text())
    print(f"wrote {md}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
