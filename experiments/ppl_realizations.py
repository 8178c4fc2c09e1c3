"""Is llama.cpp's perplexity systematically above ours, or is it one draw of rounding noise?

    python experiments/ppl_realizations.py [-m MODEL] [--chunks 20] [-k 4] [--which both]

Both implementations round activations to 8 bits before every quantized matmul, so an ulp
anywhere re-draws which activations round up or down: each run is one sample of a noise
process, and its PPL sits some way above the exact-f32 PPL. Comparing one llama.cpp run with
one of ours cannot tell a bias in that noise from an unlucky draw. Here both are re-drawn K
times by scaling the token embeddings by (1 + k * 2^-20) (k = 0 is the plain run; the scale
itself moves PPL by ~1e-6): llama.cpp through its eval callback, which rewrites the ``embd``
tensor in place before the layers read it, jllama by wrapping ``Embedding.__call__``. The
report gives each side's mean PPL and spread over the draws, and the difference of the means
with its standard error.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def llamacpp_nll(path: str, chunks: np.ndarray, factor: float, embd_name: str = "embd",
                 threads: int = 2) -> np.ndarray:
    """Per-token NLL of the scored halves, llama.cpp with FA (n_ctx = n_batch = n_ubatch =
    window), ``embd`` scaled by ``factor`` in place."""
    from numerics_vs_llamacpp import GGMLTensor, close_llamacpp, fill_batch, open_llamacpp

    from jllama.eval.llamacpp import llama_cpp_stock

    lc = llama_cpp_stock()
    n = chunks.shape[1]
    first = n // 2

    def cb(tp, ask, _ud):
        t = ctypes.cast(tp, ctypes.POINTER(GGMLTensor)).contents
        name = t.name.decode(errors="replace")
        if ask:
            return name == embd_name
        if name == embd_name and t.type == 0 and factor != 1.0:
            cnt = int(np.prod([t.ne[i] for i in range(4)]))
            a = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)),
                                      shape=(cnt,))
            a *= np.float32(factor)
        return True

    cb_c = lc.ggml_backend_sched_eval_callback(cb)
    model, ctx = open_llamacpp(path, cb_c, n, n, n, threads)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(n, 0, 1)
    out = []
    for ch in chunks:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        fill_batch(batch, ch.tolist())
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        sc = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n * n_vocab,))
        sc = sc.reshape(n, n_vocab)[first : n - 1].astype(np.float64)
        lse = np.logaddexp.reduce(sc, axis=-1)
        out.append(lse - sc[np.arange(n - 1 - first), ch[first + 1 : n]])
    lc.llama_batch_free(batch)
    close_llamacpp(model, ctx)
    del cb_c
    return np.stack(out)


def jllama_nll(path: str, toks: list[int], n_ctx: int, n_chunks: int, factor: float
               ) -> np.ndarray:
    import jax.numpy as jnp

    from jllama.api import Llama
    from jllama.eval.perplexity import perplexity
    from jllama.models import common

    orig = common.Embedding.__call__

    def scaled(self, ids):
        return orig(self, ids) * jnp.float32(factor)

    common.Embedding.__call__ = scaled if factor != 1.0 else orig
    try:
        llm = Llama(path, ctx_size=n_ctx)
        tk = llm.tokenizer
        res = perplexity(llm.engine, toks, n_ctx, n_chunks, batch=2, bos_id=tk.bos_id,
                         add_bos=tk.add_bos)
    finally:
        common.Embedding.__call__ = orig
    return np.stack(res.nll)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-f", "--file", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("-k", type=int, default=4, help="draws per side")
    ap.add_argument("--which", default="both", choices=["both", "jllama", "llamacpp"])
    ap.add_argument("--embd-name", default="embd", help="llama.cpp tensor to scale")
    ap.add_argument("--cache", default="/tmp/ppl_realizations")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jllama.eval.perplexity import chunk_tokens
    from jllama.registry import fetch

    path = str(fetch(args.model)) if not os.path.exists(args.model) else args.model
    from jllama.api import Llama

    probe = Llama(path, ctx_size=args.ctx)
    toks = probe.tokenize(Path(args.file).read_text(encoding="utf-8"), add_special=True)
    tk = probe.tokenizer
    chunks = chunk_tokens(toks, args.ctx, args.chunks, tk.bos_id, tk.add_bos)
    del probe
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sides = ["llamacpp", "jllama"] if args.which == "both" else [args.which]
    ppl: dict[str, list[float]] = {s: [] for s in sides}
    for k in range(args.k):
        factor = 1.0 + k * 2.0**-20
        for side in sides:
            f = cache / f"{Path(path).stem}_{side}_n{len(chunks)}_k{k}.npy"
            if side == "jllama" or not f.exists():
                nll = (llamacpp_nll(path, chunks, factor, args.embd_name) if side == "llamacpp"
                       else jllama_nll(path, toks, args.ctx, len(chunks), factor))
                np.save(f, nll)
            nll = np.load(f)
            ppl[side].append(math.exp(nll.mean()))
            print(f"k={k} {side:9s} PPL {ppl[side][-1]:.4f}", flush=True)
    for side in sides:
        v = np.array(ppl[side])
        print(f"{side:9s} mean {v.mean():.4f}  std {v.std(ddof=1) if len(v) > 1 else 0:.4f}  "
              f"({' '.join(f'{x:.4f}' for x in v)})")
    if len(sides) == 2 and args.k > 1:
        a, b = np.log(ppl["jllama"]), np.log(ppl["llamacpp"])
        se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        print(f"jllama - llama.cpp: {100 * (a.mean() - b.mean()):+.3f} % +- {100 * se:.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
