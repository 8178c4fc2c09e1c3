"""Prompt-sized int8 GEMMs, jllama's C++ kernel against ggml's own ``mul_mat``, side by side.

    python experiments/bench_gemm_vs_ggml.py [--rows 512] [--threads 2] [--reps 5]
        [--model gemma3|smollm2|q2q3|kquant|qwen3_4b|iq12|moe|legacy|decode|ternary|fp4|all]

Each line is one weight shape of a real model (type, n_out x n_in) multiplied by ``--rows``
activation rows: ggml's time is a prebuilt one-op graph computed with ``--threads`` threads
(its activation quantization included); jllama's is the jitted activation quantization +
``qmatvec_q8`` as the model runs them (``xla_cpu.ffi_matvec_q8``: the C quantizer). Both produce the same bits (tests/test_cpu_q8_kernel.py);
the ratio is ggml's time over ours (> 1: jllama faster). The totals weight each shape by how
often the model runs it per layer.
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

# (type, n_out, n_in, uses per layer): the prompt-path weights of the two registry models.
MODELS = {
    "gemma3": [("Q5_0", 1024, 640, 1), ("Q5_0", 256, 640, 1.5), ("Q8_0", 256, 640, 0.5),
               ("Q4_K", 640, 1024, 1), ("Q5_0", 2048, 640, 2), ("Q6_K", 640, 2048, 0.5),
               ("Q4_K", 640, 2048, 0.5)],
    "smollm2": [("Q4_1", 576, 576, 2), ("Q4_1", 192, 576, 2), ("Q4_1", 1536, 576, 2),
                ("Q4_1", 576, 1536, 1)],
    # a 1B llama (2048 wide, 8192 ffn) in llama.cpp's Q2_K / Q3_K_M mixes, Q4_K for comparison
    "q2q3": [("Q2_K", 2048, 2048, 2), ("Q3_K", 512, 2048, 1), ("Q2_K", 8192, 2048, 2),
             ("Q3_K", 2048, 8192, 1), ("Q3_K", 2048, 2048, 2), ("Q3_K", 8192, 2048, 2),
             ("Q4_K", 8192, 2048, 2)],
    # the same 1B shapes in the IQ2 / IQ1 types (llama-quantize's IQ2_*/IQ1_* file types)
    "iq12": [("IQ2_XXS", 8192, 2048, 2), ("IQ2_XS", 8192, 2048, 2), ("IQ2_S", 8192, 2048, 2),
             ("IQ1_S", 8192, 2048, 2), ("IQ1_M", 8192, 2048, 2)],
    # every K-quant on a 1B llama's ffn shapes, up (8192x2048) and down (2048x8192)
    "kquant": [(t, n, k, 1) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
               for n, k in ((8192, 2048), (2048, 8192))],
    # one expert of Qwen3-30B-A3B (768 x 2048 gate/up, 2048 x 768 down; Q4_K_M: Q4_K, down Q6_K
    # or Q4_K); a 512-token prompt gives each of its 128 experts ~32 rows (--rows 32)
    "moe": [("Q4_K", 768, 2048, 2), ("Q6_K", 2048, 768, 1), ("Q4_K", 2048, 768, 1)],
    # every low-bit int8 kernel on one 1B ffn shape (run with --rows 1: decode, per byte)
    "decode": [(t, 8192, 2048, 1) for t in ("Q2_K", "Q3_K", "Q4_K", "IQ1_S", "IQ1_M", "IQ2_XXS",
                                             "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL",
                                             "IQ4_XS")],
    # a 1B llama's layer (q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192) in
    # Q4_0 and Q8_0, which ggml multiplies with llamafile's tinyBLAS (repack off)
    "legacy": [(t, n, k, u) for t in ("Q4_0", "Q8_0")
               for n, k, u in ((2048, 2048, 2), (512, 2048, 2), (8192, 2048, 2), (2048, 8192, 1))],
    # a Qwen3-4B layer in llama.cpp's Q4_K_M mix (2560 wide, 9728 ffn, 32/8 heads of 128):
    # attn_v and half the layers' ffn_down in Q6_K, the rest Q4_K
    "qwen3_4b": [("Q4_K", 4096, 2560, 1), ("Q4_K", 1024, 2560, 1.5), ("Q6_K", 1024, 2560, 0.5),
                 ("Q4_K", 2560, 4096, 1), ("Q4_K", 9728, 2560, 2), ("Q6_K", 2560, 9728, 0.5),
                 ("Q4_K", 2560, 9728, 0.5)],
    # the rest of the int8 kernels without a tiled GEMM in ggml (ternary, MXFP4), same shape
    "ternary": [(t, 8192, 2048, 1) for t in ("TQ1_0", "TQ2_0", "MXFP4")],
    # the two FP4 types (ggml's vec_dot at every row count), same shape
    "fp4": [(t, 8192, 2048, 1) for t in ("MXFP4", "NVFP4")],
}  # fmt: skip


def best_of(fns, reps: int, clock=time.perf_counter) -> list[float]:
    """The best time of each function, their runs interleaved (the machine's load then weighs
    on both alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = clock()
            fn()
            best[i] = min(best[i], clock() - t)
    return best


def ggml_timer(raw: np.ndarray, qtype: int, x: np.ndarray, threads: int):
    from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

    base, cpu = ggml_libs()
    n, (m, k) = raw.shape[0], x.shape
    ctx = base.ggml_init(GgmlInitParams(raw.nbytes + x.nbytes + m * n * 4 + (64 << 20), None,
                                        False))
    w = base.ggml_new_tensor_2d(ctx, qtype, k, n)
    ggml_fill(base, w, raw)
    a = base.ggml_new_tensor_2d(ctx, 0, k, m)
    ggml_fill(base, a, x)
    y = base.ggml_mul_mat(ctx, w, a)
    graph = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(graph, y)

    def run():
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) == 0

    def result() -> np.ndarray:
        out = np.empty((m, n), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
        return out

    return run, result, lambda: base.ggml_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="all", choices=["all", *MODELS])
    ap.add_argument("--types", default="", help="comma-separated weight types to keep (all)")
    # On a shared machine the process's CPU time leaves out the time other processes hold the
    # core (with one thread both engines compute on one thread of this process).
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: process CPU time (use with --threads 1)")
    a = ap.parse_args()
    os.environ.setdefault("JLLAMA_CPU_KERNEL_THREADS", str(a.threads))

    import jax
    import jax.numpy as jnp

    from jllama.gguf.constants import QType
    from jllama.kernels import cpu_ffi, xla_cpu
    from jllama.quant.qtensor import QTensor
    from jllama.quant.testing import random_blocks

    assert cpu_ffi.available(), "C++ kernels not built"
    rng = np.random.default_rng(0)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    for name in MODELS if a.model == "all" else [a.model]:
        tot_g = tot_j = 0.0
        print(f"{name}: {a.rows} rows, {a.threads} threads")
        for tname, n, k, uses in MODELS[name]:
            if a.types and tname not in a.types.split(","):
                continue
            qt = int(QType[tname])
            raw = random_blocks(QType[tname], n, k, seed=1)
            x = rng.standard_normal((a.rows, k)).astype(np.float32)

            @jax.jit
            def ours(xa, r, qt=qt, n=n, k=k):
                return xla_cpu.ffi_matvec_q8(xa, QTensor(r, qt, (n, k)))

            xj, rj = jnp.asarray(x), jnp.asarray(raw)
            run, result, free = ggml_timer(raw, qt, x, a.threads)
            t_j, t_g = best_of([lambda xj=xj, rj=rj: ours(xj, rj).block_until_ready(), run],
                               a.reps, clock)
            same = np.array_equal(result(), np.asarray(ours(xj, rj)))
            free()
            tot_g, tot_j = tot_g + uses * t_g, tot_j + uses * t_j
            gmac = a.rows * n * k / 1e9
            gb = raw.nbytes / 1e9  # weight bytes: what bounds a decode-sized call
            print(f"  {tname:5s} {n:5d}x{k:<5d} ggml {t_g * 1e3:7.2f} ms ({gmac / t_g:5.1f} GMAC/s,"
                  f" {gb / t_g:5.2f} GB/s)  jllama {t_j * 1e3:7.2f} ms ({gmac / t_j:5.1f},"
                  f" {gb / t_j:5.2f} GB/s)  ratio {t_g / t_j:4.2f}"
                  f"{'' if same else '  RESULTS DIFFER'}")
        if tot_j == 0:  # --types kept none of this model's shapes
            continue
        print(f"  per layer: ggml {tot_g * 1e3:.1f} ms, jllama {tot_j * 1e3:.1f} ms, "
              f"ratio {tot_g / tot_j:.2f}")


if __name__ == "__main__":
    main()
