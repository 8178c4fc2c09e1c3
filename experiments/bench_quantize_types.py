"""Quantizer throughput against ggml's own (``ggml_quantize_chunk``, one thread), with and
without an importance matrix, on rows shaped like Llama-3-8B's ffn_down (14336 columns).

MB/s counts f32 input bytes per CPU second (process time: the machines these run on are
shared, and wall time there says more about the neighbours than about the code). The last
column says whether the bytes are ggml's.
Run: PYTHONPATH=. python experiments/bench_quantize_types.py [TYPE ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_quant_formats import _ggml_quantize  # noqa: E402  (the oracle, via ctypes)

from jllama.gguf.constants import QType  # noqa: E402
from jllama.quant.quantizers import quantize_np  # noqa: E402


def main(names: list[str]) -> None:
    rng = np.random.default_rng(0)
    n = 14336
    x = (rng.standard_normal((32, n)) * 0.02).astype(np.float32)
    x[:, rng.integers(0, n, 16)] *= 20  # outlier columns
    imx = rng.gamma(0.7, 1.0, n).astype(np.float32)
    print("| type | imatrix | ours MB/s | ggml MB/s | bytes equal |\n|---|---|---|---|---|")
    for name in names:
        qt = int(QType[name])
        quantize_np(x[:1], qt)  # grid tables (and ggml's, and the library) outside the timing
        _ggml_quantize(x[:1], qt)
        for w in (None, imx):
            t = time.process_time()
            a = quantize_np(x, qt, w)
            t1 = time.process_time() - t
            t = time.process_time()
            b = _ggml_quantize(x, qt, w)
            t2 = time.process_time() - t
            print(f"| {name} | {'yes' if w is not None else 'no'} | {x.nbytes / t1 / 1e6:.1f} "
                  f"| {x.nbytes / t2 / 1e6:.1f} | {'yes' if np.array_equal(a, b) else 'NO'} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["TQ1_0", "TQ2_0", "MXFP4", "IQ3_XXS", "IQ3_S"])
