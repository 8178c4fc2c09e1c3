"""Speed measurement as llama-bench does it: ``pp N`` (prompt of N tokens from an empty cache) and
``tg N`` (N single-token decode steps from an empty cache), repeated, mean ± sd in tokens/s.

Kept separate from the CLI so the side-by-side benchmark in ``experiments/`` measures jllama and
llama.cpp with the same procedure.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class BenchResult:
    model: str
    size_mib: float
    params_m: float
    backend: str
    test: str  # "pp512" / "tg128"
    n_tokens: int
    reps: list[float]  # seconds per repetition

    @property
    def tps(self) -> float:
        return statistics.mean(self.n_tokens / s for s in self.reps)

    @property
    def tps_sd(self) -> float:
        v = [self.n_tokens / s for s in self.reps]
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tps=self.tps, tps_sd=self.tps_sd)
        return d


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_reps(fn: Callable[[], None], reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    # avoid the special tokens at the start of most vocabularies
    return np.random.default_rng(seed).integers(min(100, n_vocab - 1), n_vocab, n).tolist()


def jllama_pp(llm, n: int) -> Callable[[], None]:
    toks = random_tokens(n, llm.spec.n_vocab)

    def run():
        llm.engine.reset(0)
        llm.engine.prefill(toks, 0).block_until_ready()

    return run


def jllama_tg(llm, n: int) -> Callable[[], None]:
    from jllama.engine.sampling import BatchSampling, SamplingParams

    eng = llm.engine
    sp = BatchSampling.stack([SamplingParams.greedy()] * eng.n_slots)
    import jax.numpy as jnp

    keys = jnp.zeros((eng.n_slots, 2), jnp.uint32)
    bias = jnp.zeros((eng.n_slots, llm.spec.n_vocab), jnp.float32)
    active = np.zeros(eng.n_slots, bool)
    active[0] = True

    def run():
        eng.reset(0)
        tok = np.zeros(eng.n_slots, np.int32)
        tok[0] = random_tokens(1, llm.spec.n_vocab)[0]
        steps = np.zeros(eng.n_slots, np.int32)
        for _ in range(n):
            nxt, _ = eng.step(tok, active, sp, keys, steps, bias)
            tok = nxt
        # step() returns host ids, so every token was synchronised

    return run


def llamacpp_pp(oracle, n: int) -> Callable[[], None]:
    toks = random_tokens(n, oracle.n_vocab())

    def run():
        oracle.reset()
        oracle.eval(toks)

    return run


def llamacpp_tg(oracle, n: int) -> Callable[[], None]:
    first = random_tokens(1, oracle.n_vocab())

    def run():
        # as llama-bench: n single-token evaluations from an empty cache, no sampling
        oracle.reset()
        for _ in range(n):
            oracle.eval(first)

    return run
