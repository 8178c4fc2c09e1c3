"""Load time: GGUF vs Orbax checkpoint (``jllama convert --to-orbax``), to a ready Engine.

    python experiments/bench_load.py [-m smollm2-135m-instruct -m gemma3-270m] [--procs 3]
                                     [--reps 3] [--out experiments/results/load.md]

Each measurement is ``Llama(source)`` until every parameter array is ready on the device
(``block_until_ready``), tokenizer and KV cache included, compile cache off, after JAX's
backend is up (its start-up is the same for both and not counted). "Cold-ish": the first load
in a fresh process (files are in the OS page cache: nothing is dropped, this machine is
shared). "Warm": the following loads in the same process. The checkpoint is written once per
model under ``--ckpt-dir`` (reused when present).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _worker(src: str, reps: int, quant: str | None) -> None:
    import jax
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # backend start-up outside the timings
    from jllama.api import Llama

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        llm = Llama(src, ctx_size=256, compile_cache=False,
                    quant={"base": quant} if quant else None)
        jax.block_until_ready(jax.tree_util.tree_leaves(llm.engine.state))
        times.append(time.perf_counter() - t0)
        del llm
    print(json.dumps({"times": times}))


# name -> (extra environment, requantize-on-load base). The C++ kernels read GGUF blocks as
# they are; without them (JLLAMA_NO_FFI=1) every quantized weight is repacked to int8 codes +
# scales at load; ``quant`` re-encodes every weight at load (the checkpoint stores the result).
SCENARIOS: dict[str, tuple[dict, str | None]] = {
    "ggml blocks (C++ kernels)": ({}, None),
    "i8 repack (JLLAMA_NO_FFI=1)": ({"JLLAMA_NO_FFI": "1"}, None),
    "requantized to q8_0 at load": ({}, "q8_0"),
}


def _env(extra: dict) -> dict:
    return dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), **extra)


def _run_worker(src: str, reps: int, extra: dict, quant: str | None) -> list[float]:
    env = _env(extra)
    q = ["--quant", quant] if quant else []
    r = subprocess.run([sys.executable, __file__, "--worker", src, "--reps", str(reps), *q],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])["times"]


def _checkpoint(model: str, ckpt_dir: Path, extra: dict, quant: str | None
                ) -> tuple[Path, float | None]:
    from jllama.checkpoint import is_checkpoint

    out = ckpt_dir / (model + ("-i8" if extra else "") + (f"-{quant}" if quant else ""))
    if is_checkpoint(out):
        return out, None
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jllama", "convert", model, "--to-orbax", str(out),
                        "--overwrite", *(["--quant", quant] if quant else [])], capture_output=True, text=True, timeout=1800,
                       env=_env(extra))
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return out, time.perf_counter() - t0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", default=None)
    ap.add_argument("--procs", type=int, default=3, help="fresh processes per source")
    ap.add_argument("--reps", type=int, default=3, help="loads per process (1 cold-ish + warm)")
    ap.add_argument("--ckpt-dir", default=str(Path.home() / ".cache" / "jllama" / "orbax"))
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.reps, args.quant)
        return 0

    from jllama.registry import resolve_model

    rows = []
    for model in args.model or ["smollm2-135m-instruct", "gemma3-270m"]:
        gguf = resolve_model(model)
        for scen, (extra, quant) in SCENARIOS.items():
            ck, conv_s = _checkpoint(model, Path(args.ckpt_dir), extra, quant)
            res = {}
            for name, src in (("gguf", str(gguf)), ("orbax", str(ck))):
                cold, warm = [], []
                for _ in range(args.procs):
                    t = _run_worker(src, args.reps, extra, quant if name == "gguf" else None)
                    cold.append(t[0])
                    warm += t[1:]
                res[name] = (statistics.median(cold), statistics.median(warm) if warm else None)
                print(f"{model} [{scen}] {name}: cold-ish {[f'{x:.2f}' for x in cold]} s, warm "
                      f"{[f'{x:.2f}' for x in warm]} s", file=sys.stderr)
            rows.append((model, scen, _du(gguf), _du(ck), conv_s, res))

    lines = ["| model | weight layout | GGUF MiB | checkpoint MiB | GGUF cold-ish s | "
             "Orbax cold-ish s | ratio | GGUF warm s | Orbax warm s | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, scen, gb, cb, _conv, res in rows:
        (gc, gw), (oc, ow) = res["gguf"], res["orbax"]
        lines.append(f"| {model} | {scen} | {gb / 2**20:.0f} | {cb / 2**20:.0f} | {gc:.2f} | "
                     f"{oc:.2f} | {gc / oc:.2f}x | {gw:.2f} | {ow:.2f} | {gw / ow:.2f}x |")
    table = "\n".join(lines)
    print(table)
    print(f"(median of {args.procs} fresh processes for cold-ish, of {args.procs * (args.reps - 1)}"
          f" loads for warm; ratio = GGUF / Orbax, > 1 means the checkpoint loads faster)")
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
