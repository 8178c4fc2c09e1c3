"""Partial offload (``-ngl``) on a GPU: speed per split, logits against the all-on-device run,
and a model larger than the device memory JAX is allowed.

Writes a random model of a given shape (experiments/gpu/e2e_gpu.py's ``write_model``) and runs
it with ``n_gpu_layers`` = all, half, 1 (output layer only) and 0 (everything streamed from
pinned host memory), printing pp/tg tokens/s, load time and the largest logit difference from
the all-on-device run. ``--mem-fraction F`` run in a child process with
XLA_PYTHON_CLIENT_MEM_FRACTION=F, so that the device is smaller than the model: ``auto`` must
pick a split that fits and run, ``all`` must fail with OffloadError.

    python experiments/gpu/offload_gpu.py [--layers 30] [--types Q8_0] [-p 256 -n 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def run_split(path: Path, ngl, pp: int, tg: int, reps: int, ref=None):
    from jllama.api import Llama
    from jllama.eval.bench import jllama_pp, jllama_tg, time_reps

    t0 = time.perf_counter()
    llm = Llama(str(path), ctx_size=pp + tg + 64, compile_cache=False, n_gpu_layers=ngl)
    load = time.perf_counter() - t0
    lg = np.asarray(llm.logits(list(range(1, 33))), np.float32)
    diff = float(np.max(np.abs(lg - ref))) if ref is not None else 0.0
    tp = time_reps(jllama_pp(llm, pp), reps)
    tt = time_reps(jllama_tg(llm, tg), reps)
    desc = llm.offload.describe() if llm.offload is not None else "all on the device"
    print(f"| {ngl} | {pp / statistics.median(tp):.1f} | {tg / statistics.median(tt):.1f} | "
          f"{load:.1f} | {diff:.3g} | {desc} |", flush=True)
    return lg


def child(path: str) -> None:
    """Under a small XLA_PYTHON_CLIENT_MEM_FRACTION: auto fits, all does not."""
    from jllama.api import Llama
    from jllama.models.offload import OffloadError, device_memory_limit

    print(f"device limit {device_memory_limit() / 2**20:.0f} MiB, model "
          f"{os.path.getsize(path) / 2**20:.0f} MiB", flush=True)
    try:
        Llama(path, ctx_size=256, compile_cache=False, n_gpu_layers="all")
        print("all: loaded (the device was large enough after all)")
    except OffloadError as e:
        print(f"all: OffloadError: {e}")
    llm = Llama(path, ctx_size=256, compile_cache=False)
    print(f"auto: {llm.offload.describe() if llm.offload else 'all on the device'}")
    out = llm.complete(list(range(1, 17)), max_tokens=8, temperature=0)
    print(f"auto: generated {len(out.tokens)} tokens, {out.gen_tps:.1f} t/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--embd", type=int, default=576)
    ap.add_argument("--ff", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("-p", type=int, default=256)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", type=int, default=2)
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="also run a big model under this XLA_PYTHON_CLIENT_MEM_FRACTION")
    ap.add_argument("--big-embd", type=int, default=2048)
    ap.add_argument("--big-ff", type=int, default=8192)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    import jax
    from e2e_gpu import write_model

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()}, "
          f"memories {[m.kind for m in jax.devices()[0].addressable_memories()]}")
    with tempfile.TemporaryDirectory() as d:
        for qname in args.types.split(","):
            path = write_model(Path(d) / f"{qname}.gguf", qname, args.layers, args.embd,
                               args.ff, args.heads, args.kv_heads, args.vocab)
            print(f"\n{qname}, {args.layers} layers\n")
            print(f"| -ngl | pp{args.p} t/s | tg{args.n} t/s | load s | max abs logit diff "
                  "| split |")
            print("| --- | ---: | ---: | ---: | ---: | --- |")
            ref = run_split(path, "all", args.p, args.n, args.r)
            for ngl in (args.layers // 2 + 1, 1, 0):
                run_split(path, ngl, args.p, args.n, args.r, ref)
        if args.mem_fraction:
            from jllama.models.offload import device_memory_limit

            # the child's device: this one's limit (JAX's default 75 % of the memory) scaled
            # to the fraction; the model is made about twice that
            child_limit = device_memory_limit() / 0.75 * args.mem_fraction
            per_layer = (2 * args.big_embd * args.big_embd + 2 * args.big_embd * 512
                         + 3 * args.big_embd * args.big_ff) * 34 / 32  # Q8_0, 4 of 16 kv heads
            n_big = max(4, int(2 * child_limit / per_layer))
            print(f"\nbig model: {n_big} layers, ~{n_big * per_layer / 2**30:.1f} GiB, child "
                  f"limit ~{child_limit / 2**30:.1f} GiB", flush=True)
            big = write_model(Path(d) / "big.gguf", "Q8_0", n_big, args.big_embd, args.big_ff,
                              16, 4, args.vocab)
            env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(args.mem_fraction))
            subprocess.run([sys.executable, __file__, "--child", str(big)], env=env,
                           timeout=240, check=False)


if __name__ == "__main__":
    main()
