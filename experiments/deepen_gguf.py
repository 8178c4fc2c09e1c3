"""Write a deeper copy of a GGUF decoder: its blocks repeated cyclically to ``--layers`` blocks.

    python experiments/deepen_gguf.py IN.gguf OUT.gguf --layers 32

For measuring what grows with depth (compile time, executable size, cache load) on real shapes
without quantizing a whole model: ``jllama synth llama-3.2-1b --type q4_k_m --layers 4`` took
~8 min on the shared 2-vCPU machine, ``--layers 32`` would take an hour. Block i of the output
is block ``i % n`` of the input (tensor bytes copied as they are, ggml types included).
"""

from __future__ import annotations

import argparse
import re
import sys

from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import TensorSpec, write_gguf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, required=True)
    a = ap.parse_args()
    g = read_gguf(a.src)
    key = f"{g.architecture}.block_count"
    n = int(g.metadata[key])
    md = dict(g.metadata)
    md[key] = a.layers
    specs = []
    blk = re.compile(r"^blk\.(\d+)\.(.*)$")
    per = {}
    for name, ti in g.tensors.items():
        m = blk.match(name)
        if m:
            per.setdefault(int(m.group(1)), []).append((m.group(2), ti))
        else:
            specs.append(TensorSpec(name, tuple(ti.shape), int(ti.qtype),
                                    lambda ti=ti: ti.data.view("u1").reshape(-1)))
    for i in range(a.layers):
        for rest, ti in per[i % n]:
            specs.append(TensorSpec(f"blk.{i}.{rest}", tuple(ti.shape), int(ti.qtype),
                                    lambda ti=ti: ti.data.view("u1").reshape(-1)))
    write_gguf(a.dst, md, specs, g.metadata_types)
    return 0


if __name__ == "__main__":
    sys.exit(main())
