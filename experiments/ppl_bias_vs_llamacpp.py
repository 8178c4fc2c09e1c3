"""Per-token NLL of jllama minus llama.cpp's on llama-perplexity's windows: is there a bias?

    python experiments/ppl_bias_vs_llamacpp.py [-m MODEL] [--chunks N] [--exact]
        [--cache DIR] [--save FILE]

llama.cpp side: llama-cpp-python with flash attention, n_ctx = n_batch = n_ubatch = 512, f16
cache, stock CPU kernels (``jllama.eval.llamacpp.llama_cpp_stock``); it reproduces
llama-perplexity's running values to 4 decimals. Its NLLs are cached per model and chunk count
(``--cache``), so variants of ours can be compared quickly. jllama side:
``jllama.eval.perplexity.perplexity`` on the same windows.

Printed: PPL of both, the mean of d = nll_ours - nll_llama.cpp with two standard errors (per
token, and from the spread of the per-chunk means, which allows for correlation inside a
window), and the share of tokens where ours is lower. A bias is significant when the mean sits
several chunk-level standard errors from zero.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np


def llamacpp_nll(path: str, chunks: np.ndarray, threads: int = 2) -> list[np.ndarray]:
    from jllama.eval.llamacpp import llama_cpp_stock

    lc = llama_cpp_stock()
    n = chunks.shape[1]
    first = n // 2
    ref = lc.Llama(model_path=path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True,
                   verbose=False, n_threads=threads, flash_attn=True)
    out = []
    for ch in chunks:
        ref.reset()
        ref.eval(ch.tolist())
        sc = np.array(ref.scores[:n], np.float64)
        lse = np.logaddexp.reduce(sc[first : n - 1], axis=-1)
        out.append(lse - sc[np.arange(first, n - 1), ch[first + 1 : n]])
    del ref
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-f", "--file", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--exact", action="store_true", help="jllama without llama.cpp rounding")
    ap.add_argument("--cache", default="/tmp/ppl_bias_cache")
    ap.add_argument("--save", default="", help="save both NLL arrays (npz)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jllama.api import Llama
    from jllama.eval.perplexity import chunk_tokens, perplexity
    from jllama.numerics import Numerics
    from jllama.registry import fetch

    path = str(fetch(args.model)) if not os.path.exists(args.model) else args.model
    llm = Llama(path, ctx_size=args.ctx, numerics=Numerics(match_llamacpp=not args.exact))
    toks = llm.tokenize(Path(args.file).read_text(encoding="utf-8"), add_special=True)
    tk = llm.tokenizer
    chunks = chunk_tokens(toks, args.ctx, args.chunks, tk.bos_id, tk.add_bos)

    cache = Path(args.cache) / f"{Path(path).stem}_c{args.ctx}_n{len(chunks)}.npy"
    if cache.exists():
        ref = list(np.load(cache))
    else:
        ref = llamacpp_nll(path, chunks)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, np.stack(ref))
    res = perplexity(llm.engine, toks, args.ctx, len(chunks), batch=2, bos_id=tk.bos_id,
                     add_bos=tk.add_bos)
    ours = np.stack(res.nll)
    theirs = np.stack(ref)
    d = ours - theirs
    per_chunk = d.mean(1)
    se_tok = d.std(ddof=1) / math.sqrt(d.size)
    se_chunk = per_chunk.std(ddof=1) / math.sqrt(len(per_chunk)) if len(per_chunk) > 1 else 0.0
    p_o, p_t = math.exp(ours.mean()), math.exp(theirs.mean())
    print(f"{args.model} {len(chunks)} chunks of {args.ctx} ({'exact' if args.exact else 'match'})")
    print(f"PPL jllama {p_o:.4f}  llama.cpp {p_t:.4f}  ({100 * (p_o / p_t - 1):+.3f} %)")
    print(f"mean d {d.mean():+.5f}  se(token) {se_tok:.5f}  se(chunk) {se_chunk:.5f}  "
          f"z {d.mean() / max(se_chunk, 1e-12):+.2f}  std d {d.std():.4f}  "
          f"median|d| {np.median(np.abs(d)):.4f}  ours lower {100 * (d < 0).mean():.1f} %")
    print("per-chunk mean d:", " ".join(f"{x:+.4f}" for x in per_chunk))
    if args.save:
        np.savez(args.save, ours=ours, theirs=theirs, chunks=chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
