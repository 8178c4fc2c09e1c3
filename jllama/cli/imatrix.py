"""``jllama imatrix -m MODEL -f TEXT [-o imatrix.gguf] [-c 512] [--chunks N] [--in-file F ...]
[--output-format gguf|dat]``: llama-imatrix's importance matrix, for ``jllama quantize
--imatrix`` (or llama-quantize). Without -f, --in-file files are only merged."""

from __future__ import annotations

import argparse
import sys

from jllama.cli.common import add_numerics_args, add_platform_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("imatrix", help="importance matrix over a text, as llama-imatrix")
    p.add_argument("-m", "--model", default="smollm2-135m-instruct",
                   help="a .gguf path or a named model (default smollm2-135m-instruct)")
    p.add_argument("-f", "--file", default=None, help="UTF-8 text to run the model over")
    p.add_argument("-o", "--output", default="imatrix.gguf",
                   help="output file (default imatrix.gguf)")
    p.add_argument("-c", "--ctx-size", type=int, default=512,
                   help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=-1, help="max chunks (default: all)")
    p.add_argument("--in-file", action="append", default=[], metavar="F",
                   help="an imatrix (GGUF or .dat) to merge in (repeatable)")
    p.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                   help="gguf (default) or llama.cpp's legacy .dat")
    add_platform_args(p)
    add_numerics_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.errors import JllamaError
    from jllama.quant.imatrix import Imatrix, merge_into, read_imatrix

    if args.ctx_size <= 0:
        raise JllamaError("imatrix requires --ctx-size > 0")
    if args.file is None and not args.in_file:
        raise JllamaError("no text (-f) and no precomputed matrices (--in-file) to combine")
    im = Imatrix(chunk_size=args.ctx_size)
    for f in args.in_file:
        print(f"loading imatrix from '{f}'", file=sys.stderr)
        merge_into(im, read_imatrix(f), args.ctx_size)
    if args.file is not None:
        from jllama.eval.perplexity import read_text

        read_text(args.file)  # fail fast on a bad file, before loading the model
        _collect(args, im)
        im.datasets.append(args.file)
    _save(args, im)
    return 0


def _collect(args, im) -> None:
    from jllama.cli.common import (
        n_gpu_layers_value,
        setup_platform,
        start_backend,
        warn_ngl_ignored,
    )

    setup_platform(args.platform, args.threads, "--platform")
    start_backend()
    warn_ngl_ignored(args.n_gpu_layers)
    from jllama.api import Llama
    from jllama.eval.imatrix import compute_imatrix
    from jllama.eval.perplexity import read_text
    from jllama.numerics import Numerics
    from jllama.quant.imatrix import ImatrixCollector

    num = Numerics.from_env(taps=True)
    llm = Llama(args.model, ctx_size=args.ctx_size, numerics=num,
                flash_attn=args.flash_attn != "off", prompt_matmul=args.prompt_matmul,
                n_gpu_layers=n_gpu_layers_value(args.n_gpu_layers))
    tokens = llm.tokenize(read_text(args.file), add_special=True)
    tk = llm.tokenizer
    shapes = {n: t.shape for n, t in llm.gguf.tensors.items()}
    col = ImatrixCollector(args.ctx_size, im)

    def on_chunk(i: int, ppl: float) -> None:
        print(f"[{i}]{ppl:.4f},", end="", flush=True)

    chunks = None if args.chunks is None or args.chunks < 0 else args.chunks
    ppl, err, n = compute_imatrix(llm.engine, tokens, shapes, col, args.ctx_size, chunks,
                                  tk.bos_id, tk.add_bos, on_chunk, args.file)
    print()
    print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    from jllama.eval.imatrix import matmul_weights

    missing = [w for w in matmul_weights(shapes) if w not in im.entries]
    if missing:
        print(f"warning: no activations collected for {len(missing)} weights "
              f"(e.g. {missing[0]}): they get no imatrix entry", file=sys.stderr)


def _save(args, im) -> None:
    from jllama.quant.imatrix import write_imatrix_dat, write_imatrix_gguf

    fmt = args.output_format or "gguf"
    if fmt == "dat":
        for name in write_imatrix_dat(args.output, im):
            print(f"save_imatrix_legacy: entry '{name:>40}' has no data - skipping",
                  file=sys.stderr)
    else:
        if args.output_format is None and not args.output.endswith(".gguf"):
            print("save_imatrix: saving imatrix using GGUF format with a different suffix than "
                  ".gguf; if you want the previous imatrix format, use --output-format dat",
                  file=sys.stderr)
        write_imatrix_gguf(args.output, im)
    print(f"saved {len(im.entries)} entries ({im.chunk_count} chunks of {im.chunk_size}) "
          f"to {args.output}")
