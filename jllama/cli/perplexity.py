"""``jllama perplexity -m MODEL -f TEXT [-c 512] [--chunks N] [--batch B]``: llama-perplexity's
method and output (running ``[i]ppl`` values, ``Final estimate: PPL = x +/- err``).

``--config RUN.yaml`` reads the job from a run config instead: ``model``, ``quant``, ``runtime``
(platform, threads, cache types, numerics) and the ``perplexity`` section (file, ctx, chunks,
batch); flags given here win. ``jllama run RUN.yaml`` runs the same job when the config sets
``perplexity.file``.

KL-divergence, as llama-perplexity: ``--kl-divergence-base FILE`` alone scores the text and saves
the base model's log-probs to FILE; adding ``--kl-divergence`` compares the model against FILE
(jllama/eval/kld.py describes the file and the statistics)."""

from __future__ import annotations

import argparse
import sys

from jllama.cli.common import (
    add_cache_type_args,
    add_lora_args,
    add_model_args,
    add_numerics_args,
    add_platform_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity")
    p.add_argument("--config", metavar="RUN.yaml", default=None,
                   help="a run config: model, quant, runtime and its perplexity section")
    p.add_argument("-m", "--model", default=None,
                   help="a .gguf path or a named model (default smollm2-135m-instruct)")
    p.add_argument("-f", "--file", default=None,
                   help="UTF-8 text (e.g. wiki.test.raw); required without --config")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="window (and context) size, default 512")
    p.add_argument("--chunks", type=int, default=None, help="max chunks (default: all)")
    p.add_argument("-b", "--batch", type=int, default=None,
                   help="chunks per compiled batch (default 2)")
    p.add_argument("--cache-type", default=None,
                   help="KV cache type, K and V (one of -ctk's; default f16)")
    add_cache_type_args(p)
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                   help="alone: save the base log-probs to FILE; with --kl-divergence: read them")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare this model against --kl-divergence-base FILE (KLD, Δp, same top)")
    p.add_argument("--quant", metavar="FTYPE", default=None,
                   help="requantize the model at load (e.g. q4_0, q4_k_m) before scoring")
    add_platform_args(p)
    add_numerics_args(p, via_config=True)
    add_lora_args(p)
    add_model_args(p)
    p.add_argument("overrides", nargs="*", default=[],
                   help="key.path=value config overrides, e.g. perplexity.chunks=10")
    p.set_defaults(func=run)


def _overrides(args) -> list[str]:
    from jllama.cli.common import overrides_from_args

    ov = list(args.overrides)
    pairs = {"model": "model", "file": "perplexity.file", "ctx_size": "perplexity.ctx",
             "chunks": "perplexity.chunks", "batch": "perplexity.batch",
             "cache_type": ("runtime.cache_type_k", "runtime.cache_type_v")}
    for attr, keys in pairs.items():
        v = getattr(args, attr)
        if v is not None:
            ov += [f"{k}={v}" for k in ((keys,) if isinstance(keys, str) else keys)]
    return ov + [o for o in overrides_from_args(args)
                 if o.startswith(("runtime.", "lora=", "kv_overrides=", "rope.", "control_vector"))]


def run(args) -> int:
    from jllama.config import load_config
    from jllama.errors import JllamaError

    cfg = load_config(args.config, _overrides(args))
    if args.quant:
        from jllama.quant.mixes import parse_ftype

        cfg.quant = {"base": parse_ftype(args.quant)}
    if args.kl_divergence and not args.kl_divergence_base:
        raise JllamaError("--kl-divergence needs --kl-divergence-base FILE (the base log-probs)")
    if cfg.perplexity.file is None:
        where = f"{cfg.source}: 'perplexity.file' is not set; " if args.config else ""
        raise JllamaError(f"{where}give the text to score with -f FILE")
    return run_job(cfg, args.kl_divergence_base, args.kl_divergence)


def run_job(cfg, kl_base: str | None = None, kl_compare: bool = False) -> int:
    """A perplexity job described by a run config (``jllama perplexity`` and ``jllama run``)."""
    from jllama.cli.common import (
        model_load_kwargs,
        platform_origin,
        setup_platform,
        start_backend,
        warn_ngl_ignored,
    )

    pp = cfg.perplexity
    setup_platform(cfg.runtime.platform, cfg.runtime.threads, platform_origin(cfg))
    from jllama.eval.perplexity import read_text, run_cli

    read_text(pp.file)  # fail fast on a bad file, before loading the model
    if kl_compare:
        from jllama.eval.kld import read_header

        read_header(kl_base)
    start_backend()
    warn_ngl_ignored(cfg.runtime.n_gpu_layers)
    from jllama.api import Llama

    llm = Llama(cfg.model, ctx_size=pp.ctx, cache_type=cfg.runtime.cache_type_k,
                cache_type_v=cfg.runtime.cache_type_v, quant=cfg.quant,
                compile_cache=cfg.runtime.compile_cache, flash_attn=cfg.runtime.flash_attn,
                prompt_matmul=cfg.runtime.prompt_matmul, lora=cfg.lora, **model_load_kwargs(cfg))
    if kl_base:
        from jllama.eval.kld import run_cli as kld_cli

        kld_cli(llm, pp.file, kl_base, kl_compare, pp.ctx, pp.chunks, pp.batch)
    else:
        # today's stdout: run_cli's default was bound when its module was imported
        run_cli(llm, pp.file, pp.ctx, pp.chunks, pp.batch, out=sys.stdout)
    return 0
