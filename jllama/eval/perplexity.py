"""Perplexity exactly as llama-perplexity computes it (tools/perplexity/perplexity.cpp).

Method: tokenize the whole text once (with the vocabulary's add_bos); cut it into chunks of
``n_ctx`` tokens, dropping the tail; each chunk starts from an empty cache, its first token
replaced by BOS when the vocabulary adds one; only the second half of each window is scored
(logits at positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1). PPL = exp(mean
NLL); the ± is ``sqrt(var(nll) / (count - 1)) * PPL`` from the per-token NLL, as llama.cpp prints.
Several chunks go through one compiled batch so both cores stay busy.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jllama.errors import JllamaError


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    n_tokens_total: int  # tokens in the whole file
    running: list[float] = field(default_factory=list)  # PPL after each chunk ([1], [2], ...)
    nll: list[np.ndarray] = field(default_factory=list)  # per-chunk per-token NLL (float64)
    same_top: int = 0  # scored positions where the argmax is the actual next token
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.nll)

    @property
    def ppl(self) -> float:
        return math.exp(float(np.concatenate(self.nll).mean()))

    @property
    def ppl_err(self) -> float:
        """llama.cpp's ± : standard error of the mean NLL, times PPL."""
        v = np.concatenate(self.nll)
        mean = v.mean()
        var = (v * v).mean() - mean * mean
        return math.sqrt(var / (len(v) - 1)) * self.ppl if var > 0 and len(v) > 1 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds else 0.0


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise JllamaError(f"{p}: no such text file")
    raw = p.read_bytes()
    if not raw.strip():
        raise JllamaError(f"{p}: the file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JllamaError(f"{p}: not UTF-8 text (bad byte at offset {e.start})") from None


def chunk_tokens(tokens: list[int], n_ctx: int, n_chunks: int | None, bos_id: int | None,
                 add_bos: bool, source: str = "text") -> np.ndarray:
    """[n_chunks, n_ctx] windows, as llama-perplexity cuts them."""
    if n_ctx < 8 or n_ctx % 2:
        raise JllamaError(f"context size {n_ctx} must be an even number >= 8")
    n_max = len(tokens) // n_ctx
    if len(tokens) < 2 * n_ctx:
        raise JllamaError(
            f"{source}: {len(tokens)} tokens, need at least 2 * n_ctx = {2 * n_ctx} "
            "(use a longer text or a smaller -c)")
    n = n_max if n_chunks is None or n_chunks <= 0 else min(n_chunks, n_max)
    chunks = np.asarray(tokens[: n * n_ctx], np.int32).reshape(n, n_ctx).copy()
    if add_bos and bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def perplexity(engine, tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None,
               batch: int = 2, bos_id: int | None = None, add_bos: bool = False,
               on_chunk: Callable[[int, float], None] | None = None,
               source: str = "text") -> PerplexityResult:
    chunks = chunk_tokens(tokens, n_ctx, n_chunks, bos_id, add_bos, source)
    res = PerplexityResult(n_ctx, len(chunks), len(tokens))
    first = n_ctx // 2
    t0 = time.perf_counter()
    for i in range(0, len(chunks), batch):
        group = chunks[i : i + batch]
        if len(group) < batch:  # keep one compiled shape: pad with a copy, drop its result
            group = np.concatenate([group, np.repeat(group[-1:], batch - len(group), 0)])
        lp, top = engine.token_logprobs(group)
        for j in range(min(batch, len(chunks) - i)):
            # positions first .. n_ctx-2 predict first+1 .. n_ctx-1
            nll = -lp[j, first : n_ctx - 1].astype(np.float64)
            res.nll.append(nll)
            res.same_top += int((top[j, first:] == chunks[i + j, first + 1 :]).sum())
            res.running.append(math.exp(float(np.concatenate(res.nll).mean())))
            if on_chunk:
                on_chunk(len(res.running), res.running[-1])
    res.seconds = time.perf_counter() - t0
    return res


def run_cli(llm, text_path: str, n_ctx: int, n_chunks: int | None, batch: int,
            out=None, scorer: Callable[..., PerplexityResult] | None = None
            ) -> PerplexityResult:
    """Tokenize, score, and print like llama-perplexity (running ``[i]ppl`` values and the
    final estimate), with a progress bar on stderr. ``scorer(llm, tokens, n_ctx, n_chunks,
    batch, on_chunk, source)`` replaces the plain scoring (the KL-divergence base run)."""
    out = sys.stdout if out is None else out  # the stream at call time, not import time
    from tqdm import tqdm

    text = read_text(text_path)
    t0 = time.perf_counter()
    tokens = llm.tokenize(text, add_special=True)
    print(f"tokenized {len(tokens)} tokens in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    tk = llm.tokenizer
    n_total = len(tokens) // n_ctx if not n_chunks else min(n_chunks, len(tokens) // n_ctx)
    bar = tqdm(total=n_total * n_ctx, unit="tok", file=sys.stderr, desc="perplexity",
               leave=False)
    line: list[str] = []

    def on_chunk(i: int, ppl: float) -> None:
        bar.update(n_ctx)
        line.append(f"[{i}]{ppl:.4f},")
        print(line[-1], end="", file=out, flush=True)

    if scorer is not None:
        res = scorer(llm, tokens, n_ctx, n_chunks, batch, on_chunk, text_path)
    else:
        res = perplexity(llm.engine, tokens, n_ctx, n_chunks, batch, tk.bos_id, tk.add_bos,
                         on_chunk, source=text_path)
    bar.close()
    print(file=out)
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}", file=out)
    print(f"{res.n_chunks} chunks of {n_ctx}, {res.count} scored tokens, same top token "
          f"{100.0 * res.same_top / res.count:.2f} %, {res.tokens_per_s:.1f} tokens/s "
          f"(all window tokens evaluated)", file=sys.stderr)
    return res
