"""``jllama run CONFIG [key=value ...]``: the job a YAML run config describes: a generation
(``generation.prompt`` / ``generation.messages``), or a perplexity run when the config sets
``perplexity.file`` (what ``jllama perplexity --config CONFIG`` runs)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a YAML config (model, runtime, generation or perplexity)")
    p.add_argument("config", help="path to a YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. generation.max_tokens=32")
    from jllama.cli.common import (
        add_distributed_args,
        add_draft_args,
        add_lora_args,
        add_model_args,
    )

    add_draft_args(p)
    add_distributed_args(p)
    add_lora_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import (
        load_llama,
        messages_with_images,
        overrides_from_args,
        print_timings,
        stream_to_stdout,
    )
    from jllama.config import load_config

    cfg = load_config(args.config, [*args.overrides, *overrides_from_args(args)])
    if cfg.perplexity.file is not None:
        from jllama.cli.perplexity import run_job

        return run_job(cfg)
    g = cfg.generation
    llm = load_llama(cfg)
    if g.messages:
        n_img = len(cfg.vision.images)
        prompt_text = llm.apply_chat_template(messages_with_images(
            [{"role": m.role, "content": m.content} for m in g.messages], n_img))
        # with images the text is cut at its media markers before tokenizing (libmtmd)
        stream_to_stdout(llm, prompt_text if n_img else llm.tokenizer.encode(
            prompt_text, add_special=True, parse_special=True), cfg)
    else:
        stream_to_stdout(llm, g.prompt or "", cfg)
    print_timings(llm, cfg)
    return 0
