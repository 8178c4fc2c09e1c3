"""Decode speed of jllama vs llama-cpp-python on the tiny random deepseek2 (MLA + MoE) model.

    python experiments/bench_deepseek2.py [--tokens 128] [--quant Q8_0] [--threads 1]

Both engines get the same prompt ids and decode greedily. After one warm-up each (jllama's
compiles happen there) the two are timed alternately, ``--reps`` times, so load from other
processes hits both alike; reported is the best decode tokens/s of each (tokens after the first
over the time after the first). On a model this small both are dominated by per-token overhead
(graph dispatch, sampling), not by weight bandwidth; llama.cpp's default of 1 thread here avoids
its thread-barrier cost, which on a shared 2-core machine dwarfs the work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tinymodels_moe as tm  # noqa: E402


def _rate(gen: Iterator[int], n: int) -> float:
    k = 0
    t1 = time.perf_counter()
    for _tok in gen:
        k += 1
        if k == 1:
            t1 = time.perf_counter()
        if k == n:
            break
    return (k - 1) / (time.perf_counter() - t1)


def runners(path: Path, ids: list[int], n: int, threads: int) -> dict[str, Callable[[], float]]:
    from jllama.eval.llamacpp import llama_cpp_stock

    llama_cpp = llama_cpp_stock()

    from jllama.engine.sampling import SamplingParams

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=threads,
                          n_threads_batch=threads, type_k=0, type_v=0)
    eng = tm.jllama_engine(path, ctx=512)

    def ref() -> float:
        llm.reset()
        return _rate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), n)

    def ours() -> float:
        return _rate(eng.generate(ids, SamplingParams.greedy(), max_tokens=n), n)

    return {"llama-cpp-python": ref, "jllama": ours}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--quant", default=None, help="e.g. Q8_0 (default: F32 weights)")
    ap.add_argument("--width", type=int, default=1,
                    help="size multiplier of the random model (8: ~25M parameters)")
    args = ap.parse_args()
    quant = getattr(tm.Q, args.quant) if args.quant else None
    with tempfile.TemporaryDirectory() as d:
        path = tm.write_deepseek2(Path(d) / "ds_bench.gguf", quant=quant, width=args.width)
        run = runners(path, tm.prompt_ids(268, n=16), args.tokens, args.threads)
        for f in run.values():  # warm-up (jllama compiles here)
            f()
        best = {k: 0.0 for k in run}
        for _ in range(args.reps):
            for k, f in run.items():
                best[k] = max(best[k], f())
    ref, ours = best["llama-cpp-python"], best["jllama"]
    print(f"random deepseek2 x{args.width} ({args.quant or 'F32'}), {args.tokens}-token greedy decode, best of "
          f"{args.reps} (llama.cpp threads={args.threads}):")
    print(f"  llama-cpp-python: {ref:8.1f} t/s")
    print(f"  jllama          : {ours:8.1f} t/s  ({ours / ref:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
