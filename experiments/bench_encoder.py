"""Time one encoder forward (the server's EncoderRunner, eager) against llama-cpp-python's embed.

A random GGUF shaped like bge-small-en-v1.5 (12 layers, 384 wide, 12 heads, FFN 1536, F32,
mean pooling), written by tests/test_arch_bert.py's helper with its sizes patched; inputs of
about 16, 64 and 256 tokens. Prints ms per sequence (median of 5 after 2 warm-up runs) and the
largest difference between the two vectors.

    PYTHONPATH=.:tests python experiments/bench_encoder.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import llama_cpp
    import test_arch_bert as tb

    from jllama.server.embeddings import EncoderRunner

    tb.N_EMBD, tb.N_HEAD, tb.N_FF, tb.N_LAYER, tb.N_CTX = 384, 12, 1536, 12, 512
    with tempfile.TemporaryDirectory() as d:
        path = tb._write(Path(d) / "bge-small-shaped.gguf", 1)
        enc = EncoderRunner(path)
        llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=512, n_batch=512,
                              n_ubatch=512, verbose=False)
        words = "the quick brown fox jumps over the lazy dog".split()
        for n in (16, 64, 256):
            text = " ".join(words[i % len(words)] for i in range(n - 2))
            ids = enc.tokenizer.encode(text, add_special=True)

            def ours(ids=ids):
                return enc.run(ids)

            def theirs(text=text):
                return np.asarray(llm.embed(text), np.float32)

            row = []
            for fn in (ours, theirs):
                for _ in range(2):
                    fn()
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                row.append(statistics.median(ts))
            diff = float(np.max(np.abs(ours() - theirs())))
            print(f"{len(ids):4d} tokens: jllama {row[0]:7.1f} ms  llama.cpp {row[1]:7.1f} ms  "
                  f"max |diff| {diff:.2e}")
        llm.close()


if __name__ == "__main__":
    main()
