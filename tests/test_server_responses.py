"""OpenAI's Responses API (``/v1/responses``, ``/v1/responses/input_tokens``) as llama-server
0c1e570 serves it, on a tiny generated llama with a ChatML template, through the real
``openai`` client and raw HTTP.

Expected values: generated text and token counts from llama.cpp (llama-cpp-python, greedy, on
the ChatML prompt written out by hand); the request conversion and the events as llama-server's
code has them (``server_chat_convert_responses_to_chatcmpl`` in server-chat.cpp,
``to_json_oaicompat_resp[_stream]`` in server-task.cpp), written out by hand below.
"""

# ruff: noqa: F811 - pytest fixtures imported from chatml_server are parameters here
from __future__ import annotations

import json

import pytest
from chatml_server import N, greedy, model, ref  # noqa: F401 - fixtures
from llamacpp_oracle import chatml


@pytest.fixture(scope="module")
def srv(model):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(model, ctx_size=256, n_slots=1)
    state = ServerState(llm, ServerSettings("tiny", timeout=120))
    with ServerThread(state) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        s.http = c
        yield s


@pytest.fixture(scope="module")
def client(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_conversion_is_llama_servers():
    """server_chat_convert_responses_to_chatcmpl: instructions -> a system message first; a
    string content -> one input_text part; input_text/input_image -> text/image_url parts;
    an assistant output message merges into an assistant turn just before it; function_call ->
    tool_calls (merged likewise); function_call_output -> a tool message; function tools
    unwrapped with strict true unless given, other tools dropped; max_output_tokens ->
    max_tokens; reasoning.effort -> reasoning_effort; every other field passed through."""
    from jllama.server import responses

    got = responses.to_chat({
        "instructions": "Be kind.", "temperature": 0.3, "max_output_tokens": 5,
        "reasoning": {"effort": "low"},
        "tools": [{"type": "function", "name": "f", "parameters": {}},
                  {"type": "web_search"}],
        "input": [
            {"role": "user", "content": "hi"},
            {"role": "developer", "type": "message", "status": "x",
             "content": [{"type": "input_text", "text": "a"},
                         {"type": "input_image", "image_url": "http://i/x.png"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "message", "role": "assistant", "id": "m1",
             "content": [{"type": "output_text", "text": "ok"}]},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c2", "output": "42"}]})
    assert got == {
        "temperature": 0.3, "max_tokens": 5, "reasoning_effort": "low",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {},
                                                    "strict": True}}],
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": [{"text": "hi", "type": "text"}]},
            {"role": "developer", "content": [
                {"text": "a", "type": "text"},
                {"image_url": {"url": "http://i/x.png"}, "type": "image_url"}]},
            {"role": "assistant", "content": [{"text": "ok", "type": "text"}],
             "tool_calls": [
                 {"function": {"arguments": "{}", "name": "f"}, "id": "c1", "type": "function"},
                 {"function": {"arguments": "{\"a\":1}", "name": "f"}, "id": "c2",
                  "type": "function"}]},
            {"content": "42", "role": "tool", "tool_call_id": "c2"}]}


@pytest.mark.parametrize("body,message", [
    ({}, "'input' is required"),
    ({"input": "a", "previous_response_id": "resp_1"},
     "llama.cpp does not support 'previous_response_id'."),
    ({"input": 3}, "'input' must be a string or array of objects"),
    ({"input": [{"foo": 1}]}, "Cannot determine type of 'item'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "'input_file' is not supported by llamacpp at this moment"),
])
def test_bad_requests_are_400(srv, body, message):
    r = srv.http.post("/v1/responses", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message


def test_response_is_llamacpps_greedy_text(client, ref):
    ids, want = greedy(ref, chatml(("system", "Book"), ("user", "What is the best book")))
    res = client.responses.create(model="gpt-4.1", max_output_tokens=N, temperature=0,
                                  input=[{"role": "system", "content": "Book"},
                                         {"role": "user", "content": "What is the best book"}])
    assert res.id.startswith("resp_") and res.object == "response"
    assert res.status == "completed" and res.model == "tiny"
    assert len(res.output) == 1 and res.output[0].id.startswith("msg_")
    assert res.output_text == want["choices"][0]["text"]
    assert res.usage.input_tokens == len(ids)
    assert res.usage.output_tokens == want["usage"]["completion_tokens"]
    assert res.usage.total_tokens == len(ids) + want["usage"]["completion_tokens"]


def test_stream_events_are_llama_servers(client, ref):
    _, want = greedy(ref, chatml(("system", "Be brief."), ("user", "Say hello")))
    kinds, text, ids = [], "", set()
    for ev in client.responses.create(model="x", instructions="Be brief.", input="Say hello",
                                      max_output_tokens=N, temperature=0, stream=True):
        kinds.append(ev.type)
        if ev.type in ("response.created", "response.in_progress", "response.completed"):
            ids.add(ev.response.id)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type == "response.completed":
            done = ev.response
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert len(ids) == 1 and ids.pop().startswith("resp_")
    assert text == done.output_text == want["choices"][0]["text"]
    assert done.output[0].id.startswith("msg_")


def test_stream_telemetry(srv):
    """llama-server's extensions: return_progress adds response.in_progress events with
    prompt_progress; timings_per_token puts timings on the deltas; response.completed
    always carries timings."""
    r = srv.http.post("/responses", json={"input": "This is a test" * 5, "max_output_tokens": 4,
                                          "temperature": 0, "stream": True,
                                          "timings_per_token": True, "return_progress": True})
    assert r.status_code == 200
    evs = []
    for block in r.text.strip().split("\n\n"):
        lines = dict(ln.split(": ", 1) for ln in block.split("\n"))
        d = json.loads(lines["data"])
        assert d["type"] == lines["event"]
        evs.append(d)
    prog = [d for d in evs if "prompt_progress" in d]
    assert prog and all(d["type"] == "response.in_progress" for d in prog)
    assert prog[-1]["prompt_progress"]["processed"] == prog[-1]["prompt_progress"]["total"]
    deltas = [d for d in evs if d["type"] == "response.output_text.delta"]
    assert deltas and all("predicted_per_second" in d["timings"] for d in deltas)
    assert evs[-1]["type"] == "response.completed" and "prompt_per_second" in evs[-1]["timings"]


def test_input_tokens_is_llamacpps_count(srv, ref):
    ids = ref.tokenize(chatml(("system", "x"), ("user", "Hello world")).encode(),
                       add_bos=False, special=True)
    r = srv.http.post("/v1/responses/input_tokens",
                      json={"instructions": "x", "input": "Hello world"})
    assert r.json() == {"input_tokens": len(ids), "object": "response.input_tokens"}
