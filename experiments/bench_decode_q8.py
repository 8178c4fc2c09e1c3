"""One-row (decode) int8 products at weight sizes beyond L3: jllama's fused quantize + matvec
(``xla_cpu.ffi_matvec_q8``, the decode path) against ggml's ``mul_mat``, GB/s of weights.

    python experiments/bench_decode_q8.py [--types Q8_0,Q4_0] [--threads 2] [--reps 10]
        [--mb 96] [--clock wall|cpu]

Each shape is repeated in distinct copies until they hold ``--mb`` MiB (one copy for larger
weights), so every call streams its weights from DRAM as a decode step does (bench_gemm_vs_ggml
re-reads one L3-resident weight). One jitted program multiplies the activation row by all copies
(jllama), one graph with a mul_mat per copy (ggml: llama-cpp-python's, stock kernels); their runs
are interleaved, best of ``--reps``. Results are checked bit for bit. JLLAMA_CPU_KERNEL_THREADS is
read once per process: run once per thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048)]


def ggml_graph(raws: list[np.ndarray], qtype: int, x: np.ndarray, threads: int):
    from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

    base, cpu = ggml_libs()
    n, k = raws[0].shape[0], x.shape[1]
    size = sum(r.nbytes for r in raws) + x.nbytes + len(raws) * (n * 4 + 4096) + (64 << 20)
    ctx = base.ggml_init(GgmlInitParams(size, None, False))
    a = base.ggml_new_tensor_2d(ctx, 0, k, 1)
    ggml_fill(base, a, x)
    graph = base.ggml_new_graph(ctx)
    ys = []
    for raw in raws:
        w = base.ggml_new_tensor_2d(ctx, qtype, k, n)
        ggml_fill(base, w, raw)
        y = base.ggml_mul_mat(ctx, w, a)
        base.ggml_build_forward_expand(graph, y)
        ys.append(y)

    def run():
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) == 0

    def first() -> np.ndarray:
        out = np.empty((1, n), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(ys[0]), out.nbytes)
        return out

    return run, first, lambda: base.ggml_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mb", type=float, default=96)
    ap.add_argument("--shapes", default="", help="e.g. 2048x2048,8192x2048 (default: all)")
    ap.add_argument("--no-ggml", action="store_true")
    ap.add_argument("--gap", type=float, default=0.05, help="seconds of sleep before each run")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    a = ap.parse_args()
    os.environ.setdefault("JLLAMA_CPU_KERNEL_THREADS", str(a.threads))

    import jax
    import jax.numpy as jnp

    from jllama.gguf.constants import QType
    from jllama.kernels import cpu_ffi, xla_cpu
    from jllama.quant.qtensor import QTensor
    from jllama.quant.testing import random_blocks

    assert cpu_ffi.available(), "C++ kernels not built"
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes
              else SHAPES)
    rng = np.random.default_rng(0)
    print(f"1 row, {a.threads} threads, {a.clock} clock, copies up to {a.mb:g} MiB")
    for tname in a.types.split(","):
        qt = int(QType[tname])
        for n, k in shapes:
            raw = random_blocks(QType[tname], n, k, seed=1)
            copies = max(1, int(a.mb * 2**20 // raw.nbytes))
            raws = [raw] + [raw.copy() for _ in range(copies - 1)]
            x = rng.standard_normal((1, k)).astype(np.float32)

            @jax.jit
            def ours(xa, rs, qt=qt, n=n, k=k):
                return [xla_cpu.ffi_matvec_q8(xa, QTensor(r, qt, (n, k))) for r in rs]

            xj, rj = jnp.asarray(x), [jnp.asarray(r) for r in raws]
            fns = [lambda xj=xj, rj=rj: jax.block_until_ready(ours(xj, rj))]
            if not a.no_ggml:
                run, first, free = ggml_graph(raws, qt, x, a.threads)
                fns.append(run)
            for fn in fns:
                fn()
            best = [float("inf")] * len(fns)
            for _ in range(a.reps):
                for i, fn in enumerate(fns):
                    # ggml's OpenMP workers spin for a while after a graph (and XLA's pool
                    # threads after a program): let them sleep before the other side runs
                    time.sleep(a.gap)
                    t = clock()
                    fn()
                    best[i] = min(best[i], clock() - t)
            gb = raw.nbytes * copies / 1e9
            line = (f"  {tname:5s} {n:6d}x{k:<5d} x{copies:<3d} jllama {best[0] / copies * 1e3:7.3f}"
                    f" ms/matrix {gb / best[0]:5.2f} GB/s")
            if not a.no_ggml:
                same = np.array_equal(first(), np.asarray(ours(xj, rj)[0]))
                line += (f"  ggml {best[1] / copies * 1e3:7.3f} ms {gb / best[1]:5.2f} GB/s"
                         f"  ratio {best[1] / best[0]:4.2f}{'' if same else '  RESULTS DIFFER'}")
                free()
            print(line, flush=True)
            del fns, rj, raws


if __name__ == "__main__":
    main()
