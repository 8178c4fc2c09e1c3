"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) as
llama-server 0c1e570 serves it: the request is converted to an OpenAI chat request
(``server_chat_convert_anthropic_to_oai`` in server-chat.cpp) and runs through the chat path;
the answer is shaped as ``to_json_anthropic`` / ``to_json_anthropic_stream`` (server-task.cpp)
shape it.

Its rules, kept here as llama-server has them: ``max_tokens`` defaults to 4096; only
``temperature``, ``top_p``, ``top_k``, ``stream``, ``stop_sequences`` (as ``stop``),
``tools``/``tool_choice`` and ``chat_template_kwargs`` pass through; ``tool_choice`` ``any`` and
``tool`` both become ``required``; ``stop_reason`` is ``end_turn`` (or ``tool_use`` with tool
calls) when generation stopped at an end token or a stop sequence (which ``stop_sequence``
names), else ``max_tokens``; usage counts ``input_tokens`` without the cached prefix, which is
``cache_read_input_tokens``.
"""

from __future__ import annotations

import json

from jllama.server import embeddings as emb
from jllama.server import openai_schema as oa

DEFAULT_MAX_TOKENS = 4096
_PASS = ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs")
_BILLING = "x-anthropic-billing-header:"


def _billing_header(text: str) -> str:
    """Claude Code's system prompt starts with a billing header whose 5-letter ``cch=`` stamp
    changes on every request; llama-server writes it as 'fffff' so the prompt cache can reuse
    the prefix."""
    if not text.startswith(_BILLING):
        return text
    i = text.find("cch=", len(_BILLING))
    if i < 0:
        return text
    j = i + 4
    if j + 5 < len(text) and text[j + 5] == ";":
        return text[:j] + "fffff" + text[j + 5:]
    return text


def _image_url(source: dict) -> str | None:
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"
    if source.get("type") == "url":
        return source.get("url", "")
    return None


def _str(d: dict, key: str) -> str:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, str) else ""


def to_chat(body: dict) -> dict:
    """The OpenAI chat request llama-server makes of an Anthropic one."""
    msgs: list[dict] = []
    system = body.get("system")
    if isinstance(system, str):
        msgs.append({"role": "system", "content": _billing_header(system)})
    elif isinstance(system, list):
        text = "".join(_billing_header(_str(b, "text")) for b in system
                       if isinstance(b, dict) and b.get("type") == "text")
        msgs.append({"role": "system", "content": text})
    elif system is not None:
        msgs.append({"role": "system", "content": ""})
    if "messages" not in body:
        raise emb.server_error((500, "server_error"), "'messages' is required")
    messages = body["messages"]
    for msg in messages if isinstance(messages, list) else []:
        if not isinstance(msg, dict):
            msgs.append(msg)  # refused by the chat path's checks
            continue
        role = _str(msg, "role")
        if "content" not in msg:
            if role != "assistant":
                msgs.append(msg)
            continue
        content = msg["content"]
        if not isinstance(content, list):
            msgs.append(msg)
            continue
        parts, calls, results, reasoning = [], [], [], ""
        for block in content:
            kind = _str(block, "type")
            if kind == "text":
                parts.append(block)
            elif kind == "thinking":
                reasoning += _str(block, "thinking")
            elif kind == "image":
                url = _image_url(block.get("source"))
                if url is not None:
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_use":
                args = block.get("input", {})
                calls.append({"id": _str(block, "id"), "type": "function",
                              "function": {"name": _str(block, "name"),
                                           "arguments": json.dumps(args if args is not None
                                                                   else {},
                                                                   ensure_ascii=False)}})
            elif kind == "tool_result":
                results.append({"role": "tool", "tool_call_id": _str(block, "tool_use_id"),
                                "content": _tool_result(block.get("content"))})
        if parts or calls or reasoning:
            new: dict = {"role": role}
            if parts:
                new["content"] = parts
            else:
                new["content"] = ""
            if calls:
                new["tool_calls"] = calls
            if reasoning:
                new["reasoning_content"] = reasoning
            msgs.append(new)
        msgs.extend(results)
    out: dict = {"messages": msgs}
    tools = body.get("tools")
    if isinstance(tools, list):
        out["tools"] = [{"type": "function", "function": {
            "name": _str(t, "name"), "description": _str(t, "description"),
            "parameters": t.get("input_schema", {}) if isinstance(t, dict) else {}}}
            for t in tools]
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        if tc.get("type") == "auto":
            out["tool_choice"] = "auto"
        elif tc.get("type") in ("any", "tool"):
            out["tool_choice"] = "required"
    if "stop_sequences" in body:
        out["stop"] = body["stop_sequences"]
    out["max_tokens"] = body["max_tokens"] if "max_tokens" in body else DEFAULT_MAX_TOKENS
    for k in _PASS:
        if k in body:
            out[k] = body[k]
    return out


def _tool_result(content) -> str | list:
    """A tool_result's content: text blocks joined into a string; with images, OpenAI parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    text, parts, images = "", [], False
    for c in content:
        kind = _str(c, "type")
        if kind == "text":
            text += _str(c, "text")
            parts.append({"type": "text", "text": _str(c, "text")})
        elif kind == "image":
            images = True
            url = _image_url(c.get("source"))
            if url is not None:
                parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts if images else text


def stop_reason(finish: str | None, calls: list | None) -> str:
    if finish == "stop":
        return "tool_use" if calls else "end_turn"
    return "max_tokens"


def _input(calls_args: str):
    try:
        return json.loads(calls_args)
    except (json.JSONDecodeError, TypeError):
        return {}


def _usage(r: oa.ChatOutcome) -> dict:
    return {"cache_read_input_tokens": r.cached, "input_tokens": r.n_prompt - r.cached,
            "output_tokens": r.n_out}


def message(rid: str, model: str, r: oa.ChatOutcome) -> dict:
    """The non-streamed answer."""
    blocks: list[dict] = []
    if r.content:
        blocks.append({"type": "text", "text": r.content})
    for c in r.calls or []:
        blocks.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                       "input": _input(c["function"]["arguments"])})
    return {"id": rid, "type": "message", "role": "assistant", "content": blocks,
            "model": model, "stop_reason": stop_reason(r.finish, r.calls),
            "stop_sequence": r.stop_word or None, "usage": _usage(r)}


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Stream:
    """The streamed answer's events: message_start, then a text block (index 0) while text
    arrives, tool_use blocks after it, content_block_stop for each block, message_delta with
    the stop reason and output tokens, message_stop."""

    def __init__(self, rid: str, model: str):
        self.rid, self.model = rid, model
        self.text_started = False

    def start(self, n_prompt: int, cached: int) -> list[str]:
        return [_event("message_start", {"type": "message_start", "message": {
            "id": self.rid, "type": "message", "role": "assistant", "content": [],
            "model": self.model, "stop_reason": None, "stop_sequence": None,
            "usage": {"cache_read_input_tokens": cached, "input_tokens": n_prompt - cached,
                      "output_tokens": 0}}})]

    def progress(self, prompt_progress: dict) -> list[str]:
        return []  # llama-server sends no Anthropic event for prompt progress

    def text(self, delta: str, timings: dict | None = None) -> list[str]:
        if not delta:
            return []
        out = []
        if not self.text_started:
            self.text_started = True
            out.append(_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                      "content_block": {"type": "text",
                                                                        "text": ""}}))
        out.append(_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta",
                                                            "text": delta}}))
        return out

    def done(self, r: oa.ChatOutcome) -> list[str]:
        out = []
        first = 1 if self.text_started else 0
        for i, c in enumerate(r.calls or []):
            out.append(_event("content_block_start", {
                "type": "content_block_start", "index": first + i,
                "content_block": {"type": "tool_use", "id": c["id"],
                                  "name": c["function"]["name"]}}))
            if c["function"]["arguments"]:
                out.append(_event("content_block_delta", {
                    "type": "content_block_delta", "index": first + i,
                    "delta": {"type": "input_json_delta",
                              "partial_json": c["function"]["arguments"]}}))
        n = first + len(r.calls or [])
        out += [_event("content_block_stop", {"type": "content_block_stop", "index": i})
                for i in range(n)]
        out.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(r.finish, r.calls),
                      "stop_sequence": r.stop_word or None},
            "usage": {"output_tokens": r.n_out}}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out

    def error(self, err: dict) -> str:
        return _event("error", err.get("error", err))

    def end(self) -> str:
        return ""  # no [DONE] after Anthropic's message_stop
