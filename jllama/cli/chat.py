"""``jllama chat -m MODEL``: an interactive conversation that streams the answer.

With ``--mmproj`` it takes images as llama-mtmd-cli's chat mode does: ``/image PATH`` attaches
an image to the next message (its media marker goes where the command was typed, before the
next line's text; a file that cannot be read is one error line and the chat goes on), and
``--image PATH`` (or a run config's ``vision.images``) attaches images to the first message
the same way. ``/clear`` forgets the
conversation (the system message and images not sent yet stay), ``/exit`` or ``/quit`` ends
it. Each turn the whole conversation is evaluated again, its images re-encoded."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from jllama.cli.common import add_sampling_args, add_vision_args

    p = sub.add_parser("chat", help="interactive chat (the model's chat template)")
    p.add_argument("--config", metavar="RUN.yaml", default=None,
                   help="a run config: model, runtime, generation.sampling / max_tokens, "
                        "vision (mmproj; images go with the first message)")
    p.add_argument("-m", "--model", default=None,
                   help="a .gguf path or a named model (default smollm2-135m-instruct)")
    p.add_argument("-s", "--system", default=None, help="system message")
    add_sampling_args(p)
    add_vision_args(p)
    p.add_argument("overrides", nargs="*", default=[],
                   help="key.path=value config overrides, e.g. vision.mmproj=F")
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import load_llama, overrides_from_args, print_timings
    from jllama.config import load_config, sampling_params
    from jllama.engine.multimodal import MEDIA_MARKER
    from jllama.errors import ImageError
    from jllama.models.clip_image import load_image

    ov = [*args.overrides, *overrides_from_args(args)]
    if args.model is not None or args.config is None:
        ov.insert(0, f"model={args.model or 'smollm2-135m-instruct'}")
    cfg = load_config(args.config, ov)
    if args.max_tokens is None and args.config is None:
        cfg.generation.max_tokens = 512
    llm = load_llama(cfg)
    # images of the whole conversation, in the order of their markers in the messages
    images = [load_image(p) for p in cfg.vision.images]
    if images and llm.vision is None:
        raise ImageError("--image needs --mmproj (the model's vision projector GGUF)")
    content = MEDIA_MARKER * len(images)  # the next user message so far
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    params = sampling_params(cfg.generation.sampling)
    stop = (args.stop or []) + cfg.generation.sampling.stop
    if interactive and llm.vision is not None:
        print("jllama: /image PATH attaches an image to the next message; /clear, /exit",
              file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()  # llama-mtmd-cli strips the line
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/clear":  # images attached to the unsent message stay, as there
            pending = content.count(MEDIA_MARKER)
            messages, images = list(system), images[len(images) - pending:]
            print("Chat history cleared", file=sys.stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            if _attach(llm, line[len("/image "):].strip(), images):
                content += MEDIA_MARKER
            continue
        messages.append({"role": "user", "content": content + line})
        content = ""
        text = llm.apply_chat_template(messages)
        # with images the text is cut at its media markers before tokenizing (libmtmd)
        prompt = text if images else llm.tokenizer.encode(text, add_special=True,
                                                          parse_special=True)
        reply = []
        for piece in llm.stream(prompt, cfg.generation.max_tokens, params, stop=stop,
                                images=list(images) or None):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        if interactive:
            print_timings(llm)
    return 0


def _attach(llm, path: str, images: list) -> bool:
    """``/image PATH``: the image appended to ``images``, or one error line (the chat goes on,
    as llama-mtmd-cli's)."""
    from jllama.errors import ImageError
    from jllama.models.clip_image import load_image

    if llm.vision is None:
        print("error: /image needs a vision projector: start the chat with --mmproj",
              file=sys.stderr)
        return False
    if not path:
        print("error: /image needs a file name", file=sys.stderr)
        return False
    try:
        images.append(load_image(path))
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    print(f"{path} image loaded", file=sys.stderr)
    return True
