"""llama-server 0c1e570's counts and response shapes that depend on how it runs a request,
on a tiny generated llama with a ChatML template (two slots):

* generated tokens: llama-server counts every token it samples (server-context.cpp: n_gen
  grows before process_token looks at the token), so the end-of-generation token that stops
  a request is in tokens_predicted, timings.predicted_n and usage.completion_tokens;
* ``n`` > 1 (n_cmpl child tasks): a whole answer is the first task's result with the other
  choices appended (its usage and timings are the first choice's); a stream ends each choice
  with its own finish chunk, usage chunk (include_usage) and timings; /v1/completions answers
  carry timings, and usage on the final chunk of a stream;
* --no-jinja: the conversation rendered by llama.cpp's built-in template that the model's
  template selects (an assistant prefill as a whole message), tools refused with a 500.

Expected values: llama-server's rules (server-context.cpp process_token / send_final_response,
server-task.cpp to_json_*, server-common.cpp oaicompat_chat_params_parse) written out by hand,
llama_chat_apply_template (llama-cpp-python) for the --no-jinja prompts and greedy completion
by llama-cpp-python for the text.
"""

# ruff: noqa: F811 - pytest fixtures imported from chatml_server are parameters here
from __future__ import annotations

import json

import pytest
from chatml_server import N, greedy, model, ref  # noqa: F401 - fixtures
from llamacpp_oracle import chatml, llama_cpp_module
from test_chat_legacy import _oracle

CTX = 512


def _server(model, **settings):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(model, ctx_size=CTX, n_slots=2)
    state = ServerState(llm, ServerSettings("tiny", timeout=120, **settings))
    s = ServerThread(state, warmup=False)
    s.__enter__()
    s.http = httpx.Client(base_url=s.url, timeout=120)
    s.llm = llm
    return s


@pytest.fixture(scope="module")
def srv(model):
    s = _server(model)
    yield s
    s.http.close()
    s.__exit__(None, None, None)


def _chunks(r) -> list[dict]:
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.strip().split("\n\n"):
        assert block.startswith("data: ")
        if block != "data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


def test_end_of_generation_token_is_counted(srv):
    eos = srv.llm.tokenizer.eos_id
    assert srv.llm.tokenizer.is_eog(eos)
    bias = {"logit_bias": [[eos, 100.0]], "temperature": 0}
    # the first token drawn ends the request: one token generated, no text
    r = srv.http.post("/completion", json={"prompt": "hi", "n_predict": 5, **bias}).json()
    assert (r["content"], r["stop_type"]) == ("", "eos")
    assert r["tokens_predicted"] == 1 and r["timings"]["predicted_n"] == 1
    ch = _chunks(srv.http.post("/completion", json={"prompt": "hi", "n_predict": 5,
                                                    "stream": True, **bias}))
    assert ch[-1]["stop"] and ch[-1]["tokens_predicted"] == 1
    assert ch[-1]["timings"]["predicted_n"] == 1
    r = srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, **bias}).json()
    assert r["usage"]["completion_tokens"] == 1 and r["timings"]["predicted_n"] == 1
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 1
    msgs = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **bias}
    r = srv.http.post("/v1/chat/completions", json=msgs).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 1 and r["timings"]["predicted_n"] == 1
    ch = _chunks(srv.http.post("/v1/chat/completions", json={
        **msgs, "stream": True, "stream_options": {"include_usage": True}}))
    assert ch[-1]["usage"]["completion_tokens"] == 1 and ch[-1]["timings"]["predicted_n"] == 1
    # a limit counts the tokens it allowed, as before
    r = srv.http.post("/completion", json={"prompt": "hi", "n_predict": 3,
                                           "temperature": 0}).json()
    assert r["stop_type"] == "limit" and r["tokens_predicted"] == 3


def test_stream_chunks_carry_their_token_ids(srv, ref):
    # llama-server's partial results: the sampled token's id in "tokens" (send_partial_response)
    ids, want = greedy(ref, "hello")
    ch = _chunks(srv.http.post("/completion", json={"prompt": "hello", "n_predict": N,
                                                    "temperature": 0, "stream": True}))
    parts = [c for c in ch if not c["stop"]]
    assert all(c["tokens"] and all(isinstance(t, int) for t in c["tokens"]) for c in parts)
    toks = [t for c in parts for t in c["tokens"]]
    assert len(toks) == N == ch[-1]["tokens_predicted"]
    assert ref.detokenize(toks).decode(errors="replace") == want["choices"][0]["text"]


def test_n_choices_usage_and_timings(srv, ref):
    msgs = [{"role": "user", "content": "test"}]
    ids, want = greedy(ref, chatml(("user", "test")))
    text = want["choices"][0]["text"]
    body = {"messages": msgs, "max_tokens": N, "temperature": 0, "n": 2}
    r = srv.http.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in r["choices"]] == [text, text]
    assert [c["index"] for c in r["choices"]] == [0, 1]
    # the first task's result: one choice's tokens, not the sum
    assert r["usage"]["completion_tokens"] == N and r["usage"]["prompt_tokens"] == len(ids)
    assert r["timings"]["predicted_n"] == N
    ch = _chunks(srv.http.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True},
        "return_progress": True}))
    for i in range(2):
        mine = [c for c in ch if c["choices"] and c["choices"][0]["index"] == i]
        assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": None}
                   for c in mine if "prompt_progress" in c)
        assert mine[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in mine) == text
        # with return_progress the role chunk comes after the progress, with the first token
        first = next(k for k, c in enumerate(mine) if "prompt_progress" not in c)
        assert mine[first]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        progress = [c["prompt_progress"] for c in mine if "prompt_progress" in c]
        assert progress and progress[-1]["processed"] == progress[-1]["total"] == len(ids)
        if i > 0:  # a child: one chunk, after its copy of the first's prompt
            assert len(progress) == 1
    usage = [c for c in ch if not c["choices"]]
    assert len(usage) == 2  # one per choice, each right after its finish chunk
    for u in usage:
        assert u["usage"]["completion_tokens"] == N and u["timings"]["predicted_n"] == N
    ends = [k for k, c in enumerate(ch) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [k + 1 for k in ends] == [k for k, c in enumerate(ch) if not c["choices"]]
    # without include_usage: the timings ride on each finish chunk
    ch = _chunks(srv.http.post("/v1/chat/completions", json={**body, "stream": True}))
    ends = [c for c in ch if c["choices"][0]["finish_reason"]]
    assert len(ends) == 2 and all(c["timings"]["predicted_n"] == N for c in ends)
    assert all("usage" not in c for c in ch)


def test_completions_timings_and_final_usage(srv, ref):
    ids, want = greedy(ref, "hello")
    body = {"prompt": "hello", "max_tokens": N, "temperature": 0}
    r = srv.http.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == want["choices"][0]["text"]
    assert r["timings"]["predicted_n"] == N and r["usage"]["completion_tokens"] == N
    # a stream's final chunk: the finish, usage and timings (with or without include_usage)
    ch = _chunks(srv.http.post("/v1/completions", json={**body, "stream": True}))
    assert ch[-1]["choices"][0]["finish_reason"] == "length"
    assert ch[-1]["usage"]["completion_tokens"] == N and ch[-1]["timings"]["predicted_n"] == N
    assert all("usage" not in c for c in ch[:-1])
    r = srv.http.post("/v1/completions", json={**body, "n": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["completion_tokens"] == N and r["timings"]["predicted_n"] == N
    ch = _chunks(srv.http.post("/v1/completions", json={**body, "n": 2, "stream": True}))
    ends = [c for c in ch if c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in ends) == [0, 1]
    assert all(c["usage"]["completion_tokens"] == N and c["timings"]["predicted_n"] == N
               for c in ends)


@pytest.mark.oracle
def test_no_jinja_renders_builtin_template(model, ref):
    s = _server(model, jinja=False)
    lc = llama_cpp_module()
    try:
        tmpl = s.llm.tokenizer.chat_template
        convs = [
            [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
            [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "The answer"}],
        ]
        for conv in convs:
            # a prefill renders the assistant message whole, without a generation prompt
            add = conv[-1]["role"] != "assistant"
            got = s.http.post("/apply-template", json={"messages": conv}).json()["prompt"]
            assert got == _oracle(lc, tmpl, conv, add)
        # content parts: joined by newlines (common_chat_templates_apply_legacy)
        parts = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                              {"type": "text", "text": "two"}]}]
        got = s.http.post("/apply-template", json={"messages": parts}).json()["prompt"]
        assert got == _oracle(lc, tmpl, [{"role": "user", "content": "one\ntwo"}], True)
        # the reply: greedy completion of that prompt
        msgs = [{"role": "user", "content": "test"}]
        _, want = greedy(ref, _oracle(lc, tmpl, msgs, True))
        r = s.http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": N,
                                                      "temperature": 0}).json()
        assert r["choices"][0]["message"]["content"] == want["choices"][0]["text"]
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        for extra, what in (({"tools": tools}, "tools"), ({"tool_choice": "none"}, "tool_choice")):
            r = s.http.post("/v1/chat/completions", json={"messages": msgs, **extra})
            assert r.status_code == 500
            assert r.json()["error"]["message"] == f"{what} param requires --jinja flag"
    finally:
        s.http.close()
        s.__exit__(None, None, None)


def test_no_jinja_refuses_unknown_template_at_start():
    from jllama.cli.serve import _check_legacy_template
    from jllama.errors import ConfigError

    _check_legacy_template(None)  # no template: ChatML, as llama-server
    _check_legacy_template("{{ '<start_of_turn>' }}")
    with pytest.raises(ConfigError, match="--no-jinja"):
        _check_legacy_template("{{ messages }}")


def test_n_choices_are_child_tasks(srv):
    # server_task::add_child: child k samples with seed + k and takes any free slot
    body = {"prompt": "hello", "max_tokens": N, "temperature": 1.0, "top_k": 0, "seed": 42}
    single = [srv.http.post("/v1/completions", json={**body, "seed": 42 + k}).json()
              for k in range(2)]
    two = srv.http.post("/v1/completions", json={**body, "n": 2, "id_slot": 1}).json()
    assert [c["text"] for c in two["choices"]] == [r["choices"][0]["text"] for r in single]
    assert single[0]["choices"][0]["text"] != single[1]["choices"][0]["text"]
    # /completion: a list of results, the first task's then its children's
    nat = srv.http.post("/completion", json={"prompt": "hello", "n_predict": N,
                                             "temperature": 1.0, "top_k": 0, "seed": 42,
                                             "n": 2}).json()
    assert [r["index"] for r in nat] == [0, 1]
    assert [r["content"] for r in nat] == [r["choices"][0]["text"] for r in single]
    assert all(r["tokens_predicted"] == N for r in nat)
    assert [r["generation_settings"]["seed"] for r in nat] == [42, 43]
    # streamed: the choices' partial results interleaved, each with its index
    ch = _chunks(srv.http.post("/completion", json={"prompt": "hello", "n_predict": N,
                                                    "temperature": 1.0, "top_k": 0, "seed": 42,
                                                    "n": 2, "stream": True}))
    for k in range(2):
        mine = [c for c in ch if c["index"] == k]
        assert "".join(c["content"] for c in mine) == nat[k]["content"]
        assert [c["stop"] for c in mine][-1] and not any(c["stop"] for c in mine[:-1])
        assert mine[-1]["tokens_predicted"] == N
    r = srv.http.post("/completion", json={"prompt": "hello", "n": 3})
    assert r.status_code == 400  # n_cmpl's hard limit: the slot count, in llama-server's words
    assert r.json()["error"]["message"] == "Field 'n': Value must be between 1 <= value <= 2, " \
        "but got 3"
