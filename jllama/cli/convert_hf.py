"""``jllama convert-hf DIR OUT --outtype T``: a Hugging Face checkpoint folder -> one GGUF file.

The job of llama.cpp's ``convert_hf_to_gguf.py`` (flags named as there: ``--outtype``,
``--outfile``, ``--model-name``), with the same output bytes on the architectures
``jllama/convert`` supports. OUT may be given as the second argument or as ``--outfile``.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-hf", help="convert a Hugging Face checkpoint folder to GGUF "
                                          "(as convert_hf_to_gguf.py)")
    p.add_argument("model", help="checkpoint folder: config.json, model*.safetensors, "
                                 "tokenizer.json or tokenizer.model")
    p.add_argument("out", nargs="?", default=None, help="output .gguf file")
    p.add_argument("--outfile", default=None, help="output .gguf file (same as OUT)")
    p.add_argument("--outtype", default="auto", choices=["f32", "f16", "bf16", "q8_0", "auto"],
                   help="tensor type: f32, f16, bf16, q8_0, or auto (the checkpoint's 16-bit "
                        "type, else f16); 1-D tensors and norms stay f32")
    p.add_argument("--model-name", default=None, help="general.name (default: from the folder "
                                                      "name and model card)")
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.convert import ConvertError, convert_hf

    out = args.outfile or args.out
    if out is None:
        raise ConvertError("no output file: give OUT or --outfile")
    if args.out and args.outfile and args.out != args.outfile:
        raise ConvertError("OUT and --outfile disagree: give one")
    t0 = time.perf_counter()
    size = convert_hf(args.model, out, args.outtype, model_name=args.model_name)
    print(f"jllama convert-hf: {args.model} -> {out} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
