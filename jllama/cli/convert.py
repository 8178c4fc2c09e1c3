"""``jllama convert MODEL --to-orbax DIR``: save a loaded model as an Orbax checkpoint.

The checkpoint holds the parameters exactly as the engine uses them (requantized when asked,
repacked for this backend) plus the GGUF header (tokenizer, hyperparameters); ``Llama(DIR)``,
``jllama run`` / ``generate -m DIR`` then start from it without the GGUF. See
``jllama/checkpoint.py`` for the format.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="save a model as an Orbax checkpoint (fast, shardable load)")
    p.add_argument("model", help="input .gguf file or a named model")
    p.add_argument("--to-orbax", metavar="DIR", required=True, help="checkpoint directory to write")
    p.add_argument("--quant", metavar="TYPE", default=None,
                   help="requantize while loading (a file type, e.g. q8_0), as runtime quant does")
    p.add_argument("--platform", default=None,
                   help="cpu | gpu | tpu: the backend whose weight layout to store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import setup_platform, start_backend

    setup_platform(args.platform, None, "--platform")
    start_backend()
    import time

    from jllama.api import Llama
    from jllama.checkpoint import save

    t0 = time.perf_counter()
    quant = {"base": args.quant} if args.quant else None
    llm = Llama(args.model, ctx_size=256, n_slots=1, quant=quant, compile_cache=False)
    t1 = time.perf_counter()
    out = save(llm, args.to_orbax, overwrite=args.overwrite)
    t2 = time.perf_counter()
    import jax

    n_bytes = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(llm.engine.state))
    print(f"jllama convert: {llm.path} -> {out} ({llm.spec.arch}, {n_bytes / 2**20:.1f} MiB of "
          f"{jax.default_backend()}-layout parameters; load {t1 - t0:.2f} s, save {t2 - t1:.2f} s)",
          file=sys.stderr)
    return 0
