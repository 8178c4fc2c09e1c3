"""Per-step costs DRY and mirostat add to decoding: the host-side DRY rows (4 slots, a 152k
vocabulary, a 30k-token context) and the sampler with vs without the DRY rows and mu inputs
(the decode step always passes them), interleaved.

    PYTHONPATH=. python experiments/bench_dry_overhead.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jllama.engine import dry
from jllama.engine.sampling import BatchSampling, SamplingParams, sample_state

B, V = 4, 151936


def host_rows() -> None:
    p = SamplingParams(dry_multiplier=0.8)
    rng = np.random.default_rng(0)
    toks = [int(t) for t in rng.integers(0, 50, 30000)]
    buf = np.zeros((B, V), np.float32)
    t = time.perf_counter()
    for _ in range(200):
        buf[:] = 0
        for b in range(B):
            dry.penalty_row(toks, p, {}, V, out=buf[b], then=[7])
        jax.device_put(buf).block_until_ready()
    print(f"DRY rows for {B} slots, V={V}, last_n 64: "
          f"{(time.perf_counter() - t) / 200 * 1e3:.2f} ms per step")


def sampler() -> None:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, V)).astype(np.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), B)
    hist = jnp.full((B, 64), -1, jnp.int32)
    zeros = jnp.zeros((B, V), jnp.float32)
    mu = jnp.zeros(B, jnp.float32)
    f_old = jax.jit(lambda x, sp, k, h: sample_state(x, sp, k, h, zeros)[0])
    f_new = jax.jit(lambda x, sp, k, h, d, m: sample_state(x, sp, k, h, zeros, d, m))
    for name, ps in [("defaults", SamplingParams()), ("greedy", SamplingParams.greedy())]:
        sp = BatchSampling.stack([ps] * B)
        jax.block_until_ready(f_old(x, sp, keys, hist))
        jax.block_until_ready(f_new(x, sp, keys, hist, zeros, mu))
        to, tn = [], []
        for _ in range(30):
            t = time.perf_counter()
            jax.block_until_ready(f_old(x, sp, keys, hist))
            to.append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready(f_new(x, sp, keys, hist, zeros, mu))
            tn.append(time.perf_counter() - t)
        print(f"{name}: without DRY rows/mu {np.median(to) * 1e3:.2f} ms, with "
              f"{np.median(tn) * 1e3:.2f} ms (B={B}, V={V}, median of 30, interleaved)")


if __name__ == "__main__":
    host_rows()
    sampler()
