"""A real model requantized to ggml 0c1e570's newer types by jllama and by llama.cpp: file
identity, and jllama's logits and greedy tokens against llama.cpp's on the same file.

    python experiments/newtypes_vs_llamacpp.py [-m gemma3-270m] Q1_0 Q2_0

Uses the test oracle (llama-cpp-python, stock kernels: see tests/llamacpp_oracle.py).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    from llamacpp_oracle import llama_cpp_logits_and_greedy

    from jllama.api import Llama
    from jllama.engine.sampling import SamplingParams
    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file
    from jllama.quant.testing import llama_cpp_quantize
    from jllama.registry import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="gemma3-270m")
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("ftypes", nargs="+")
    a = ap.parse_args()
    src = resolve_model(a.model)
    toks = [2, 818, 5279, 529, 7001, 563, 496, 1024, 2368, 107, 236743, 3272]
    for ft in a.ftypes:
        ours, ref = Path(a.out) / f"newtypes-{ft}-ours.gguf", Path(a.out) / f"newtypes-{ft}-ref.gguf"
        t0 = time.perf_counter()
        quantize_file(src, ours, mix_from_base(ft), allow_requantize=True)
        t1 = time.perf_counter()
        llama_cpp_quantize(src, ref, ft, allow_requantize=True)
        t2 = time.perf_counter()
        same = filecmp.cmp(ours, ref, shallow=False)
        lref, gref = llama_cpp_logits_and_greedy(ref, toks)
        llm = Llama(ours, ctx_size=128)
        got = llm.engine.logits(toks)
        greedy = list(llm.engine.generate(toks, SamplingParams.greedy(), max_tokens=16))
        exact = np.array_equal(got.view(np.uint32), lref.view(np.uint32))
        print(f"{ft}: quantize jllama {t1 - t0:.1f} s, llama.cpp {t2 - t1:.1f} s; file identical "
              f"{same}; logits at {len(toks)} positions bit-identical {exact} (max |diff| "
              f"{float(np.abs(got - lref).max()):.3g}); 16 greedy tokens equal {greedy == gref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
