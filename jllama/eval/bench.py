"""Speed measurement as llama-bench does it: ``pp N`` (prompt of N tokens from an empty cache) and
``tg N`` (N single-token decode steps from an empty cache), repeated, mean ± sd in tokens/s.

Kept separate from the CLI so the side-by-side benchmark in ``experiments/`` measures jllama and
llama.cpp with the same procedure.
"""

from __future__ import annotations

import math
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


# llama.cpp's llama_model_ftype_name for general.file_type ids (jllama.quant.mixes.FTYPES'
# names); other names print as they are
_FTYPE_DESC = {
    "F32": "all F32", "Q2_K": "Q2_K - Medium", "Q3_K_S": "Q3_K - Small",
    "Q3_K_M": "Q3_K - Medium", "Q3_K_L": "Q3_K - Large", "Q4_K_S": "Q4_K - Small",
    "Q4_K_M": "Q4_K - Medium", "Q5_K_S": "Q5_K - Small", "Q5_K_M": "Q5_K - Medium",
    "IQ4_NL": "IQ4_NL - 4.5 bpw", "IQ4_XS": "IQ4_XS - 4.25 bpw",
}
# the file type llama.cpp guesses from the most frequent tensor type when the key is missing
_GUESS = {"F32": "F32", "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def count_params(gguf) -> int:
    """Parameters counted from the tensors' shapes (llama_model_n_params), not from metadata."""
    return sum(math.prod(t.shape) for t in gguf.tensors.values())


def size_label(n_params: int, min_digits: int = 2) -> str:
    """"135M" for 134,515,008: the rounding gguf-py's ``size_label`` applies to a count."""
    scale, suffix = next(((s, u) for s, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"))
                          if n_params > s), (1e3, "K"))
    x = n_params * (1.0 / scale)  # gguf-py multiplies by 1e-6 etc.: the same last bits
    fix = max(min_digits - len(str(round(x)).lstrip("0")), 0)
    return f"{x:.{fix}f}{suffix}"


def ftype_desc(gguf) -> str:
    """llama.cpp's file-type name ("Q4_K - Medium"); guessed, as llama.cpp does, from the most
    frequent tensor type when general.file_type is missing."""
    from collections import Counter

    from jllama.quant.mixes import FTYPE_BY_ID

    ft = gguf.metadata.get("general.file_type")
    if ft is not None:
        name = FTYPE_BY_ID.get(int(ft))
        return _FTYPE_DESC.get(name, name) if name else f"file type {ft}"
    types = Counter(t.type_name.upper() for t in gguf.tensors.values())
    if not types:
        return "unknown"
    name = types.most_common(1)[0][0]
    name = _GUESS.get(name, name)
    return f"{_FTYPE_DESC.get(name, name)} (guessed)"


def model_type(gguf, arch: str) -> str:
    """llama-bench's model column ("llama 135M Q4_1"), the size from the counted parameters:
    general.size_label is whatever the converter wrote, and llama.cpp's own size names come
    from a table by layer count (it calls SmolLM2-135M "256M")."""
    return f"{arch} {size_label(count_params(gguf))} {ftype_desc(gguf)}"


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
    from jllama.engine.engine import DECODE_CHUNK
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
        if eng.loop_decode:  # as generate() decodes: DECODE_CHUNK tokens per dispatch
            done = 0
            while done < n:
                k = min(DECODE_CHUNK, n - done)
                left = np.zeros(eng.n_slots, np.int32)
                left[0] = k + 1  # the chunk's last token is fed too, as the next one's input
                out = eng.decode_chunk(tok, active, sp, keys, steps, left, (), k, bias)
                tok = np.maximum(out[-1], 0)  # other slots' -1: any valid id
                done += k
            return
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
