"""Time to first token, split into its parts, cold and warm (issue #5).

    python experiments/bench_ttft.py [-m MODEL ...] [-r 2]

Each run is a fresh interpreter doing what ``bench_vs_llamacpp.py --ttft`` does (``Llama(model,
ctx_size=512)``, one greedy token of 'Hello, my name is') against a persistent compilation cache
that starts empty: run 1 is cold, the others warm. Per run it prints import / load / first-token
seconds, where the first token's time went (XLA compiles, persistent-cache reads, i.e.
deserialising executables, and lowering to StableHLO; the rest is tracing, running and Python),
how many programs were compiled or read, and the process's peak RSS.
Results are appended to experiments/results/ttft.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import jax
from jax._src import compilation_cache, compiler
from jax._src.interpreters import mlir
t_import = time.perf_counter() - t0
acc = {}

def timed(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        s = time.perf_counter()
        r = f(*a, **k)
        d = acc.setdefault(key, [0.0, 0])
        d[0] += time.perf_counter() - s
        d[1] += key != "cache_read" or r[0] is not None  # cache reads: count the hits
        return r
    setattr(mod, name, g)

timed(compilation_cache, "get_executable_and_time", "cache_read")
timed(compiler, "backend_compile_and_load", "compile")
timed(mlir, "lower_jaxpr_to_module", "lower")
from jllama.api import Llama
from jllama.engine.sampling import SamplingParams
t1 = time.perf_counter()
llm = Llama(sys.argv[1], ctx_size=512)
t2 = time.perf_counter()
before = {k: list(v) for k, v in acc.items()}
next(iter(llm.engine.generate(llm.tokenize("Hello, my name is"), SamplingParams.greedy(), 1)))
t3 = time.perf_counter()
first = {k: [v[0] - before.get(k, [0, 0])[0], v[1] - before.get(k, [0, 0])[1]]
         for k, v in acc.items()}
print(json.dumps(dict(total=t3 - t0, import_jax=t_import, load=t2 - t1, first=t3 - t2,
                      first_parts=first,
                      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def run_once(model: str, cache_dir: str, scan: bool = True) -> dict:
    env = dict(os.environ, JLLAMA_XLA_CACHE=cache_dir, JLLAMA_NO_SCAN="0" if scan else "1")
    out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", default=None)
    ap.add_argument("-r", "--warm-runs", type=int, default=2)
    ap.add_argument("--both", action="store_true",
                    help="scanned and unrolled decoder (JLLAMA_NO_SCAN=1), interleaved")
    args = ap.parse_args()
    from jllama.registry import resolve_model

    lines = [f"### {datetime.datetime.now():%Y-%m-%d %H:%M} load "
             f"{os.getloadavg()[0]:.1f} (1-min average, 2 vCPUs)", "",
             "| model | program | run | total s | import s | load s | first token s "
             "| compile s (n) | cache read s (hits) | lower s | cache MiB | peak RSS MiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for model in args.model or ["smollm2-135m-instruct"]:
        path = resolve_model(model)
        dirs = {s: tempfile.TemporaryDirectory() for s in ((True, False) if args.both
                                                             else (True,))}
        for i in range(1 + args.warm_runs):
            for scan, d in dirs.items():  # interleaved: the machine's load hits both alike
                r = run_once(str(path), d.name, scan)
                p = r["first_parts"]
                c, n_c = p.get("compile", [0.0, 0])
                cr, n_cr = p.get("cache_read", [0.0, 0])
                lo = p.get("lower", [0.0, 0])[0]
                mib = sum(f.stat().st_size for f in Path(d.name).rglob("*") if f.is_file())
                row = (f"| {path.name} | {'scan' if scan else 'unrolled'} | "
                       f"{'cold' if i == 0 else 'warm'} | {r['total']:.2f} | "
                       f"{r['import_jax']:.2f} | {r['load']:.2f} | {r['first']:.2f} | "
                       f"{c:.2f} ({n_c}) | {cr:.2f} ({n_cr}) | {lo:.2f} | {mib / 2**20:.1f} | "
                       f"{r['peak_rss_mib']:.0f} |")
                print(row, flush=True)
                lines.append(row)
        for d in dirs.values():
            d.cleanup()
    out = HERE / "results" / "ttft.md"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
