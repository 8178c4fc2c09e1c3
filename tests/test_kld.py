"""KL-divergence mode (llama-perplexity --kl-divergence): the file round trip, the statistics
against a float64 numpy evaluation of the definitions, and clean refusals of bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from jllama.errors import JllamaError
from jllama.eval.kld import KLDResult, _percentile, kl_divergence, read_header, save_base
from jllama.eval.perplexity import chunk_tokens

N_CTX, N_CHUNKS = 128, 2


@pytest.fixture(scope="module")
def text(wiki_test_path) -> str:
    raw = wiki_test_path.read_text(encoding="utf-8")
    return raw[:6000]  # ~1400 tokens: enough for a few 128-token windows


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from jllama.api import Llama

    return Llama(smollm2_path, ctx_size=N_CTX)


@pytest.fixture(scope="module")
def tokens(llm, text):
    return llm.tokenize(text)


@pytest.fixture(scope="module")
def base(llm, tokens, tmp_path_factory):
    p = tmp_path_factory.mktemp("kld") / "base.kld"
    res = save_base(llm, tokens, p, N_CTX, N_CHUNKS, batch=2)
    return p, res


@pytest.fixture(scope="module")
def q4_0(smollm2_path):
    from jllama.api import Llama

    return Llama(smollm2_path, ctx_size=N_CTX, quant={"base": "q4_0"})


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_base_file_header(llm, base):
    p, res = base
    hdr, _ = read_header(p)
    assert (hdr.n_ctx, hdr.n_chunks, hdr.n_vocab) == (N_CTX, N_CHUNKS, llm.tokenizer.n_vocab)
    assert res.count == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)


def test_model_against_itself(llm, tokens, base):
    r = kl_divergence(llm, tokens, base[0], N_CTX)
    assert r.count == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    # only the file's 16-bit log-prob rounding (<= 1.22e-4 nats per entry) separates them
    assert np.abs(r.kld).max() < 3e-4 and abs(r.kld.mean()) < 2e-5
    assert np.abs(r.nll - r.nll_base).max() < 2e-4
    assert np.abs(r.p_diff).max() < 2e-4
    assert r.same_top == r.count
    s = r.stats()
    assert s["same_top"] == 1.0 and abs(s["ppl_ratio"] - 1) < 1e-4 and s["cor_ln_ppl"] > 0.9999


def test_q4_0_against_q4_1_base_matches_the_definition(llm, q4_0, tokens, base):
    """KLD, Δp and NLLs from the file path equal float64 numpy evaluations of the definitions
    on full logits: KL(p_base || p_Q) = sum p_base (ln p_base - ln p_Q), Δp = p_Q(next) -
    p_base(next)."""
    r = kl_divergence(q4_0, tokens, base[0], N_CTX)
    assert r.kld.mean() > 1e-3  # Q4_0 requantized from Q4_1 really differs
    assert r.same_top < r.count
    chunks = chunk_tokens(tokens, N_CTX, N_CHUNKS, llm.tokenizer.bos_id, llm.tokenizer.add_bos)
    first, n = N_CTX // 2, N_CTX - 1 - N_CTX // 2
    kld, dp, nll, nll_b = [], [], [], []
    for ch in chunks:
        lb = _log_softmax64(llm.logits(ch)[first : N_CTX - 1])
        lq = _log_softmax64(q4_0.logits(ch)[first : N_CTX - 1])
        tgt = ch[first + 1 :]
        kld.append((np.exp(lb) * (lb - lq)).sum(-1))
        dp.append(np.exp(lq[np.arange(n), tgt]) - np.exp(lb[np.arange(n), tgt]))
        nll.append(-lq[np.arange(n), tgt])
        nll_b.append(-lb[np.arange(n), tgt])
    kld, dp, nll, nll_b = map(np.concatenate, (kld, dp, nll, nll_b))
    # bound: 16-bit rounding of the base log-probs plus f32 vs f64 sums
    assert np.abs(r.kld - kld).max() < 5e-4 + 2e-3 * kld.max()
    assert abs(r.kld.mean() - kld.mean()) < 2e-5 + 1e-3 * kld.mean()
    assert np.abs(r.p_diff - dp).max() < 5e-4
    assert np.abs(r.nll - nll).max() < 1e-3 and np.abs(r.nll_base - nll_b).max() < 1e-3
    # the base run's own PPL (printed as llama-perplexity does) is of the same NLLs
    assert np.abs(np.concatenate(base[1].nll) - nll_b).max() < 1e-3
    s = r.stats()
    assert s["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
    assert s["ppl_base"] == pytest.approx(np.exp(nll_b.mean()), rel=1e-4)
    assert s["cor_ln_ppl"] == pytest.approx(np.corrcoef(nll, nll_b)[0, 1], abs=2e-3)
    assert s["rms_dp"] == pytest.approx(np.sqrt((dp**2).mean()), rel=1e-2)
    assert s["kld_median"] == pytest.approx(np.median(kld), rel=1e-2, abs=1e-4)
    assert s["kld_max"] == pytest.approx(kld.max(), rel=1e-2, abs=5e-4)


def test_statistics_formulas():
    """llama.cpp's percentile is linear interpolation at f * (n - 1); its ± is the standard
    error; the report carries every label of llama-perplexity's."""
    v = np.sort(np.random.default_rng(0).random(1001))
    for f in (0.001, 0.01, 0.5, 0.9, 0.999):
        assert _percentile(v, f) == pytest.approx(np.percentile(v, 100 * f), rel=1e-6)
    rng = np.random.default_rng(1)
    k = rng.exponential(0.05, 500)
    r = KLDResult(512, 2, nll=rng.random(500) + 2, nll_base=rng.random(500) + 2, kld=k,
                  p_diff=rng.normal(0, 0.02, 500), same_top=450)
    s = r.stats()
    assert s["kld"] == pytest.approx(k.mean())
    assert s["kld_unc"] == pytest.approx(k.std() / np.sqrt(499))
    assert s["same_top_unc"] == pytest.approx(np.sqrt(0.9 * 0.1 / 499))
    text = r.report()
    for label in ("Mean PPL(Q)", "Mean PPL(base)", "Cor(ln(PPL(Q)), ln(PPL(base)))",
                  "Mean ln(PPL(Q)/PPL(base))", "Mean PPL(Q)/PPL(base)", "Mean    KLD",
                  "Maximum KLD", "99.9%   KLD", "Median  KLD", " 1.0%   KLD", "Minimum KLD",
                  "Mean    Δp", "Maximum Δp", "75.0%   Δp", "25.0%   Δp", "Minimum Δp",
                  "RMS Δp", "Same top p: 90.000 ±"):
        assert label in text, label


def test_mismatched_base_is_refused(llm, tokens, base, tmp_path):
    from jllama.api import Llama
    from jllama.quant.testing import tiny_llama

    p = base[0]
    with pytest.raises(JllamaError, match="n_ctx = 128.*-c 64"):
        kl_divergence(llm, tokens, p, 64)
    with pytest.raises(JllamaError, match="tokenization differs"):
        kl_divergence(llm, tokens[:-1], p, N_CTX)
    # a base file from another model with another vocabulary
    tiny_path = tmp_path / "tiny.gguf"
    tiny_llama(tiny_path, n_embd=64, n_layer=1, n_head=2, n_head_kv=1, n_ff=128)
    tiny = Llama(tiny_path, ctx_size=N_CTX)
    tiny_base = tmp_path / "tiny.kld"
    save_base(tiny, tiny.tokenize("the quick brown fox " * 80), tiny_base, N_CTX, 1)
    with pytest.raises(JllamaError, match="vocabulary differs: base file has 320 tokens"):
        kl_divergence(llm, tokens, tiny_base, N_CTX)
    # not a base file / truncated
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"_logits_" + bytes(100))
    with pytest.raises(JllamaError, match="not a jllama KL-divergence base file"):
        read_header(bad)
    cut = tmp_path / "cut.kld"
    cut.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(JllamaError, match="truncated"):
        read_header(cut)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from jllama.cli.main import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_round_trip(text, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    b = tmp_path / "b.kld"
    args = ["perplexity", "-f", str(f), "-c", str(N_CTX), "--chunks", "2"]
    rc, out, err = _cli(args + ["--kl-divergence-base", str(b)], capsys)
    assert rc == 0 and "Final estimate: PPL" in out and b.is_file(), err
    rc, out, err = _cli(args + ["--kl-divergence-base", str(b), "--kl-divergence"], capsys)
    assert rc == 0, err
    assert "Mean    KLD" in out and "Same top p: 100.000" in out and "RMS Δp" in out


@pytest.mark.parametrize("content,message", [
    (b"Just a few words.", "need at least 2"),
    (b" \n", "empty"),
    (b"abc\xff\xfe", "not UTF-8"),
])
def test_cli_bad_text(tmp_path, capsys, content, message):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    rc, _, err = _cli(["perplexity", "-f", str(f), "-c", "64", "--kl-divergence-base",
                       str(tmp_path / "b.kld")], capsys)
    assert rc == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "b.kld").exists() and not (tmp_path / "b.kld.tmp").exists()


def test_cli_bad_base(tmp_path, capsys, text):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    rc, _, err = _cli(["perplexity", "-f", str(f), "--kl-divergence"], capsys)
    assert rc == 1 and "needs --kl-divergence-base" in err
    rc, _, err = _cli(["perplexity", "-f", str(f), "--kl-divergence", "--kl-divergence-base",
                       str(tmp_path / "none.kld")], capsys)
    assert rc == 1 and "no such KL-divergence base file" in err and "Traceback" not in err


def _logits_and_targets(logits, targets):
    return logits, targets


def test_reduce_scored_spans_compiled_pieces(tmp_path):
    """Windows longer than one compiled piece (512): the scored slice is stitched from several
    pieces and equals the same rows of the full-logits path."""
    from jllama.api import Llama
    from jllama.quant.testing import tiny_llama

    p = tmp_path / "tiny.gguf"
    tiny_llama(p, n_embd=64, n_layer=1, n_head=2, n_head_kv=1, n_ff=128)
    tiny = Llama(p, ctx_size=1100)
    toks = np.random.default_rng(0).integers(3, 320, (1, 1030)).astype(np.int32)
    first = 515
    lg, tg = tiny.engine.reduce_scored(toks, first, _logits_and_targets, toks[:, first + 1 :])
    assert lg.shape == (1, 1030 - 1 - first, 320) and (tg == toks[:, first + 1 :]).all()
    ref = tiny.engine.logits(toks[0])[first:-1]
    np.testing.assert_allclose(lg[0], ref, atol=1e-4, rtol=1e-4)


def _llamacpp(path, n_ctx: int):
    """The oracle (conftest gives it ggml's stock CPU kernels: AMX buffers crash here)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                           logits_all=True, verbose=False)


@pytest.mark.oracle
def test_llamacpp_logits_against_our_base_file(tmp_path):
    """The oracle's distributions, compared in float64 numpy with the base file jllama wrote
    (dequantized as the format says): KLD ~0 for the same F32 model; and llama.cpp's own Q4_0
    quantization scores the same mean KLD as jllama's Q4_0 quantize-on-load."""
    from jllama.api import Llama
    from jllama.eval.kld import read_header
    from jllama.quant.testing import llama_cpp_quantize, tiny_llama

    n_ctx = 64
    src, q40 = tmp_path / "tiny.gguf", tmp_path / "tiny-q4_0.gguf"
    tiny_llama(src, n_embd=256, n_layer=2, n_head=2, n_head_kv=1, n_ff=256)
    llama_cpp_quantize(src, q40, "q4_0")
    base = Llama(src, ctx_size=n_ctx)
    toks = base.tokenize("the quick brown fox jumps over the lazy dog. " * 40)
    save_base(base, toks, tmp_path / "b.kld", n_ctx, 2)
    hdr, off = read_header(tmp_path / "b.kld")
    windows = np.fromfile(tmp_path / "b.kld", "<i4", 2 * n_ctx, offset=off).reshape(2, n_ctx)
    rows = np.fromfile(tmp_path / "b.kld", "<u2", offset=off + 8 * n_ctx)
    rows = rows.reshape(2, hdr.n_scored, hdr.row_u16)
    sm = np.ascontiguousarray(rows[..., :4]).view("<f4").astype(np.float64)
    lpb = sm[..., 0:1] * rows[..., 4 : 4 + hdr.n_vocab] + sm[..., 1:2]

    def oracle_kld(path) -> np.ndarray:
        ref = _llamacpp(path, n_ctx)
        out = []
        for w, lb in zip(windows, lpb):
            ref.reset()
            ref.eval(w.tolist())
            lq = _log_softmax64(np.asarray(ref.scores[n_ctx // 2 : n_ctx - 1]))
            out.append(np.where(lb > -16, np.exp(lb) * (lb - lq), 0.0).sum(-1))
        return np.concatenate(out)

    same = oracle_kld(src)
    assert np.abs(same).max() < 5e-4 and abs(same.mean()) < 5e-5
    theirs = oracle_kld(q40).mean()
    ours = kl_divergence(Llama(src, ctx_size=n_ctx, quant={"base": "q4_0"}), toks,
                         tmp_path / "b.kld", n_ctx).kld.mean()
    assert theirs > 1e-3 and ours == pytest.approx(theirs, rel=0.05)
