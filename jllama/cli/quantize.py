"""``jllama quantize IN OUT TYPE``: llama-quantize's job.

TYPE is a file type (q4_k_m, q8_0, ...); ``--config MIX.yaml`` gives a mix instead (its ``base``
plays TYPE's role, which may then be omitted). ``--imatrix F`` weighs the quantizers with an
importance matrix (``jllama imatrix`` or llama-imatrix output). Flags mirror llama-quantize's.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a GGUF model (llama-quantize's mixes, optional imatrix)",
        description="Quantize a GGUF model like llama-quantize. TYPE: f32, f16, bf16, q4_0, "
        "q4_1, q5_0, q5_1, q8_0, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, "
        "q5_k_m, q6_k, iq4_nl, iq4_xs, iq2_xxs, iq2_xs, iq2_s, iq2_m, iq1_s, iq1_m, iq3_xxs, "
        "iq3_xs, iq3_s, iq3_m, tq1_0, tq2_0, mxfp4_moe (most of the 1-3 bit ones need an "
        "importance matrix, as in llama-quantize); or a bare type (q3_k, q4_k, q5_k, mxfp4, nvfp4) "
        "for that type everywhere (--pure).",
    )
    p.add_argument("input", help="input .gguf file or a named model")
    p.add_argument("output", help="output .gguf file")
    p.add_argument("type", nargs="?", help="file type, e.g. q4_k_m (optional with --config)")
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="allow re-encoding tensors that are already quantized (loses quality)",
    )
    p.add_argument("--token-embedding-type", metavar="T", help="type of token_embd.weight")
    p.add_argument("--output-tensor-type", metavar="T", help="type of output.weight")
    p.add_argument(
        "--pure", action="store_true", help="one type for all quantizable tensors, no mix rules"
    )
    p.add_argument(
        "--tensor-type",
        metavar="REGEX=TYPE",
        action="append",
        default=[],
        help="type for tensors whose name matches REGEX (repeatable, first match wins)",
    )
    p.add_argument("--config", metavar="MIX.yaml", help="YAML mix: {base, rules: [{match, type}]}")
    p.add_argument(
        "--imatrix", metavar="F", help="importance matrix (GGUF or legacy .dat) for the quantizers"
    )
    p.add_argument(
        "--include-weights",
        metavar="NAME",
        action="append",
        default=[],
        help="use the imatrix only for tensors whose name contains NAME (repeatable)",
    )
    p.add_argument(
        "--exclude-weights",
        metavar="NAME",
        action="append",
        default=[],
        help="do not use the imatrix for tensors whose name contains NAME (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or tensor table")
    p.set_defaults(func=run)


def build_spec(args):
    """The MixSpec from TYPE / --config and the flags (flags win over the YAML)."""
    from jllama.errors import QuantError
    from jllama.quant.mixes import load_mix, mix_from_base, parse_override, parse_type

    if args.config:
        spec = load_mix(args.config)
        if args.type:
            base = mix_from_base(args.type)
            spec.ftype, spec.pure = base.ftype, spec.pure or base.pure
    elif args.type:
        spec = mix_from_base(args.type)
    else:
        raise QuantError("give a TYPE (e.g. q4_k_m) or --config MIX.yaml")
    spec.pure = spec.pure or args.pure
    if args.token_embedding_type:
        spec.token_embedding_type = parse_type(args.token_embedding_type, "token embedding type")
    if args.output_tensor_type:
        spec.output_tensor_type = parse_type(args.output_tensor_type, "output tensor type")
    # command-line rules come before the file's: they are the more specific request
    spec.overrides = [parse_override(t) for t in args.tensor_type] + spec.overrides
    return spec


def load_imatrix_arg(args):
    """--imatrix / --include-weights / --exclude-weights, with llama-quantize's messages."""
    from jllama.errors import QuantError
    from jllama.quant.imatrix import load_for_quantize

    if args.include_weights and args.exclude_weights:
        raise QuantError("--include-weights and --exclude-weights cannot be used together")
    if not args.imatrix:
        if args.include_weights or args.exclude_weights:
            raise QuantError("--include-weights/--exclude-weights need --imatrix")
        return None
    qi = load_for_quantize(args.imatrix, args.include_weights, args.exclude_weights)
    if qi.datasets:
        print("load_imatrix: imatrix datasets=[" + ", ".join(f"'{d}'" for d in qi.datasets) + "]")
    print(
        f"load_imatrix: loaded {qi.n_loaded} importance matrix entries from {qi.file} "
        f"computed on {qi.chunk_count} chunks"
    )
    if qi.weights:
        print(f"prepare_imatrix: have {len(qi.weights)} importance matrix entries")
    return qi


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def run(args) -> int:
    from jllama.quant.mixes import QuantWarning
    from jllama.quant.quantize import quantize_file
    from jllama.registry import resolve_model

    spec = build_spec(args)
    src = resolve_model(args.input)
    imatrix = load_imatrix_arg(args)

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        from jllama.gguf.reader import read_gguf

        bar = tqdm(total=len(read_gguf(src).tensors), unit="tensor", file=sys.stderr)

    def progress(t) -> None:
        if bar is not None:
            bar.set_postfix_str(t.name, refresh=False)
            bar.update(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QuantWarning)
        try:
            rep = quantize_file(src, args.output, spec, args.allow_requantize, progress, imatrix)
        finally:
            if bar is not None:
                bar.close()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for name in rep.imatrix_missing:
        print(f"====== llama_model_quantize_impl: did not find weights for {name}")

    if not args.quiet:
        w = max(len(t.name) for t in rep.tensors)
        print(
            f"{'tensor':<{w}}  {'shape':>16}  {'from':>6} -> {'to':<6} {'before':>12} {'after':>12}"
        )
        for t in rep.tensors:
            shape = "x".join(str(d) for d in reversed(t.shape))  # ggml order, as llama.cpp prints
            print(
                f"{t.name:<{w}}  {shape:>16}  {t.from_type:>6} -> {t.to_type:<6} "
                f"{_mib(t.bytes_before)} {_mib(t.bytes_after)}"
            )
    counts = ", ".join(
        f"{n} {k}" for k, n in sorted(rep.type_counts().items(), key=lambda x: -x[1])
    )
    print(f"file type {rep.ftype}: {counts}")
    if rep.fallbacks:
        print(
            f"{len(rep.fallbacks)} of {len(rep.tensors)} tensors required a fallback type "
            "(rows not a multiple of 256)"
        )
    print(f"model size: {_mib(rep.bytes_before)} ({rep.bpw_before:.2f} BPW)")
    print(f"quant size: {_mib(rep.bytes_after)} ({rep.bpw_after:.2f} BPW)")
    print(f"wrote {rep.out_path} ({rep.file_size:,} bytes)")
    return 0
