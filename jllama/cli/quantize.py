"""``jllama quantize [flags] IN [OUT] TYPE [NTHREADS]``: llama-quantize's job and command line.

The positionals are read as llama-quantize reads them (tools/quantize/quantize.cpp at 0c1e570):
when the second one is a file type, the output is ``<dir of IN>/ggml-model-<TYPE>.gguf``;
otherwise it is OUT and the file type follows. TYPE is a name (any case) or a llama_ftype
number; Q3_K, Q4_K and Q5_K are the _M mixes; COPY copies the tensors. NTHREADS defaults to the
CPUs this process may use. jllama's own additions: ``--config MIX.yaml`` (a YAML mix whose
``base`` plays TYPE's role: TYPE may then be omitted), ``--quiet``, flags after the positionals.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# llama-quantize's QUANT_OPTIONS, in its order: a number resolves to the first name with that
# llama_ftype (15 -> Q4_K, the alias, as llama-quantize names its output ggml-model-Q4_K.gguf).
QUANT_OPTIONS = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S",
    "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M",
    "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S",
    "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY",
)  # fmt: skip
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "COPY": "F32"}
# jllama's own: types llama.cpp runs but its quantize has no option for, each as the bare type
# (every quantizable tensor in it; llama.cpp writes them only through --tensor-type)
_JLLAMA_ONLY = ("NVFP4",)


def _stoi(text: str) -> int | None:
    """std::stoi: leading blanks, a sign, digits, and whatever follows ignored; None where it
    throws (no digits, or out of int's range)."""
    s = text.lstrip(" \t\n\v\f\r")
    i = 1 if s[:1] in ("+", "-") else 0
    j = i
    while j < len(s) and s[j] in "0123456789":
        j += 1
    if j == i:
        return None
    v = int(s[:j])
    return v if -(2**31) <= v < 2**31 else None


def _ftype_id(name: str) -> int:
    from jllama.quant.mixes import FTYPES

    mix = _ALIASES.get(name, name)
    return FTYPES[mix][0]


def try_parse_ftype(text: str) -> str | None:
    """llama-quantize's try_parse_ftype: its canonical option name for ``text`` (a name in any
    case, or a llama_ftype number), None if it is not one."""
    up = text.upper()
    if up in QUANT_OPTIONS or up in _JLLAMA_ONLY:
        return up
    n = _stoi(up)
    if n is not None:
        for name in QUANT_OPTIONS:
            if name != "COPY" and _ftype_id(name) == n:
                return name
    return None


def _spec_for(name: str):
    """The MixSpec of a QUANT_OPTIONS name (the aliases are the _M mixes)."""
    from jllama.quant.mixes import MixSpec, mix_from_base

    if name == "COPY":
        return MixSpec(ftype="F32", only_copy=True)
    if name in _JLLAMA_ONLY:
        return mix_from_base(name)
    return MixSpec(ftype=_ALIASES.get(name, name))


class _TensorTypes(argparse.Action):
    """--tensor-type and --tensor-type-file fill one list, in command-line order (their rules
    are tried in that order, first match wins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def register(sub: argparse._SubParsersAction) -> None:
    # llama-quantize's names, with no import here (jllama --help stays fast); one jllama cannot
    # write yet fails at run time with one line
    known = ", ".join(QUANT_OPTIONS)
    p = sub.add_parser(
        "quantize",
        help="quantize a GGUF model (llama-quantize's command line, mixes, imatrix, threads)",
        usage="jllama quantize [flags] model-f32.gguf [model-quant.gguf] type [nthreads]",
        description="Quantize a GGUF model with llama-quantize's command line and results "
        "(byte-identical files). TYPE (any case, or its llama_ftype number): "
        f"{known} (Q3_K/Q4_K/Q5_K: the _M mixes; COPY: only copy tensors; most 1-3 bit types "
        "need --imatrix). Without OUT the output is <dir of IN>/ggml-model-TYPE.gguf. "
        "NTHREADS: worker threads (default: the CPUs this process may use). jllama's own: "
        "NVFP4 (every quantizable tensor NVFP4; llama-quantize has no such option).",
    )
    p.add_argument(
        "positionals",
        nargs="*",
        metavar="IN [OUT] TYPE [NTHREADS]",
        help="input .gguf (or a named model), output .gguf, file type, threads",
    )
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="allow re-encoding tensors that are already quantized (loses quality)",
    )
    p.add_argument(
        "--leave-output-tensor", action="store_true", help="leave output.weight un(re)quantized"
    )
    p.add_argument(
        "--pure",
        action="store_true",
        help="one type for all quantizable tensors, no k-quant mixture rules",
    )
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
    p.add_argument("--output-tensor-type", metavar="T", help="ggml type of output.weight")
    p.add_argument("--token-embedding-type", metavar="T", help="ggml type of token_embd.weight")
    p.add_argument(
        "--tensor-type",
        metavar="REGEX=TYPE",
        dest="tensor_types",
        const="arg",
        action=_TensorTypes,
        default=[],
        help="type for tensors whose name matches REGEX (repeatable, first match wins)",
    )
    p.add_argument(
        "--tensor-type-file",
        metavar="F",
        dest="tensor_types",
        const="file",
        action=_TensorTypes,
        help="REGEX=TYPE rules from a file, separated by spaces or newlines",
    )
    p.add_argument(
        "--prune-layers",
        metavar="L0,L1,...",
        help="drop these blocks (the later ones are renumbered)",
    )
    p.add_argument(
        "--keep-split",
        action="store_true",
        help="write OUT-00001-of-00001.gguf as llama-quantize does (split inputs "
        "are not supported)",
    )
    p.add_argument(
        "--override-kv",
        metavar="KEY=TYPE:VALUE",
        action="append",
        default=[],
        help="set a metadata key in the output; TYPE int, float, bool or str (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show the tensor types and sizes without quantizing or writing",
    )
    p.add_argument(
        "--max-buffer-size",
        metavar="MiB",
        help="tensor rows kept in memory at once (bounds memory, not the result)",
    )
    p.add_argument(
        "--config",
        metavar="MIX.yaml",
        help="jllama: a YAML mix {base, rules: [{match, type}]} (TYPE optional)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or tensor table")
    p.set_defaults(func=run)


def parse_positionals(args) -> tuple[str, str | None, str | None, int]:
    """(IN, OUT or None for --dry-run's IN TYPE form, option name or None with --config alone,
    nthread) as llama-quantize's main() reads them."""
    from jllama.errors import QuantError
    from jllama.quant.quantize import default_threads

    pos = list(args.positionals)
    if len(pos) < 2:
        raise QuantError("bad arguments: expected IN [OUT] TYPE [NTHREADS]")
    inp = pos[0]
    name = try_parse_ftype(pos[1])
    if name is not None:  # IN TYPE: the output goes next to the input
        out = None
        if not args.dry_run:
            cut = max(inp.rfind("/"), inp.rfind("\\"))
            out = inp[: cut + 1] + "ggml-model-" + name + ("" if args.keep_split else ".gguf")
        rest = pos[2:]
    else:
        out = pos[1]
        if args.keep_split and ".gguf" in out:
            out = out[:-5]  # sic: llama-quantize cuts 5 characters wherever '.gguf' appears
        if len(pos) < 3:
            if not args.config:
                raise QuantError("missing ftype")
        else:
            name = try_parse_ftype(pos[2])
            if name is None:
                known = ", ".join(n.lower() for n in QUANT_OPTIONS)
                raise QuantError(f"invalid ftype '{pos[2]}'; known: {known}")
        rest = pos[3:]
    nthread = 0
    if rest:
        n = _stoi(rest[0])
        if n is None:
            raise QuantError(f"invalid nthread '{rest[0]}'")
        nthread = n
        if len(rest) > 1:  # llama-quantize ignores them; say so
            print(f"warning: ignoring extra arguments {' '.join(rest[1:])}", file=sys.stderr)
    return inp, out, name, nthread if nthread > 0 else default_threads()


def _tensor_type_rules(items) -> list:
    from jllama.errors import QuantError
    from jllama.quant.mixes import parse_override

    rules = []
    for kind, value in items:
        if kind == "arg":
            rules.append(parse_override(value))
            continue
        try:
            with open(value) as f:
                words = f.read().split()
        except OSError as e:
            raise QuantError(f"failed to open file '{value}': {e.strerror or e}") from None
        rules += [parse_override(w) for w in words]
    return rules


def _prune_list(text: str | None) -> list[int]:
    from jllama.errors import QuantError

    if text is None:
        return []
    out = []
    for part in text.split(","):  # common's string_split: every field, empty ones too
        n = _stoi(part)
        if n is None or n < 0:
            raise QuantError(f"--prune-layers: invalid layer id '{part}'")
        out.append(n)
    return sorted(set(out))


def build_spec(args, name: str | None):
    """The MixSpec from TYPE / --config and the flags (flags win over the YAML)."""
    from jllama.errors import QuantError
    from jllama.quant.mixes import load_mix, parse_type

    if args.config:
        spec = load_mix(args.config)
        if name is not None:
            base = _spec_for(name)
            spec.ftype, spec.only_copy = base.ftype, base.only_copy
    elif name is not None:
        spec = _spec_for(name)
    else:
        raise QuantError("give a TYPE (e.g. Q4_K_M) or --config MIX.yaml")
    spec.pure = spec.pure or args.pure
    spec.quantize_output_tensor = not args.leave_output_tensor
    if args.token_embedding_type:
        spec.token_embedding_type = parse_type(args.token_embedding_type, "token embedding type")
    if args.output_tensor_type:
        spec.output_tensor_type = parse_type(args.output_tensor_type, "output tensor type")
    # command-line rules come before the file's: they are the more specific request
    spec.overrides = _tensor_type_rules(args.tensor_types) + spec.overrides
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


def _max_buffer(text: str | None) -> int | None:
    from jllama.errors import QuantError

    if text is None:
        return None
    mib = _stoi(text) or 0  # atoi: 0 where there is no number
    if mib <= 0:
        raise QuantError(f"invalid --max-buffer-size '{text}'")
    return mib * 2**20


def _ggml_name(t: str) -> str:
    """ggml_type_name: lower case but the K of the k-quants (q4_K)."""
    return t.lower().replace("_k", "_K")


def _print_dry_run(rep, n_tensors: int) -> None:
    """llama_model_quantize_impl's --dry-run lines."""
    for i, t in enumerate(rep.tensors, 1):
        ne = list(reversed(t.shape)) + [1] * (4 - len(t.shape))
        shape = ", ".join(f"{d:6d}" for d in ne)
        line = f"[{i:4d}/{n_tensors:4d}] {t.name:<36s} - [{shape}], type = {_ggml_name(t.from_type):>6s}, "
        if t.to_type != t.from_type:
            line += (
                f"size = {t.bytes_before / 2**20:8.2f} MiB -> {t.bytes_after / 2**20:8.2f} MiB "
                f"({_ggml_name(t.to_type)})"
            )
        else:
            line += f"size = {t.bytes_before / 2**20:8.3f} MiB"
        print(line)
    for what, n in (("model size", rep.bytes_before), ("quant size", rep.bytes_after)):
        print(
            f"llama_model_quantize_impl: {what}  = {n / 2**20:8.2f} MiB "
            f"({8.0 * n / max(1, rep.n_elements):.2f} BPW)"
        )
    if rep.will_require_imatrix:
        print(
            "llama_model_quantize_impl: WARNING: dry run completed successfully, but actually "
            "completing this quantization will require an imatrix!"
        )


def run(args) -> int:
    from jllama.gguf.overrides import parse_kv_override
    from jllama.quant.mixes import QuantWarning
    from jllama.quant.quantize import quantize_file
    from jllama.registry import resolve_model

    inp, out, name, nthread = parse_positionals(args)
    spec = build_spec(args, name)
    prune = _prune_list(args.prune_layers)
    kv = [parse_kv_override(t) for t in args.override_kv]  # one each, as llama-quantize
    max_buf = _max_buffer(args.max_buffer_size)
    src = resolve_model(inp)
    if out is not None and os.path.exists(out) and os.path.samefile(src, out):
        from jllama.errors import QuantError  # before any output, as llama-quantize

        raise QuantError(f"input and output files are the same: '{inp}'")
    imatrix = load_imatrix_arg(args)
    label = "COPY" if spec.only_copy else name or spec.ftype
    if not args.quiet:
        what = (
            f"calculating quantization size for '{inp}'"
            if args.dry_run
            else (f"quantizing '{inp}' to '{out}'")
        )
        print(f"{what} as {label} using {nthread} threads", file=sys.stderr)

    from jllama.gguf.reader import read_gguf

    n_tensors = len(read_gguf(src).tensors)
    bar = None
    if not args.quiet and not args.dry_run:
        from tqdm import tqdm

        bar = tqdm(total=n_tensors, unit="tensor", file=sys.stderr)

    def progress(t) -> None:
        if bar is not None:
            bar.set_postfix_str(t.name, refresh=False)
            bar.update(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QuantWarning)
        try:
            rep = quantize_file(
                src, out, spec, args.allow_requantize, progress, imatrix,
                nthread=nthread, kv_overrides=kv, prune_layers=prune, dry_run=args.dry_run,
                keep_split=args.keep_split, max_buf_size=max_buf,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for tname in rep.imatrix_missing:
        print(f"====== llama_model_quantize_impl: did not find weights for {tname}")

    if args.dry_run:
        _print_dry_run(rep, n_tensors)
    elif not args.quiet:
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
    print(f"file type {label}: {counts}")
    if rep.fallbacks:
        print(
            f"{len(rep.fallbacks)} of {len(rep.tensors)} tensors required a fallback type "
            "(rows not a multiple of 256)"
        )
    if not args.dry_run:  # --dry-run printed llama.cpp's size lines above
        print(f"model size: {_mib(rep.bytes_before)} ({rep.bpw_before:.2f} BPW)")
        print(f"quant size: {_mib(rep.bytes_after)} ({rep.bpw_after:.2f} BPW)")
        print(f"wrote {rep.out_path} ({rep.file_size:,} bytes)")
    return 0
