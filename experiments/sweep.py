"""Quantization sweep: size, bits per weight, PPL, KLD and speed for a list of mixes of one model.

    python experiments/sweep.py experiments/sweeps/smollm2.yaml [--chunks N] [--no-speed]
                                [--no-llamacpp] [--score-identical] [--keep-files]
                                [--report-only]
                                [--out experiments/results]

The YAML names a model, a text and the points; each point is a quantize-on-load mix in the form
``jllama quantize --config`` reads (``{base: q4_k_m, rules: [{match: REGEX, type: T}]}``) or
``null`` for the file as it is. For every point: weight bytes and bits per weight (of all
tensors, as llama-quantize prints), PPL with llama-perplexity's method, KL-divergence against
the base point (the first, or ``base:``; its log-probs are saved once with the base-file
writer of ``jllama perplexity --kl-divergence-base``), and pp/tg speed. ``llamacpp:`` points
are quantized by llama.cpp itself (``llama_model_quantize``) and scored by llama-cpp-python on
the same windows, with their KLD against the same base file.

``ftypes:`` points (``FTYPE`` or ``"FTYPE imatrix"``) are llama-quantize file types made twice,
by jllama's quantizer and by llama.cpp's llama-quantize binary (``--allow-requantize``, one
thread; ``LLAMACPP_BIN`` names its folder), with the sweep's importance matrix for the
``imatrix`` ones (``imatrix: {text, n_ctx, chunks}``: made once per model by llama-imatrix and
given to both). The two files' sha256 are compared: jllama scores its file; llama.cpp's is
scored by llama-cpp-python only when it differs (or with ``--score-identical``).

Results go to ``{out}/sweep_{name}.csv`` after every point; a rerun skips the points already
in the CSV (same n_ctx and chunks), so an interrupted sweep resumes. The markdown table and the
plot (bits/weight vs KLD and vs PPL) are rewritten from the CSV at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
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
          "seconds", "ftype", "imatrix", "sha256", "identical", "qcpu_jllama", "qcpu_llamacpp"]
# default place of llama.cpp 0c1e570's own tools (shared/tools/build-llamacpp.sh builds them)
LLAMACPP_BIN = Path(os.environ.get("LLAMACPP_BIN", Path.home() / ".cache/llamacpp-0c1e570/bin"))


# ----------------------------------------------------------------------------- the YAML


@dataclass
class Point:
    name: str
    quant: dict[str, Any] | None  # None: the model file as it is
    ftype: str = ""  # a file-type point: quantized to a file by jllama and by llama-quantize
    imatrix: bool = False  # ... with the sweep's importance matrix


@dataclass
class ImatrixSpec:
    """How the sweep's importance matrix is made: llama-imatrix over ``text`` (once per model;
    the same file then goes to both quantizers, so their outputs can be compared byte for
    byte)."""

    text: Path
    n_ctx: int = 512
    chunks: int = 8


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
    ftypes: list[Point] = field(default_factory=list)  # file-type points, both quantizers
    imatrix: ImatrixSpec | None = None

    @property
    def base_point(self) -> Point:
        return next(p for p in self.points if p.name == self.base)


_KEYS = {"name", "model", "text", "n_ctx", "chunks", "batch", "speed", "base", "points",
         "llamacpp", "llamacpp_chunks", "notes", "ftypes", "imatrix"}


def _ftype_points(d: dict[str, Any], source: str) -> tuple[list[Point], ImatrixSpec | None]:
    """``ftypes: [FTYPE, "FTYPE imatrix", ...]`` (run in this order) and ``imatrix: {text,
    n_ctx, chunks}``; an imatrix point needs the imatrix block."""
    from jllama.errors import ConfigError
    from jllama.quant.mixes import parse_ftype

    raw = d.get("ftypes") or []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: 'ftypes' must be a list of FTYPE or 'FTYPE imatrix'")
    pts = []
    for n in raw:
        words = str(n).split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] != "imatrix"):
            raise ConfigError(f"{source}: ftypes entry '{n}' is not FTYPE or 'FTYPE imatrix'")
        ft = parse_ftype(words[0])
        im = len(words) == 2
        pts.append(Point(f"{ft} imatrix" if im else ft, None, ft, im))
    imx = None
    if d.get("imatrix") is not None:
        m = d["imatrix"]
        if not isinstance(m, dict) or "text" not in m or set(m) - {"text", "n_ctx", "chunks"}:
            raise ConfigError(f"{source}: 'imatrix' must be {{text: FILE, n_ctx: N, chunks: N}}")
        imx = ImatrixSpec((Path(source).parent / str(m["text"])).resolve(),
                          int(m.get("n_ctx", 512)), int(m.get("chunks", 8)))
    if any(p.imatrix for p in pts) and imx is None:
        raise ConfigError(f"{source}: ftypes.imatrix needs an 'imatrix' block")
    names = [p.name for p in pts]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate file types in 'ftypes'")
    return pts, imx


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
    sw.ftypes, sw.imatrix = _ftype_points(d, str(path))
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
    if not new:
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:  # written by an older sweep.py: rewrite with today's columns
            old = read_rows(csv_path)
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, FIELDS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in FIELDS} for r in old)
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


def score_llamacpp(sw: Sweep, path: Path, chunks: np.ndarray, base_file: Path) -> dict[str, Any]:
    """llama-cpp-python scores ``path`` on the base file's windows; its logits are compared
    with the base file's (numpy on the host). Returns the KLD/PPL fields of a row."""
    import jax.numpy as jnp

    from jllama.eval.kld import KLDResult, _compare_rows, read_header

    sys.path.insert(0, str(HERE))
    from bench_perplexity import open_llamacpp

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
    return _kld_fields(res.stats())


def run_llamacpp_point(sw: Sweep, p: Point, chunks: np.ndarray, base_file: Path,
                       work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """llama.cpp quantizes (``llama_model_quantize``) and scores with llama-cpp-python, KLD
    against the same base file."""
    from jllama.gguf.reader import read_gguf
    from jllama.quant.testing import llama_cpp_quantize
    from jllama.registry import resolve_model

    t0 = time.perf_counter()
    src = resolve_model(sw.model)
    path = Path(src)
    if p.quant is not None:
        path = work / f"{Path(src).stem}.llamacpp-{p.quant['base'].lower()}.gguf"
        if not path.is_file():
            llama_cpp_quantize(src, path, p.quant["base"])
    nbytes, elems = weight_bytes(read_gguf(path), None)
    row = {"engine": "llama.cpp", "point": p.name, "quant": json.dumps(p.quant),
           "n_ctx": sw.n_ctx, "chunks": len(chunks), "bytes": nbytes, "bpw": 8.0 * nbytes / elems,
           **score_llamacpp(sw, path, chunks, base_file), "seconds": time.perf_counter() - t0}
    log(f"llama.cpp {p.name}: {row['bpw']:.3f} bpw, PPL {row['ppl']:.4f}, KLD {row['kld']:.5f}")
    return row


def ensure_imatrix(sw: Sweep, work: Path, log: Callable[[str], None]) -> Path:
    """The sweep's importance matrix, made once by llama.cpp's own llama-imatrix (jllama's
    `jllama imatrix` matches it to f32 summation order, experiments/results/imatrix.md; one
    file for both quantizers is what lets their outputs be compared byte for byte)."""
    assert sw.imatrix is not None
    im = sw.imatrix
    path = work / f"{sw.name}.imatrix-c{im.n_ctx}-n{im.chunks}.gguf"
    if path.is_file():
        return path
    tmp = path.with_suffix(".tmp.gguf")
    cmd = [str(LLAMACPP_BIN / "llama-imatrix"), "-m", _resolve(sw.model), "-f", str(im.text),
           "-o", str(tmp), "-c", str(im.n_ctx), "--chunks", str(im.chunks), "-t", "2"]
    log("imatrix: " + " ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=True)
    tmp.rename(path)
    return path


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def llama_quantize(src: str, dst: Path, ftype: str, imatrix: Path | None) -> None:
    """llama.cpp's llama-quantize binary, requantizing (--allow-requantize), one thread; where
    the binary is not built, the same library call through llama-cpp-python
    (``llama_model_quantize``, handed the imatrix and its metadata as llama-quantize does)."""
    exe = LLAMACPP_BIN / "llama-quantize"
    if not exe.is_file():
        from jllama.quant.imatrix import load_for_quantize, quantize_metadata
        from jllama.quant.testing import llama_cpp_quantize

        qi = load_for_quantize(str(imatrix)) if imatrix is not None else None
        llama_cpp_quantize(src, dst, ftype, imatrix=qi and qi.weights,
                           kv_overrides=qi and [(k, v) for k, v, _ in quantize_metadata(qi)])
        return
    cmd = [str(exe), "--allow-requantize"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [src, str(dst), ftype, "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize {ftype} failed: {r.stderr.strip()[-400:]}")


def run_ftype_point(sw: Sweep, p: Point, tokens: list[int], chunks: np.ndarray,
                    base_file: Path, work: Path, imatrix: Path | None,
                    log: Callable[[str], None], score_identical: bool = False,
                    keep_files: bool = False) -> list[dict[str, Any]]:
    """Quantize the model to ``p.ftype`` with jllama and with llama-quantize (the same
    imatrix file for both), compare the files' sha256, score jllama's file with jllama and, when
    the files differ (or ``score_identical``), llama.cpp's with llama-cpp-python."""
    from jllama.api import Llama
    from jllama.eval.kld import kl_divergence
    from jllama.gguf.reader import read_gguf
    from jllama.quant.imatrix import load_for_quantize
    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file

    src = _resolve(sw.model)
    tag = f"{p.ftype.lower()}{'-imatrix' if p.imatrix else ''}"
    jpath = work / f"{Path(src).stem}.jllama-{tag}.gguf"
    lpath = work / f"{Path(src).stem}.llamacpp-{tag}.gguf"
    im = imatrix if p.imatrix else None
    # CPU seconds, not wall: the machine is shared, and both quantizers run on one thread
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_file(src, jpath, mix_from_base(p.ftype), allow_requantize=True,
                  imatrix=load_for_quantize(str(im)) if im is not None else None)
    t_j, c_j = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), _children_cpu()
    llama_quantize(src, lpath, p.ftype, im)
    t_l, c_l = time.perf_counter() - t0, _children_cpu() - c0
    from jllama.registry import sha256_of

    sj, sl = sha256_of(jpath), sha256_of(lpath)
    same = sj == sl
    base = {"point": p.name, "quant": json.dumps({"base": p.ftype.lower()}), "n_ctx": sw.n_ctx,
            "ftype": p.ftype, "imatrix": int(p.imatrix), "identical": int(same),
            "qcpu_jllama": c_j, "qcpu_llamacpp": c_l}
    out = []
    t0 = time.perf_counter()
    nbytes, elems = weight_bytes(read_gguf(jpath), None)
    llm = Llama(str(jpath), ctx_size=sw.n_ctx)
    r = kl_divergence(llm, tokens, base_file, sw.n_ctx, sw.chunks, sw.batch)
    del llm
    out.append({**base, "engine": "jllama", "chunks": sw.chunks, "bytes": nbytes,
                "bpw": 8.0 * nbytes / elems, **_kld_fields(r.stats()), "sha256": sj,
                "seconds": time.perf_counter() - t0 + t_j})
    log(f"jllama {p.name}: quantize {c_j:.1f} CPU s (llama-quantize {c_l:.1f} CPU s), "
        f"{'identical' if same else 'DIFFERENT'} files, {out[0]['bpw']:.3f} bpw, "
        f"PPL {out[0]['ppl']:.4f}, KLD {out[0]['kld']:.5f}")
    if not same or score_identical:
        t0 = time.perf_counter()
        nbytes, elems = weight_bytes(read_gguf(lpath), None)
        out.append({**base, "engine": "llama.cpp", "chunks": len(chunks), "bytes": nbytes,
                    "bpw": 8.0 * nbytes / elems, **score_llamacpp(sw, lpath, chunks, base_file),
                    "sha256": sl, "seconds": time.perf_counter() - t0 + t_l})
        log(f"llama.cpp {p.name}: PPL {out[1]['ppl']:.4f}, KLD {out[1]['kld']:.5f}")
    if not keep_files:
        jpath.unlink()
        lpath.unlink()
    return out


def run_sweep(sw: Sweep, out_dir: Path, work_dir: Path, speed: bool = True,
              llamacpp: bool = True, log: Callable[[str], None] = print,
              run_point: Callable[..., dict[str, Any]] = run_jllama_point,
              score_identical: bool = False, keep_files: bool = False) -> list[dict[str, str]]:
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
    ft_todo = [p for p in sw.ftypes if not _done(rows, "jllama", p.name, sw.n_ctx, sw.chunks)]
    need_base = bool(todo or lc_todo or ft_todo)
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
    if lc_todo or ft_todo:
        chunks = chunk_tokens(tokens, sw.n_ctx, lc_chunks, tk.bos_id, tk.add_bos, str(sw.text))
    for p in lc_todo:
        _append_row(csv_path, run_llamacpp_point(sw, p, chunks, base_file, work_dir, log))
    imatrix = ensure_imatrix(sw, work_dir, log) if any(p.imatrix for p in ft_todo) else None
    for p in ft_todo:
        try:
            got = run_ftype_point(sw, p, tokens, chunks, base_file, work_dir, imatrix, log,
                                  score_identical, keep_files)
        except Exception as e:  # one failing point must not lose the others
            log(f"{p.name}: FAILED: {type(e).__name__}: {e}")
            continue
        for row in got:
            _append_row(csv_path, row)
    return read_rows(csv_path)


def _resolve(model: str) -> str:
    from jllama.registry import resolve_model

    return str(resolve_model(model))


# ----------------------------------------------------------------------------- reports


def _f(x: str, fmt: str) -> str:
    return format(float(x), fmt) if x not in ("", None) else ""


def _files_cell(r: dict[str, str]) -> str:
    if not r.get("ftype"):
        return ""
    if r.get("identical") == "1":
        return f"identical ({r['sha256'][:12]})"
    return f"differ ({r['sha256'][:12]})"


def write_markdown(sw: Sweep, rows: list[dict[str, str]], out_dir: Path) -> Path:
    speed = any(r.get("pp_tps") for r in rows)
    ft = any(r.get("ftype") for r in rows)
    head = (f"WikiText-2 test, -c {sw.n_ctx}; KLD against '{sw.base}' (jllama). Sizes are bytes "
            "of all tensors (bits per weight as llama-quantize prints).")
    if speed:
        head += f" Speeds pp{sw.pp} / tg{sw.tg} t/s, 2 threads, shared machine."
    if ft:
        head += (" File-type rows: the file quantized by jllama and by llama-quantize; 'files' "
                 "says whether the two are byte-identical (sha256 prefix of the scored file). "
                 "Identical files are scored once, by jllama (the 'jllama' row stands for both); "
                 "differing ones by both engines, each on its own file.")
    cols = ["engine", "point", "chunks", "MiB", "bpw", "PPL", "±", "mean KLD", "99% KLD",
            "RMS Δp", "same top"] + (["files"] if ft else []) + (["pp t/s", "tg t/s"] if speed
                                                                  else [])
    lines = [f"# Quantization sweep: {sw.name} ({Path(_resolve(sw.model)).name})", "", head, "",
             "| " + " | ".join(cols) + " |",
             "| --- | --- | " + " | ".join(["---:"] * (len(cols) - 2)) + " |"]
    for r in sorted(rows, key=lambda r: (r["engine"] != "jllama", -float(r["bpw"]),
                                         r.get("imatrix") == "1")):
        cells = [r["engine"], r["point"], r["chunks"], f"{float(r['bytes']) / 2**20:.2f}",
                 _f(r["bpw"], ".3f"), _f(r["ppl"], ".4f"), _f(r["ppl_err"], ".4f"),
                 _f(r["kld"], ".5f"), _f(r["kld_p99"], ".4f"),
                 f"{_f(str(100 * float(r['rms_dp'])), '.2f')} %",
                 f"{_f(str(100 * float(r['same_top'])), '.2f')} %"]
        if ft:
            cells.append(_files_cell(r))
        if speed:
            cells += [_f(r.get("pp_tps", ""), ".1f"), _f(r.get("tg_tps", ""), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
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
    series = (("jllama", "0", "o", "no imatrix (jllama)"),
              ("jllama", "1", "s", "imatrix (jllama)"),
              ("llama.cpp", "0", "x", "llama.cpp (file differs)"),
              ("llama.cpp", "1", "+", "llama.cpp, imatrix (file differs)"))
    for engine, imx, marker, label in series:
        rs = [r for r, b in zip(rows, is_base) if r["engine"] == engine and not b
              and (r.get("imatrix") or "0") == imx]
        if not rs:
            continue
        bpw = [float(r["bpw"]) for r in rs]
        kld = [max(float(r["kld"]), 1e-6) for r in rs]
        ppl = [float(r["ppl"]) for r in rs]
        a1.scatter(bpw, kld, marker=marker, label=label, s=40)
        a2.scatter(bpw, ppl, marker=marker, label=label, s=40)
        if engine == "jllama":
            for r, x, y1, y2 in zip(rs, bpw, kld, ppl):
                a1.annotate(r.get("ftype") or r["point"], (x, y1), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
                a2.annotate(r.get("ftype") or r["point"], (x, y2), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    a1.set_yscale("log")
    a2.set_yscale("log")  # the 1-2 bit types reach PPL in the hundreds
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
    ap.add_argument("--score-identical", action="store_true",
                    help="score llama.cpp's file with llama-cpp-python even when it is "
                         "byte-identical to jllama's")
    ap.add_argument("--keep-files", action="store_true",
                    help="keep the quantized files of the file-type points in --work")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the markdown and the plot from the CSV")
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
        if args.report_only:
            rows = read_rows(Path(args.out) / f"sweep_{sw.name}.csv")
        else:
            rows = run_sweep(sw, Path(args.out), work, not args.no_speed, not args.no_llamacpp,
                             score_identical=args.score_identical, keep_files=args.keep_files)
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
