"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) as llama-server
0c1e570 serves it, on a tiny generated llama with a ChatML template.

Expected values: generated text and token counts from llama.cpp (llama-cpp-python, greedy, on
the ChatML prompt written out by hand); the request conversion and the answer's shape as
llama-server's code has them (``server_chat_convert_anthropic_to_oai`` in server-chat.cpp,
``to_json_anthropic[_stream]`` in server-task.cpp), written out by hand below.
"""

# ruff: noqa: F811 - pytest fixtures imported from chatml_server are parameters here
from __future__ import annotations

import json

import pytest
from chatml_server import N, greedy, model, ref  # noqa: F401 - fixtures
from llamacpp_oracle import chatml

KEY = "sk-ant-test"
@pytest.fixture(scope="module")
def srv(model):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(model, ctx_size=512, n_slots=1)
    state = ServerState(llm, ServerSettings("tiny", api_key=KEY, timeout=120))
    with ServerThread(state) as s, httpx.Client(base_url=s.url, timeout=120,
                                                headers={"x-api-key": KEY}) as c:
        s.http = c
        yield s


def _events(r) -> list[tuple[str, dict]]:
    """(event, data) pairs of an SSE body; each data's type must repeat its event name."""
    out = []
    for block in r.text.strip().split("\n\n"):
        lines = dict(ln.split(": ", 1) for ln in block.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


def test_conversion_is_llama_servers():
    """server_chat_convert_anthropic_to_oai: system blocks joined (the billing header's cch
    stamp written as fffff), text/image blocks kept as OpenAI parts, tool_use -> tool_calls
    (input as JSON text), tool_result -> a tool message after its turn (text joined), thinking
    -> reasoning_content, tools' input_schema -> parameters, tool_choice any/tool -> required,
    stop_sequences -> stop, max_tokens 4096 when missing, only temperature/top_p/top_k/stream/
    chat_template_kwargs passed through."""
    from jllama.server import anthropic

    got = anthropic.to_chat({
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1; cch=a5145;Hi"},
                   {"type": "text", "text": " there"}, {"type": "image"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "image", "source": {
                                             "type": "base64", "media_type": "image/png",
                                             "data": "QUJD"}}]},
            {"role": "assistant"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "res:"},
                {"type": "tool_result", "tool_use_id": "t1",
                 "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}]},
                {"type": "tool_result", "tool_use_id": "t2"}]}],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}},
                  {"name": "g"}],
        "tool_choice": {"type": "tool", "name": "f"}, "stop_sequences": ["END"],
        "temperature": 0.5, "top_k": 3, "metadata": {"user_id": "u"}, "seed": 4})
    assert got == {
        "messages": [
            {"role": "system", "content": "x-anthropic-billing-header: cc=1; cch=fffff;Hi there"},
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "image_url", "image_url": {
                                             "url": "data:image/png;base64,QUJD"}}]},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "t1", "type": "function",
                             "function": {"name": "f", "arguments": '{"x": 1}'}}],
             "reasoning_content": "hmm"},
            {"role": "user", "content": [{"type": "text", "text": "res:"}]},
            {"role": "tool", "tool_call_id": "t1", "content": "42"},
            {"role": "tool", "tool_call_id": "t2", "content": ""}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                                    "parameters": {"type": "object"}}},
                  {"type": "function", "function": {"name": "g", "description": "",
                                                    "parameters": {}}}],
        "tool_choice": "required", "stop": ["END"], "max_tokens": 4096,
        "temperature": 0.5, "top_k": 3}


def test_message_is_llamacpps_greedy_text(srv, ref):
    ids, want = greedy(ref, chatml(("system", "Be brief. Really."), ("user", "Say hello")))
    r = srv.http.post("/v1/messages", json={
        "model": "x", "max_tokens": N, "temperature": 0,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Really."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say "},
                                                  {"type": "text", "text": "hello"}]}]})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["id"].startswith("chatcmpl-") and d["type"] == "message"
    assert d["role"] == "assistant" and d["model"] == "tiny"
    assert d["content"] == [{"type": "text", "text": want["choices"][0]["text"]}]
    assert want["choices"][0]["finish_reason"] == "length"
    assert d["stop_reason"] == "max_tokens" and d["stop_sequence"] is None
    u = d["usage"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] == len(ids)
    assert u["output_tokens"] == want["usage"]["completion_tokens"]
    assert "timings" not in d


def test_stop_sequence_ends_the_turn(srv, ref):
    _, want = greedy(ref, chatml(("user", "Count to 10")), 16)
    text = want["choices"][0]["text"]
    stop = text[4:8]  # text the model writes; the content ends before its first occurrence
    assert text.index(stop) > 0  # some content before it
    r = srv.http.post("/v1/messages", json={
        "max_tokens": 16, "temperature": 0, "stop_sequences": [stop],
        "messages": [{"role": "user", "content": "Count to 10"}]})
    d = r.json()
    assert d["stop_reason"] == "end_turn" and d["stop_sequence"] == stop
    head = text[:text.index(stop)]
    assert d["content"] == ([{"type": "text", "text": head}] if head else [])


def test_stream_events_are_llama_servers(srv, ref):
    ids, want = greedy(ref, chatml(("user", "Say hello")))
    r = srv.http.post("/v1/messages", json={
        "max_tokens": N, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "Say hello"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = _events(r)
    kinds = [k for k, _ in evs]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    m = evs[0][1]["message"]
    assert m["content"] == [] and m["stop_reason"] is None and m["role"] == "assistant"
    assert m["usage"]["input_tokens"] + m["usage"]["cache_read_input_tokens"] == len(ids)
    assert m["usage"]["output_tokens"] == 0
    assert evs[1][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}
    deltas = [d for k, d in evs if k == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == want["choices"][0]["text"]
    assert evs[-3][1] == {"type": "content_block_stop", "index": 0}
    assert evs[-2][1] == {"type": "message_delta",
                          "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                          "usage": {"output_tokens": want["usage"]["completion_tokens"]}}
    assert not r.text.rstrip().endswith("[DONE]")


def test_count_tokens_is_llamacpps_count(srv, ref):
    ids = ref.tokenize(chatml(("system", "You are terse."), ("user", "Hello world")).encode(),
                       add_bos=False, special=True)
    r = srv.http.post("/v1/messages/count_tokens", json={
        "model": "x", "system": "You are terse.",
        "messages": [{"role": "user", "content": "Hello world"}]})
    assert r.status_code == 200
    assert r.json() == {"input_tokens": len(ids)}  # nothing else (no 'object' here)


def test_empty_messages_and_tool_turns_are_accepted(srv, ref):
    ids, want = greedy(ref, "<|im_start|>assistant\n")
    d = srv.http.post("/v1/messages", json={"max_tokens": N, "temperature": 0,
                                            "messages": []}).json()
    assert d["type"] == "message"
    assert d["usage"]["input_tokens"] + d["usage"]["cache_read_input_tokens"] == len(ids)
    r = srv.http.post("/v1/messages", json={"max_tokens": 4, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "w",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "is_error": True, "content": "not found"}]}]})
    assert r.status_code == 200 and r.json()["type"] == "message"


def test_image_without_projector_is_500(srv):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    r = srv.http.post("/v1/messages", json={"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": png}},
            {"type": "text", "text": "What is this?"}]}]})
    assert r.status_code == 500
    assert "image input is not supported" in r.json()["error"]["message"]


def test_missing_messages_and_api_key(srv):
    assert srv.http.post("/v1/messages", json={"max_tokens": 4}).status_code == 500
    r = srv.http.post("/v1/messages", headers={"x-api-key": "wrong"},
                      json={"max_tokens": 1, "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 401


def test_forced_tool_use(srv):
    """tool_choice any with one tool: jllama forces that tool's call (JSON arguments
    constrained by its input_schema); the answer is a tool_use block, stop_reason tool_use
    when the arguments close."""
    tool = {"name": "calc", "description": "math",
            "input_schema": {"type": "object", "properties": {"e": {"enum": ["1+1", "2"]}},
                             "required": ["e"], "additionalProperties": False}}
    body = {"max_tokens": 40, "temperature": 0, "tools": [tool],
            "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": "2+2?"}]}
    d = srv.http.post("/v1/messages", json=body).json()
    assert d["stop_reason"] == "tool_use"
    assert [b["type"] for b in d["content"]] == ["tool_use"]
    assert d["content"][0]["name"] == "calc" and d["content"][0]["input"]["e"] in ("1+1", "2")
    evs = _events(srv.http.post("/v1/messages", json={**body, "stream": True}))
    starts = [d for k, d in evs if k == "content_block_start"]
    stops = [d["index"] for k, d in evs if k == "content_block_stop"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    assert starts[0]["index"] == 0 and stops == [0]
    args = "".join(d["delta"]["partial_json"] for k, d in evs if k == "content_block_delta")
    assert json.loads(args) == d["content"][0]["input"]
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"
