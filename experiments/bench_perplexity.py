"""Perplexity throughput, jllama vs llama.cpp, same model, same text, same windows, one run.

    python experiments/bench_perplexity.py [-m MODEL] [-f TEXT] [-c 512] [--chunks 10] [-t 2]

llama.cpp runs through llama-cpp-python 0.3.36 (``logits_all=True``, n_ctx = n_batch = 512):
each window is evaluated from an empty cache with its first token replaced by BOS and the second
half scored from the logits, exactly llama-perplexity's loop (log-softmax of every scored row on
the host, as perplexity.cpp does). jllama runs ``jllama.eval.perplexity.perplexity`` (in-graph
log-probs, ``--batch`` windows per compiled call) after one warm-up batch, so compile time is not
counted. Both PPLs are printed side by side as a check that the same thing was measured.

Speeds: scored tokens/s (the n_ctx/2 - 1 tokens per window that enter the PPL) and window
tokens/s (all n_ctx evaluated tokens per window: the figure llama-perplexity's ETA implies).
Results are appended to experiments/results/perplexity.md, with the load average: on a shared
2-core machine, llama.cpp's spinning thread barriers lose far more than XLA's thread pool when
other processes compete, so only runs on an idle machine give a fair ratio.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WIKI = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def llamacpp_perplexity(ref, chunks: np.ndarray) -> tuple[list[np.ndarray], float]:
    """llama-perplexity's loop on prepared windows: per-window NLLs and the seconds taken."""
    n_ctx = chunks.shape[1]
    first = n_ctx // 2
    out = []
    t0 = time.perf_counter()
    for ch in chunks:
        ref.reset()
        ref.eval(ch.tolist())
        sc = np.asarray(ref.scores[first : n_ctx - 1], np.float32)
        mx = sc.max(-1)
        lse = mx + np.log(np.exp(sc - mx[:, None]).sum(-1, dtype=np.float64))
        out.append(lse - sc[np.arange(n_ctx - 1 - first), ch[first + 1 :]])
    return out, time.perf_counter() - t0


def open_llamacpp(path: str, n_ctx: int, threads: int, logits_all: bool = True):
    """llama-cpp-python's Llama with ggml's extra buffer types (AMX, repacked weights) off: on
    Intel hosts with AMX under this VM, ggml's AMX matmul dies at ``ldtilecfg`` (general
    protection fault); the stock vec_dot kernels are what the reference AMD machine ran. Flash
    attention on, as llama-perplexity runs (and jllama by default)."""
    from jllama.eval.llamacpp import llama_cpp_stock

    return llama_cpp_stock().Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512,
                                   n_threads=threads, logits_all=logits_all, verbose=False,
                                   flash_attn=True)


def ppl_err(nll: np.ndarray) -> tuple[float, float]:
    m = nll.mean()
    var = (nll * nll).mean() - m * m
    ppl = math.exp(m)
    return ppl, math.sqrt(var / (len(nll) - 1)) * ppl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-f", "--file", default=str(WIKI))
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("-b", "--batch", type=int, default=2, help="jllama windows per call")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()

    from jllama.api import Llama
    from jllama.eval.perplexity import chunk_tokens, perplexity, read_text
    from jllama.registry import resolve_model

    path = resolve_model(args.model)
    load0 = os.getloadavg()[0]
    n_ctx = args.ctx_size
    llm = Llama(str(path), ctx_size=n_ctx)
    tokens = llm.tokenize(read_text(args.file))
    tk = llm.tokenizer
    chunks = chunk_tokens(tokens, n_ctx, args.chunks, tk.bos_id, tk.add_bos, args.file)
    n = len(chunks)
    scored = n * (n_ctx - 1 - n_ctx // 2)

    # jllama: warm-up (compile) on one batch, then the timed run
    perplexity(llm.engine, tokens, n_ctx, args.batch, args.batch, tk.bos_id, tk.add_bos)
    j = perplexity(llm.engine, tokens, n_ctx, n, args.batch, tk.bos_id, tk.add_bos)
    j_ppl, j_err = ppl_err(np.concatenate(j.nll))
    del llm

    ref = open_llamacpp(str(path), n_ctx, args.threads)
    ref_tokens = ref.tokenize(Path(args.file).read_bytes(), add_bos=True, special=False)
    same_tokens = list(ref_tokens[: n * n_ctx]) == list(tokens[: n * n_ctx])
    llamacpp_perplexity(ref, chunks[:1])  # warm-up
    l_nll, l_s = llamacpp_perplexity(ref, chunks)
    l_ppl, l_err = ppl_err(np.concatenate(l_nll))
    del ref

    rows = [("jllama", j_ppl, j_err, j.seconds), ("llama.cpp", l_ppl, l_err, l_s)]
    lines = [
        f"### {datetime.datetime.now():%Y-%m-%d %H:%M} {path.name}, {Path(args.file).name}, "
        f"-c {n_ctx}, {n} chunks ({scored} scored tokens), threads={args.threads}, "
        f"jllama batch={args.batch}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs",
        "",
        "| engine | PPL | ± | seconds | scored tok/s | window tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ppl, err, s in rows:
        lines.append(f"| {name} | {ppl:.4f} | {err:.4f} | {s:.2f} | {scored / s:.1f} | "
                     f"{n * n_ctx / s:.1f} |")
    lines += [
        "",
        f"ratio jllama / llama.cpp (throughput): {l_s / j.seconds:.2f}; "
        f"PPL difference {100 * (j_ppl / l_ppl - 1):+.2f} %; "
        f"tokenization identical: {same_tokens}",
    ]
    text = "\n".join(lines)
    print(text)
    out = HERE / "results" / "perplexity.md"
    out.parent.mkdir(exist_ok=True)
    new = not out.exists()
    with open(out, "a") as f:
        if new:
            f.write("# Perplexity throughput, jllama vs llama.cpp "
                    "(experiments/bench_perplexity.py)\n\n")
        f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
