"""Decode speed of seeded sampling: llama.cpp's draw on the host (jllama/engine/dist.py) against
the device's JAX draw it replaced and against greedy, on SmolLM2-135M Q4_1, interleaved.

    PYTHONPATH=. /work/main/.venv/bin/python experiments/bench_seeded_draw.py [--rounds 3]

The JAX draw is what ``Engine.generate`` does when ``HostSampler.wanted`` says no (the code path
before the change); greedy draws nothing.
"""

from __future__ import annotations

import argparse
import time

from jllama import registry
from jllama.api import Llama
from jllama.engine import dist
from jllama.engine.sampling import SamplingParams

PROMPT = "<|im_start|>user\nWrite a long story about a cat.<|im_end|>\n<|im_start|>assistant\n"


def run(llm, ids, params, n) -> float:
    t = time.perf_counter()
    got = sum(1 for _ in llm.engine.generate(ids, params, max_tokens=n))
    return got / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    llm = Llama(registry.fetch("smollm2-135m-instruct", quiet=True), ctx_size=512)
    ids = llm.tokenizer.encode(PROMPT, add_special=False, parse_special=True)
    wanted = dist.HostSampler.wanted
    cases = {
        "greedy": (SamplingParams.greedy(), wanted),
        "seeded, host draw (llama.cpp's)": (SamplingParams(temperature=1.0, seed=42), wanted),
        "seeded, device JAX draw (before)": (SamplingParams(temperature=1.0, seed=42),
                                             staticmethod(lambda p: False)),
    }
    res: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(a.rounds + 1):  # round 0 compiles
        for name, (p, w) in cases.items():
            dist.HostSampler.wanted = w
            tps = run(llm, ids, p, a.tokens)
            if r:
                res[name].append(tps)
    dist.HostSampler.wanted = wanted
    for name, v in res.items():
        print(f"{name:36s} " + " ".join(f"{x:6.1f}" for x in v) + f"  best {max(v):6.1f} tok/s")


if __name__ == "__main__":
    main()
