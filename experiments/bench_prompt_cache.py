"""Prompt (prefix) cache and KV cache types: what they buy, measured.

    python experiments/bench_prompt_cache.py [-m MODEL] [--prefix 500]

1. Time to first token of a second request sharing a ``--prefix``-token prefix with the first,
   with the prompt cache (same slot, reused) and without (slot reset), after warm-up so compile
   time is excluded.
2. KV cache types f32 / f16 / q8_0 / q4_0: bytes per token (measured from the cache arrays and
   from the formula) and the KL-divergence of next-token distributions against the f32 cache on
   a WikiText-2 excerpt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--prefix", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams
    from jllama.models.kvquant import bytes_per_token

    data = Path(os.environ.get("JLLAMA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    text = (data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    llm = Llama(args.model, ctx_size=1024)
    ids = llm.tokenize(text)
    prefix = ids[: args.prefix]
    eng = llm.engine

    def ttft(prompt, reuse: bool) -> float:
        if not reuse:
            eng.reset(0)
        t0 = time.perf_counter()
        next(iter(eng.generate(prompt, SamplingParams.greedy(), max_tokens=1)))
        return time.perf_counter() - t0

    # warm up every shape involved
    for _ in range(2):
        ttft(prefix + ids[args.prefix : args.prefix + 7], False)
        ttft(prefix + ids[args.prefix + 7 : args.prefix + 12], True)
    cold, warm = [], []
    for r in range(args.reps):
        a = prefix + ids[args.prefix + 20 * r : args.prefix + 20 * r + 7]
        b = prefix + ids[args.prefix + 20 * r + 7 : args.prefix + 20 * r + 12]
        ttft(a, False)
        cold.append(ttft(b, False))
        ttft(a, False)
        warm.append(ttft(b, True))
    print(f"## Prompt cache ({llm.path.name}, {args.prefix}-token shared prefix)\n")
    print("| second request | TTFT (best of reps) |\n| --- | ---: |")
    print(f"| no prompt cache | {min(cold) * 1e3:.0f} ms |")
    print(f"| prompt cache (reused {eng.timings.extra.get('cached_tokens')} tokens) | {min(warm) * 1e3:.0f} ms |")
    print(f"\nspeed-up {min(cold) / min(warm):.1f}x\n")

    spec = llm.spec
    window = ids[:512]
    ref = None
    print("## KV cache types\n")
    print("| type | bytes/token (formula) | bytes/token (measured) | KLD vs f32 | same top-1 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        m = Llama(args.model, ctx_size=512, cache_type=kind)
        lg = m.engine.logits(window)
        lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
        if ref is None:
            ref = lp
        kld = float(np.mean(np.sum(np.exp(ref) * (ref - lp), axis=-1)))
        same = float(np.mean(lp.argmax(-1) == ref.argmax(-1)))
        formula = 2 * spec.n_layer * bytes_per_token(kind, spec.head_dim, spec.n_head_kv)
        measured = m.engine.cache.nbytes / m.engine.max_len
        print(f"| {kind} | {formula} | {measured:.0f} | {kld:.5f} | {same:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
