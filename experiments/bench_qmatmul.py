"""Benchmark quantized matmul on the current JAX backend for SmolLM2-sized weights.

Prints, per ggml type and weight shape (n_out x n_in), the best-of-N time of a matvec (decode, one
x row) and a GEMM (prefill, --gemm-rows rows), as GB/s of the weight's GGUF bytes (what llama.cpp
reads per token), GB/s of the bytes actually stored (after ``prepare``), and GFLOP/s, next to the
plain f32 dot on the same shape. The machine is shared: we repeat and keep the best.
``JLLAMA_NO_FFI=1`` measures the pure-XLA path instead of the C++ kernels.

    python experiments/bench_qmatmul.py [--types Q4_1,Q8_0] [--reps 20] [--gemm-rows 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllama.gguf.constants import QType, qtype_info
from jllama.kernels.dispatch import prepare, qmatmul
from jllama.quant.qtensor import QTensor

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]
TYPES = [
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
]
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108],
              "IQ4_NL": [0], "IQ4_XS": [0]}  # fmt: skip


def best_time(f, *args, reps: int) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def random_weight(name: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    info = qtype_info(name)
    nb = n_in // info.block_size
    raw = rng.integers(0, 256, (n_out, nb, info.type_size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        f = rng.uniform(-0.05, 0.05, (n_out, nb)).astype(np.float16)
        raw[..., off : off + 2] = f[..., None].view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * info.type_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gemm-rows", type=int, default=512)
    ap.add_argument("--raw", action="store_true", help="skip prepare(): kernels read GGUF blocks")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mm = jax.jit(qmatmul)
    dot = jax.jit(lambda x, w: x @ w.T)
    from jllama.kernels import cpu_ffi

    path = "C++ FFI kernels" if cpu_ffi.available() else "pure XLA (JLLAMA_NO_FFI or no compiler)"
    print(f"backend {jax.default_backend()}, CPU path: {path}, best of {args.reps}")
    print(f"{'type':6} {'shape':>11} {'rows':>4} {'us':>9} {'GB/s gguf':>9} {'GB/s held':>9} "
          f"{'GFLOP/s':>8} | {'f32 us':>8} {'f32 GB/s':>8} {'f32 GF/s':>8}")  # fmt: skip
    f32_cache: dict[tuple[int, int, int], float] = {}
    for name in args.types.split(","):
        info = qtype_info(name)
        for n_out, n_in in SHAPES:
            if n_in % info.block_size:
                print(f"{name:6} {n_out:>5}x{n_in:<5} (n_in not a multiple of {info.block_size})")
                continue
            raw = random_weight(name, n_out, n_in, rng)
            qt = QTensor(jnp.asarray(raw), int(QType[name]), (n_out, n_in))
            if not args.raw:
                qt = prepare(qt, jax.default_backend())
            w32 = jnp.asarray(rng.standard_normal((n_out, n_in)), jnp.float32)
            for m in (1, args.gemm_rows):
                x = jnp.asarray(rng.standard_normal((m, n_in)), jnp.float32)
                reps = args.reps if m == 1 else max(3, args.reps // 4)
                t = best_time(mm, x, qt, reps=reps)
                key = (n_out, n_in, m)
                if key not in f32_cache:
                    f32_cache[key] = best_time(dot, x, w32, reps=reps)
                tf = f32_cache[key]
                flop = 2.0 * m * n_out * n_in
                print(
                    f"{name:6} {n_out:>5}x{n_in:<5} {m:>4} {t * 1e6:>9.0f} {raw.nbytes / t / 1e9:>9.2f}"
                    f" {qt.nbytes / t / 1e9:>9.2f} {flop / t / 1e9:>8.1f} | {tf * 1e6:>8.0f}"
                    f" {w32.nbytes / tf / 1e9:>8.2f} {flop / tf / 1e9:>8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
