"""Reasoning and tool-call formats (jllama/server/chat_formats.py) against llama.cpp's own
expected values.

Two sources, both llama.cpp 0c1e570's:
- tests/data/llamacpp_chat_formats.json: what libllama-common's common_chat_templates_apply
  rendered (prompt, generation prompt) and common_chat_parse returned for each model output,
  for llama.cpp's models/templates/*.jinja (recorded by experiments/chat_format_oracle.py);
- PORTED: cases of llama.cpp's tests/test-chat.cpp (test_template_output_peg_parsers), named
  by their template block there, compared as that test compares (whitespace-stripped content
  and reasoning, arguments as normalised JSON).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import testdata

from jllama.server import chat_formats as cf
from jllama.tokenizer.chat import render_chat

DATA = json.loads((Path(__file__).parent / "data" / "llamacpp_chat_formats.json").read_text())
TOOL = DATA["tool"]
USER = [{"role": "user", "content": "Hey there!"}]


def template(name: str) -> str:
    return (testdata.chat_templates_dir() / f"{name}.jinja").read_text()


def render(name: str, tools: bool, enable_thinking: bool, gen: bool = True) -> str:
    return render_chat(template(name), USER, add_generation_prompt=gen,
                       tools=[TOOL] if tools else None, enable_thinking=enable_thinking,
                       **DATA["context"])


def parser_for(name: str, tools: bool, enable_thinking: bool = True,
               reasoning_format: str = "deepseek") -> cf.ChatParser:
    gen = cf.generation_prompt(render(name, tools, enable_thinking),
                               render(name, tools, enable_thinking, gen=False))
    return cf.ChatParser(cf.detect(template(name)), gen, reasoning_format,
                         {TOOL["function"]["name"]} if tools else None)


def as_dict(p: cf.Parsed) -> dict:
    return {"content": p.content, "reasoning_content": p.reasoning,
            "tool_calls": [{"name": n, "arguments": a, "id": i} for n, a, i in p.calls]}


def _sets() -> list:
    return list(_set_params())


def _set_params():
    for s in DATA["sets"]:
        yield pytest.param(s, id=f"{s['template']}-{'tools' if s['tools'] else 'notools'}-"
                           f"{s['reasoning_format']}-{'think' if s['enable_thinking'] else 'nothink'}"
                           f"{'-parallel' if s['parallel_tool_calls'] else ''}")


# ---------------------------------------------------------------------------- template -> format
FORMATS = {  # the family whose syntax llama.cpp's parser accepted for each template's outputs
    "Qwen-Qwen2.5-7B-Instruct": "hermes", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes", "Qwen-QwQ-32B": "hermes",
    "Qwen-Qwen3-0.6B": "hermes", "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3", "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral-nemo",
    "fireworks-ai-llama-3-firefunction-v2": "firefunction-v2",
    "meetkai-functionary-medium-v3.1": "functionary-v3.1",
    "meetkai-functionary-medium-v3.2": "functionary-v3.2",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "command-r7b",
    "llama-cpp-deepseek-r1": "deepseek-r1", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "deepseek-r1",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "deepseek-r1",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(testdata.CHAT_TEMPLATE_SHA256))
def test_detect_format_and_thinking_tags(name):
    fmt = cf.detect(template(name))
    assert fmt.name == FORMATS[name]
    # llama.cpp reports thinking tags (params.thinking_start_tag) for exactly these
    thinking = {s["template"] for s in DATA["sets"]
                if any(c["expect"].get("reasoning_content") for c in s["cases"])}
    if name in thinking:
        assert fmt.think is not None


def test_generic_for_a_template_without_tools():
    smol = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    assert cf.detect(smol) == cf.ChatFormat("generic")
    assert not cf.detect(smol).native_tools


# ---------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("s", _sets())
def test_prompt_and_generation_prompt_match_llamacpp(s):
    with_gen = render(s["template"], s["tools"], s["enable_thinking"])
    assert with_gen == s["prompt"]
    gen = cf.generation_prompt(with_gen, render(s["template"], s["tools"], s["enable_thinking"],
                                                gen=False))
    assert gen == s["generation_prompt"]


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("s", _sets())
def test_parse_matches_llamacpp(s):
    p = cf.ChatParser(cf.detect(template(s["template"])), s["generation_prompt"],
                      s["reasoning_format"], {TOOL["function"]["name"]} if s["tools"] else None,
                      s["parallel_tool_calls"])
    for c in s["cases"]:
        got = as_dict(p.parse(c["text"]))
        if "error" in c["expect"]:
            # llama.cpp fails the request; jllama answers the text as content
            assert got == {"content": c["text"], "reasoning_content": "", "tool_calls": []} \
                or not got["tool_calls"], c["text"]
            continue
        assert got == c["expect"], c["text"]


@pytest.mark.parametrize("s", _sets())
def test_streamed_deltas_add_up_to_the_final_parse(s):
    """llama.cpp's test_peg_parser: parsing every prefix of the reply and sending the
    differences gives the same message as parsing the whole reply."""
    p = cf.ChatParser(cf.detect(template(s["template"])), s["generation_prompt"],
                      s["reasoning_format"], {TOOL["function"]["name"]} if s["tools"] else None,
                      s["parallel_tool_calls"])
    for c in s["cases"]:
        if "error" in c["expect"]:
            continue
        text = c["text"]
        p = dataclasses.replace(p)  # a parser follows one reply
        prev, reasoning, content, calls = cf.Parsed(), "", "", []
        for n in range(1, len(text) + 1):
            cur = p.parse(text[:n], partial=n < len(text))
            assert cur.reasoning.startswith(prev.reasoning), (text[:n], cur)
            assert cur.content.startswith(prev.content), (text[:n], cur)
            assert cur.calls[:len(prev.calls)] == prev.calls
            r, t, new = cf.diff(prev, cur)
            reasoning, content, calls = reasoning + r, content + t, calls + [x for _, x in new]
            prev = cur
        assert {"content": content, "reasoning_content": reasoning,
                "tool_calls": [{"name": n, "arguments": a, "id": i} for n, a, i in calls]} \
            == c["expect"], text


# ---------------------------------------------------------------------------- test-chat.cpp
ASSIST = ("Hello, world!\nWhat's up?", "", [])
THOUGHTS = ("Hello, world!\nWhat's up?", "I'm\nthinking", [])
CALL = ("", "", [("special_function", '{"arg1": 1}', "")])
R1_CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n"
           "```json\n{\"arg1\": 1}```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
# (test-chat.cpp block, template, tools, enable_thinking, reasoning format, input, expected)
PORTED = [
    ("Qwen-QwQ-32B (reasoning model)", "Qwen-QwQ-32B", False, True, "auto",
     "Let me think about this...\n</think>\nThe answer is 42.",
     ("The answer is 42.", "Let me think about this...", [])),
    ("Qwen-QwQ-32B (reasoning model)", "Qwen-QwQ-32B", False, True, "auto",
     "</think>Hello, world!", ("Hello, world!", "", [])),
    ("NousResearch-Hermes-2-Pro and Hermes-3", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
     True, True, "deepseek",
     '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>', CALL),
    ("NousResearch-Hermes-2-Pro and Hermes-3", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
     True, True, "deepseek", "Hello, world!\nWhat's up?<tool_call>\n"
     '{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>',
     ("Hello, world!\nWhat's up?", "", [("special_function", '{"arg1":1}', "")])),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use",
     "CohereForAI-c4ai-command-r7b-12-2024-tool_use", False, True, "deepseek",
     "<|START_RESPONSE|>Hello, world!\nWhat's up?<|END_RESPONSE|>", ASSIST),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use",
     "CohereForAI-c4ai-command-r7b-12-2024-tool_use", True, True, "deepseek",
     "<|START_THINKING|>I'm\nthinking<|END_THINKING|><|START_ACTION|>[\n    {\"tool_call_id\": "
     "\"0\", \"tool_name\": \"special_function\", \"parameters\": {\"arg1\": 1}}\n]<|END_ACTION|>",
     ("", "I'm\nthinking", [("special_function", '{"arg1": 1}', "0")])),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistralai-Mistral-Nemo-Instruct-2407", False,
     True, "deepseek", "Hello, world!\nWhat's up?", ASSIST),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistralai-Mistral-Nemo-Instruct-2407", True,
     True, "deepseek", '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, '
     '"id": "123456789"}]', ("", "", [("special_function", '{"arg1":1}', "123456789")])),
    ("meetkai-functionary-medium-v3.1", "meetkai-functionary-medium-v3.1", False, True,
     "deepseek", "Hello, world!\nWhat's up?", ASSIST),
    ("meetkai-functionary-medium-v3.1", "meetkai-functionary-medium-v3.1", True, True,
     "deepseek", '<function=special_function>{"arg1": 1}</function>', CALL),
    ("Functionary v3.2", "meetkai-functionary-medium-v3.2", False, True, "deepseek",
     "all\nHello, world!\nWhat's up?", ASSIST),
    ("Functionary v3.2", "meetkai-functionary-medium-v3.2", True, True, "deepseek",
     'special_function\n{"arg1": 1}', CALL),
    ("FireFunction", "fireworks-ai-llama-3-firefunction-v2", False, True, "deepseek",
     "Hello, world!\nWhat's up?", ASSIST),
    ("FireFunction", "fireworks-ai-llama-3-firefunction-v2", True, True, "deepseek",
     ' functools[{"name": "special_function", "arguments": {"arg1": 1}}]', CALL),
    ("DeepSeek R1 Distill Llama 8B", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", False, True,
     "deepseek", "</think>Hello, world!\nWhat's up?", ASSIST),
    ("DeepSeek R1 Distill Llama 8B", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", False, True,
     "deepseek", "I'm\nthinking</think>Hello, world!\nWhat's up?", THOUGHTS),
    ("llama-cpp DeepSeek R1 template", "llama-cpp-deepseek-r1", False, True, "deepseek",
     "</think>Hello, world!\nWhat's up?", ASSIST),
    ("llama-cpp DeepSeek R1 template", "llama-cpp-deepseek-r1", False, True, "deepseek",
     "I'm\nthinking</think>Hello, world!\nWhat's up?", THOUGHTS),
    ("llama-cpp DeepSeek R1 template", "llama-cpp-deepseek-r1", True, True, "deepseek",
     "</think>" + R1_CALL, CALL),
    ("DeepSeek R1 Distill Qwen 32B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", False, True,
     "deepseek", "</think>Hello, world!\nWhat's up?", ASSIST),
    ("DeepSeek R1 Distill Qwen 32B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", False, True,
     "deepseek", "I'm\nthinking</think>Hello, world!\nWhat's up?", THOUGHTS),
    ("DeepSeek R1 Distill Qwen 32B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", True, False,
     "deepseek", R1_CALL, CALL),
] + [
    (f"MiMo-VL / Hermes 3 / Qwen 2.5 ({name})", name, tools, True, "deepseek", text, expect)
    for name in ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "Qwen-Qwen2.5-7B-Instruct")
    for tools, text, expect in [
        (False, "Hello, world!\nWhat's up?", ASSIST),
        (True, '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n'
         "</tool_call>", CALL)]
] + [
    (f"Llama 3.x ({name})", name, True, True, "deepseek", "Hello, world!\nWhat's up?", ASSIST)
    for name in ("meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
                 "meta-llama-Llama-3.3-70B-Instruct")
]


def _norm_args(a: str) -> str:
    try:
        return json.dumps(json.loads(a))
    except json.JSONDecodeError:
        return a


@pytest.mark.parametrize("block,name,tools,think,rf,text,expect", PORTED,
                         ids=[f"{b}-{i}" for i, (b, *_) in enumerate(PORTED)])
def test_llamacpp_test_chat_cases(block, name, tools, think, rf, text, expect):
    got = parser_for(name, tools, think, rf).parse(text)
    content, reasoning, calls = expect
    assert got.content.strip() == content.strip()
    assert got.reasoning.strip() == reasoning.strip()
    assert [(n, _norm_args(a), i) for n, a, i in got.calls] == \
        [(n, _norm_args(a), i) for n, a, i in calls]


# ---------------------------------------------------------------------------- through the server
class ScriptDecoder:
    """Each generated token decodes to the next piece of SCRIPT (the fake engine's token ids
    do not matter), so a request's reply is a chosen text."""

    SCRIPT: list[str] = []

    def __init__(self, tok):
        self.i = 0

    def feed(self, i):
        piece = self.SCRIPT[self.i] if self.i < len(self.SCRIPT) else ""
        self.i += 1
        return piece

    def flush(self):
        return ""


def _server(monkeypatch, template_name: str, **settings):
    import types

    from starlette.testclient import TestClient
    from test_server_units import FakeEngine, FakeTok, V

    import jllama.tokenizer as jt
    from jllama.server.app import ServerSettings, ServerState, create_app

    class ScriptTok(FakeTok):
        chat_template = template(template_name)
        add_bos, bos_id = False, None

        def encode(self, text, add_special=True, parse_special=True):
            return [5, 6, 7]

        def apply_chat_template(self, messages, add_generation_prompt=True, tools=None,
                                fallback_chatml=False, **extra):
            return render_chat(self.chat_template, messages, add_generation_prompt, tools,
                               **extra)

    monkeypatch.setattr(jt, "StreamDecoder", ScriptDecoder, raising=False)
    llm = types.SimpleNamespace(engine=FakeEngine(2, ctx_size=256), tokenizer=ScriptTok(),
                                spec=types.SimpleNamespace(n_vocab=V, arch="fake"))
    state = ServerState(llm, ServerSettings("fake", **settings))
    return TestClient(create_app(state, warmup=False))


def _pieces(text: str, n: int = 3) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


SERVED = [  # (data set: template, tools, reasoning format, enable_thinking; case index)
    ("Qwen-QwQ-32B", True, "deepseek", True, 0), ("Qwen-QwQ-32B", True, "deepseek", True, 5),
    ("Qwen-QwQ-32B", False, "none", True, 0), ("Qwen-Qwen3-0.6B", False, "deepseek", True, 1),
    ("Qwen-Qwen3-0.6B", True, "deepseek", True, 0),
    ("Qwen-Qwen2.5-7B-Instruct", True, "deepseek", True, 2),
    ("mistralai-Mistral-Nemo-Instruct-2407", True, "deepseek", True, 1),
    ("llama-cpp-deepseek-r1", True, "deepseek", True, 1),  # the parallel set
    ("meta-llama-Llama-3.1-8B-Instruct", True, "deepseek", True, 1),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", True, "deepseek", True, 1),
]


def _served_set(name, tools, rf, think, parallel=False):
    return next(s for s in DATA["sets"] if (s["template"], s["tools"], s["reasoning_format"],
                                            s["enable_thinking"], s["parallel_tool_calls"])
                == (name, tools, rf, think, parallel))


@pytest.mark.parametrize("name,tools,rf,think,k", SERVED,
                         ids=[f"{n}-{'tools' if t else 'notools'}-{rf}-{k}"
                              for n, t, rf, _, k in SERVED])
def test_chat_completion_reasoning_and_tool_calls(monkeypatch, name, tools, rf, think, k):
    """/v1/chat/completions answers as llama.cpp's parser splits the reply: message fields
    whole, and streamed deltas that add up to the same message."""
    parallel = name == "llama-cpp-deepseek-r1"
    s = _served_set(name, tools, rf, think, parallel)
    case = s["cases"][k]
    ScriptDecoder.SCRIPT = _pieces(case["text"])
    body = {"messages": USER, "max_tokens": len(ScriptDecoder.SCRIPT), "temperature": 0,
            "reasoning_format": rf, "parallel_tool_calls": parallel}
    if tools:
        body["tools"] = [TOOL]
    exp = case["expect"]
    with _server(monkeypatch, name) as client:
        msg = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert (msg["content"] or "") == exp["content"]
        assert msg.get("reasoning_content", "") == exp["reasoning_content"]
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in msg.get("tool_calls", [])]
        assert calls == [{"name": c["name"], "arguments": c["arguments"]}
                         for c in exp["tool_calls"]]
        for c, e in zip(msg.get("tool_calls", []), exp["tool_calls"]):
            assert c["id"] == e["id"] if e["id"] else c["id"].startswith("call_")
        r = client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [json.loads(ln[6:]) for ln in r.text.splitlines()
                  if ln.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == exp["content"]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == exp["reasoning_content"]
    streamed = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [(tc["index"], tc["function"]["name"], tc["function"]["arguments"])
            for tc in streamed] == [(i, c["name"], c["arguments"])
                                    for i, c in enumerate(exp["tool_calls"])]
    # the script ends at max_tokens: llama-server says tool_calls only for a reply that stopped
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_reasoning_off_and_budget_zero(monkeypatch):
    """enable_thinking false (per request, as llama-server reads chat_template_kwargs) renders
    the template's closed thoughts and nothing is split; a reasoning budget of 0 on a template
    whose prompt opens the thoughts closes them in the prompt; on one whose model opens them
    the request is served."""
    s = _served_set("Qwen-QwQ-32B", False, "deepseek", False)  # enable_thinking false
    case = s["cases"][0]
    ScriptDecoder.SCRIPT = _pieces(case["text"])
    body = {"messages": USER, "max_tokens": len(ScriptDecoder.SCRIPT), "temperature": 0}
    with _server(monkeypatch, "Qwen-QwQ-32B") as client:
        off = client.post("/v1/chat/completions", json={
            **body, "chat_template_kwargs": {"enable_thinking": False}}).json()
        assert off["choices"][0]["message"]["content"] == case["expect"]["content"]
        assert "reasoning_content" not in off["choices"][0]["message"]
        bad = client.post("/v1/chat/completions", json={
            **body, "chat_template_kwargs": {"enable_thinking": "false"}})
        assert bad.status_code == 400 and "enable_thinking" in bad.json()["error"]["message"]
        bad = client.post("/v1/chat/completions", json={**body, "reasoning_format": "qwen"})
        assert bad.status_code == 400
    with _server(monkeypatch, "Qwen-QwQ-32B", reasoning_budget=0) as client:
        ScriptDecoder.SCRIPT = ["Answer"]
        msg = client.post("/v1/chat/completions", json={**body, "max_tokens": 1}).json()[
            "choices"][0]["message"]
        assert msg["content"] == "Answer" and "reasoning_content" not in msg
    with _server(monkeypatch, "Qwen-Qwen3-0.6B") as client:  # the model opens its thoughts:
        # the budget runs as llama.cpp's sampler (tests/test_server_reasoning_budget.py)
        r = client.post("/v1/chat/completions", json={**body, "reasoning_budget_tokens": 0})
        assert r.status_code == 200


# llama.cpp's tools/server/tests/unit/test_template.py::test_reasoning (its expected endings)
TEMPLATE_REASONING = [
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "on", "<think>\n"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "auto", "<think>\n"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "off", "<think>\n</think>"),
    ("Qwen-Qwen3-0.6B", "auto", "<|im_start|>assistant\n"),
    ("Qwen-Qwen3-0.6B", "off", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("Qwen-QwQ-32B", "auto", "<|im_start|>assistant\n<think>\n"),
    ("Qwen-QwQ-32B", "off", "<|im_start|>assistant\n<think>\n</think>"),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", "auto",
     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", "off",
     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_THINKING|><|END_THINKING|>"),
]


@pytest.mark.parametrize("name,reasoning,end", TEMPLATE_REASONING)
def test_apply_template_reasoning(monkeypatch, name, reasoning, end):
    """/apply-template with --reasoning on/off/auto (serve's flags set these settings)."""
    settings = {"reasoning": {"on": 1, "off": 0}.get(reasoning, -1),
                "template_kwargs": ({"enable_thinking": reasoning == "on"}
                                    if reasoning != "auto" else {})}
    with _server(monkeypatch, name, **settings) as client:
        for tools in (None, [], [TOOL]):
            r = client.post("/apply-template", json={
                "messages": [{"role": "user", "content": "What is today?"}], "tools": tools})
            assert r.status_code == 200 and r.json()["prompt"].endswith(end), tools


def test_history_reasoning_content_reaches_the_template():
    """An assistant turn's reasoning_content goes to the template as llama.cpp passes it
    (common_chat_msgs_parse_oaicompat): Qwen3's template shows the last turn's thoughts."""
    from jllama.server import openai_schema as oa

    msgs = oa.parse_messages({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "Bye"}]})
    assert msgs[1]["reasoning_content"] == "greet back"
    prompt = render_chat(template("Qwen-Qwen3-0.6B"), msgs[:2], add_generation_prompt=False)
    # common_chat_templates_apply's prompt for these two messages (experiments/
    # chat_format_oracle.cpp, add_generation_prompt false)
    assert prompt == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
                      "greet back\n</think>\n\nHello<|im_end|>\n")
