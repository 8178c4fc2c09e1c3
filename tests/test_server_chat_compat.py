"""/v1/chat/completions behaviours that llama.cpp 0c1e570's server suite checks
(unit/test_chat_completion.py), on a tiny generated llama with a ChatML template:

* llama.cpp's built-in chat templates by name (``--chat-template llama3``, ``command-r``, ...):
  every name llama_chat_builtin_templates lists renders as llama_chat_apply_template does;
* streamed chunks carry ``timings`` with ``timings_per_token`` (the last chunk always), as
  server-task.cpp's to_json_oaicompat_chat[_stream] writes them; a whole answer carries them;
* ``verbose`` from the server's --verbose, on whole and streamed answers (``__verbose``);
* an assistant prefill / ``continue_final_message``: the rest of the conversation with its
  generation prompt, then the final message's text (parts joined by blank lines), as
  common_chat_templates_apply does; the refusals of oaicompat_chat_params_parse;
* an over-long prompt: 400 ``exceed_context_size_error`` with n_prompt_tokens and n_ctx (the
  slot's), on chat (streamed or not) and /completion;
* ``return_progress`` on a streamed chat: prompt_progress chunks.

Expected values: llama.cpp through llama-cpp-python (the built-in templates through
llama_chat_apply_template; generated text by greedy completion of the prompt written out by
hand) and llama-server's code and suite assertions, written out by hand below.
"""

# ruff: noqa: F811 - pytest fixtures imported from chatml_server are parameters here
from __future__ import annotations

import ctypes
import json

import pytest
from chatml_server import N, greedy, model, ref  # noqa: F401 - fixtures
from llamacpp_oracle import chatml, llama_cpp_module

CTX = 512

CONVS = [
    [{"role": "system", "content": " You are a test. "}, {"role": "user", "content": "Hi\n"},
     {"role": "assistant", "content": "  Hello! \n"}, {"role": "user", "content": "Who?"}],
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "tool", "content": "t"}, {"role": "function", "content": "f"},
     {"role": "user", "content": "ünïcode ✓"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"},
     {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}],
]


def _oracle_template(lc, name: str, msgs: list[dict], add: bool) -> str:
    arr = (lc.llama_chat_message * len(msgs))()
    keep = []
    for i, m in enumerate(msgs):
        r, c = m["role"].encode(), m["content"].encode()
        keep += [r, c]
        arr[i].role, arr[i].content = r, c
    buf = ctypes.create_string_buffer(1 << 16)
    n = lc.llama_chat_apply_template(name.encode(), arr, len(msgs), add, buf, len(buf))
    assert 0 <= n <= len(buf), (name, n)
    return buf.raw[:n].decode()


def test_builtin_templates_render_as_llamacpp():
    from jllama.tokenizer.chat import render_chat
    from jllama.tokenizer.chat_builtin import BUILTIN_TEMPLATES

    lc = llama_cpp_module()
    n = lc.llama_chat_builtin_templates(None, 0)
    out = (ctypes.c_char_p * n)()
    lc.llama_chat_builtin_templates(out, n)
    names = sorted(x.decode() for x in out)
    assert names == sorted(BUILTIN_TEMPLATES)
    for name in names:
        for conv in CONVS:
            for add in (True, False):
                assert render_chat(name, conv, add) == _oracle_template(lc, name, conv, add), \
                    (name, conv, add)


def test_serve_takes_builtin_template_names():
    from jllama.cli.main import build_parser
    from jllama.cli.serve import _chat_flags
    from jllama.errors import ConfigError

    p = build_parser()
    for name in ("llama3", "command-r", "gemma", "mistral-v7", "deepseek3"):
        _, tmpl = _chat_flags(p.parse_args(["serve", "-m", "m.gguf", "--chat-template", name]))
        assert tmpl == name
    with pytest.raises(ConfigError, match="built-in templates"):
        _chat_flags(p.parse_args(["serve", "-m", "m.gguf", "--chat-template", "nope"]))
    assert p.parse_args(["serve", "-m", "m.gguf", "--verbose"]).verbose


@pytest.fixture(scope="module")
def srv(model):
    import httpx

    from jllama.api import Llama
    from jllama.server.app import ServerSettings, ServerState, ServerThread

    llm = Llama(model, ctx_size=CTX, n_slots=1)
    # the server's --verbose: every request's 'verbose' defaults to true
    state = ServerState(llm, ServerSettings("tiny", timeout=120, defaults={"verbose": True}))
    with ServerThread(state) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        s.http = c
        s.llm = llm
        yield s


def _chunks(r) -> list[dict]:
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.strip().split("\n\n"):
        assert block.startswith("data: ")
        if block != "data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


def test_timings_and_verbose(srv, ref):
    msgs = [{"role": "user", "content": "test"}]
    ids, want = greedy(ref, chatml(("user", "test")))
    body = {"messages": msgs, "max_tokens": N, "temperature": 0}
    r = srv.http.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"] == want["choices"][0]["text"]
    assert r["timings"]["predicted_n"] == N and r["timings"]["prompt_n"] == len(ids)
    assert r["__verbose"]["content"] == want["choices"][0]["text"]  # --verbose's default
    assert r["__verbose"]["tokens_evaluated"] == len(ids)
    assert "__verbose" not in srv.http.post("/v1/chat/completions",
                                            json={**body, "verbose": False}).json()
    ch = _chunks(srv.http.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True},
        "timings_per_token": True}))
    assert ch[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert "timings" not in ch[0]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in ch if c["choices"])
    assert text == want["choices"][0]["text"]
    for c in ch[1:]:
        if c["choices"]:
            assert "role" not in c["choices"][0]["delta"]
            if c["choices"][0]["delta"].get("content"):  # a token's chunk
                assert "predicted_per_second" in c["timings"]
    assert ch[-1]["choices"] == [] and ch[-1]["timings"]["predicted_n"] == N
    assert ch[-1]["usage"]["completion_tokens"] == N
    # the final group's first chunk (here the finish chunk) carries __verbose
    fin = [c for c in ch if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(fin) == 1 and fin[0]["__verbose"]["tokens_predicted"] == N
    # without timings_per_token only the last chunk carries them
    ch = _chunks(srv.http.post("/v1/chat/completions", json={**body, "stream": True}))
    assert [("timings" in c) for c in ch] == [False] * (len(ch) - 1) + [True]


def test_assistant_prefill(srv, ref):
    base = [{"role": "system", "content": "Book"},
            {"role": "user", "content": "What is the best book"}]
    prompt = chatml(("system", "Book"), ("user", "What is the best book"))
    for prefill, text, extra in [
            ("Whill", "Whill", {}),
            ([{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}], "Wh\n\nill", {}),
            ("Whill", "Whill", {"add_generation_prompt": False,
                                "continue_final_message": True})]:
        # (llama-cpp-python's decode fails on these prompts with this tiny model: "failed to
        # find a memory slot", so the oracle here is its tokenizer, not its completion)
        ids = ref.tokenize((prompt + text).encode(), add_bos=False, special=True)
        r = srv.http.post("/v1/chat/completions", json={
            "messages": base + [{"role": "assistant", "content": prefill}], "max_tokens": N,
            "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        r = r.json()
        assert r["__verbose"]["prompt"].endswith(
            "<|im_start|>user\nWhat is the best book<|im_end|>\n<|im_start|>assistant\n" + text)
        assert r["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("messages,extra,words", [
    # the suite's messages7 (prefill_assistant refuses two assistant turns at the end)
    ([{"role": "user", "content": "t"}, {"role": "assistant", "content": "t"},
      {"role": "assistant", "content": "t"}], {},
     "Cannot have 2 or more assistant messages at the end of the list."),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     {"add_generation_prompt": True, "continue_final_message": True},
     "Cannot set both add_generation_prompt and continue_final_message to true."),
    ([{"role": "user", "content": "Hi"}], {"continue_final_message": True},
     "Cannot set both add_generation_prompt and continue_final_message to true."),
])
def test_continuation_refusals(srv, messages, extra, words):
    r = srv.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                    **extra})
    assert r.status_code == 400 and r.json()["error"]["message"] == words


def test_context_size_exceeded(srv):
    msgs = [{"role": "system", "content": "Book"},
            {"role": "user", "content": "What is the best book"}] * 100
    for path, body in [("/v1/chat/completions", {"messages": msgs}),
                       ("/v1/chat/completions", {"messages": msgs, "stream": True}),
                       ("/completion", {"prompt": "word " * CTX}),
                       ("/v1/completions", {"prompt": "word " * CTX, "stream": True})]:
        r = srv.http.post(path, json=body)
        assert r.status_code == 400, path
        e = r.json()["error"]
        assert e["type"] == "exceed_context_size_error" and e["code"] == 400
        assert e["n_ctx"] == CTX and e["n_prompt_tokens"] > CTX
        assert e["message"] == (f"request ({e['n_prompt_tokens']} tokens) exceeds the "
                                f"available context size ({CTX} tokens), try increasing it")


def test_return_progress(srv):
    ch = _chunks(srv.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "This is a test" * 10}], "max_tokens": 4,
        "stream": True, "return_progress": True, "cache_prompt": False}))
    prog = [c["prompt_progress"] for c in ch if "prompt_progress" in c]
    assert prog, ch
    assert prog[0]["total"] > 0 and prog[0]["cache"] == prog[0]["processed"]
    assert prog[-1]["processed"] == prog[-1]["total"]
    assert all(a["processed"] < b["processed"] for a, b in zip(prog, prog[1:]))
    for c in ch:  # llama-server: a progress chunk repeats the role delta
        if "prompt_progress" in c:
            assert c["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_apply_template_with_builtin_name(srv):
    """The suite's test_apply_chat_template (--chat-template command-r), its expected text."""
    tk = srv.llm.tokenizer
    saved, tk.chat_template = tk.chat_template, "command-r"
    try:
        r = srv.http.post("/apply-template", json={"messages": [
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": "Hi there"}]})
    finally:
        tk.chat_template = saved
    assert r.json()["prompt"] == (
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a test.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")


def test_resumable_stream(srv):
    """llama-server's resumable streams on a single-model server (server-stream.cpp): a
    streamed answer with X-Conversation-Id replays byte for byte from GET /v1/stream, from any
    offset; DELETE stops and drops it (204, idempotent); then 404. Missing id: 400."""
    conv = "conv-1::org/model"
    qs = "conv_id=conv-1%3A%3Aorg%2Fmodel"
    r = srv.http.post("/v1/chat/completions", headers={"X-Conversation-Id": conv}, json={
        "messages": [{"role": "user", "content": "test"}], "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    g = srv.http.get(f"/v1/stream?{qs}&from=0")
    assert g.status_code == 200 and g.text == r.text
    assert srv.http.get(f"/v1/stream?{qs}&from=6").text == r.text[6:]
    assert srv.http.post("/v1/streams/lookup", json={"conversation_ids": ["conv-1"]}).json()[0][
        "total_bytes"] == len(r.content)
    assert srv.http.delete(f"/v1/stream?{qs}").status_code == 204
    assert srv.http.delete(f"/v1/stream?{qs}").status_code == 204
    assert srv.http.get(f"/v1/stream?{qs}&from=0").status_code == 404
    assert srv.http.get("/v1/stream").status_code == 400
