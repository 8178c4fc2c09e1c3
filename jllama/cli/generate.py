"""``jllama generate -m MODEL -p PROMPT``: one completion, like llama-cli -no-cnv."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from jllama.cli.common import add_sampling_args, add_vision_args

    p = sub.add_parser("generate", help="complete a prompt")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct", help="a .gguf path or a named model")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_args(p)
    add_vision_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import load_llama, overrides_from_args, print_timings, stream_to_stdout
    from jllama.config import load_config

    cfg = load_config(None, [f"model={args.model}", *overrides_from_args(args)])
    llm = load_llama(cfg)
    prompt = args.prompt
    if args.chat:
        text = llm.apply_chat_template([{"role": "user", "content": llm.with_media_markers(
            prompt, len(cfg.vision.images))}])
        # with images the text is cut at its media markers before tokenizing (libmtmd)
        prompt = (text if cfg.vision.images
                  else llm.tokenizer.encode(text, add_special=True, parse_special=True))
    stream_to_stdout(llm, prompt, cfg, stop=args.stop)
    print_timings(llm, cfg)
    return 0
