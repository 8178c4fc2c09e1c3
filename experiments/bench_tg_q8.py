"""Decode (tg) A/B for the int8 matvec: llama.cpp, jllama with the int8 kernels, jllama without
(``JLLAMA_NO_Q8=1``), interleaved in fresh processes so a busy shared machine hits all three alike.

    python experiments/bench_tg_q8.py [-m MODEL ...] [-n 128] [-r 3] [--rounds 2]

Prints tokens/s (best of reps) per round; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CODE = {
    "llama.cpp": (
        "from jllama.eval.llamacpp import llama_cpp_stock; from jllama.registry import resolve_model;"
        "from jllama.eval.bench import llamacpp_tg, time_reps; lc = llama_cpp_stock();"
        "p = resolve_model({m!r}); r = lc.Llama(model_path=str(p), n_ctx={n} + 64, n_batch=512,"
        " n_threads=2, verbose=False); print(max({n} / s for s in time_reps(llamacpp_tg(r, {n}), {r})))"
    ),
    "jllama": (
        "from jllama.api import Llama; from jllama.eval.bench import jllama_tg, time_reps;"
        "llm = Llama({m!r}, ctx_size={n} + 64);"
        "print(max({n} / s for s in time_reps(jllama_tg(llm, {n}), {r})))"
    ),
}


def run(kind: str, model: str, n: int, reps: int, env: dict) -> float:
    code = CODE["llama.cpp" if kind == "llama.cpp" else "jllama"].format(m=model, n=n, r=reps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, **env))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", action="append", default=None)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    variants = [("llama.cpp", {}), ("jllama int8", {"JLLAMA_NO_Q8": "0"}),
                ("jllama f32 kernels", {"JLLAMA_NO_Q8": "1"})]  # fmt: skip
    for model in a.model or ["smollm2-135m-instruct"]:
        for rnd in range(a.rounds):
            res = [(name, run(name if name == "llama.cpp" else "j", model, a.n, a.reps, env))
                   for name, env in variants]  # fmt: skip
            print(f"{model} round {rnd + 1} tg{a.n}: "
                  + ", ".join(f"{name} {v:.1f} t/s" for name, v in res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
