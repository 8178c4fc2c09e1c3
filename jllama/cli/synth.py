"""``jllama synth NAME OUT``: a random-weight GGUF with a published model's shapes and tokenizer.

For benchmarks and scale tests without downloading the model (``jllama.convert.synth``). The
F16 file is written tensor by tensor; ``--type`` q4_k_m / q4_0 / q8_0 then runs ``jllama
quantize``'s quantize_file on it (also streaming) and keeps only the quantized file.

``--random-blocks`` writes the quantized file directly instead (seconds where quantizing takes
minutes to an hour): the tensor types and metadata ``jllama quantize`` would give it for any file
type it knows (q4_k_m, q4_1, q6_k, ...), with random codes and small scales in the quantized
tensors. Its values are random: for speed and memory benchmarks only, its text is meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TYPES = ("f16", "q4_k_m", "q4_0", "q8_0")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a random-weight GGUF with a real model's shapes and tokenizer",
        description="Write a random-weight GGUF with the shapes, metadata and tokenizer of a "
        "published model (llama-3.2-1b, qwen3-30b-a3b, deepseek-v2-lite, ...: "
        "'jllama synth list' prints them all).",
    )
    p.add_argument("name", help="model shape, or 'list' to print them with their sizes")
    p.add_argument("output", nargs="?", help="output .gguf file")
    p.add_argument("--type", default="f16", metavar="TYPE",
                   help=f"file type (default f16): {', '.join(TYPES)}; with --random-blocks "
                   "any 'jllama quantize' type (q4_1, q4_k_m, q5_k_s, q6_k, ...)")
    p.add_argument("--random-blocks", action="store_true",
                   help="write the quantized file directly with random codes and small scales "
                   "(seconds, not minutes): tensor types as 'jllama quantize IN OUT TYPE' would "
                   "choose; values random, for speed/memory benchmarks only (meaningless text)")
    p.add_argument("--layers", type=int, help="number of blocks (default: the model's)")
    p.add_argument("--tiny", action="store_true",
                   help="width 256, 4 heads, 8 experts (tests): same archs and vocabulary")
    p.add_argument("--vocab", metavar="GGUF", help="tokenizer source (file or folder of "
                   "llama.cpp's ggml-vocab-*.gguf); default: shared data, registry")
    p.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.convert.synth import SHAPES, find_vocab, n_params, scaled, write
    from jllama.errors import JllamaError

    if args.name == "list":
        for name, s in SHAPES.items():
            print(f"{name:18s} {s.arch:10s} {n_params(s) / 1e9:6.2f}B params "
                  f"(published {s.params}B), {s.n_layer} layers, vocab {s.n_vocab}")
        return 0
    if args.name not in SHAPES:
        raise JllamaError(f"unknown model shape '{args.name}' (known: {', '.join(SHAPES)})")
    if not args.output:
        raise JllamaError("give an output file")
    if args.random_blocks:
        from jllama.quant.mixes import mix_from_base

        mix_from_base(args.type)  # an unknown name fails before any work
    elif args.type not in TYPES:
        raise JllamaError(f"unknown --type '{args.type}' (known: {', '.join(TYPES)}; "
                          "--random-blocks takes any 'jllama quantize' type)")
    shape = scaled(SHAPES[args.name], args.layers, args.tiny)
    vocab = find_vocab(shape, args.vocab)
    t0 = time.time()
    if args.random_blocks:
        from jllama.convert.synth import write_random_blocks

        size = write_random_blocks(shape, args.output, vocab, args.type, seed=args.seed)
        print(f"synth: {args.name}: {n_params(shape) / 1e9:.3f}B params, random "
              f"{args.type.upper()} blocks {size / 2**20:.1f} MiB in {time.time() - t0:.1f} s",
              file=sys.stderr)
        print(args.output)
        return 0
    f16 = args.output if args.type == "f16" else args.output + ".f16.tmp"
    size = write(shape, f16, vocab, seed=args.seed)
    print(f"synth: {args.name}: {n_params(shape) / 1e9:.3f}B params, F16 {size / 2**20:.1f} MiB "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)
    if args.type != "f16":
        from jllama.quant.mixes import mix_from_base
        from jllama.quant.quantize import quantize_file

        t1 = time.time()
        try:
            rep = quantize_file(f16, args.output, mix_from_base(args.type))
        finally:
            os.unlink(f16)
        print(f"synth: {args.type.upper()} {rep.file_size / 2**20:.1f} MiB in "
              f"{time.time() - t1:.1f} s", file=sys.stderr)
    print(args.output)
    return 0
