"""Warm start of two jllama trees side by side (issue #16 item 4): bench_ttft's child process
(``Llama(model, ctx_size=512)``, one greedy token of 'Hello, my name is'), interleaved.

    python experiments/ttft_before_after.py -m MODEL [-m ...] [-r 2] \
        --variant before=/tmp/before:/tmp/ml_dtypes-0.7.0 --variant after=. --variant aot=.+aot

A variant is NAME=PYTHONPATH (``+aot`` at the end: with JLLAMA_AOT_CACHE=1); each has its own
compile cache, empty at the start, so run 1 is cold and the others warm. "import" is everything
before ``Llama()`` (jax, flax, jllama), "load" is ``Llama()``, "first" the first token.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ttft import CHILD  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", required=True)
    ap.add_argument("-r", "--warm-runs", type=int, default=2)
    ap.add_argument("--variant", action="append", required=True)
    args = ap.parse_args()
    variants = []
    for v in args.variant:
        name, path = v.split("=", 1)
        aot = path.endswith("+aot")
        path = path.removesuffix("+aot")
        pp = ":".join(str(Path(p).resolve()) for p in path.split(":"))
        variants.append((name, pp, aot, tempfile.TemporaryDirectory()))
    print("| model | variant | run | total s | import s | load s | first token s "
          "| compile s (n) | cache read s (hits) | lower s | peak RSS MiB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in args.model:
        for _, _, _, d in variants:
            for f in Path(d.name).iterdir():
                subprocess.run(["rm", "-rf", str(f)], check=True)
        for i in range(1 + args.warm_runs):
            for name, pp, aot, d in variants:
                env = dict(os.environ, PYTHONPATH=pp, JLLAMA_XLA_CACHE=d.name,
                           JLLAMA_AOT_CACHE="1" if aot else "0")
                out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True,
                                     text=True, env=env)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                p = r["first_parts"]
                c, n_c = p.get("compile", [0.0, 0])
                cr, n_cr = p.get("cache_read", [0.0, 0])
                lo = p.get("lower", [0.0, 0])[0]
                imp = r["total"] - r["load"] - r["first"]
                print(f"| {Path(model).name} | {name} | {'cold' if i == 0 else 'warm'} | "
                      f"{r['total']:.2f} | {imp:.2f} | {r['load']:.2f} | {r['first']:.2f} | "
                      f"{c:.2f} ({n_c}) | {cr:.2f} ({n_cr}) | {lo:.2f} | "
                      f"{r['peak_rss_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
