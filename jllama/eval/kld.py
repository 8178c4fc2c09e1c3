"""KL-divergence of a (quantized) model against a base model, as llama-perplexity's
``--kl-divergence`` computes it (tools/perplexity/perplexity.cpp, ``kl_divergence``).

Two runs. The base run (``--kl-divergence-base FILE`` alone) scores the text like ``perplexity``
and saves, for every scored token (the second half of each window), the base model's log-softmax
over the whole vocabulary. The compare run (``--kl-divergence --kl-divergence-base FILE``)
evaluates the same windows with the model under test and, per scored token, computes

* KLD = sum_i p_base(i) (ln p_base(i) - ln p_Q(i)), over tokens with ln p_base(i) > -16;
* Δp = p_Q(correct) - p_base(correct) (the token that actually follows);
* NLL of the correct token under both models (PPL(Q), PPL(base), their correlation and ratio);
* whether both models have the same argmax ("same top").

Both the quantization (base run) and the reduction (compare run) happen in-graph
(``Engine.reduce_scored``): the compare run only brings back five numbers per token.

Why the full vocabulary, stored like llama.cpp, rather than top-k log-probs: with top-k, the
mass outside the base's top k must be merged into one bucket, which makes the result a lower
bound whose error, R·KL(tails), has no bound (p_Q of a tail token can be arbitrarily small); the
full row keeps every term, costs 2 bytes per vocabulary entry (SmolLM2: 96 KiB per token, 25 MiB
per 512-token window, 250 MiB for 10 windows) and keeps our numbers comparable with llama.cpp's.

Error bound (the same as llama.cpp's format): a row stores ln p as ``min + scale * u16`` with
``scale = (max_logit - min_logit) / 65535`` and the range clipped to 16 nats, so every stored
log-prob above the clip is within ``scale / 2 <= 16 / 131070 = 1.22e-4`` nats of the exact value;
a term's p_base is then within 0.0122 % and the per-token KLD within ~1.3e-4; the rounding
errors have mean zero, so a model against itself reads a mean KLD of a few 1e-6 (SmolLM2, 126
tokens: -2.2e-6, largest |KLD| 5.5e-5). Tokens with
p_base < e^-16 = 1.1e-7 are left out of the sum, as llama.cpp does.

File format (version 1, little-endian)::

    8 bytes   magic b"JLKLBASE"
    uint32    version (1)
    uint32    header length H
    H bytes   UTF-8 JSON header: model, arch, n_vocab, vocab_sha256 (of all token strings),
              tokens_sha256 (of the int32 tokenization of the whole text), n_tokens, n_ctx,
              n_chunks, add_bos, bos_id, first (= n_ctx/2), n_scored (= n_ctx - 1 - first)
    int32     windows [n_chunks, n_ctx] as evaluated (BOS substituted)
    rows      n_chunks * n_scored rows, each: float32 scale, float32 min_log_prob,
              uint16 q[2 * ceil(n_vocab / 2)]   (ln p_i = min_log_prob + scale * q_i;
              q_i = 0 for logits at or below the clip) -- llama.cpp's row layout.

The compare run refuses a base file whose vocabulary, tokenization of the text or n_ctx differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import jax.numpy as jnp
import numpy as np

from jllama.errors import JllamaError
from jllama.eval.perplexity import PerplexityResult, chunk_tokens, read_text

MAGIC = b"JLKLBASE"
VERSION = 1
CLIP = 16.0  # nats below the top logit kept in a row (llama.cpp's)


# ----------------------------------------------------------------------------- in-graph parts


def _base_rows(logits, targets):
    """llama.cpp's ``log_softmax(n_vocab, logits, uint16 *log_prob, tok)`` on [B, n, V]."""
    mx = logits.max(-1, keepdims=True)
    mn = jnp.maximum(logits.min(-1, keepdims=True), mx - CLIP)
    lse = jnp.log(jnp.exp(logits - mx).sum(-1, keepdims=True))
    scale = (mx - mn) / 65535.0
    inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    q = jnp.where(logits > mn, jnp.clip(jnp.round((logits - mn) * inv), 0, 65535), 0)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    nll = (mx + lse - tgt)[..., 0]
    return (q.astype(jnp.uint16), scale[..., 0], (mn - mx - lse)[..., 0], nll,
            jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _compare_rows(logits, targets, base_q, base_scale, base_min):
    """llama.cpp's ``log_softmax(..., base_log_prob, tok, kld)`` on [B, n, V]: per token NLL,
    base NLL, KLD, Δp and same-top."""
    mx = logits.max(-1, keepdims=True)
    logp = logits - mx - jnp.log(jnp.exp(logits - mx).sum(-1, keepdims=True))
    lpb = base_scale[..., None] * base_q.astype(jnp.float32) + base_min[..., None]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    nll_base = -jnp.take_along_axis(lpb, targets[..., None], axis=-1)[..., 0]
    kld = jnp.where(lpb > -CLIP, jnp.exp(lpb) * (lpb - logp), 0.0).sum(-1)
    same = jnp.argmax(logits, axis=-1) == jnp.argmax(lpb, axis=-1)
    return nll, nll_base, kld, jnp.exp(-nll) - jnp.exp(-nll_base), same


# ----------------------------------------------------------------------------- the file


@dataclass
class BaseHeader:
    model: str
    arch: str
    n_vocab: int
    vocab_sha256: str
    tokens_sha256: str
    n_tokens: int
    n_ctx: int
    n_chunks: int
    add_bos: bool
    bos_id: int | None

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.first

    @property
    def row_u16(self) -> int:
        """uint16 words per row: 4 for (scale, min) + the vocabulary padded to even."""
        return 4 + 2 * ((self.n_vocab + 1) // 2)


def vocab_sha256(tokenizer) -> str:
    h = hashlib.sha256()
    for t in tokenizer.vocab.tokens:
        h.update(str(t).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def tokens_sha256(tokens: list[int] | np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens, "<i4").tobytes()).hexdigest()


def make_header(llm, tokens: list[int], n_ctx: int, n_chunks: int) -> BaseHeader:
    tk = llm.tokenizer
    md = llm.gguf.metadata
    return BaseHeader(
        model=str(md.get("general.name") or Path(str(llm.path)).name),
        arch=str(md.get("general.architecture", "")), n_vocab=int(tk.n_vocab),
        vocab_sha256=vocab_sha256(tk), tokens_sha256=tokens_sha256(tokens),
        n_tokens=len(tokens), n_ctx=n_ctx, n_chunks=n_chunks, add_bos=bool(tk.add_bos),
        bos_id=None if tk.bos_id is None else int(tk.bos_id))


def read_header(path: str | Path) -> tuple[BaseHeader, int]:
    """The header and the byte offset of the windows; JllamaError on anything else."""
    p = Path(path)
    if not p.is_file():
        raise JllamaError(f"{p}: no such KL-divergence base file")
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise JllamaError(f"{p}: not a jllama KL-divergence base file (bad magic); make one "
                              "with --kl-divergence-base FILE alone")
        version, n = struct.unpack("<II", head[8:])
        if version != VERSION:
            raise JllamaError(f"{p}: base file version {version}, this jllama reads {VERSION}")
        try:
            d = json.loads(f.read(n).decode("utf-8"))
            d = {k: d[k] for k in BaseHeader.__dataclass_fields__}
            hdr = BaseHeader(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise JllamaError(f"{p}: corrupt base file header ({e})") from None
    off = 16 + n
    need = off + 4 * hdr.n_chunks * hdr.n_ctx + 2 * hdr.n_chunks * hdr.n_scored * hdr.row_u16
    if p.stat().st_size != need:
        raise JllamaError(f"{p}: truncated or corrupt base file ({p.stat().st_size} bytes, "
                          f"header says {need})")
    return hdr, off


def check_compatible(hdr: BaseHeader, ours: BaseHeader, path: str | Path) -> None:
    """Refuse a base file that does not describe the same vocabulary, text and windows."""
    if hdr.n_vocab != ours.n_vocab:
        raise JllamaError(f"{path}: vocabulary differs: base file has {hdr.n_vocab} tokens "
                          f"({hdr.model}), this model {ours.n_vocab} ({ours.model})")
    if hdr.vocab_sha256 != ours.vocab_sha256:
        raise JllamaError(f"{path}: vocabulary differs: same size ({hdr.n_vocab}) but other "
                          f"token strings (base {hdr.model}, this model {ours.model})")
    if hdr.n_ctx != ours.n_ctx:
        raise JllamaError(f"{path}: base file was computed with n_ctx = {hdr.n_ctx}, this run "
                          f"uses -c {ours.n_ctx} (use -c {hdr.n_ctx})")
    if hdr.tokens_sha256 != ours.tokens_sha256 or hdr.n_tokens != ours.n_tokens:
        raise JllamaError(f"{path}: tokenization differs: the base file's text gave "
                          f"{hdr.n_tokens} tokens, this text/tokenizer gives {ours.n_tokens} "
                          "(different text file or tokenizer settings)")
    if hdr.add_bos != ours.add_bos or hdr.bos_id != ours.bos_id:
        raise JllamaError(f"{path}: BOS handling differs (base add_bos={hdr.add_bos} "
                          f"bos={hdr.bos_id}, this model add_bos={ours.add_bos} bos={ours.bos_id})")


def _rows(q: np.ndarray, scale: np.ndarray, mn: np.ndarray, row_u16: int) -> np.ndarray:
    """[n, V] uint16 + [n] scale, min -> [n, row_u16] uint16 rows (llama.cpp's layout)."""
    n, v = q.shape
    out = np.zeros((n, row_u16), "<u2")
    out[:, :4] = np.stack([scale, mn], -1).astype("<f4").view("<u2")
    out[:, 4 : 4 + v] = q
    return out


def _batches(chunks: np.ndarray, batch: int):
    """(group [batch, n_ctx] padded with copies of its last row to keep one compiled shape,
    index of its first chunk, number of real chunks)."""
    for i in range(0, len(chunks), batch):
        group = chunks[i : i + batch]
        real = len(group)
        if real < batch:
            group = np.concatenate([group, np.repeat(group[-1:], batch - real, 0)])
        yield group, i, real


def save_base(llm, tokens: list[int], path: str | Path, n_ctx: int = 512,
              n_chunks: int | None = None, batch: int = 2,
              on_chunk: Callable[[int, float], None] | None = None,
              source: str = "text") -> PerplexityResult:
    """Score ``tokens`` like ``perplexity`` and save the base log-probs to ``path`` (written to
    ``path.tmp`` and renamed when complete, so an interrupted run leaves no partial file)."""
    tk = llm.tokenizer
    chunks = chunk_tokens(tokens, n_ctx, n_chunks, tk.bos_id, tk.add_bos, source)
    hdr = make_header(llm, tokens, n_ctx, len(chunks))
    res = PerplexityResult(n_ctx, len(chunks), len(tokens))
    first = hdr.first
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            blob = json.dumps(asdict(hdr)).encode("utf-8")
            f.write(MAGIC + struct.pack("<II", VERSION, len(blob)) + blob)
            f.write(chunks.astype("<i4").tobytes())
            for group, _, real in _batches(chunks, batch):
                q, scale, mn, nll, top = llm.engine.reduce_scored(
                    group, first, _base_rows, group[:, first + 1 :])
                if q.shape[-1] != hdr.n_vocab:
                    raise JllamaError(f"model has {q.shape[-1]} logits, vocabulary "
                                      f"{hdr.n_vocab} tokens: cannot save a base file")
                for j in range(real):
                    f.write(_rows(q[j], scale[j], mn[j], hdr.row_u16).tobytes())
                    res.nll.append(nll[j].astype(np.float64))
                    res.same_top += int((top[j] == group[j, first + 1 :]).sum())
                    res.running.append(math.exp(float(np.concatenate(res.nll).mean())))
                    if on_chunk:
                        on_chunk(len(res.running), res.running[-1])
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    res.seconds = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- statistics


def _mean_unc(s: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: mean and standard error (0 for <= 10 values)."""
    n = len(s)
    if n < 1:
        return 0.0, 0.0
    f = float(s.sum() / n)
    df = float((s * s).sum() / n) - f * f
    return f, math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance of the two means (0 for < 10 values)."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float((a * b).sum() / n) - float(a.sum() / n) * float(b.sum() / n)) / (n - 1)


def _percentile(sorted_v: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at fraction * (n - 1)."""
    if fraction <= 0:
        return float(sorted_v[0])
    if fraction >= 1:
        return float(sorted_v[-1])
    p = float(np.float32(fraction)) * (len(sorted_v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_v[ip] + p * sorted_v[min(ip + 1, len(sorted_v) - 1)])


KLD_PCTS = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95),
            ("90.0%", 0.9), ("Median", 0.5), ("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01),
            (" 0.1%", 0.001), ("Minimum", 0.0))
DP_PCTS = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95),
           ("90.0%", 0.9), ("75.0%", 0.75), ("Median", 0.5), ("25.0%", 0.25), ("10.0%", 0.1),
           (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001), ("Minimum", 0.0))


@dataclass
class KLDResult:
    """Per scored token values (float64) and llama.cpp's statistics over them."""

    n_ctx: int
    n_chunks: int
    model: str = ""
    base_model: str = ""
    nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nll_base: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kld: np.ndarray = field(default_factory=lambda: np.zeros(0))
    p_diff: np.ndarray = field(default_factory=lambda: np.zeros(0))
    same_top: int = 0
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.kld)

    def stats(self) -> dict[str, float]:
        """Every number of llama-perplexity's KLD report, by name (fractions, not %)."""
        n = self.count
        lp, dlp = _mean_unc(self.nll)
        lb, dlb = _mean_unc(self.nll_base)
        cov = _cov(self.nll, self.nll_base)
        ppl, ppl_b = math.exp(lp), math.exp(lb)
        ratio_unc = math.sqrt(max(0.0, dlp * dlp + dlb * dlb - 2.0 * cov))
        k, dk = _mean_unc(self.kld)
        dp, ddp = _mean_unc(self.p_diff)
        mse, dmse = _mean_unc(self.p_diff**2)
        rms = math.sqrt(mse)
        top = self.same_top / n if n else 0.0
        s = {
            "ppl": ppl, "ppl_unc": ppl * dlp, "ppl_base": ppl_b, "ppl_base_unc": ppl_b * dlb,
            "cor_ln_ppl": cov / (dlp * dlb) if dlp * dlb > 0 else 0.0,
            "ln_ppl_ratio": lp - lb, "ln_ppl_ratio_unc": ratio_unc,
            "ppl_ratio": math.exp(lp - lb), "ppl_ratio_unc": math.exp(lp - lb) * ratio_unc,
            "ppl_diff": ppl - ppl_b,
            "ppl_diff_unc": math.sqrt(max(0.0, (ppl * dlp) ** 2 + (ppl_b * dlb) ** 2
                                          - 2.0 * ppl * ppl_b * cov)),
            "kld": k, "kld_unc": dk,
            "dp": dp, "dp_unc": ddp,
            "rms_dp": rms, "rms_dp_unc": 0.5 / rms * dmse if rms > 0 else 0.0,
            "same_top": top,
            "same_top_unc": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
            "count": float(n),
        }
        if n:
            ks, ds = np.sort(self.kld), np.sort(self.p_diff)
            for name, f in KLD_PCTS:
                s[f"kld_{_key(name)}"] = _percentile(ks, f)
            for name, f in DP_PCTS:
                s[f"dp_{_key(name)}"] = _percentile(ds, f)
        return s

    def report(self) -> str:
        """llama-perplexity's three statistics blocks, same labels and formats."""
        s = self.stats()
        out = ["====== Perplexity statistics ======",
               f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_unc']:10.6f}",
               f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:10.6f}",
               f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor_ln_ppl']:6.2f}%",
               f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± "
               f"{s['ln_ppl_ratio_unc']:10.6f}",
               f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_unc']:10.6f}",
               f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_unc']:10.6f}",
               "", "====== KL divergence statistics ======",
               f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_unc']:10.6f}"]
        out += [f"{name:<7} KLD: {s['kld_' + _key(name)]:10.6f}" for name, _ in KLD_PCTS]
        out += ["", "====== Token probability statistics ======",
                f"Mean    Δp: {100 * s['dp']:6.3f} ± {100 * s['dp_unc']:5.3f} %"]
        out += [f"{name:<7} Δp: {100 * s['dp_' + _key(name)]:6.3f}%" for name, _ in DP_PCTS]
        out += [f"RMS Δp    : {100 * s['rms_dp']:6.3f} ± {100 * s['rms_dp_unc']:5.3f} %",
                f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_unc']:5.3f} %"]
        return "\n".join(out)


def _key(name: str) -> str:
    return {"Maximum": "max", "Minimum": "min", "Median": "median"}.get(
        name, "p" + name.strip().rstrip("%").replace(".", "_"))


def chunk_line(r: KLDResult, i: int) -> str:
    """llama-perplexity's running per-chunk row: PPL, ln ratio, KLD, RMS Δp, same top."""
    s = r.stats()
    return (f"{i:4d}    {s['ppl']:9.4f} ± {s['ppl_unc']:9.4f}"
            f"    {s['ln_ppl_ratio']:10.5f} ± {s['ln_ppl_ratio_unc']:10.5f}"
            f"    {s['kld']:10.5f} ± {s['kld_unc']:10.5f}"
            f"    {100 * s['rms_dp']:6.3f} ± {100 * s['rms_dp_unc']:6.3f} %"
            f"    {100 * s['same_top']:6.3f} ± {100 * s['same_top_unc']:6.3f} %")


CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          "
                "KL Divergence              Δp RMS            Same top p")


def kl_divergence(llm, tokens: list[int], base_path: str | Path, n_ctx: int = 512,
                  n_chunks: int | None = None, batch: int = 2,
                  on_chunk: Callable[[KLDResult], None] | None = None) -> KLDResult:
    """Compare ``llm`` on ``tokens`` (the same text the base file was made from) against the
    base file; ``n_chunks`` at most the file's. Returns the per-token values and statistics."""
    hdr, off = read_header(base_path)
    check_compatible(hdr, make_header(llm, tokens, n_ctx, hdr.n_chunks), base_path)
    n = hdr.n_chunks if not n_chunks or n_chunks <= 0 else min(n_chunks, hdr.n_chunks)
    chunks = np.fromfile(base_path, "<i4", hdr.n_chunks * n_ctx, offset=off)
    chunks = chunks.reshape(hdr.n_chunks, n_ctx)[:n]
    rows = np.memmap(base_path, "<u2", "r", off + chunks.itemsize * hdr.n_chunks * n_ctx,
                     (hdr.n_chunks, hdr.n_scored, hdr.row_u16))
    first, v = hdr.first, hdr.n_vocab
    res = KLDResult(n_ctx, n, model=make_header(llm, tokens, n_ctx, 0).model,
                    base_model=hdr.model)
    parts: list[tuple] = []
    t0 = time.perf_counter()
    for group, i, real in _batches(chunks, batch):
        idx = list(range(i, i + real)) + [i + real - 1] * (len(group) - real)
        r = np.asarray(rows[idx])
        sm = np.ascontiguousarray(r[..., :4]).view("<f4")
        out = llm.engine.reduce_scored(
            group, first, _compare_rows, group[:, first + 1 :],
            np.ascontiguousarray(r[..., 4 : 4 + v]), sm[..., 0], sm[..., 1])
        for j in range(real):
            nll, nll_b, kld, dp, same = (np.asarray(x[j]) for x in out)
            parts.append((nll, nll_b, kld, dp))
            res.same_top += int(same.sum())
            res.nll, res.nll_base, res.kld, res.p_diff = (
                np.concatenate([p[k] for p in parts]).astype(np.float64) for k in range(4))
            if on_chunk:
                on_chunk(res)
    res.seconds = time.perf_counter() - t0
    del rows
    return res


def run_cli(llm, text_path: str, base_path: str, compare: bool, n_ctx: int,
            n_chunks: int | None, batch: int, out: IO[str] | None = None):
    """The two modes of ``jllama perplexity --kl-divergence-base FILE [--kl-divergence]``."""
    from jllama.eval.perplexity import run_cli as ppl_cli

    out = out or sys.stdout

    if not compare:
        def save(llm_, tokens, n_ctx_, n_chunks_, batch_, on_chunk, source):
            return save_base(llm_, tokens, base_path, n_ctx_, n_chunks_, batch_, on_chunk, source)

        res = ppl_cli(llm, text_path, n_ctx, n_chunks, batch, out, scorer=save)
        print(f"saved base log-probs of {res.count} tokens to {base_path} "
              f"({Path(base_path).stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
        return res
    read_header(base_path)  # fail fast on a bad base file, before tokenizing
    tokens = llm.tokenize(read_text(text_path), add_special=True)
    print(CHUNK_HEADER, file=out)

    def on_chunk(r: KLDResult) -> None:
        print(chunk_line(r, len(r.kld) // (n_ctx - 1 - n_ctx // 2)), file=out, flush=True)

    res = kl_divergence(llm, tokens, base_path, n_ctx, n_chunks, batch, on_chunk)
    print(file=out)
    if res.count < 100:
        print("(fewer than 100 tokens: statistics are rough)", file=out)
    print(res.report(), file=out)
    print(f"{res.n_chunks} chunks of {n_ctx}, {res.count} scored tokens, "
          f"{res.n_chunks * n_ctx / res.seconds:.1f} tokens/s (all window tokens evaluated)",
          file=sys.stderr)
    return res
