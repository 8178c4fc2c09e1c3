"""``jllama export-lora -m BASE --lora F [--lora-scaled F:S] -o OUT``: llama-export-lora's job,
LoRA adapters merged into a new GGUF (models/lora.py ``export_merged`` says how, and what the
output's tensor types are: F16 for merged tensors of a non-F32 base, as llama-export-lora)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from jllama.cli.common import add_lora_args, add_platform_args

    p = sub.add_parser("export-lora", help="merge LoRA adapters into a GGUF (llama-export-lora)")
    p.add_argument("-m", "--model", required=True, help="base model .gguf or a named model")
    p.add_argument("-o", "--output", "--output-file", dest="output",
                   default="ggml-lora-merged-f16.gguf",
                   help="output file (default: ggml-lora-merged-f16.gguf)")
    p.add_argument("--quiet", action="store_true", help="no per-tensor lines")
    add_lora_args(p)
    add_platform_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jllama.cli.common import lora_from_args, setup_platform, start_backend
    from jllama.errors import ConfigError

    adapters = [(e["path"], e["scale"]) for e in lora_from_args(args)]
    if not adapters:
        raise ConfigError("no adapter given: --lora FNAME or --lora-scaled FNAME:SCALE")
    setup_platform(args.platform or "cpu", args.threads, "--platform")
    start_backend()
    from jllama.models.lora import export_merged
    from jllama.registry import resolve_model

    base = resolve_model(args.model)
    log = None if args.quiet else (lambda s: print(f"jllama export-lora: {s}", file=sys.stderr))
    size = export_merged(base, adapters, args.output, log=log)
    print(f"jllama export-lora: wrote {args.output} ({size / 2**20:.1f} MiB, "
          f"{len(adapters)} adapter(s) merged)", file=sys.stderr)
    return 0
