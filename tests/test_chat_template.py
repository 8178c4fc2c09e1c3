"""Chat templates vs llama-cpp-python's Jinja2ChatFormatter (the HF-style Jinja setup).

SmolLM2's template comes from its GGUF; the Gemma 3 270M GGUF has none, so Gemma 3's
published template (google/gemma-3-*-it tokenizer_config.json) is used as text here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jllama.errors import JllamaError
from jllama.tokenizer import Tokenizer
from jllama.tokenizer.chat import CHATML_TEMPLATE, render_chat

GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke about ünïcödé ✓"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],
]


def _oracle_render(template: str, messages: list[dict], bos: str, eos: str, agp: bool) -> str:
    fmt = pytest.importorskip("llama_cpp.llama_chat_format")
    return fmt.Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos,
                                   add_generation_prompt=agp)(messages=messages).prompt


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_path(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> Tokenizer:
    return Tokenizer.from_path(gemma3_path)


@pytest.mark.oracle
@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", range(3))
def test_smollm2_template_matches_oracle(smollm2: Tokenizer, conv: int, agp: bool) -> None:
    msgs = CONVERSATIONS[conv]
    bos, eos = smollm2.piece_text(smollm2.bos_id), smollm2.piece_text(smollm2.eos_id)
    got = render_chat(smollm2.chat_template, msgs, add_generation_prompt=agp, bos_token=bos,
                      eos_token=eos)
    assert got == _oracle_render(smollm2.chat_template, msgs, bos, eos, agp)
    # ChatML structure implied by the template: default system turn unless one is given
    if msgs[0]["role"] != "system":
        assert got.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert got.count("<|im_start|>") == len(msgs) + (msgs[0]["role"] != "system") + agp
    assert got.endswith("<|im_start|>assistant\n" if agp else "<|im_end|>\n")


@pytest.mark.oracle
@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", range(4))
def test_gemma3_template_matches_oracle(gemma3: Tokenizer, conv: int, agp: bool) -> None:
    msgs = CONVERSATIONS[conv]
    bos, eos = gemma3.piece_text(gemma3.bos_id), gemma3.piece_text(gemma3.eos_id)
    got = render_chat(GEMMA3_TEMPLATE, msgs, add_generation_prompt=agp, bos_token=bos,
                      eos_token=eos)
    assert got == _oracle_render(GEMMA3_TEMPLATE, msgs, bos, eos, agp)
    assert got.startswith("<bos><start_of_turn>user\n")
    assert got.endswith("<start_of_turn>model\n" if agp else "<end_of_turn>\n")


@pytest.mark.oracle
def test_rendered_prompt_tokens_match_llama_cpp(smollm2: Tokenizer, smollm2_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    prompt = render_chat(smollm2.chat_template, CONVERSATIONS[2])
    llm = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    try:
        ref = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    finally:
        llm.close()
    assert smollm2.encode(prompt, add_special=True, parse_special=True) == ref


def test_gemma3_roles_must_alternate() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(JllamaError, match="roles must alternate"):
        render_chat(GEMMA3_TEMPLATE, msgs)


def test_missing_and_broken_templates(gemma3: Tokenizer) -> None:
    assert gemma3.chat_template is None  # the 270M GGUF ships without one
    with pytest.raises(JllamaError, match="no chat template"):
        render_chat(gemma3.chat_template, CONVERSATIONS[0])
    with pytest.raises(JllamaError, match="does not compile"):
        render_chat("{% for m in messages %}", CONVERSATIONS[0])
    with pytest.raises(JllamaError, match="failed"):
        render_chat("{{ messages[0].content.nope() }}", CONVERSATIONS[0])


def test_helpers_and_chatml_fallback() -> None:
    tmpl = ("{{ tools | tojson }}|{{ strftime_now('%Y') | length }}|"
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
            "{% endfor %}")
    out = render_chat(tmpl, [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
                      tools=[{"name": "café"}])
    assert out == '[{"name": "café"}]|4|x'
    chatml = render_chat(CHATML_TEMPLATE, CONVERSATIONS[0])
    assert chatml == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_apply_chat_template(smollm2: Tokenizer, gemma3: Tokenizer) -> None:
    msgs = CONVERSATIONS[0]
    assert smollm2.apply_chat_template(msgs) == render_chat(
        smollm2.chat_template, msgs, bos_token="<|im_start|>", eos_token="<|im_end|>")
    with pytest.raises(JllamaError):
        gemma3.apply_chat_template(msgs)
    assert gemma3.apply_chat_template(msgs, fallback_chatml=True) == render_chat(
        CHATML_TEMPLATE, msgs)
