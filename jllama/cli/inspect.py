"""``jllama inspect FILE``: metadata and tensor table, like gguf-dump / llama-cli's model info."""

from __future__ import annotations

import argparse
import json
from collections import Counter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a GGUF file's metadata and tensor table")
    p.add_argument("model", help="path to a .gguf file or a named model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--full-arrays", action="store_true", help="do not abbreviate long arrays")
    p.add_argument("--no-tensors", action="store_true", help="metadata only")
    p.set_defaults(func=run)


def _short(v, full: bool):
    if isinstance(v, list) and not full and len(v) > 8:
        return f"[{', '.join(repr(x) for x in v[:5])}, ...] ({len(v)} items)"
    if isinstance(v, str) and not full and len(v) > 120:
        return repr(v[:117] + "...")
    return repr(v) if isinstance(v, str) else str(v)


def run(args) -> int:
    from jllama.gguf.reader import read_gguf
    from jllama.registry import resolve_model

    g = read_gguf(resolve_model(args.model))
    total = sum(t.nbytes for t in g.tensors.values())
    n_params = sum(t.n_elements for t in g.tensors.values())
    if args.json:
        meta = {
            k: (v if args.full_arrays or not isinstance(v, list) or len(v) <= 64
                else {"type": "array", "length": len(v), "head": v[:8]})
            for k, v in g.metadata.items()
        }
        out = {
            "path": g.path, "version": g.version, "alignment": g.alignment,
            "file_size": g.file_size, "n_params": n_params, "tensor_bytes": total,
            "metadata": meta,
            "tensors": [] if args.no_tensors else [
                {"name": t.name, "shape": list(t.shape), "type": t.type_name,
                 "offset": t.offset, "bytes": t.nbytes}
                for t in g.tensors.values()
            ],
        }
        print(json.dumps(out, ensure_ascii=False, default=str))
        return 0
    print(f"{g.path}: GGUF v{g.version}, {len(g.metadata)} metadata entries, "
          f"{len(g.tensors)} tensors, {g.file_size / 2**20:.2f} MiB")
    print(f"  params: {n_params / 1e6:.2f} M, tensor data {total / 2**20:.2f} MiB, "
          f"{8 * total / max(n_params, 1):.2f} bits per weight")
    types = Counter(t.type_name for t in g.tensors.values())
    print("  types: " + ", ".join(f"{n} {k}" for k, n in types.most_common()))
    print("\nmetadata:")
    w = max((len(k) for k in g.metadata), default=0)
    for k, v in g.metadata.items():
        print(f"  {k:<{w}} = {_short(v, args.full_arrays)}")
    if not args.no_tensors:
        print("\ntensors:")
        nw = max((len(n) for n in g.tensors), default=4)
        print(f"  {'#':>4}  {'name':<{nw}}  {'shape':<18} {'type':<8} {'bytes':>12}")
        for i, t in enumerate(g.tensors.values()):
            shape = "x".join(str(d) for d in t.shape)
            print(f"  {i:>4}  {t.name:<{nw}}  {shape:<18} {t.type_name:<8} {t.nbytes:>12,}")
    return 0
