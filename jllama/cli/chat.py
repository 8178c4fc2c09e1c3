"""``jllama chat -m MODEL``: an interactive conversation that streams the answer."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from jllama.cli.common import add_sampling_args

    p = sub.add_parser("chat", help="interactive chat (the model's chat template)")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("-s", "--system", default=None, help="system message")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import load_llama, overrides_from_args, print_timings
    from jllama.config import load_config, sampling_params

    cfg = load_config(None, [f"model={args.model}", *overrides_from_args(args)])
    if args.max_tokens is None:
        cfg.generation.max_tokens = 512
    llm = load_llama(cfg)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    params = sampling_params(cfg.generation.sampling)
    while True:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.encode(llm.apply_chat_template(messages), add_special=True,
                                   parse_special=True)
        reply = []
        for piece in llm.stream(ids, cfg.generation.max_tokens, params, stop=args.stop):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        if interactive:
            print_timings(llm)
    return 0
