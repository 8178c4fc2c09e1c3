"""jllama vs llama.cpp, side by side in one run, same file, same procedure (pp512 / tg128).

    python experiments/bench_vs_llamacpp.py [-m MODEL ...] [-r 3] [-t 2] [--ttft]

llama.cpp runs through llama-cpp-python 0.3.36 (commit 0c1e570) in this process; jllama through
its engine. Prints a table with both and the ratio jllama / llama.cpp (>= 1.0 means jllama is
faster). ``--ttft`` also measures time to first token in fresh processes with a cold (empty) and
warm persistent compilation cache. Results are appended to experiments/results/bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ttft(model: str, cache_dir: str) -> float:
    """Wall time from process start to the first generated token, in a fresh interpreter."""
    code = (
        "import time; t0=time.perf_counter();"
        "from jllama.api import Llama;"
        f"llm=Llama({model!r}, ctx_size=512);"
        "from jllama.engine.sampling import SamplingParams;"
        "next(iter(llm.engine.generate(llm.tokenize('Hello, my name is'), SamplingParams.greedy(), 1)));"
        "print(time.perf_counter()-t0)"
    )
    env = dict(os.environ, JLLAMA_XLA_CACHE=cache_dir)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    del t0
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", default=None)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--ttft", action="store_true")
    args = ap.parse_args()

    from jllama.eval.llamacpp import llama_cpp_stock

    llama_cpp = llama_cpp_stock()

    from jllama.api import Llama
    from jllama.eval.bench import (
        jllama_pp,
        jllama_tg,
        llamacpp_pp,
        llamacpp_tg,
        peak_rss_mib,
        time_reps,
    )
    from jllama.registry import resolve_model

    rows = []
    for model in args.model or ["smollm2-135m-instruct"]:
        path = resolve_model(model)
        llm = Llama(str(path), ctx_size=max(args.p, args.n) + 64)
        j_pp = time_reps(jllama_pp(llm, args.p), args.reps)
        j_tg = time_reps(jllama_tg(llm, args.n), args.reps)
        rss_j = peak_rss_mib()
        del llm
        # flash attention on: llama.cpp's CPU default, and the computation jllama does by default
        ref = llama_cpp.Llama(model_path=str(path), n_ctx=max(args.p, args.n) + 64, n_batch=512,
                              n_threads=args.threads, verbose=False, flash_attn=True)
        l_pp = time_reps(llamacpp_pp(ref, args.p), args.reps)
        l_tg = time_reps(llamacpp_tg(ref, args.n), args.reps)
        del ref
        for test, n, j, lc in ((f"pp{args.p}", args.p, j_pp, l_pp), (f"tg{args.n}", args.n, j_tg, l_tg)):
            jt = max(n / s for s in j)
            lt = max(n / s for s in lc)
            rows.append((path.name, test, jt, lt, jt / lt))
        rows.append((path.name, "peak RSS MiB (jllama process so far)", rss_j, float("nan"), float("nan")))
        if args.ttft:
            with tempfile.TemporaryDirectory() as d:
                cold = ttft(str(path), d)
                warm = ttft(str(path), d)
            rows.append((path.name, "TTFT cold s", cold, float("nan"), float("nan")))
            rows.append((path.name, "TTFT warm s", warm, float("nan"), float("nan")))

    lines = [
        f"### {datetime.datetime.now():%Y-%m-%d %H:%M} threads={args.threads} reps={args.reps} (best of reps)",
        "",
        "| model | test | jllama | llama.cpp | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for m, test, j, lc, r in rows:
        lines.append(f"| {m} | {test} | {j:.1f} | {lc:.1f} | {r:.2f} |")
    text = "\n".join(lines)
    print(text)
    out = HERE / "results" / "bench.md"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
