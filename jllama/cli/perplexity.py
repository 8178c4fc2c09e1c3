"""``jllama perplexity -m MODEL -f TEXT [-c 512] [--chunks N] [--batch B]``: llama-perplexity's
method and output (running ``[i]ppl`` values, ``Final estimate: PPL = x +/- err``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text (e.g. wiki.test.raw)")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None, help="max chunks (default: all)")
    p.add_argument("-b", "--batch", type=int, default=2, help="chunks per compiled batch")
    p.add_argument("--cache-type", default="f16", help="KV cache type (f32 f16 bf16 q8_0 q4_0)")
    p.add_argument("--platform", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import setup_platform

    setup_platform(args.platform)
    from jllama.api import Llama
    from jllama.eval.perplexity import read_text, run_cli

    read_text(args.file)  # fail fast on a bad file, before loading the model
    llm = Llama(args.model, ctx_size=args.ctx_size, cache_type=args.cache_type)
    run_cli(llm, args.file, args.ctx_size, args.chunks, max(1, args.batch))
    return 0
