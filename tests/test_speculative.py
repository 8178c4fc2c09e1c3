"""Speculative decoding: greedy output equals plain greedy decoding; sampled output follows the
target's exact distribution.

References: plain ``Engine.generate`` for greedy identity, and for sampling the target
distribution written out from its definition (softmax of the target's logits over its top-k at
a temperature). The rejection rule itself is checked on synthetic p/q tables, where deliberately
wrong rules must fail the same statistical check.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from jllama.config import DraftConfig
from jllama.engine.sampling import SamplingParams
from jllama.engine.speculative import Speculative, accept, ngram_lookup, speculative_sample

PROMPTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
    "def fib2(n):\n",
    "The capital of France is",
    "List: apple, banana, cherry, apple, banana,",
]
N_TOK = 24
CTX = 256


# ------------------------------------------------------------------------------ statistics
def _chi2_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> float:
    """Pearson chi-square of observed counts against exact probabilities, bins with expected
    count < 5 pooled into one."""
    n = counts.sum()
    exp = expected_p * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] < 1e-9:
        obs, ex = obs[:-1], ex[:-1]
    assert counts[expected_p == 0].sum() == 0, "drew a token the target gives probability 0"
    return float(stats.chisquare(obs, ex * obs.sum() / ex.sum()).pvalue)


def _tables(seed: int, v: int = 6):
    """A toy two-step target p and draft q: first-token rows and rows conditioned on it."""
    rng = np.random.default_rng(seed)

    def row():
        return rng.dirichlet(np.full(v, 0.7))

    p1, q1 = row(), row()
    p2 = np.stack([row() for _ in range(v)])
    q2 = np.stack([row() for _ in range(v)])
    p3 = np.full(v, 1.0 / v)
    return p1, q1, p2, q2, p3


def _simulate(rule, onehot: bool, trials: int = 20000, seed: int = 0):
    """First and second emitted tokens of one speculative round with 2 drafts (a round that
    emits one token is followed by a plain draw from the target)."""
    p1, q1, p2, q2, p3 = _tables(7)
    v = len(p1)
    rng = np.random.default_rng(seed)
    first = np.zeros(v, np.int64)
    second = np.zeros(v, np.int64)
    for _ in range(trials):
        if onehot:  # deterministic proposals (prompt lookup): always the same two tokens
            d = [2, 4]
            qs = None
        else:
            d1 = int(rng.choice(v, p=q1))
            d = [d1, int(rng.choice(v, p=q2[d1]))]
            qs = [q1, q2[d1]]
        out = rule([p1, p2[d[0]], p3], qs, d, rng)
        if len(out) == 1:
            out.append(int(rng.choice(v, p=p2[out[0]])))
        first[out[0]] += 1
        second[out[1]] += 1
    return first, second, p1, p1 @ p2


def _always_accept(ps, qs, drafts, rng):
    return list(drafts) + [int(rng.choice(len(ps[0]), p=ps[len(drafts)]))]


def _resample_from_p(ps, qs, drafts, rng):
    """Right acceptance test, wrong replacement: draws from p instead of norm(max(p - q, 0))."""
    out = []
    for i, x in enumerate(drafts):
        q = np.eye(len(ps[i]))[x] if qs is None else qs[i]
        if rng.random() < min(1.0, ps[i][x] / q[x]):
            out.append(x)
            continue
        out.append(int(rng.choice(len(ps[i]), p=ps[i])))
        return out
    return out + [int(rng.choice(len(ps[0]), p=ps[len(drafts)]))]


@pytest.mark.parametrize("onehot", [False, True], ids=["draft-q", "one-hot"])
def test_rejection_sampling_keeps_the_target_distribution(onehot):
    first, second, e1, e2 = _simulate(speculative_sample, onehot)
    assert _chi2_pvalue(first, e1) > 1e-3 and _chi2_pvalue(second, e2) > 1e-3
    # the same check has the power to catch wrong rules
    for wrong in (_always_accept, _resample_from_p):
        f, s, _, _ = _simulate(wrong, onehot)
        assert min(_chi2_pvalue(f, e1), _chi2_pvalue(s, e2)) < 1e-6, wrong.__name__


def test_accept_rule_probabilities():
    """P(keep x) = min(1, p(x)/q(x)) exactly, and rejections never return x when p(x) <= q(x)."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.6, 0.2])
    rng = np.random.default_rng(3)
    n = 20000
    res = [accept(p, q, 1, rng) for _ in range(n)]
    kept = sum(ok for ok, _ in res)
    assert abs(kept / n - 0.5) < 4 * np.sqrt(0.25 / n)
    assert all(t == 0 for ok, t in res if not ok)  # the only token with p > q


def test_ngram_lookup():
    seq = [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert ngram_lookup(seq, 3, 4) == [7, 8, 4, 1]  # most recent earlier match wins
    assert ngram_lookup(seq, 3, 1) == [7]
    assert ngram_lookup([1, 2, 3, 4], 2, 5) == []
    assert ngram_lookup([1, 1, 1], 1, 3) == [1]  # the continuation may run into the suffix


# ------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def exact_llms(smollm2_path):
    """Target SmolLM2 and its Q4_0 requantization as draft, with exact f32 numerics.

    With llama.cpp-style activation rounding (the default), the verify forward of k+1 tokens and
    the one-token decode step already give O(0.1) different logits (llama.cpp's own batch and
    decode paths disagree the same way), so a near-tie may go either way; exact numerics isolate
    the speculative logic (rewinds, cache sync, acceptance), which must then change no token.
    """
    from jllama.api import Llama
    from jllama.numerics import Numerics

    plain = Numerics(match_llamacpp=False)
    target = Llama(smollm2_path, ctx_size=CTX, cache_type="f32", numerics=plain)
    draft = Llama(smollm2_path, ctx_size=CTX, cache_type="f32", quant={"base": "q4_0"},
                  numerics=plain)
    return target, draft


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_greedy_identical_to_plain(exact_llms, kind):
    target, draft = exact_llms
    spec = Speculative(target, DraftConfig(kind=kind, n=8, p_min=0.5),
                       draft if kind == "model" else None)
    eog = target.tokenizer.eog_ids
    n_tok = N_TOK if kind == "ngram" else 16  # the draft model's steps cost as much as the target's
    accepted = 0
    for p in PROMPTS:
        ids = target.tokenize(p)
        target.engine.reset()
        t0 = time.perf_counter()
        ref = list(target.engine.generate(ids, SamplingParams.greedy(), n_tok, eog))
        t1 = time.perf_counter()
        held = list(target.engine.tokens[0])
        target.engine.reset()
        out = list(spec.generate(ids, SamplingParams.greedy(), n_tok, eog))
        ex = target.engine.timings.extra
        print(f"\n{kind} {p[:20]!r}: plain {t1 - t0:.2f} s, speculative "
              f"{time.perf_counter() - t1:.2f} s, {ex['draft_accepted']}/{ex['draft_proposed']} "
              "drafts accepted")
        assert out == ref, (p, ex)
        assert target.engine.timings.gen_tokens == len(ref)
        accepted += ex["draft_accepted"]
        # the slot ends as plain generation leaves it (the prompt cache of the next request)
        assert target.engine.tokens[0] == held
    assert accepted > n_tok  # drafts really were used, not just plain steps


# ------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random llama (F32) and its Q4_0 copy: close but different distributions."""
    import gguf
    from tinymodels import dense_hparams, dense_tensors, write_gguf

    from jllama.api import Llama

    d = tmp_path_factory.mktemp("spec")
    shp = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)
    t = dense_tensors(0, n_vocab=320, std=0.12, embd_std=0.6, **shp)
    hp = dense_hparams(**shp)
    f32 = write_gguf(d / "target.gguf", "llama", hp, t)
    q4 = write_gguf(d / "draft.gguf", "llama", hp, t, qtype=gguf.GGMLQuantizationType.Q4_0)
    other = write_gguf(d / "other.gguf", "llama", hp,
                       dense_tensors(1, n_vocab=352, **shp))  # another vocabulary size
    return (Llama(f32, ctx_size=64, cache_type="f32"), Llama(q4, ctx_size=64, cache_type="f32"),
            other)


def test_sampling_matches_target_distribution(tiny_pair):
    """Tokens 2 and 3 (drawn by speculative rounds with a Q4_0 draft) against the exact
    marginals of the target: top-8 of its logits, softmax at temperature 0.8."""
    target, q4, _ = tiny_pair
    spec = Speculative(target, DraftConfig(kind="model", n=2, p_min=0.0), q4)
    top_k, temp = 8, 0.8
    prompt = [3, 70, 81, 99]

    def dist(seqs):
        lg = target.engine.score_batch(np.asarray(seqs, np.int32))[:, -1].astype(np.float64)
        out = np.zeros_like(lg)
        for r, row in enumerate(lg):
            top = np.argsort(-row)[:top_k]
            e = np.exp((row[top] - row[top].max()) / temp)
            out[r, top] = e / e.sum()
        return out

    p1 = dist([prompt])[0]
    t1s = np.nonzero(p1)[0]
    p2 = dist([prompt + [a] for a in t1s])  # rows: t1 in t1s
    m2 = p1[t1s] @ p2
    pairs = [(a, b) for i, a in enumerate(t1s) for b in np.nonzero(p2[i])[0]]
    p3 = dist([prompt + [a, b] for a, b in pairs])
    w = np.array([p1[a] * p2[i, b] for i, a in enumerate(t1s) for b in np.nonzero(p2[i])[0]])
    m3 = w @ p3
    v = len(p1)
    c2, c3 = np.zeros(v, np.int64), np.zeros(v, np.int64)
    rounds = accepted = 0
    for s in range(300):
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=1.0, min_p=0.0, seed=s)
        out = list(spec.generate(prompt, params, 4))
        ex = target.engine.timings.extra
        rounds += ex["rounds"]
        accepted += ex["draft_accepted"]
        c2[out[1]] += 1
        c3[out[2]] += 1
    assert rounds >= 300 and 0.2 < accepted / (2 * rounds) < 0.98  # both outcomes exercised
    assert _chi2_pvalue(c2, m2) > 1e-3 and _chi2_pvalue(c3, m3) > 1e-3


def test_vocab_mismatch_names_both_models(tiny_pair):
    from jllama.api import Llama
    from jllama.errors import JllamaError

    target, _, other = tiny_pair
    with pytest.raises(JllamaError, match=r"other\.gguf.*target\.gguf.*vocabulary size 320 vs 352"):
        Llama(target.path, ctx_size=64, compile_cache=False,
              draft={"kind": "model", "model": str(other)})


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_stop_ids_and_context_full(tiny_pair, kind):
    """Engine.generate's contract: stop ids end generation unyielded, a full context stops it
    where plain generation stops, and the slot is left as plain generation leaves it."""
    target, q4, _ = tiny_pair
    eng = target.engine
    spec = Speculative(target, DraftConfig(kind=kind, n=4, p_min=0.0), q4)
    prompt = [3, 70, 81, 99, 70, 81]
    g = SamplingParams.greedy()
    fulls = []
    for stop, n in ((frozenset(), 100), (None, 100), (frozenset(), 7)):
        eng.reset()
        ref = list(eng.generate(prompt, g, n, stop or frozenset()))
        if stop is None:  # stop at the first token that repeats an earlier one
            stop = frozenset({next(t for i, t in enumerate(ref) if t in ref[:i])})
            ref = list(eng.generate(prompt, g, n, stop))
        full = eng.timings.extra.get("context_full", False)
        held = list(eng.tokens[0])
        eng.reset()
        out = list(spec.generate(prompt, g, n, stop))
        assert out == ref
        assert eng.timings.extra.get("context_full", False) == full
        assert eng.tokens[0] == held
        fulls.append(full)
    assert fulls == [True, False, False] and len(out) == 7


# ------------------------------------------------------------------------------ front ends
def test_cli_generate_draft_ngram_same_text(exact_llms, smollm2_path, capsys, monkeypatch):
    """``jllama generate --draft-ngram --temp 0`` prints what plain greedy generation prints, and
    really goes through the speculative generator."""
    from jllama.cli.main import main
    from jllama.engine import speculative

    calls = []
    real = speculative.Speculative.generate

    def spy(self, *a, **k):
        calls.append(self.proposer.kind)
        return real(self, *a, **k)

    monkeypatch.setattr(speculative.Speculative, "generate", spy)
    base = ["generate", "-m", str(smollm2_path), "-p", PROMPTS[2], "--temp", "0", "-n", "16",
            "-c", str(CTX)]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert calls == []
    assert main(base + ["--draft-ngram", "--draft-n", "8"]) == 0
    assert capsys.readouterr().out == plain
    assert calls == ["ngram"]


def test_single_slot_server_with_ngram_draft(exact_llms, smollm2_path):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(smollm2_path, ctx_size=CTX, n_slots=1, draft={"kind": "ngram", "n": 8})
    ids = llm.tokenize(PROMPTS[2])
    eog = llm.tokenizer.eog_ids
    ref = llm.detokenize(list(llm.engine.generate(ids, SamplingParams.greedy(), 16, eog)))
    llm.engine.reset()
    state = ServerState(llm, ServerSettings("smollm2", max_queue=4, timeout=120))
    assert state.scheduler.speculative is llm.speculative
    with ServerThread(state, warmup=False) as s:
        r = httpx.post(s.url + "/v1/completions", timeout=120,
                       json={"prompt": ids, "max_tokens": 16, "temperature": 0})
        # llama-server's /completion reports the request's drafting in its timings
        # (unit/test_speculative.py reads draft_n and draft_n_accepted)
        nat = httpx.post(s.url + "/completion", timeout=120,
                         json={"prompt": ids, "n_predict": 16, "temperature": 0})
        ex = dict(llm.engine.timings.extra)
        # the end-of-generation token that stops it is counted, as llama-server counts it
        eos = httpx.post(s.url + "/completion", timeout=120,
                         json={"prompt": ids, "n_predict": 16, "temperature": 0,
                               "logit_bias": [[llm.tokenizer.eos_id, 100.0]]}).json()
    assert (eos["content"], eos["stop_type"], eos["tokens_predicted"]) == ("", "eos", 1)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref
    assert ex["draft_kind"] == "ngram" and ex["draft_accepted"] > 0
    tm = nat.json()["timings"]
    assert (tm["draft_n"], tm["draft_n_accepted"]) == (ex["draft_proposed"],
                                                       ex["draft_accepted"])
    assert nat.json()["content"] == ref


def test_multi_slot_server_turns_speculative_off(tiny_pair, caplog):
    from types import SimpleNamespace

    from jllama.server.scheduler import Scheduler

    target = tiny_pair[0]
    llm = SimpleNamespace(engine=SimpleNamespace(n_slots=2), tokenizer=target.tokenizer,
                          spec=target.spec, speculative=object())
    with caplog.at_level("WARNING", logger="jllama.server"):
        sch = Scheduler(llm)
    assert sch.speculative is None and "single-slot" in caplog.text
