"""Mirostat and DRY through the whole generation path: the Python API's greedy outputs checked
token by token against llama.cpp (its logits for the same tokens, its own DRY and penalty
samplers fed the prompt and every generated token, as llama-server's slot sampler is), then the
server (continuous batching, per-slot state) giving the same text, seeded mirostat requests
unchanged by their neighbours, and the fields reported as llama-server reports them."""

from __future__ import annotations

import ctypes
import threading

import httpx
import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_logits, llama_cpp_module

PROMPT = "Once upon a time, there"
N = 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tinymodels import write_server_model

    return write_server_model(tmp_path_factory.mktemp("miro") / "tiny.gguf", seed=8)


@pytest.fixture(scope="module")
def llm(model):
    from jllama.api import Llama

    return Llama(str(model), ctx_size=128, n_slots=3)


@pytest.fixture(scope="module")
def oracle_vocab(model):
    low = llama_cpp_module().llama_cpp
    mp = low.llama_model_default_params()
    mp.vocab_only = True
    m = low.llama_model_load_from_file(str(model).encode(), mp)
    assert m
    yield low, low.llama_model_get_vocab(m)
    low.llama_model_free(m)


def _greedy(llm, params):
    from jllama.engine.sampling import SamplingParams

    llm.engine.reset()
    ids = llm.tokenizer.encode(PROMPT, add_special=True)
    c = llm.complete(ids, N, SamplingParams(**params))
    return ids, c


def _oracle_rows(low, model, ids, gen):
    """llama.cpp's logits before each generated token, as llama_token_data arrays."""
    logits = llama_cpp_logits(model, ids + gen[:-1])[len(ids) - 1:]
    return logits


def _apply(low, smpl, row):
    n = len(row)
    arr = (low.llama_token_data * n)(*[low.llama_token_data(i, float(x), 0.0)
                                       for i, x in enumerate(row)])
    ta = low.llama_token_data_array(arr, n, -1, False)
    low.llama_sampler_apply(smpl, ctypes.byref(ta))
    out = np.empty(n, np.float32)
    for i in range(ta.size):
        out[ta.data[i].id] = ta.data[i].logit
    return out


def test_dry_greedy_matches_llamacpp(llm, model, oracle_vocab):
    """Greedy with DRY: each token is the first maximum of llama.cpp's logits after its DRY
    sampler, which has accepted the prompt and the tokens generated so far."""
    low, vocab = oracle_vocab
    params = dict(temperature=0.0, dry_multiplier=2.0, dry_allowed_length=1)
    ids, c = _greedy(llm, params)
    gen = c.tokens
    assert len(gen) >= 8, gen
    brk = [b.encode() for b in ("\n", ":", "\"", "*")]
    smpl = low.llama_sampler_init_dry(vocab, 2.0, 1.75, 1, 64,
                                      (ctypes.c_char_p * 4)(*brk), 4)
    changed = 0
    try:
        for t in ids:
            low.llama_sampler_accept(smpl, t)
        for j, row in enumerate(_oracle_rows(low, model, ids, gen)):
            pen = _apply(low, smpl, row)
            assert gen[j] == int(np.argmax(pen)), (j, gen)
            changed += int(np.argmax(row)) != gen[j]
            low.llama_sampler_accept(smpl, gen[j])
    finally:
        low.llama_sampler_free(smpl)
    assert changed, "DRY never moved the greedy choice: the test would not notice it missing"


def test_mirostat_skips_the_penalties(llm, model, oracle_vocab):
    """llama.cpp's mirostat chain is logit bias, temperature, mirostat: at temperature 0 it is
    the raw argmax even with a repeat penalty set (which does move the plain greedy output)."""
    low, vocab = oracle_vocab
    ids, c = _greedy(llm, dict(temperature=0.0, mirostat=2, repeat_penalty=1.5))
    gen = c.tokens
    rows = _oracle_rows(low, model, ids, gen)
    assert gen == [int(np.argmax(r)) for r in rows]
    _, plain = _greedy(llm, dict(temperature=0.0, repeat_penalty=1.5))
    assert plain.tokens != gen


@pytest.fixture(scope="module")
def server(llm, model):
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    # the API's references first: the scheduler owns the engine once the server runs
    refs = {"dry": _greedy(llm, dict(temperature=0.0, dry_multiplier=2.0,
                                     dry_allowed_length=1))[1].text}
    llm.engine.reset()
    st = ServerState(llm, ServerSettings("tiny", max_queue=16, timeout=120,
                                         defaults={"mirostat_tau": 4.0}))
    with ServerThread(st) as s:
        s.refs = refs
        with httpx.Client(base_url=s.url, timeout=120) as http:
            s.http = http
            yield s


def _complete(http, **kw):
    body = {"prompt": PROMPT, "n_predict": N, "cache_prompt": False, **kw}
    r = http.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_server_dry_equals_the_api(server):
    """The scheduler feeds DRY the slot's prompt and output as the API's engine loop does (whose
    tokens llama.cpp confirmed above), with other requests sharing the batch."""
    out = {}

    def run(i, kw):
        out[i] = _complete(server.http, **kw)["content"]

    jobs = [dict(temperature=0.0, dry_multiplier=2.0, dry_allowed_length=1),
            dict(temperature=1.0, seed=3, mirostat=1),
            dict(temperature=0.7, seed=4, dry_multiplier=0.5, dry_sequence_breakers=["e"])]
    ts = [threading.Thread(target=run, args=(i, kw)) for i, kw in enumerate(jobs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out[0] == server.refs["dry"]


def test_seeded_mirostat_is_per_request(server):
    """mu is each request's own: a seeded mirostat request gives the same text alone, again
    (mu starts over), and beside other mirostat requests whose mu moves differently."""
    kw = dict(temperature=1.0, seed=1234, mirostat=2, mirostat_tau=3.0, mirostat_eta=0.4)
    alone = _complete(server.http, **kw)
    assert _complete(server.http, **kw)["content"] == alone["content"]
    assert _complete(server.http, **{**kw, "seed": 77})["content"] != alone["content"]
    out = {}

    def run(i):
        k = kw if i == 0 else {**kw, "seed": i, "mirostat": 1 + i % 2, "mirostat_tau": 1.0 + i}
        out[i] = _complete(server.http, **k)["content"]

    ts = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out[0] == alone["content"]
    gs = alone["generation_settings"]
    assert (gs["mirostat"], gs["mirostat_tau"], gs["mirostat_eta"]) == (2, 3.0, 0.4)
    assert gs["dry_sequence_breakers"] == ["\n", ":", "\"", "*"]
    assert (gs["dry_multiplier"], gs["dry_base"], gs["dry_allowed_length"],
            gs["dry_penalty_last_n"]) == (0.0, 1.75, 2, 64)


def test_props_report_the_server_defaults(server):
    """/props (task_params::to_json(true)): the sampler fields with the server's defaults, and
    no breakers (only the full form has them)."""
    p = server.http.get("/props").json()["default_generation_settings"]["params"]
    assert (p["mirostat"], p["mirostat_tau"], p["mirostat_eta"]) == (0, 4.0, 0.1)
    assert (p["dry_multiplier"], p["dry_base"], p["dry_allowed_length"],
            p["dry_penalty_last_n"]) == (0.0, 1.75, 2, 64)
    assert "dry_sequence_breakers" not in p


def test_bad_dry_fields_are_refused(server):
    r = server.http.post("/completion", json={"prompt": "x", "dry_sequence_breakers": []})
    assert r.status_code == 400 and "dry_sequence_breakers" in r.text
    r = server.http.post("/completion", json={"prompt": "x", "dry_penalty_last_n": -1})
    assert r.status_code == 400
