"""ms per attention call: the C++ ggml flash attention (jllama_flash_attn) vs the XLA attention
(``jllama.models.common.attention``), f16 caches, SmolLM2 and Gemma 3 shapes.

    python experiments/bench_attention.py [--reps 20] [--workers 0]

Cases: a 512-token prefill from an empty cache, and a one-token decode over 512 / 1024 cached
positions (split-KV in ggml). Both are jitted and warmed up; each is timed ``--reps`` times,
alternating, and the median is reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllama.kernels import cpu_attention
from jllama.models.common import attention

SHAPES = {"smollm2": dict(h=9, kvh=3, d=64, window=None),
          "gemma3": dict(h=4, kvh=1, d=256, window=512)}  # fmt: skip


def _time(f, args, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=0, help="kernel threads (0 = XLA's pool)")
    ap.add_argument("--n-threads", type=int, default=2, help="llama.cpp's -t (split-KV chunks)")
    a = ap.parse_args()
    assert cpu_attention.available(), "kernel unavailable"
    rng = np.random.default_rng(0)
    print(f"{'model':8} {'case':14} {'xla ms':>8} {'ggml-fa ms':>10} {'speedup':>8}")
    for name, s in SHAPES.items():
        h, kvh, d, window = s["h"], s["kvh"], s["d"], s["window"]
        cache = 2048
        k = jnp.asarray(rng.standard_normal((1, kvh, cache, d)), jnp.float16)
        v = jnp.asarray(rng.standard_normal((1, kvh, cache, d)), jnp.float16)
        for case, t, kv_len in (("prefill 512", 512, 512), ("decode @512", 1, 512),
                                ("decode @1024", 1, 1024)):
            q = jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.float32)
            pos0 = jnp.asarray([kv_len - t], jnp.int32)
            scale = 1.0 / np.sqrt(d)
            xla = jax.jit(lambda q, k, v, p, kv_len=kv_len, w=window, sc=scale: attention(
                q, k, v, p, kv_len, sc, window=w, k_type="f16", v_type="f16"))
            ours = jax.jit(lambda q, k, v, p, kv_len=kv_len, w=window, sc=scale:
                           cpu_attention.ggml_flash_attn(q, k, v, p, kv_len, sc, window=w,
                                                         n_threads=a.n_threads,
                                                         workers=a.workers))
            args = (q, k, v, pos0)
            _time(xla, args, 2)
            _time(ours, args, 2)
            tx, to = [], []
            for _ in range(a.reps):
                tx += _time(xla, args, 1)
                to += _time(ours, args, 1)
            mx, mo = statistics.median(tx), statistics.median(to)
            print(f"{name:8} {case:14} {mx:8.3f} {mo:10.3f} {mx / mo:7.2f}x")


if __name__ == "__main__":
    main()
