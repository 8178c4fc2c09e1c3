"""`jllama quantize` vs `llama-quantize`, same command line, same input, side by side.

    python experiments/bench_quantize.py IN.gguf --types Q8_0 Q4_K_M IQ4_XS --threads 1 2 \
        --imatrix im.gguf --imatrix-types IQ4_XS [--llama-quantize PATH] [--repeat 1]

    python experiments/bench_quantize.py --tensor 2048x2048 --types Q4_K Q6_K IQ4_XS Q8_0

The second form times quantize_tensor in-process on one random F32 tensor, 1 vs 2 threads
interleaved (median of --repeat), to see the thread pool's gain without process start-up.

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


def bench_tensor(args) -> None:
    import statistics

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from jllama.gguf.constants import QType
    from jllama.quant.quantize import quantize_tensor

    rows, cols = (int(v) for v in args.tensor.split("x"))
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    qw = np.random.default_rng(1).lognormal(0, 1, cols).astype(np.float32)
    print("| type | imatrix | 1 thread wall s | 2 threads wall s | speedup | "
          "2 threads: cpu s / wall s |")
    print("|---|---|---|---|---|---|")
    for name in args.types:
        t = QType[name]
        im = qw if name in args.imatrix_types else None
        times: dict[int, list[float]] = {1: [], 2: []}
        busy: list[float] = []
        outs = {}
        for _ in range(args.repeat):
            for n in args.threads:
                t0, c0 = time.perf_counter(), time.process_time()
                outs[n] = quantize_tensor(x, QType.F32, t, x.shape, im, nthread=n)
                times[n].append(time.perf_counter() - t0)
                if n == 2:  # ~2 when both threads ran, ~1 when the GIL or a busy CPU held one
                    busy.append((time.process_time() - c0) / times[n][-1])
        assert all(np.array_equal(outs[1], o) for o in outs.values())
        a, b = statistics.median(times[1]), statistics.median(times[2])
        print(f"| {name} | {'yes' if im is not None else 'no'} | {a:.2f} | {b:.2f} | "
              f"{a / b:.2f}x | {statistics.median(busy):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", nargs="?")
    ap.add_argument("--tensor", metavar="ROWSxCOLS", help="time quantize_tensor on one tensor")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--imatrix", help="imatrix file given to both for --imatrix-types")
    ap.add_argument("--imatrix-types", nargs="*", default=[])
    ap.add_argument("--llama-quantize", default=str(LLAMA_QUANTIZE))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if args.tensor:
        return bench_tensor(args)

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
