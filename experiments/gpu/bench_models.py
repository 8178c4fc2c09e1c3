"""Published model shapes with random weights: ``jllama bench`` against llama.cpp's llama-bench.

For each ``NAME:TYPE`` of ``--models`` this writes ``jllama synth NAME --type TYPE
--random-blocks`` into ``--workdir`` (seconds even at 8B; a file already there is reused), runs
``jllama bench`` on it and, with ``--llama-bench PATH``, llama.cpp's llama-bench on the same file
(``-ngl``), both with the same ``-p/-n/-r``, and prints a markdown table (model, type, size,
pp and tg tokens/s of both engines, jllama / llama.cpp ratios), rewritten to ``--out`` after each
row so a run cut short still leaves what it measured. The weights are random: speed and memory
only (the text they would produce is meaningless).

Each synth and engine run is its own subprocess with a timeout (``--timeout``, and never past the
time budget by much), so a failure is a row with its error and the next model still runs.
``--time-budget S`` skips (and lists) the models that would start after S seconds.

On the GPU machine (no network: the tokenizers come from ``--vocab-dir``, a folder of llama.cpp's
``ggml-vocab-*.gguf``; gemma shapes fall back to llama-bpe's vocabulary padded to theirs when the
folder has no gemma tokenizer):

    python3 experiments/gpu/bench_models.py --vocab-dir DIR --workdir DIR \\
        [--llama-bench PATH] --out $OUT/models.md --time-budget S

Smoke test on a CPU (two blocks per model, tiny runs; about 3 minutes on 2 cores):

    python3 experiments/gpu/bench_models.py --layers 2 -p 16 -n 4 -r 1 \\
        --models smollm2-135m:q4_1,gemma-3-270m:q4_k_m,llama-3.2-1b:q8_0 \\
        --vocab-dir ~/.cache/jllama/testdata/vocab --workdir /tmp/bench_models \\
        --llama-bench ~/.cache/llamacpp-0c1e570/bin/llama-bench --out /tmp/bench_models/models.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEFAULT_MODELS = ("smollm2-135m:q4_1,gemma-3-270m:q4_k_m,gemma-3-1b:q4_k_m,llama-3.2-1b:q4_k_m,"
                  "llama-3.2-1b:q8_0,llama-3.1-8b:q4_k_m")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], timeout: float) -> tuple[str | None, str]:
    """(stdout, "") or (None, a one-line error)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                           cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    except OSError as e:
        return None, f"cannot run {cmd[0]}: {e.strerror or e}"
    if r.returncode != 0:
        lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()]
        return None, f"exit {r.returncode}: {lines[-1][:200] if lines else 'no output'}"
    return r.stdout, ""


def _vocab_for(name: str, vocab_dir: str | None) -> list[str]:
    """``--vocab`` for synth: the folder, or for a shape whose tokenizer is a registry model
    (gemma) and a folder without it, llama-bpe's vocabulary (padded to the shape's size)."""
    if not vocab_dir:
        return []
    from jllama.convert.synth import SHAPES

    s = SHAPES.get(name)
    if s is not None and s.vocab.startswith("registry:") and not (Path(vocab_dir) / f"ggml-vocab-{s.vocab}.gguf"
                                                 ).is_file():
        return ["--vocab", str(Path(vocab_dir) / "ggml-vocab-llama-bpe.gguf")]
    return ["--vocab", vocab_dir]


def synth(name: str, qtype: str, args, timeout: float) -> tuple[Path | None, str, float]:
    layers = f"-{args.layers}l" if args.layers else ""
    path = Path(args.workdir) / f"{name}-{qtype}{layers}-random.gguf"
    if path.is_file():
        return path, "", 0.0
    cmd = [sys.executable, "-m", "jllama", "synth", name, str(path), "--type", qtype,
           "--random-blocks", *_vocab_for(name, args.vocab_dir)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    t0 = time.perf_counter()
    out, err = _run(cmd, timeout)
    return (path if out is not None else None), err, time.perf_counter() - t0


def bench_jllama(path: Path, args, timeout: float) -> tuple[float | None, float | None, str]:
    cmd = [sys.executable, "-m", "jllama", "bench", "-m", str(path), "-p", str(args.p),
           "-n", str(args.n), "-r", str(args.r), "--json", "--platform", args.platform]
    out, err = _run(cmd, timeout)
    if out is None:
        return None, None, err
    try:
        res = json.loads(out.strip().splitlines()[-1])["results"]
    except (ValueError, KeyError, IndexError):
        return None, None, f"unreadable jllama bench output: {out.strip()[-200:]!r}"
    tps = {r["test"]: r["tps"] for r in res}
    backends = sorted({r["backend"] for r in res})
    # a GPU run that fell back to the CPU would look like a slow GPU: say where it ran
    return tps.get(f"pp{args.p}"), tps.get(f"tg{args.n}"), f"jllama on {'/'.join(backends)}"


def bench_llamacpp(path: Path, args, timeout: float) -> tuple[float | None, float | None, str]:
    cmd = [args.llama_bench, "-m", str(path), "-p", str(args.p), "-n", str(args.n),
           "-r", str(args.r), "-ngl", str(args.ngl), "-o", "json"]
    out, err = _run(cmd, timeout)
    if out is None:
        return None, None, err
    try:
        res = json.loads(out)
        pp = [r["avg_ts"] for r in res if r["n_prompt"] == args.p and r["n_gen"] == 0]
        tg = [r["avg_ts"] for r in res if r["n_gen"] == args.n and r["n_prompt"] == 0]
    except (ValueError, KeyError, TypeError):
        return None, None, f"unreadable llama-bench output: {out.strip()[-200:]!r}"
    return (pp[0] if pp else None), (tg[0] if tg else None), ""


def device() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            gpu = "; ".join(x.strip() for x in r.stdout.strip().splitlines())
            return f"{gpu}; {os.cpu_count()} CPUs"
    except (OSError, subprocess.TimeoutExpired):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs (no GPU found by nvidia-smi)"


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def render(head: list[str], rows: list[dict], skipped: list[str]) -> str:
    lines = [*head, "",
             f"| model | type | size GiB | jllama pp{ARGS.p} t/s | jllama tg{ARGS.n} t/s | "
             f"llama.cpp pp{ARGS.p} t/s | llama.cpp tg{ARGS.n} t/s | pp ratio | tg ratio | "
             "synth s | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['type']} | {_f(r['size'], 2)} | {_f(r['j_pp'])} | "
            f"{_f(r['j_tg'])} | {_f(r['l_pp'])} | {_f(r['l_tg'])} | "
            f"{_ratio(r['j_pp'], r['l_pp'])} | {_ratio(r['j_tg'], r['l_tg'])} | "
            f"{_f(r['synth_s'])} | {'; '.join(r['notes']).replace('|', '/')} |")
    if skipped:
        lines += ["", f"Skipped (time budget): {', '.join(skipped)}"]
    lines += ["", "Ratios: jllama / llama.cpp (above 1: jllama faster). Random weights: speed "
              "only, the text is meaningless."]
    return "\n".join(lines) + "\n"


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="NAME:TYPE,... (jllama synth "
                    f"shapes and 'jllama quantize' types; default {DEFAULT_MODELS})")
    ap.add_argument("--workdir", default="/tmp/jllama-bench-models",
                    help="where the model files are written (and reused from)")
    ap.add_argument("--vocab-dir", help="folder of llama.cpp's ggml-vocab-*.gguf (else synth's "
                    "default: shared data, registry)")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (else jllama only)")
    ap.add_argument("--ngl", default="99", help="llama-bench -ngl (default 99)")
    ap.add_argument("--platform", default="auto", help="jllama bench --platform (default auto)")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=2)
    ap.add_argument("--layers", type=int, help="blocks per model (smoke tests; default all)")
    ap.add_argument("--out", help="also write the markdown here (after every row)")
    ap.add_argument("--time-budget", type=float, help="seconds: models that would start "
                    "later are skipped")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    args = ARGS = ap.parse_args()

    t0 = time.time()
    models = []
    for item in args.models.split(","):
        name, sep, qtype = item.strip().partition(":")
        if not sep or not name or not qtype:
            print(f"bench_models: --models wants NAME:TYPE, got '{item}'", file=sys.stderr)
            return 1
        models.append((name, qtype))
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        print(f"bench_models: {args.llama_bench} is not an executable", file=sys.stderr)
        return 1
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc)
    head = [f"# jllama bench vs llama-bench on random-weight models ({now:%Y-%m-%d %H:%M} UTC)",
            "",
            f"- device: {device()}; load average at start {load}",
            f"- flags: -p {args.p} -n {args.n} -r {args.r}; jllama --platform {args.platform}; "
            + (f"llama-bench {args.llama_bench} -ngl {args.ngl}" if args.llama_bench
               else "no llama-bench"),
            f"- command: {' '.join(shlex.quote(a) for a in sys.argv)}"]
    rows: list[dict] = []
    skipped: list[str] = []

    def emit() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render(head, rows, skipped))

    for name, qtype in models:
        elapsed = time.time() - t0
        if args.time_budget is not None and elapsed > args.time_budget:
            skipped.append(f"{name}:{qtype}")
            continue

        def timeout() -> float:  # never far past the budget: the caller's limit is hard
            if args.time_budget is None:
                return args.timeout
            return max(30.0, min(args.timeout, args.time_budget + 60 - (time.time() - t0)))

        row = {"model": name, "type": qtype, "size": None, "j_pp": None, "j_tg": None,
               "l_pp": None, "l_tg": None, "synth_s": None, "notes": []}
        rows.append(row)
        path, err, synth_s = synth(name, qtype, args, timeout())
        row["synth_s"] = synth_s or None
        if path is None:
            row["notes"].append(f"synth: {err}")
        else:
            row["size"] = path.stat().st_size / 2**30
            row["j_pp"], row["j_tg"], err = bench_jllama(path, args, timeout())
            row["notes"].append(err if err.startswith("jllama on") else f"jllama: {err}")
            if args.llama_bench:
                row["l_pp"], row["l_tg"], err = bench_llamacpp(path, args, timeout())
                if err:
                    row["notes"].append(f"llama-bench: {err}")
        print(f"{name}:{qtype}: jllama pp {_f(row['j_pp'])} tg {_f(row['j_tg'])}, llama.cpp pp "
              f"{_f(row['l_pp'])} tg {_f(row['l_tg'])} t/s {'; '.join(row['notes'])}",
              file=sys.stderr, flush=True)
        emit()
    emit()
    print(render(head, rows, skipped))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the device script's phase timeout (SIGINT): rows are in --out
        print("bench_models: interrupted; the rows measured so far are in --out", file=sys.stderr)
        sys.exit(130)
