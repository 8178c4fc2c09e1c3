"""Tool calling and chat replies: tools into the prompt, the reply's thoughts and calls back out.

Templates that describe tools (Qwen, Hermes, Llama 3.x, Mistral, Functionary, DeepSeek R1,
Command R7B ...) get ``tools`` through the chat template, and their replies are read in the
template's own format (jllama/server/chat_formats.py). Templates that do not (SmolLM2's ChatML)
would silently drop them (llama.cpp 0c1e570 does); jllama instead describes the tool list and
the ``<tool_call>{json}</tool_call>`` format in a system message, and reads back the
Hermes/Qwen form (several allowed, text around them becomes ``content``) or a reply that is
nothing but JSON: ``{"name", "arguments"|"parameters"}``, a list of those, or
``{"tool_calls": [...]}``.

``plan_chat`` turns a request's reasoning and template fields (reasoning_format,
chat_template_kwargs, reasoning_effort, reasoning budget, parallel_tool_calls) into what to
render; ``ChatReply`` turns the generated text into message fields and stream deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from jllama.server import chat_formats as cf

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


# the opening of one call in each format, up to where its arguments object starts
_CALL_OPENING = {
    "hermes": '<tool_call>\n{{"name": {q}, "arguments": ',
    "llama3": '{{"name": {q}, "parameters": ',
    "mistral-nemo": '[TOOL_CALLS][{{"name": {q}, "arguments": ',
    "firefunction-v2": ' functools[{{"name": {q}, "arguments": ',
    "functionary-v3.1": "<function={n}>",
    "functionary-v3.2": "{n}\n",
    "deepseek-r1": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n",
    "command-r7b": '<|START_ACTION|>[{{"tool_call_id": "0", "tool_name": {q}, "parameters": ',
}


def forced_prefix(choice, tools: list[dict] | None, fmt: cf.ChatFormat | None = None,
                  thinking_open: bool = False) -> tuple[str, str | None]:
    """Assistant text the server writes itself for a forced call, in the template's format
    (after closing thoughts the prompt opened); the model then only writes the arguments
    object (JSON-constrained). Returns (prefix, function name) or ("", None)."""
    if not tools:
        return "", None
    name = None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    elif choice == "required" and len(tools) == 1:
        name = tools[0]["function"]["name"]
    if name is None:
        return "", None
    opening = _CALL_OPENING.get(fmt.name if fmt is not None else "generic",
                                _CALL_OPENING["hermes"])
    close = fmt.think[1] if thinking_open and fmt is not None and fmt.think else ""
    return close + opening.format(q=json.dumps(name), n=name), name


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


# ---------------------------------------------------------------------------- chat replies
def call_of(name: str, arguments: str, call_id: str = "") -> dict:
    """An OpenAI tool call from a parsed one: the model's own id when its format carries one
    (Mistral Nemo, Command R7B), else a new one (llama-server's gen_tool_call_id)."""
    return {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ChatReply:
    """One chat reply split as its template's format says (jllama/server/chat_formats.py):
    ``final`` for a whole reply, ``feed``/``finish`` for a stream, as OpenAI message fields
    and ``delta`` objects. With ``generic`` (a template without tool support) calls are read
    back by this module's fallback parser from what the format leaves as content."""

    def __init__(self, parser: cf.ChatParser, tools: list[dict] | None, generic: bool):
        self.parser = parser
        self._args = (tools, generic)
        self.budget = None  # a maker of the request's reasoning_budget.ReasoningBudget
        self.tools = tools if generic else None
        self.stream = ToolStream(tools) if generic and tools else None
        self.text = ""
        self.prev = cf.Parsed()
        self.ids: list[str] = []

    def fresh(self) -> ChatReply:
        """A reader for another reply to the same prompt (n > 1)."""
        import dataclasses

        return ChatReply(dataclasses.replace(self.parser), *self._args)

    @property
    def splits_reasoning(self) -> bool:
        return self.parser.fmt.think is not None and self.parser.reasoning_format != "none"

    def _calls(self, calls: list[tuple]) -> list[dict]:
        out = []
        for i, (name, args, cid) in enumerate(calls):
            if i >= len(self.ids):  # llama-server's set_tool_call_ids: stable across chunks
                self.ids.append(cid or new_call_id())
            out.append(call_of(name, args, self.ids[i]))
        return out

    def final(self, text: str) -> tuple[str | None, str | None, list[dict]]:
        """(content, reasoning_content, tool calls) of a whole reply."""
        p = self.parser.parse(text)
        calls = self._calls(p.calls)
        content: str | None = p.content
        if self.tools:
            content, calls = parse_tool_calls(p.content, self.tools)
        elif calls and not content:
            content = None
        return content, (p.reasoning or None), calls

    def _deltas(self, cur: cf.Parsed) -> list[dict]:
        r, c, new = cf.diff(self.prev, cur)
        self.prev = cur
        out = []
        if r:
            out.append({"reasoning_content": r})
        if c and self.stream is not None:
            c = self.stream.feed(c)
        if c:
            out.append({"content": c})
        if new:
            calls = self._calls(cur.calls)
            out.append({"tool_calls": [{"index": i, **calls[i]} for i, _ in new]})
        return out

    def feed(self, text: str) -> list[dict]:
        """Deltas for the next piece of the reply."""
        self.text += text
        return self._deltas(self.parser.parse(self.text, partial=True))

    def finish(self) -> tuple[list[dict], bool]:
        """The last deltas, and whether the reply called tools."""
        out = self._deltas(self.parser.parse(self.text))
        called = bool(self.prev.calls)
        if self.stream is not None:
            rest, calls = self.stream.finish()
            if rest:
                out.append({"content": rest})
            if calls:
                out.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                called = True
        return out, called


# ---------------------------------------------------------------------------- chat requests
@dataclass
class ChatPlan:
    """How one chat request renders and how its reply is read (llama-server's
    oaicompat_chat_params_parse + common_chat_templates_apply, for the formats jllama knows)."""

    fmt: cf.ChatFormat
    messages: list[dict]
    template_tools: list[dict] | None
    context: dict  # extra template variables: enable_thinking, chat_template_kwargs, dates
    reasoning_format: str
    tools: list[dict] | None
    parallel: bool
    budget: int  # reasoning budget in tokens, -1 unlimited
    budget_message: str = ""  # llama-server's reasoning_budget_message (before the end tag)

    def budget_suffix(self, gen_prompt: str) -> str:
        """Text that ends the thoughts at once (a budget of 0 and no message): llama.cpp's
        budget sampler forces the end tag as soon as the thoughts open; when the generation
        prompt opened them that is before the first generated token, so the prompt can carry
        it. Every other budget runs as the request's reasoning_budget.ReasoningBudget."""
        if (self.budget != 0 or self.budget_message or self.fmt.think is None
                or self.reasoning_format == "none"):
            return ""
        start, end = self.fmt.think
        g = gen_prompt.rfind(start)
        return end if g >= 0 and end not in gen_prompt[g:] else ""

    def reply(self, gen_prompt: str) -> ChatReply:
        names = {t["function"]["name"] for t in self.tools} if self.tools else None
        parser = cf.ChatParser(self.fmt, gen_prompt, self.reasoning_format,
                               names if self.fmt.native_tools else None, self.parallel)
        return ChatReply(parser, self.tools, not self.fmt.native_tools)

    def thinking_open(self, gen_prompt: str) -> bool:
        if self.fmt.think is None:
            return False
        g = gen_prompt.rfind(self.fmt.think[0])
        return g >= 0 and self.fmt.think[1] not in gen_prompt[g:]


def plan_chat(body: dict, messages: list[dict], tools: list[dict] | None, choice,
              template: str, reasoning_format: str = "deepseek", reasoning: int = -1,
              budget: int = -1, kwargs: dict | None = None,
              budget_message: str = "") -> ChatPlan:
    """``reasoning_format``/``reasoning``/``budget``/``kwargs``: the server's --reasoning-format,
    --reasoning (-1 auto, 0 off, 1 on), --reasoning-budget and --chat-template-kwargs."""
    import time

    from jllama.server.openai_schema import bad

    fmt = cf.detect(template)
    rf = body.get("reasoning_format", reasoning_format)
    if rf not in cf.REASONING_FORMATS:
        raise bad("reasoning_format", f"Unknown reasoning format: {rf}")
    kw = dict(kwargs or {})
    req_kw = body.get("chat_template_kwargs")
    if req_kw is not None:
        if not isinstance(req_kw, dict):
            raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object",
                      "invalid_type")
        kw.update(req_kw)
    enable = reasoning != 0 and fmt.think is not None
    et = kw.get("enable_thinking")
    if isinstance(et, bool):
        enable = et
    elif isinstance(et, str):
        raise bad("chat_template_kwargs", 'invalid type for "enable_thinking" (expected '
                  "boolean, got string)")
    effort = body.get("reasoning_effort")
    if effort == "none":
        enable = False
        kw.pop("reasoning_effort", None)
    elif isinstance(effort, str) and effort:
        kw["reasoning_effort"] = effort
    b = body.get("reasoning_budget_tokens", body.get("thinking_budget_tokens", -1))
    if isinstance(b, bool) or not isinstance(b, int) or b < -1:
        raise bad("reasoning_budget_tokens", "'reasoning_budget_tokens' must be an integer >= -1")
    if b == -1:
        b = budget
    msg = body.get("reasoning_budget_message", budget_message)
    if not isinstance(msg, str):
        raise bad("reasoning_budget_message", "'reasoning_budget_message' must be a string",
                  "invalid_type")
    par = body.get("parallel_tool_calls")
    if par is not None and not isinstance(par, bool):
        raise bad("parallel_tool_calls", "'parallel_tool_calls' must be true or false",
                  "invalid_type")
    # llama.cpp's common_chat_extra_context, then the kwargs (which may override it)
    context = {"date_string": time.strftime("%d %b %Y"), "datetime": time.strftime("%b %d %Y"),
               **kw, "enable_thinking": enable}
    if fmt.native_tools or template_knows_tools(template):
        msgs, tmpl_tools = messages, tools
    else:
        msgs, tmpl_tools = prepare_messages(messages, tools, choice, template)
    return ChatPlan(fmt, msgs, tmpl_tools, context, rf, tools,
                    par if par is not None else fmt.name != "llama3", b, msg)
