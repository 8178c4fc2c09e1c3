"""Scanned vs unrolled decoder (``Numerics.scan_layers``): prompt and decode speed, interleaved.

    python experiments/bench_scan.py [-m MODEL] [-p 128] [-n 32] [-r 5]

Both engines live in one process on the same weights; each round times one prompt of ``-p``
tokens (a fresh slot) and ``-n`` greedy decode steps on each engine in turn, so the machine's
load hits both alike. Prints the median prompt and decode tokens/s of each, and whether they
produced the same tokens. Results go to experiments/results/ttft.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-p", "--prompt", type=int, default=128)
    ap.add_argument("-n", "--decode", type=int, default=32)
    ap.add_argument("-r", "--rounds", type=int, default=5)
    a = ap.parse_args()
    from jllama.engine.engine import Engine
    from jllama.engine.sampling import SamplingParams
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model, load_weights
    from jllama.numerics import Numerics
    from jllama.registry import resolve_model

    path = resolve_model(a.model)
    g = read_gguf(path)
    w = load_weights(g)
    engines = {}
    for scan in (True, False):
        num = Numerics(scan_layers=scan)
        spec, m = build_model(g, weights=w, numerics=num)
        engines[scan] = Engine(spec, m, ctx_size=a.prompt + a.decode + 8, numerics=num)
    n_vocab = spec.n_vocab
    prompt = np.random.default_rng(0).integers(100, n_vocab - 100, a.prompt).tolist()
    pp = {s: [] for s in engines}
    tg = {s: [] for s in engines}
    toks = {}
    for r in range(a.rounds + 1):  # round 0 compiles
        for s, eng in engines.items():
            eng.reset()
            t0 = time.perf_counter()
            gen = eng.generate(prompt, SamplingParams.greedy(), a.decode)
            first = next(gen)
            t1 = time.perf_counter()
            rest = list(gen)
            t2 = time.perf_counter()
            toks[s] = [first, *rest]
            if r:
                pp[s].append(a.prompt / (t1 - t0))
                tg[s].append((a.decode - 1) / (t2 - t1))
    same = toks[True] == toks[False]
    lines = [f"### {datetime.datetime.now():%Y-%m-%d %H:%M} bench_scan load "
             f"{os.getloadavg()[0]:.1f} (1-min average, 2 vCPUs, shared by other sessions)", "",
             f"`python experiments/bench_scan.py -m {a.model} -p {a.prompt} -n {a.decode} "
             f"-r {a.rounds}`: {path.name}, medians of {a.rounds} interleaved rounds; "
             f"same tokens: {same}", "",
             "| program | prompt t/s | decode t/s |", "| --- | ---: | ---: |"]
    for s in engines:
        lines.append(f"| {'scan' if s else 'unrolled'} | {np.median(pp[s]):.1f} | "
                     f"{np.median(tg[s]):.2f} |")
    print("\n".join(lines))
    with open(HERE / "results" / "ttft.md", "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
