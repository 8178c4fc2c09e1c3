"""`jllama quantize` vs `llama-quantize`, same command line, same input, side by side.

    python experiments/bench_quantize.py IN.gguf --types Q8_0 Q4_K_M IQ4_XS --threads 1 2 \
        --imatrix im.gguf --imatrix-types IQ4_XS [--llama-quantize PATH] [--repeat 1]

Runs are interleaved (for each type and thread count: llama-quantize, then jllama), each a fresh
process; wall and CPU seconds (the child's user+sys) are printed as a Markdown table, and each
pair of outputs is compared byte for byte. The command lines are printed as run.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_QUANTIZE = Path.home() / ".cache/llamacpp-0c1e570/bin/llama-quantize"


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--imatrix", help="imatrix file given to both for --imatrix-types")
    ap.add_argument("--imatrix-types", nargs="*", default=[])
    ap.add_argument("--llama-quantize", default=str(LLAMA_QUANTIZE))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    jllama = [sys.executable, "-m", "jllama.cli.main", "quantize", "--quiet"]
    rows = []
    with tempfile.TemporaryDirectory(dir=Path(args.input).parent) as d:
        for ftype in args.types:
            flags = ["--imatrix", args.imatrix] if ftype in args.imatrix_types else []
            for n in args.threads:
                for _ in range(args.repeat):
                    a, b = Path(d) / "llama.gguf", Path(d) / "jllama.gguf"
                    tail = [args.input, None, ftype, str(n)]
                    ref_cmd = [args.llama_quantize, *flags, *[str(a) if x is None else x for x in tail]]
                    our_cmd = [*jllama, *flags, *[str(b) if x is None else x for x in tail]]
                    lw, lc = timed(ref_cmd, env)
                    jw, jc = timed(our_cmd, env)
                    same = filecmp.cmp(a, b, shallow=False)
                    rows.append((ftype, n, lw, lc, jw, jc, same))
                    print("$", " ".join(ref_cmd), file=sys.stderr)
                    print("$", " ".join(our_cmd), file=sys.stderr)
                    print(f"{ftype} {n}: llama {lw:.2f}s wall, jllama {jw:.2f}s wall, "
                          f"identical={same}", file=sys.stderr)
    print("| type | threads | llama-quantize wall s | cpu s | jllama wall s | cpu s | "
          "wall ratio | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for ftype, n, lw, lc, jw, jc, same in rows:
        print(f"| {ftype} | {n} | {lw:.2f} | {lc:.2f} | {jw:.2f} | {jc:.2f} | "
              f"{jw / lw:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
