"""Kernel-only A/B of the CPU matvec: the f32 decoders (``jllama_qmatvec``/``_xs``) against the
int8 ones (``jllama_qmatvec_q8``), one jitted call per type on decode-sized shapes.

Usage: python experiments/bench_q8_kernel.py [--rows 1] [--threads N] [--reps 50]
Prints GB/s of weight bytes read (the kernels are bandwidth-bound at m = 1).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllama.gguf.constants import QType, qtype_info
from jllama.kernels import cpu_ffi
from jllama.quant.actquant import quantize_activations_ex, quantize_activations_q8

# (type, n_out, n_in): SmolLM2 ffn (Q4_1), its tied output (Q8_0), Gemma 3's layers and output.
SHAPES = [
    (QType.Q4_1, 1536, 576), (QType.Q8_0, 49152, 576), (QType.Q5_0, 2048, 640),
    (QType.Q8_0, 262144, 640), (QType.Q4_K, 640, 2048), (QType.Q6_K, 640, 2048),
    (QType.Q4_0, 2048, 2048), (QType.Q5_1, 2048, 2048), (QType.Q5_K, 2048, 2048),
    (QType.Q2_K, 2048, 2048), (QType.Q3_K, 2048, 2048),
]  # fmt: skip


def weights(qtype: QType, n: int, k: int) -> np.ndarray:
    info = qtype_info(int(qtype))
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n, k // info.block_size, info.type_size), dtype=np.uint8)
    off = {QType.Q6_K: [208], QType.Q2_K: [80, 82], QType.Q3_K: [108]}.get(
        qtype, [0, 2] if qtype in (QType.Q4_1, QType.Q5_1, QType.Q4_K, QType.Q5_K) else [0])
    for o in off:
        f = rng.uniform(-0.05, 0.05, raw.shape[:2]).astype(np.float16)
        raw[..., o : o + 2] = f[..., None].view(np.uint8)
    return raw.reshape(n, -1)


CLOCK = time.perf_counter


def timeit(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(5):
        t = CLOCK()
        for _ in range(reps):
            y = fn(*args)
        jax.block_until_ready(y)
        best = min(best, (CLOCK() - t) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="JLLAMA_CPU_KERNEL_THREADS (0: all)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="process CPU time instead of wall time (a shared, busy machine)")
    a = ap.parse_args()
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if a.threads:
        os.environ["JLLAMA_CPU_KERNEL_THREADS"] = str(a.threads)
    assert cpu_ffi.available() and cpu_ffi.q8_supported(int(QType.Q8_0))
    for qtype, n, k in SHAPES:
        raw = jnp.asarray(weights(qtype, n, k))
        x = jax.random.normal(jax.random.key(0), (a.rows, k), jnp.float32)
        q, d, s = quantize_activations_q8(x, qtype)
        xh, s_err = quantize_activations_ex(x, qtype)
        f32 = jax.jit(lambda xh, raw, qt=int(qtype): cpu_ffi.qmatvec(xh, raw, qt))
        i8 = jax.jit(lambda q, d, s, raw, qt=int(qtype): cpu_ffi.qmatvec_q8(q, d, s, raw, qt))
        t_old = timeit(f32, xh, raw, reps=a.reps)
        t_new = timeit(i8, q, d, s, raw, reps=a.reps)
        gb = raw.nbytes / 1e9
        print(f"{qtype.name:5s} {n:6d}x{k:<5d} m={a.rows}: f32 {gb / t_old:6.2f} GB/s "
              f"({t_old * 1e6:7.1f} us)  int8 {gb / t_new:6.2f} GB/s ({t_new * 1e6:7.1f} us)  "
              f"x{t_old / t_new:.2f}")


if __name__ == "__main__":
    main()
