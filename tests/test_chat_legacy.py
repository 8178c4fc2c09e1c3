"""llama.cpp's chat templates without Jinja (llama-server --no-jinja): the built-in renderer
that a template's source selects (llm_chat_detect_template), then its rendering
(llm_chat_apply_template): jllama.tokenizer.chat_builtin.detect + render_chat(jinja=False).

Expected values: llama.cpp through llama-cpp-python's ``llama_chat_apply_template`` on the same
template source (it detects, then renders; -1 for a template it does not know), for llama.cpp's
own template files and for sources built around each marker string its detection looks for.
"""

from __future__ import annotations

import ctypes

import pytest
import testdata
from llamacpp_oracle import llama_cpp_module

from jllama.tokenizer.chat import CHATML_TEMPLATE, ChatTemplateError, render_chat
from jllama.tokenizer.chat_builtin import BUILTIN_TEMPLATES, detect

CONVS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": " Hi there \n"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": " A1 "}, {"role": "user", "content": "Q2"}],
    # an assistant prefill: the legacy path renders it as a whole message
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "The answer"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"},
     {"role": "user", "content": "ü ✓"}, {"role": "tool", "content": "t"}],
]

# sources that hold the marker strings llm_chat_detect_template tests, alone and in the
# combinations where its order decides (each is a plain string: no Jinja is run)
MARKERS = [
    "<|im_start|>", "<|im_start|><|im_sep|>", "<|im_start|><end_of_utterance>",
    "mistral whatever", "[INST]", "[INST][SYSTEM_PROMPT]", "' [INST] ' + system_message",
    "[INST][AVAILABLE_TOOLS]", '"[INST]"[AVAILABLE_TOOLS]', " [INST]<<SYS>>",
    "[INST] content.strip()", "bos_token + '[INST]", "<|assistant|><|end|>", "[gMASK]<sop>",
    "<|assistant|><|user|>", "<|assistant|><|user|><|tool_declare|>", "<|assistant|><|user|></s>",
    "<|{{ item['role'] }}|><|begin_of_image|>", "<|user|><|endoftext|>",
    "bos_token + message['role']", "<start_of_turn>", "'\\n\\nAssistant: ' + eos_token",
    "GPT4 Correct ", "USER: ASSISTANT: ", "USER: ASSISTANT: SYSTEM: ", "### Instruction:<|EOT|>",
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|start_header_id|><|end_header_id|>",
    "[gMASK]sop", "<用户>", "'Assistant: ' + message['content'] + eos_token",
    "<｜Assistant｜><｜User｜><｜end▁of▁sentence｜>", "[|system|][|assistant|][|endofturn|]",
    "[|system|][|assistant|][|endofturn|][|tool|]", "rwkv-world",
    "{{- 'User: ' + message['content']|trim + '\\n\\n' -}}", "<|start_of_role|>",
    "<|start_of_role|><tool_call>", "<|start_of_role|><tools>g4_default_system_message",
    "message['role'] + additional_special_tokens[0] + message['content'] + "
    "additional_special_tokens[1]", "<|role_start|>", " Ассистент:",
    "<role>ASSISTANT</role>'HUMAN'", '<role>ASSISTANT</role>"HUMAN"<think>',
    "<role>ASSISTANT</role><role>HUMAN</role><|role_end|>", "<|header_start|><|header_end|>",
    "<|endofuserprompt|>", "<|extra_0|><|extra_4|>", "<|start|><|channel|>",
    "<｜hy_Assistant｜><｜hy_begin▁of▁sentence｜>", "<｜hy_Assistant｜><｜hy_place▁holder▁no▁3｜>",
    "<|im_assistant|>assistant<|im_middle|>", "<seed:bos>",
    "'Assistant: '  + message['content'] + '<|separator|>", "[unused9]系统：[unused10]",
    "<|begin|><|end|><|content|>",
    # none of llama.cpp's families: refused
    "{{ messages }}", "<|user|> alone", "plain text",
]


def _oracle(lc, template: str, msgs: list[dict], add: bool) -> str | None:
    arr = (lc.llama_chat_message * len(msgs))()
    keep = []
    for i, m in enumerate(msgs):
        r, c = m["role"].encode(), m["content"].encode()
        keep += [r, c]
        arr[i].role, arr[i].content = r, c
    buf = ctypes.create_string_buffer(1 << 16)
    n = lc.llama_chat_apply_template(template.encode(), arr, len(msgs), add, buf, len(buf))
    if n < 0:
        return None
    assert n <= len(buf)
    return buf.raw[:n].decode()


def _check(lc, template: str) -> None:
    for conv in CONVS:
        for add in (True, False):
            want = _oracle(lc, template, conv, add)
            if want is None:
                assert detect(template) is None, template
                with pytest.raises(ChatTemplateError, match="try using --jinja"):
                    render_chat(template, conv, add, jinja=False)
            else:
                assert render_chat(template, conv, add, jinja=False) == want, \
                    (template[:80], conv, add)


@pytest.mark.oracle
def test_marker_sources_render_as_llamacpp():
    lc = llama_cpp_module()
    for src in MARKERS + list(BUILTIN_TEMPLATES) + [CHATML_TEMPLATE]:
        _check(lc, src)


@pytest.mark.oracle
def test_llamacpp_template_files_render_as_llamacpp():
    lc = llama_cpp_module()
    folder = testdata.chat_templates_dir()
    for name in testdata.CHAT_TEMPLATE_SHA256:
        _check(lc, (folder / f"{name}.jinja").read_text())


def test_content_parts_join_by_newlines():
    # common_chat_templates_apply_legacy: a message's text parts, each after a newline once
    # there is text; other parts are left out
    msgs = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                         {"type": "image", "text": "x"},
                                         {"type": "text", "text": "two"}]}]
    assert render_chat(CHATML_TEMPLATE, msgs, True, jinja=False) == \
        "<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>assistant\n"
