"""Fault isolation and llama-server's HTTP rules, on a fake engine (no model, a few seconds).

* an exception while sampling one request ends that request only (the others in its batch
  finish with every token they asked for);
* a scheduler whose turns keep failing stops for good and ``/health`` answers 503 (and new
  requests 503 at once instead of hanging);
* request bodies over the limit get 413, whether they announce a Content-Length or not;
* API keys: llama-server's headers (Bearer, X-Api-Key), several keys, compared through
  ``hmac.compare_digest``;
* CORS as llama-server answers it, ``--metrics``/``--slots`` switches, and serve's refusal of
  llama-server flags it cannot honour yet.

Expected values are llama-server's documented behaviour (tools/server/README.md and its
server-http.cpp rules), not outputs of our own code.
"""

from __future__ import annotations

import threading
import types

import pytest
from test_server_units import FakeDecoder, FakeEngine, FakeTok, V

from jllama.engine.sampling import SamplingParams


@pytest.fixture
def fake_llm(monkeypatch):
    import jllama.tokenizer as jt

    monkeypatch.setattr(jt, "StreamDecoder", FakeDecoder, raising=False)
    return types.SimpleNamespace(engine=FakeEngine(4), tokenizer=FakeTok(),
                                 spec=types.SimpleNamespace(n_vocab=V, arch="fake"))


def _request(sch, prompt, n, constraint=None):
    from jllama.server.scheduler import GenRequest

    out, done, box = [], threading.Event(), {}

    def sink(ev):
        if ev.kind == "text":
            out.append(ev.text)
        else:
            box["ev"] = ev
            done.set()

    sch.submit(GenRequest(list(prompt), n, SamplingParams(temperature=1.0, seed=1), [], sink,
                          constraint))
    return out, done, box


class Exploding:
    """A constraint whose sampling raises after a few tokens (a grammar bug, say)."""

    def __init__(self, after: int):
        self.left = after
        self.done = False

    def pick(self, tok, logits, *a):
        if self.left == 0:
            raise RuntimeError("boom in sampling")
        self.left -= 1
        return tok

    def advance(self, tok):
        pass


def test_sampling_error_ends_only_its_request(fake_llm):
    from jllama.server.scheduler import Scheduler

    sch = Scheduler(fake_llm, max_queue=8)
    sch.start()
    try:
        runs = [_request(sch, [9, i], 20) for i in range(3)]
        bad = _request(sch, [5, 6], 20, Exploding(after=3))
        for _, done, _ in [*runs, bad]:
            assert done.wait(30)
        ev = bad[2]["ev"]
        assert ev.kind == "error" and ev.status == 500 and "boom in sampling" in ev.message
        for out, _, box in runs:  # its batch neighbours got every token they asked for
            assert box["ev"].kind == "done" and box["ev"].finish == "length" and len(out) == 20
        assert sch.dead is None and isinstance(sch.error, RuntimeError)
        later = _request(sch, [7], 5)  # and the server goes on serving
        assert later[1].wait(30) and later[2]["ev"].finish == "length"
    finally:
        sch.stop()


def _client(llm, **settings):
    from starlette.testclient import TestClient

    from jllama.server.app import ServerSettings, ServerState, create_app

    state = ServerState(llm, ServerSettings("fake", **settings))
    return state, TestClient(create_app(state, warmup=False))


def test_broken_scheduler_makes_health_503(fake_llm):
    from jllama.server.scheduler import MAX_FAILED_TURNS

    def broken_step(*a, **k):
        raise RuntimeError("device lost")

    fake_llm.engine.step = broken_step
    state, client = _client(fake_llm, timeout=30)
    with client:
        assert client.get("/health").status_code == 200
        for _ in range(MAX_FAILED_TURNS):  # each request fails in its own turn: 500
            r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4})
            assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        r = client.get("/health")
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4})
        assert r.status_code == 503  # refused at once, not queued forever
        assert state.scheduler.dead is not None


def test_request_body_limit(fake_llm):
    _, client = _client(fake_llm, max_body=1000)
    with client:
        big = {"prompt": "x" * 2000, "max_tokens": 1}
        assert client.post("/v1/completions", json=big).status_code == 413

        def chunks():  # no Content-Length: counted while it is read
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        r = client.post("/v1/completions", content=chunks(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        ok = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
        assert ok.status_code == 200


def test_api_keys_constant_time(fake_llm, monkeypatch):
    import jllama.server.app as app_mod

    calls = []
    real = app_mod.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_mod.hmac, "compare_digest", spy)
    _, client = _client(fake_llm, api_keys=["k-one", "k-two"])
    body = {"prompt": [5, 6], "max_tokens": 2}
    with client:
        assert client.get("/health").status_code == 200  # public, as llama-server's
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.post("/v1/completions", json=body,
                           headers={"Authorization": "Bearer k-on"}).status_code == 401
        assert client.post("/v1/completions", json=body,
                           headers={"Authorization": "Bearer k-two"}).status_code == 200
        assert client.post("/v1/completions", json=body,
                           headers={"X-Api-Key": "k-one"}).status_code == 200
        assert client.get("/v1/models").status_code == 401
    assert calls and all(isinstance(a, bytes) for a, _ in calls)
    # every key is compared, whichever matched: the time does not tell which one it was
    assert {b for _, b in calls} == {b"k-one", b"k-two"}


def test_cors_and_switches(fake_llm):
    _, client = _client(fake_llm, metrics=False, slots=False)
    pre = {"Origin": "web.mydomain.fr", "Access-Control-Request-Method": "POST"}
    with client:
        r = client.options("/completions", headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "web.mydomain.fr"
        assert r.headers["access-control-allow-credentials"] == "true"
        assert r.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
        assert r.headers["access-control-allow-headers"] == "*"
        assert client.get("/health", headers=pre).headers["access-control-allow-origin"] == \
            "web.mydomain.fr"
        assert client.get("/metrics").status_code == 501
        assert client.get("/slots").status_code == 501
    _, client = _client(fake_llm, cors_origins="localhost", metrics=True)
    with client:
        for origin, allowed in (("http://127.0.0.1:3000", True), ("http://[::1]", True),
                                ("http://localhost", True), ("http://evil.example", False)):
            r = client.options("/completions", headers={"Origin": origin})
            assert ("access-control-allow-origin" in r.headers) == allowed, origin
        text = client.get("/metrics").text
        assert "llamacpp:prompt_tokens_total" in text and "llamacpp:requests_processing" in text
        slots = client.get("/slots").json()
        assert [s["id"] for s in slots] == [0, 1, 2, 3] and not slots[0]["is_processing"]


@pytest.mark.parametrize("flag", [["--grp-attn-n", "4"], ["--models-dir", "d"],
                                  ["--hf-repo", "ggml-org/x"], ["-nocb"],
                                  ["--reasoning-format", "qwen"],
                                  ["--reasoning-budget", "-2"],
                                  ["--sleep-idle-seconds", "0"], ["-mmu", "http://x"]])
def test_serve_refuses_unbuilt_llama_server_flags(flag, capsys):
    from jllama.cli.main import main

    assert main(["serve", "-m", "smollm2-135m-instruct", *flag]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--chat-template-file", "/nonexistent/t.jinja"],
                                  ["--chat-template", "llama9"],
                                  ["--chat-template", "{% if %}"],
                                  ["--chat-template-kwargs", "[1]"], ["--reasoning", "maybe"]])
def test_serve_rejects_bad_chat_flags(flag, capsys):
    from jllama.cli.main import main

    assert main(["serve", "-m", "smollm2-135m-instruct", *flag]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err and "Traceback" not in err


def test_native_completion_shape_and_progress(fake_llm):
    """llama-server's /completion: its own fields, n_predict, and (stream + return_progress)
    a prompt_progress chunk before the prompt and after each chunk of it (tools/server
    README: 'return_progress')."""
    import json

    _, client = _client(fake_llm, metrics=True)
    with client:
        r = client.post("/completion", json={"prompt": [5, 6, 7], "n_predict": 4})
        b = r.json()
        assert r.status_code == 200 and b["stop"] is True and b["stop_type"] == "limit"
        assert b["tokens_predicted"] == 4 and b["timings"]["predicted_n"] == 4
        assert b["timings"]["prompt_n"] + b["timings"]["cache_n"] == 3
        with client.stream("POST", "/completion", json={
                "prompt": [5, 6, 7, 8], "n_predict": 2, "stream": True,
                "return_progress": True}) as resp:
            chunks = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: ")]
        prog = [c for c in chunks if "prompt_progress" in c]
        assert len(prog) >= 2 and prog[0]["timings"]["prompt_n"] == 0
        assert prog[-1]["prompt_progress"]["processed"] == 4 and chunks[-1]["stop"] is True
        text = client.get("/metrics")
        assert "Process-Start-Time-Unix" in text.headers
