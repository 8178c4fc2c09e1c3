"""jllama vs llama-bench on real-shape GGUFs, side by side in one run per model (issue #16 items 2, 3, 6).

    python experiments/scale_sweep.py run FILE.gguf ... [-p 512] [-n 128] [-r 2] [-t 2]
    python experiments/scale_sweep.py ttft FILE.gguf ... [-r 2] [-t 2]
    python experiments/scale_sweep.py plot [--csv experiments/results/scale.csv]

``run``, per file, interleaved in this order so drift on a shared machine shows up as a gap
between the two llama-bench runs instead of landing on one engine:

1. llama-bench, repack on (llama.cpp's default and usually its best on x86: Q4_0/Q4_K/IQ4_NL/
   Q8_0 weights get copied into its interleaved layouts at load);
2. llama-bench ``--repack 0`` (ggml's stock kernels, the configuration jllama is bit-exact with;
   its weights stay in the mapped file, so this is the fair RSS reference);
3. ``jllama bench``;
4. llama-bench, repack on, again.

Each run is its own process under ``/usr/bin/time -v`` for peak RSS. Rows go to the CSV
(appended, one per engine and configuration, with date, CPU model and flags); the printed table
gives jllama / llama.cpp for the best llama.cpp configuration measured on that file and the
range over all llama.cpp runs. ``plot`` draws t/s vs parameters (pp and tg) and peak RSS vs
parameters for both engines from the CSV, plus TTFT vs layers from ``scale_ttft.csv``, which
``ttft`` writes: jllama cold (empty persistent compilation cache) and warm, each a fresh process
through ``bench_ttft.py``'s child (``Llama(model, ctx_size=512)`` and one greedy token), and
llama.cpp the same way through llama-cpp-python (its defaults: repack on), the file in the page
cache for both.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LLAMACPP_BIN = Path(os.environ.get("LLAMACPP_BIN", Path.home() / ".cache/llamacpp-0c1e570/bin"))
FIELDS = [
    "date_utc", "cpu", "cpu_flags", "file", "arch", "params_b", "size_gib", "ftype", "layers",
    "engine", "config", "threads", "pp", "pp_tps", "tg", "tg_tps", "peak_rss_mib", "commit",
]


def cpu_model() -> tuple[str, str]:
    """("AMD EPYC (family 25, model 1)", "avx2+fma+f16c"): a VM's model name alone can be bare."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
            if key.strip() == "flags":
                break
    except OSError:
        return platform.processor() or "?", ""
    have = set(info.get("flags", "").split())
    want = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    name = f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    return name, "+".join(f for f in want if f in have)


def timed(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run under /usr/bin/time -v; returns (stdout, peak RSS MiB)."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stderr[-1500:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    return out.stdout, (int(m.group(1)) / 1024 if m else float("nan"))


def llama_bench(path: str, p: int, n: int, r: int, t: int, repack: int) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMACPP_BIN))
    cmd = [str(LLAMACPP_BIN / "llama-bench"), "-m", path, "-p", str(p), "-n", str(n),
           "-r", str(r), "-t", str(t), "--repack", str(repack), "-o", "json"]
    out, rss = timed(cmd, env)
    res = {"rss": rss}
    for row in json.loads(out):
        if row.get("n_gen", 0) == 0:
            res["pp"] = row["avg_ts"]
        else:
            res["tg"] = row["avg_ts"]
        res["params_b"] = row.get("model_n_params", 0) / 1e9
        res["size_gib"] = row.get("model_size", 0) / 2**30
    return res


def jllama_bench(path: str, p: int, n: int, r: int, t: int) -> dict:
    cmd = [sys.executable, "-m", "jllama.cli.main", "bench", "-m", path, "-p", str(p), "-n", str(n),
           "-r", str(r), "-t", str(t), "--json"]
    out, rss = timed(cmd)
    doc = json.loads(out.strip().splitlines()[-1])
    res = {"rss": rss}
    for row in doc["results"]:
        res["pp" if row["test"].startswith("pp") else "tg"] = row["tps"]
    return res


def gguf_meta(path: str) -> tuple[str, int, str]:
    from jllama.gguf.reader import read_gguf

    g = read_gguf(path)
    arch = str(g.get("general.architecture", "?"))
    layers = int(g.get(f"{arch}.block_count", 0))
    from jllama.quant.mixes import FTYPE_BY_ID

    ft = g.get("general.file_type")
    ftype = FTYPE_BY_ID.get(ft, {0: "F32", 1: "F16", 32: "BF16"}.get(ft, str(ft)))
    return arch, layers, ftype


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def ratio(ours: dict, ref: list[dict], key: str) -> str:
    """jllama over the best llama.cpp run, and the range over every llama.cpp run."""
    vals = [ours[key] / x[key] for x in ref]
    return f"{min(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"


def run(args: argparse.Namespace) -> int:
    cpu, flags = cpu_model()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    commit = git_commit()
    new = not Path(args.csv).exists()
    print("| file | llama-bench pp / tg (1st) | --repack 0 pp / tg | jllama pp / tg | llama-bench "
          "pp / tg (2nd) | pp ratio vs best (range) | tg ratio vs best (range) | RSS MiB "
          "repack on / off / jllama |")
    print("|---|---|---|---|---|---|---|---|")
    with open(args.csv, "a", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        if new:
            w.writeheader()
        for path in args.files:
            arch, layers, ftype = gguf_meta(path)
            runs = [("llama.cpp", "repack", llama_bench(path, args.p, args.n, args.r, args.t, 1)),
                    ("llama.cpp", "no-repack", llama_bench(path, args.p, args.n, args.r, args.t, 0)),
                    ("jllama", "default", jllama_bench(path, args.p, args.n, args.r, args.t)),
                    ("llama.cpp", "repack", llama_bench(path, args.p, args.n, args.r, args.t, 1))]
            base = runs[0][2]
            for engine, config, res in runs:
                w.writerow({
                    "date_utc": date, "cpu": cpu, "cpu_flags": flags, "file": Path(path).name,
                    "arch": arch, "params_b": f"{base['params_b']:.3f}",
                    "size_gib": f"{base['size_gib']:.3f}", "ftype": ftype, "layers": layers,
                    "engine": engine, "config": config, "threads": args.t, "pp": args.p,
                    "pp_tps": f"{res['pp']:.3f}", "tg": args.n, "tg_tps": f"{res['tg']:.3f}",
                    "peak_rss_mib": f"{res['rss']:.0f}", "commit": commit})
            fh.flush()
            ours = runs[2][2]
            ref = [r[2] for r in runs if r[0] == "llama.cpp"]
            cells = [f"{r[2]['pp']:.2f} / {r[2]['tg']:.2f}" for r in runs]
            print(f"| {Path(path).name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
                  f"{ratio(ours, ref, 'pp')} | {ratio(ours, ref, 'tg')} | {runs[0][2]['rss']:.0f} / "
                  f"{runs[1][2]['rss']:.0f} / {ours['rss']:.0f} |", flush=True)
    return 0


LLAMACPP_TTFT = r"""
import sys, time
t0 = time.perf_counter()
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), verbose=False)
t1 = time.perf_counter()
llm.eval(llm.tokenize(b"Hello, my name is"))
llm.sample()
print(time.perf_counter() - t0, t1 - t0)
"""


def ttft(args: argparse.Namespace) -> int:
    """Time to first token vs depth: jllama cold/warm (bench_ttft.py's child) and llama.cpp."""
    import tempfile

    sys.path.insert(0, str(HERE))
    from bench_ttft import run_once

    cpu, flags = cpu_model()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    out = Path(args.csv).with_name(Path(args.csv).stem + "_ttft.csv")
    fields = ["date_utc", "cpu", "cpu_flags", "file", "arch", "layers", "engine", "cold_s",
              "warm_s", "load_s", "commit"]
    new = not out.exists()
    print("| file | layers | jllama cold s | jllama warm s (load s) | llama.cpp s (load s) |")
    print("|---|---|---|---|---|")
    with open(out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        if new:
            w.writeheader()
        for path in args.files:
            arch, layers, _ = gguf_meta(path)
            with tempfile.TemporaryDirectory() as cache:
                cold = run_once(path, cache)
                warm = [run_once(path, cache) for _ in range(args.r)]
            best = min(warm, key=lambda d: d["total"])
            ref = []
            for _ in range(args.r):
                o = subprocess.run([sys.executable, "-c", LLAMACPP_TTFT, path, str(args.t)],
                                   capture_output=True, text=True)
                if o.returncode != 0:
                    raise RuntimeError(o.stderr[-1500:])
                ref.append([float(x) for x in o.stdout.split()])
            rbest = min(ref)
            base = {"date_utc": date, "cpu": cpu, "cpu_flags": flags, "file": Path(path).name,
                    "arch": arch, "layers": layers, "commit": git_commit()}
            w.writerow({**base, "engine": "jllama", "cold_s": f"{cold['total']:.3f}",
                        "warm_s": f"{best['total']:.3f}", "load_s": f"{best['load']:.3f}"})
            w.writerow({**base, "engine": "llama.cpp", "cold_s": "", "warm_s": f"{rbest[0]:.3f}",
                        "load_s": f"{rbest[1]:.3f}"})
            fh.flush()
            print(f"| {Path(path).name} | {layers} | {cold['total']:.2f} | {best['total']:.2f} "
                  f"({best['load']:.2f}) | {rbest[0]:.2f} ({rbest[1]:.2f}) |", flush=True)
    return 0


def plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib
    except ImportError:  # not a dependency of jllama: only these plots use it
        raise SystemExit("scale_sweep.py plot: needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(args.csv)))
    if not rows:
        raise SystemExit(f"{args.csv}: no rows")
    # One machine per plot (its speed is not comparable across CPUs): the newest row's, or --cpu.
    cpu = args.cpu or rows[-1]["cpu"]
    rows = [r for r in rows if r["cpu"] == cpu]
    if not rows:
        raise SystemExit(f"{args.csv}: no rows for cpu {cpu!r}")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    style = {("jllama", "default"): ("o-", "jllama"),
             ("llama.cpp", "repack"): ("s--", "llama-bench (repack on)"),
             ("llama.cpp", "no-repack"): ("^:", "llama-bench --repack 0")}
    for ftype in sorted({r["ftype"] for r in rows}):
        for (engine, config), (mark, label) in style.items():
            pts: dict[float, list[dict]] = {}
            for r in rows:
                if r["ftype"] == ftype and r["engine"] == engine and r["config"] == config:
                    pts.setdefault(float(r["params_b"]), []).append(r)
            if not pts:
                continue
            xs = sorted(pts)
            # The newest measurement of each file wins; of a sweep's two llama-bench runs the
            # faster (its runs disagree by up to 20 %; the tables' ratios take its best too).
            def last(rs: list[dict], key: str) -> float:
                newest = max(x["date_utc"] for x in rs)
                vals = [float(x[key]) for x in rs if x["date_utc"] == newest]
                return max(vals) if key.endswith("_tps") else sum(vals) / len(vals)
            for ax, key in zip(axes, ("pp_tps", "tg_tps", "peak_rss_mib")):
                ax.plot(xs, [last(pts[x], key) for x in xs], mark, label=f"{label}, {ftype}")
    pp, tg = rows[-1]["pp"], rows[-1]["tg"]
    for ax, title in zip(axes, (f"pp{pp} t/s", f"tg{tg} t/s", "peak RSS MiB")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (B)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{rows[-1]['cpu']} ({rows[-1]['cpu_flags']}), {rows[-1]['threads']} threads")
    fig.tight_layout()
    out = Path(args.csv).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    ttft = Path(args.csv).with_name(Path(args.csv).stem + "_ttft.csv")
    if ttft.exists():
        rows = [r for r in csv.DictReader(open(ttft)) if r["cpu"] == cpu]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.set_title(cpu, fontsize=9)
        for engine in sorted({r["engine"] for r in rows}):
            for key, mark in (("cold_s", "o-"), ("warm_s", "s--")):
                rs = sorted((int(r["layers"]), float(r[key])) for r in rows
                            if r["engine"] == engine and r.get(key))
                if rs:
                    ax.plot(*zip(*rs), mark, label=f"{engine} {key[:-2]}")
        ax.set_xlabel("layers")
        ax.set_ylabel("time to first token, s")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(ttft.with_suffix(".png"), dpi=110)
        print(f"wrote {ttft.with_suffix('.png')}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("files", nargs="+")
    r.add_argument("-p", type=int, default=512)
    r.add_argument("-n", type=int, default=128)
    r.add_argument("-r", type=int, default=2)
    r.add_argument("-t", type=int, default=2)
    r.add_argument("--csv", default=str(RESULTS / "scale.csv"))
    t = sub.add_parser("ttft")
    t.add_argument("files", nargs="+")
    t.add_argument("-r", type=int, default=2)
    t.add_argument("-t", type=int, default=2)
    t.add_argument("--csv", default=str(RESULTS / "scale.csv"))
    q = sub.add_parser("plot")
    q.add_argument("--csv", default=str(RESULTS / "scale.csv"))
    q.add_argument("--cpu", help="the csv's cpu column to plot (default: the newest row's)")
    args = ap.parse_args()
    return {"run": run, "ttft": ttft, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
