"""llama.cpp's built-in chat templates, by name (llama_chat_builtin_templates).

``--chat-template NAME`` in llama.cpp's tools selects one of these hand-written renderers
(src/llama-chat.cpp, llm_chat_apply_template) instead of a Jinja template; jllama renders them
the same way here so that a prompt is byte-identical to llama.cpp's. Messages are plain
role/content strings: these templates know nothing of tools or content parts.
"""

from __future__ import annotations

from collections.abc import Callable

# llama.cpp's trim(): C isspace on the ends (ASCII whitespace only, not Unicode's)
_WS = " \t\n\v\f\r"


def _trim(s: str) -> str:
    return s.strip(_WS)


Msgs = list[tuple[str, str]]


def _chatml(m: Msgs, add: bool) -> str:
    out = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in m)
    return out + ("<|im_start|>assistant\n" if add else "")


def _mistral_v7(space: str) -> Callable[[Msgs, bool], str]:
    def render(m: Msgs, add: bool) -> str:
        out = []
        for r, c in m:
            if r == "system":
                out.append(f"[SYSTEM_PROMPT]{space}{c}[/SYSTEM_PROMPT]")
            elif r == "user":
                out.append(f"[INST]{space}{c}[/INST]")
            else:
                out.append(f"{space}{c}</s>")
        return "".join(out)  # no generation prompt: the [/INST] already asks for one
    return render


def _mistral_v1_v3(lead: str, trail: str, trim_reply: bool) -> Callable[[Msgs, bool], str]:
    def render(m: Msgs, add: bool) -> str:
        out, inside = [], False
        for r, c in m:
            if not inside:
                out.append(f"{lead}[INST]{trail}")
                inside = True
            if r == "system":
                out.append(c + "\n\n")
            elif r == "user":
                out.append(f"{c}{lead}[/INST]")
            else:
                out.append(f"{trail}{_trim(c) if trim_reply else c}</s>")
                inside = False
        return "".join(out)
    return render


def _llama2(system: bool, bos_inside: bool, strip: bool) -> Callable[[Msgs, bool], str]:
    def render(m: Msgs, add: bool) -> str:
        out, inside = ["[INST] "], True  # the first turn's BOS is the tokenizer's
        for r, c in m:
            c = _trim(c) if strip else c
            if not inside:
                inside = True
                out.append("<s>[INST] " if bos_inside else "[INST] ")
            if r == "system":
                out.append(f"<<SYS>>\n{c}\n<</SYS>>\n\n" if system else c + "\n")
            elif r == "user":
                out.append(c + " [/INST]")
            else:
                out.append(c + "</s>")
                inside = False
        return "".join(out)
    return render


def _simple(turn: Callable[[str, str], str], gen: str) -> Callable[[Msgs, bool], str]:
    """Templates that write each message alone and end with a fixed generation prompt."""
    def render(m: Msgs, add: bool) -> str:
        return "".join(turn(r, c) for r, c in m) + (gen if add else "")
    return render


def _monarch(m: Msgs, add: bool) -> str:
    out = "".join(("" if i == 0 else "<s>") + f"{r}\n{c}</s>\n" for i, (r, c) in enumerate(m))
    return out + ("<s>assistant\n" if add else "")


def _gemma(m: Msgs, add: bool) -> str:
    out, system = [], ""
    for r, c in m:
        if r == "system":  # no system turn: merged into the next user turn
            system += _trim(c)
            continue
        r = "model" if r == "assistant" else r
        out.append(f"<start_of_turn>{r}\n")
        if system and r != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(_trim(c) + "<end_of_turn>\n")
    return "".join(out) + ("<start_of_turn>model\n" if add else "")


def _orion(m: Msgs, add: bool) -> str:
    out, system = [], ""
    for r, c in m:
        if r == "system":
            system += c
        elif r == "user":
            out.append("Human: ")
            if system:
                out.append(system + "\n\n")
                system = ""
            out.append(c + "\n\nAssistant: </s>")
        else:
            out.append(c + "</s>")
    return "".join(out)


def _openchat(m: Msgs, add: bool) -> str:
    out = []
    for r, c in m:
        if r == "system":
            out.append(c + "<|end_of_turn|>")
        else:
            role = r[:1].upper() + r[1:] if r[:1].isascii() else r  # C toupper: ASCII only
            out.append(f"GPT4 Correct {role}: {c}<|end_of_turn|>")
    return "".join(out) + ("GPT4 Correct Assistant:" if add else "")


def _vicuna(orca: bool) -> Callable[[Msgs, bool], str]:
    def turn(r: str, c: str) -> str:
        if r == "system":
            return f"SYSTEM: {c}\n" if orca else c + "\n\n"
        if r == "user":
            return f"USER: {c}\n"
        if r == "assistant":
            return f"ASSISTANT: {c}</s>\n"
        return ""
    return _simple(turn, "ASSISTANT:")


def _by_role(parts: dict[str, Callable[[str], str]], gen: str) -> Callable[[Msgs, bool], str]:
    """Templates with one format per known role; other roles are left out."""
    return _simple(lambda r, c: parts[r](c) if r in parts else "", gen)


def _trimmed(before: str, after: str) -> Callable[[str], str]:
    return lambda c: before + _trim(c) + after


def _minicpm(m: Msgs, add: bool) -> str:
    return "".join(f"<用户>{_trim(c)}<AI>" if r == "user" else _trim(c) for r, c in m)


def _rwkv(m: Msgs, add: bool) -> str:
    out = []
    for i, (r, c) in enumerate(m):
        if r == "system":
            out.append(f"System: {_trim(c)}\n\n")
        elif r == "user":
            out.append(f"User: {_trim(c)}\n\n")
            if i == len(m) - 1:
                out.append("Assistant:")
        elif r == "assistant":
            out.append(f"Assistant: {_trim(c)}\n\n")
    return "".join(out)


def _granite3(m: Msgs, add: bool) -> str:
    out = []
    for r, c in m:
        out.append(f"<|start_of_role|>{r}<|end_of_role|>")
        if r == "assistant_tool_call":
            out.append("<|tool_call|>")
        out.append(c + "<|end_of_text|>\n")
    return "".join(out) + ("<|start_of_role|>assistant<|end_of_role|>" if add else "")


def _granite4(m: Msgs, add: bool) -> str:
    out = []
    for r, c in m:
        out.append("<|start_of_role|>assistant<|end_of_role|><|tool_call|>"
                   if r == "assistant_tool_call" else f"<|start_of_role|>{r}<|end_of_role|>")
        out.append(c + "<|end_of_text|>\n")
    return "".join(out) + ("<|start_of_role|>assistant<|end_of_role|>" if add else "")


def _gigachat(m: Msgs, add: bool) -> str:
    has_system = bool(m) and m[0][0] == "system"
    out = ["<s>" + (m[0][1] + "<|message_sep|>" if has_system else "")]
    for r, c in m[1 if has_system else 0:]:
        if r == "user":
            out.append(f"user<|role_sep|>{c}<|message_sep|>available functions<|role_sep|>[]"
                       "<|message_sep|>")
        elif r == "assistant":
            out.append(f"assistant<|role_sep|>{c}<|message_sep|>")
    return "".join(out) + ("assistant<|role_sep|>" if add else "")


def _yandex(m: Msgs, add: bool) -> str:
    out = []
    for r, c in m:
        if r == "user":
            out.append(f" Пользователь: {c}\n\n")
        elif r == "assistant":
            out.append(f" Ассистент: {c}\n\n")
    return "".join(out) + (" Ассистент:[SEP]" if add else "")


def _ascii_upper(s: str) -> str:
    return "".join(ch.upper() if ch.isascii() else ch for ch in s)


def _bailing(think: bool) -> Callable[[Msgs, bool], str]:
    def render(m: Msgs, add: bool) -> str:
        out = "".join(f"<role>{'HUMAN' if r == 'user' else _ascii_upper(r)}</role>{c}"
                      for r, c in m)
        if add:
            out += "<role>ASSISTANT</role>" + ("<think>" if think else "")
        return out
    return render


def _bailing2(m: Msgs, add: bool) -> str:
    out = [] if m and m[0][0] == "system" else \
        ["<role>SYSTEM</role>detailed thinking off<|role_end|>"]
    out += [f"<role>{'HUMAN' if r == 'user' else _ascii_upper(r)}</role>{c}<|role_end|>"
            for r, c in m]
    return "".join(out) + ("<role>ASSISTANT</role>" if add else "")


def _smolvlm(m: Msgs, add: bool) -> str:
    out = ["<|im_start|>"]  # SmolVLM's BOS; the turns are not ChatML
    for r, c in m:
        if r == "system":
            out.append(c + "\n\n")
        elif r == "user":
            out.append(f"User: {c}<end_of_utterance>\n")
        else:
            out.append(f"Assistant: {c}<end_of_utterance>\n")
    return "".join(out) + ("Assistant:" if add else "")


def _hunyuan_moe(m: Msgs, add: bool) -> str:
    out = []
    for r, c in m:
        if r == "system":
            out.append(f"<|startoftext|>{c}<|extra_4|>")
        elif r == "assistant":
            out.append(c + "<|eos|>")
        else:
            out.append(f"<|startoftext|>{c}<|extra_0|>")
    return "".join(out)


def _hunyuan_dense(m: Msgs, add: bool) -> str:
    out = []
    for i, (r, c) in enumerate(m):
        if i == 0 and r == "system":
            out.append(c + "<｜hy_place▁holder▁no▁3｜>")
        if r == "assistant":
            out.append(f"<｜hy_Assistant｜>{c}<｜hy_place▁holder▁no▁2｜>")
        elif r == "user":
            out.append(f"<｜hy_User｜>{c}<｜hy_Assistant｜>")
    return "".join(out)


def _hunyuan_vl(m: Msgs, add: bool) -> str:
    out = ["<｜hy_begin▁of▁sentence｜>"]
    for i, (r, c) in enumerate(m):
        if i == 0 and r == "system":
            out.append(c + "<｜hy_place▁holder▁no▁3｜>")
        elif r == "user":
            out.append(c + "<｜hy_User｜>")
        elif r == "assistant":
            out.append(c + "<｜hy_Assistant｜>")
    return "".join(out)


_KIMI = {"system": "<|im_system|>system<|im_middle|>", "user": "<|im_user|>user<|im_middle|>",
         "assistant": "<|im_assistant|>assistant<|im_middle|>",
         "tool": "<|im_system|>tool<|im_middle|>"}

_PANGU = {"system": "系统", "user": "用户", "assistant": "助手", "tool": "工具", "function": "方法"}


def _pangu(m: Msgs, add: bool) -> str:
    out = []
    for i, (r, c) in enumerate(m):
        if i == 0 and r != "system":
            out.append("[unused9]系统：[unused10]")
        if r in _PANGU:
            out.append(f"[unused9]{_PANGU[r]}：{c}[unused10]")
    return "".join(out) + ("[unused9]助手：" if add else "")


def _exaone(tool: bool) -> Callable[[Msgs, bool], str]:
    parts = {"system": lambda c: f"[|system|]{_trim(c)}[|endofturn|]\n",
             "user": lambda c: f"[|user|]{_trim(c)}\n",
             "assistant": lambda c: f"[|assistant|]{_trim(c)}[|endofturn|]\n"}
    if tool:
        parts["tool"] = lambda c: f"[|tool|]{_trim(c)}[|endofturn|]\n"
    return _by_role(parts, "[|assistant|]")


_TEMPLATES: dict[str, Callable[[Msgs, bool], str]] = {
    "chatml": _chatml,
    "llama2": _llama2(False, False, False),
    "llama2-sys": _llama2(True, False, False),
    "llama2-sys-bos": _llama2(True, True, False),
    "llama2-sys-strip": _llama2(True, False, True),
    "mistral-v1": _mistral_v1_v3(" ", " ", False),
    "mistral-v3": _mistral_v1_v3("", " ", True),
    "mistral-v3-tekken": _mistral_v1_v3("", "", False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "phi3": _simple(lambda r, c: f"<|{r}|>\n{c}<|end|>\n", "<|assistant|>\n"),
    "phi4": _simple(lambda r, c: f"<|im_start|>{r}<|im_sep|>{c}<|im_end|>",
                    "<|im_start|>assistant<|im_sep|>"),
    "falcon3": _simple(lambda r, c: f"<|{r}|>\n{c}\n", "<|assistant|>\n"),
    "zephyr": _simple(lambda r, c: f"<|{r}|>\n{c}<|endoftext|>\n", "<|assistant|>\n"),
    "monarch": _monarch,
    "gemma": _gemma,
    "orion": _orion,
    "openchat": _openchat,
    "vicuna": _vicuna(False),
    "vicuna-orca": _vicuna(True),
    "deepseek": _by_role({"system": lambda c: c,
                          "user": lambda c: f"### Instruction:\n{c}\n",
                          "assistant": lambda c: f"### Response:\n{c}\n<|EOT|>\n"},
                         "### Response:\n"),
    "deepseek2": _by_role({"system": lambda c: c + "\n\n", "user": lambda c: f"User: {c}\n\n",
                           "assistant": lambda c: f"Assistant: {c}<｜end▁of▁sentence｜>"},
                          "Assistant:"),
    "deepseek3": _by_role({"system": lambda c: c + "\n\n", "user": lambda c: "<｜User｜>" + c,
                           "assistant": lambda c: f"<｜Assistant｜>{c}<｜end▁of▁sentence｜>"},
                          "<｜Assistant｜>"),
    "deepseek-ocr": lambda m, add: "".join(c for _, c in m),
    "command-r": _by_role(
        {r: _trimmed(f"<|START_OF_TURN_TOKEN|><|{t}_TOKEN|>", "<|END_OF_TURN_TOKEN|>")
         for r, t in (("system", "SYSTEM"), ("user", "USER"), ("assistant", "CHATBOT"))},
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
    "llama3": _simple(lambda r, c: f"<|start_header_id|>{r}<|end_header_id|>\n\n{_trim(c)}"
                      "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatglm3": lambda m, add: "[gMASK]sop" + "".join(f"<|{r}|>\n {c}" for r, c in m)
    + ("<|assistant|>" if add else ""),
    "chatglm4": lambda m, add: "[gMASK]<sop>" + "".join(f"<|{r}|>\n{c}" for r, c in m)
    + ("<|assistant|>\n" if add else ""),
    "glmedge": _simple(lambda r, c: f"<|{r}|>\n{c}", "<|assistant|>"),
    "minicpm": _minicpm,
    "exaone3": _exaone(False),
    "exaone4": _exaone(True),
    "exaone-moe": _by_role({r: _trimmed(f"<|{r}|>\n", "<|endofturn|>\n")
                            for r in ("system", "user", "assistant", "tool")},
                           "<|assistant|>\n"),
    "rwkv-world": _rwkv,
    "granite": _granite3,
    "granite-4.0": _granite4,
    "granite-4.1": _granite4,
    "gigachat": _gigachat,
    "megrez": _simple(lambda r, c: f"<|role_start|>{r}<|role_end|>{c}<|turn_end|>",
                      "<|role_start|>assistant<|role_end|>"),
    "yandex": _yandex,
    "bailing": _bailing(False),
    "bailing-think": _bailing(True),
    "bailing2": _bailing2,
    "llama4": _simple(lambda r, c: f"<|header_start|>{r}<|header_end|>\n\n{_trim(c)}<|eot|>",
                      "<|header_start|>assistant<|header_end|>\n\n"),
    "smolvlm": _smolvlm,
    "hunyuan-moe": _hunyuan_moe,
    "gpt-oss": _simple(lambda r, c: f"<|start|>{r}<|message|>{c}"
                       + ("<|return|>" if r == "assistant" else "<|end|>"), "<|start|>assistant"),
    "hunyuan-dense": _hunyuan_dense,
    "hunyuan-vl": _hunyuan_vl,
    "kimi-k2": _simple(lambda r, c: _KIMI.get(r, "") + c + "<|im_end|>",
                       "<|im_assistant|>assistant<|im_middle|>"),
    "seed_oss": _simple(lambda r, c: f"<seed:bos>{r}\n{_trim(c) if r == 'assistant' else c}"
                        "<seed:eos>", "<seed:bos>assistant\n"),
    "grok-2": _by_role({"system": lambda c: f"System: {_trim(c)}<|separator|>\n\n",
                        "user": lambda c: f"Human: {_trim(c)}<|separator|>\n\n",
                        "assistant": lambda c: f"Assistant: {c}<|separator|>\n\n"},
                       "Assistant:"),
    "pangu-embedded": _pangu,
    "solar-open": _simple(lambda r, c: f"<|begin|>{r}<|content|>{c}<|end|>",
                          "<|begin|>assistant"),
}

BUILTIN_TEMPLATES: tuple[str, ...] = tuple(sorted(_TEMPLATES))


def _dots1(m: Msgs, add: bool) -> str:
    tags = {"system": ("<|system|>", "<|endofsystem|>"),
            "user": ("<|userprompt|>", "<|endofuserprompt|>")}
    out = [f"{a}{c}{b}" for a, b, c in
           ((*tags.get(r, ("<|response|>", "<|endofresponse|>")), c) for r, c in m)]
    return "".join(out) + ("<|response|>" if add else "")


# found by detect() only: llama.cpp has no name for it
_DETECTED_ONLY: dict[str, Callable[[Msgs, bool], str]] = {"dots1": _dots1}


def detect(template: str) -> str | None:
    """The built-in template llama.cpp renders a chat template's source with when Jinja is off
    (llm_chat_detect_template: a built-in name as is, else the first family whose marker
    strings the source holds, in llama.cpp's order); None for one it does not know."""
    if template in _TEMPLATES:
        return template

    def has(*needles: str) -> bool:
        return all(n in template for n in needles)

    if has("<|im_start|>"):
        return "phi4" if has("<|im_sep|>") else "smolvlm" if has("<end_of_utterance>") \
            else "chatml"
    if template.startswith("mistral") or has("[INST]"):
        if has("[SYSTEM_PROMPT]"):
            return "mistral-v7"
        if has("' [INST] ' + system_message") or has("[AVAILABLE_TOOLS]"):
            return "mistral-v1" if has(" [INST]") else "mistral-v3-tekken" \
                if has('"[INST]"') else "mistral-v3"
        if has("content.strip()"):
            return "llama2-sys-strip"
        if has("bos_token + '[INST]"):
            return "llama2-sys-bos"
        return "llama2-sys" if has("<<SYS>>") else "llama2"
    if has("<|assistant|>", "<|end|>"):
        return "phi3"
    if has("[gMASK]<sop>"):
        return "chatglm4"
    if has("<|assistant|>", "<|user|>"):
        if has("<|tool_declare|>"):
            return "exaone-moe"
        return "falcon3" if has("</s>") else "glmedge"
    if has("<|{{ item['role'] }}|>", "<|begin_of_image|>"):
        return "glmedge"
    for needles, name in _FAMILIES:
        if has(*needles):
            return name
    if has("<|start_of_role|>"):
        if has("<tool_call>") or has("<tools>"):
            return "granite-4.0" if has("g4_default_system_message") else "granite-4.1"
        return "granite"
    for needles, name in _LATE_FAMILIES:
        if has(*needles):
            return name
    return None


# llm_chat_detect_template's plain marker tests, in its order (before and after granite)
_FAMILIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<|user|>", "<|endoftext|>"), "zephyr"),
    (("bos_token + message['role']",), "monarch"),
    (("<start_of_turn>",), "gemma"),
    (("'\\n\\nAssistant: ' + eos_token",), "orion"),
    (("GPT4 Correct ",), "openchat"),
    (("USER: ", "ASSISTANT: ", "SYSTEM: "), "vicuna-orca"),
    (("USER: ", "ASSISTANT: "), "vicuna"),
    (("### Instruction:", "<|EOT|>"), "deepseek"),
    (("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>"), "command-r"),
    (("<|start_header_id|>", "<|end_header_id|>"), "llama3"),
    (("[gMASK]sop",), "chatglm3"),
    (("<用户>",), "minicpm"),
    (("'Assistant: ' + message['content'] + eos_token",), "deepseek2"),
    (("<｜Assistant｜>", "<｜User｜>", "<｜end▁of▁sentence｜>"), "deepseek3"),
    (("[|system|]", "[|assistant|]", "[|endofturn|]", "[|tool|]"), "exaone4"),
    (("[|system|]", "[|assistant|]", "[|endofturn|]"), "exaone3"),
    (("rwkv-world",), "rwkv-world"),
    (("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}",), "rwkv-world"),
)
_LATE_FAMILIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("message['role'] + additional_special_tokens[0] + message['content'] + "
      "additional_special_tokens[1]",), "gigachat"),
    (("<|role_start|>",), "megrez"),
    ((" Ассистент:",), "yandex"),
    (("<role>ASSISTANT</role>", "'HUMAN'"), "bailing"),
    (("<role>ASSISTANT</role>", '"HUMAN"', "<think>"), "bailing-think"),
    (("<role>ASSISTANT</role>", "<role>HUMAN</role>", "<|role_end|>"), "bailing2"),
    (("<|header_start|>", "<|header_end|>"), "llama4"),
    (("<|endofuserprompt|>",), "dots1"),
    (("<|extra_0|>", "<|extra_4|>"), "hunyuan-moe"),
    (("<|start|>", "<|channel|>"), "gpt-oss"),
    (("<｜hy_Assistant｜>", "<｜hy_begin▁of▁sentence｜>"), "hunyuan-vl"),
    (("<｜hy_Assistant｜>", "<｜hy_place▁holder▁no▁3｜>"), "hunyuan-dense"),
    (("<|im_assistant|>assistant<|im_middle|>",), "kimi-k2"),
    (("<seed:bos>",), "seed_oss"),
    (("'Assistant: '  + message['content'] + '<|separator|>",), "grok-2"),
    (("[unused9]系统：[unused10]",), "pangu-embedded"),
    (("<|begin|>", "<|end|>", "<|content|>"), "solar-open"),
)


def is_builtin(name: str | None) -> bool:
    return name in _TEMPLATES


def render_builtin(name: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``messages`` (role and string content) rendered by llama.cpp's built-in template
    ``name`` (one of BUILTIN_TEMPLATES), as llama_chat_apply_template renders them."""
    msgs = [(m.get("role") or "", _text(m.get("content"))) for m in messages]
    return {**_TEMPLATES, **_DETECTED_ONLY}[name](msgs, add_generation_prompt)


def _text(content) -> str:
    """A message's text as llama.cpp's legacy template path sees it: a content array's text
    parts joined by newlines (other parts left out)."""
    if not isinstance(content, list):
        return content or ""
    out = ""
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("text", "media_marker"):
            out += ("\n" if out else "") + str(part.get("text") or "")
    return out
