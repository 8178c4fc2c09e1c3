"""``jllama perplexity -m MODEL -f TEXT [-c 512] [--chunks N] [--batch B]``: llama-perplexity's
method and output (running ``[i]ppl`` values, ``Final estimate: PPL = x +/- err``).

KL-divergence, as llama-perplexity: ``--kl-divergence-base FILE`` alone scores the text and saves
the base model's log-probs to FILE; adding ``--kl-divergence`` compares the model against FILE
(jllama/eval/kld.py describes the file and the statistics)."""

from __future__ import annotations

import argparse

from jllama.cli.common import add_numerics_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text (e.g. wiki.test.raw)")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None, help="max chunks (default: all)")
    p.add_argument("-b", "--batch", type=int, default=2, help="chunks per compiled batch")
    p.add_argument("--cache-type", default="f16", help="KV cache type (f32 f16 bf16 q8_0 q4_0)")
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                   help="alone: save the base log-probs to FILE; with --kl-divergence: read them")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare this model against --kl-divergence-base FILE (KLD, Δp, same top)")
    p.add_argument("--quant", metavar="FTYPE", default=None,
                   help="requantize the model at load (e.g. q4_0, q4_k_m) before scoring")
    p.add_argument("--platform", default=None)
    add_numerics_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import setup_platform

    setup_platform(args.platform)
    from jllama.api import Llama
    from jllama.errors import JllamaError
    from jllama.eval.perplexity import read_text, run_cli

    if args.kl_divergence and not args.kl_divergence_base:
        raise JllamaError("--kl-divergence needs --kl-divergence-base FILE (the base log-probs)")
    read_text(args.file)  # fail fast on a bad file, before loading the model
    if args.kl_divergence:
        from jllama.eval.kld import read_header

        read_header(args.kl_divergence_base)
    quant = None
    if args.quant:
        from jllama.quant.mixes import parse_ftype

        quant = {"base": parse_ftype(args.quant)}
    llm = Llama(args.model, ctx_size=args.ctx_size, cache_type=args.cache_type, quant=quant,
                flash_attn=args.flash_attn == "on", prompt_matmul=args.prompt_matmul)
    if args.kl_divergence_base:
        from jllama.eval.kld import run_cli as kld_cli

        kld_cli(llm, args.file, args.kl_divergence_base, args.kl_divergence, args.ctx_size,
                args.chunks, max(1, args.batch))
    else:
        run_cli(llm, args.file, args.ctx_size, args.chunks, max(1, args.batch))
    return 0
