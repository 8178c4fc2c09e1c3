"""Tool calling: tools into the prompt, the model's tool calls back out.

Templates that know about tools (Qwen, Hermes, Llama 3.x ...) get ``tools`` through the chat
template. Templates that do not (SmolLM2's ChatML) would silently drop them, so, like
llama.cpp's generic fallback, the tool list and the expected ``<tool_call>{json}</tool_call>``
format are described in a system message instead.

Parsing accepts the Hermes/Qwen form ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``
(several allowed, text around them becomes ``content``) and, as a fallback, a reply that is
nothing but JSON: ``{"name", "arguments"|"parameters"}``, a list of those, or
``{"tool_calls": [...]}``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def template_knows_tools(template: str) -> bool:
    return "tools" in template


def tools_system_text(tools: list[dict], choice) -> str:
    lines = ["You may call these functions:", "<tools>"]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    lines += ["</tools>", "To call one, reply only with:",
              '<tool_call>\n{"name": <name>, "arguments": <arguments object>}\n</tool_call>']
    if choice == "required":
        lines.append("You must call a function.")
    elif isinstance(choice, dict):
        lines.append(f"You must call {choice['function']['name']}.")
    return "\n".join(lines)


def prepare_messages(messages: list[dict], tools: list[dict] | None, choice,
                     template: str) -> tuple[list[dict], list[dict] | None]:
    """Messages and tools to hand to the template; tool turns become text the template can
    print when it has no tool support of its own."""
    if template_knows_tools(template):
        return messages, tools
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [OPEN + "\n" + json.dumps({"name": c["function"]["name"],
                                               "arguments": c["function"]["arguments"]},
                                              ensure_ascii=False) + "\n" + CLOSE
                     for c in m.pop("tool_calls")]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + calls)
        if m["role"] == "tool":
            m = {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools:
        text = tools_system_text(tools, choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def forced_prefix(choice, tools: list[dict] | None) -> tuple[str, str | None]:
    """Assistant text the server writes itself for a forced call; the model then only writes the
    arguments object (JSON-constrained). Returns (prefix, function name) or ("", None)."""
    if not tools:
        return "", None
    name = None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    elif choice == "required" and len(tools) == 1:
        name = tools[0]["function"]["name"]
    if name is None:
        return "", None
    return OPEN + "\n" + '{"name": ' + json.dumps(name) + ', "arguments": ', name


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def make_call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _as_call(obj, names: set[str]) -> dict | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI-shaped
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or (names and name not in names):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return make_call(name, args)


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from a complete reply; no calls found -> (text, [])."""
    names = {t["function"]["name"] for t in tools}
    if OPEN in text:
        calls = []
        for m in _CALL_RE.finditer(text):
            try:
                call = _as_call(json.loads(m.group(1)), names)
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        rest = _CALL_RE.sub("", text).strip()
        return (rest or None), calls
    body = text.strip()
    fence = _FENCE_RE.match(body)
    if fence:
        body = fence.group(1)
    if body[:1] not in ("{", "["):
        return text, []
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return text, []
    items = obj.get("tool_calls") if isinstance(obj, dict) and "tool_calls" in obj else obj
    items = items if isinstance(items, list) else [items]
    calls = [_as_call(o, names) for o in items]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls


@dataclass
class ToolStream:
    """Streams content while holding back anything that may turn out to be a tool call.

    Text is released unless it could be the start of ``<tool_call>`` or (at the very start of
    the reply) of a bare JSON call; once a call has begun, the rest is buffered and parsed at the
    end, then sent as ``tool_calls`` deltas.
    """

    tools: list[dict]
    held: str = ""
    emitted: bool = False
    in_call: bool = False

    def feed(self, text: str) -> str:
        """Content that can be shown now."""
        self.held += text
        if self.in_call:
            return ""
        s = self.held.lstrip()
        if not self.emitted:
            if not s or s[0] in "{[`" or s.startswith(OPEN) or OPEN.startswith(s):
                self.in_call = bool(s) and (s[0] in "{[`" or s.startswith(OPEN))
                return ""
        i = self.held.find(OPEN)
        if i >= 0:
            out, self.held, self.in_call = self.held[:i], self.held[i:], True
        else:
            keep = _partial_suffix(self.held, OPEN)
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        if out:
            self.emitted = True
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls) at the end of the reply."""
        held, self.held = self.held, ""
        if not self.in_call:
            return held, []
        content, calls = parse_tool_calls(held, self.tools)
        if not calls:
            return held, []
        return (content or ""), calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
