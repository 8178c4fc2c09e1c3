"""OpenAI's Responses API (``POST /v1/responses``, ``/v1/responses/input_tokens``) as
llama-server 0c1e570 serves it: the request becomes a chat request
(``server_chat_convert_responses_to_chatcmpl`` in server-chat.cpp: ``instructions`` a system
message, ``input`` a string or a list of message / function_call / function_call_output /
reasoning items, ``max_output_tokens`` as ``max_tokens``, function tools unwrapped, every other
field passed through) and runs through the chat path; the answer is shaped as
``to_json_oaicompat_resp`` and its stream as the ``response.*`` events of
``to_json_oaicompat_resp[_stream]`` (server-task.cpp). ``previous_response_id`` is refused:
llama-server keeps no responses.
"""

from __future__ import annotations

import json
import time
import uuid

from jllama.server import embeddings as emb
from jllama.server import openai_schema as oa


def _bad(message: str):
    return emb.server_error((400, "invalid_request_error"), message)


def _rand() -> str:
    return uuid.uuid4().hex


def _is(d, key: str, t) -> bool:
    return isinstance(d, dict) and isinstance(d.get(key), t)


def _user_content(parts: list) -> list[dict]:
    out = []
    for p in parts:
        kind = p.get("type", "") if isinstance(p, dict) else ""
        if kind == "input_text":
            if "text" not in p:
                raise _bad("'Input text' requires 'text'")
            out.append({"text": p["text"], "type": "text"})
        elif kind == "input_image":
            if "image_url" not in p:
                raise _bad("'image_url' is required")
            out.append({"image_url": {"url": p["image_url"]}, "type": "image_url"})
        elif kind == "input_file":
            raise _bad("'input_file' is not supported by llamacpp at this moment")
        else:
            raise _bad("'type' must be one of 'input_text', 'input_image', or 'input_file'")
    return out


def _assistant_content(item: dict) -> list[dict]:
    content = item.get("content")
    if isinstance(content, str):
        return [{"text": content, "type": "text"}]
    out = []
    for p in content if isinstance(content, list) else []:
        kind = p.get("type", "") if isinstance(p, dict) else ""
        if kind in ("output_text", "input_text"):
            if not _is(p, "text", str):
                raise _bad("'Output text' requires 'text'")
            out.append({"text": p["text"], "type": "text"})
        elif kind == "refusal":
            if not _is(p, "refusal", str):
                raise _bad("'Refusal' requires 'refusal'")
            out.append({"text": p["refusal"], "type": "text"})  # jllama's chat: text parts
        else:
            raise _bad("'type' must be one of 'output_text' or 'refusal'")
    return out


def to_chat(body: dict) -> dict:
    """The chat request llama-server makes of a Responses request."""
    if "input" not in body:
        raise _bad("'input' is required")
    if isinstance(body.get("previous_response_id"), str) and body["previous_response_id"]:
        raise _bad("llama.cpp does not support 'previous_response_id'.")
    inp = body["input"]
    out = {k: v for k, v in body.items() if k not in ("input", "instructions")}
    msgs: list[dict] = []
    if "instructions" in body:
        ins = body["instructions"]
        msgs.append({"role": "system", "content": ins if isinstance(ins, str) else ""})
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        for item in inp:
            if not isinstance(item, dict):
                raise _bad("Cannot determine type of 'item'")
            item = dict(item)
            merge = bool(msgs) and msgs[-1].get("role") == "assistant"
            if _is(item, "content", str) and item.get("role") != "assistant":
                item["content"] = [{"text": item["content"], "type": "input_text"}]
            kind = item.get("type")
            if _is(item, "content", list) and item.get("role") in ("user", "system",
                                                                    "developer"):
                item.pop("type", None)
                item.pop("status", None)
                item["content"] = _user_content(item["content"])
                msgs.append(item)
            elif item.get("role") == "assistant" and kind == "message":
                content = _assistant_content(item)
                if merge:
                    prev = msgs[-1]
                    if not isinstance(prev.get("content"), list):
                        prev["content"] = []
                    prev["content"] += content
                else:
                    item.pop("status", None)
                    item.pop("type", None)
                    item["content"] = content
                    msgs.append(item)
            elif (kind == "function_call" and _is(item, "arguments", str)
                  and _is(item, "call_id", str) and _is(item, "name", str)):
                call = {"function": {"arguments": item["arguments"], "name": item["name"]},
                        "id": item["call_id"], "type": "function"}
                if merge:
                    msgs[-1].setdefault("tool_calls", []).append(call)
                else:
                    msgs.append({"role": "assistant", "tool_calls": [call]})
            elif (kind == "function_call_output" and _is(item, "call_id", str)
                  and isinstance(item.get("output"), (str, list))):
                msgs.append({"content": _tool_output(item["output"]), "role": "tool",
                             "tool_call_id": item["call_id"]})
            elif kind == "reasoning" and _is(item, "summary", list):
                c = item.get("content")
                if not isinstance(c, list):
                    raise _bad("item['content'] is not an array")
                if not c:
                    raise _bad("item['content'] is empty")
                if not _is(c[0], "text", str):
                    raise _bad("item['content']['text'] is not a string")
                if merge:
                    msgs[-1]["reasoning_content"] = c[0]["text"]
                else:
                    msgs.append({"role": "assistant", "content": [],
                                 "reasoning_content": c[0]["text"]})
            else:
                raise _bad("Cannot determine type of 'item'")
    else:
        raise _bad("'input' must be a string or array of objects")
    out["messages"] = msgs
    if "tools" in body:
        tools = body["tools"]
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array of objects")
        out.pop("tools")
        fns = []
        for t in tools:
            if not isinstance(t, dict) or t.get("type") != "function":
                continue  # no chat equivalent (llama-server logs and skips them)
            fn = {k: v for k, v in t.items() if k != "type"}
            fn.setdefault("strict", True)
            fns.append({"type": "function", "function": fn})
        if fns:
            out["tools"] = fns
    if "max_output_tokens" in body:
        out.pop("max_output_tokens")
        out["max_tokens"] = body["max_output_tokens"]
    if "reasoning" in body:
        r = out.pop("reasoning")
        if isinstance(r, dict) and "effort" in r:
            out["reasoning_effort"] = r["effort"]
    return out


def _tool_output(output) -> str | list:
    if isinstance(output, str):
        return output
    parts = []
    for p in output:
        if not isinstance(p, dict) or "type" not in p:
            raise _bad("Output of tool call missing 'type' field")
        if p["type"] == "input_text":
            parts.append({**p, "type": "text"})
        elif p["type"] == "input_image":
            if "image_url" not in p:
                raise _bad("'image_url' is required")
            parts.append({**p, "type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            raise _bad("Output of tool call should be 'Input text' or 'Input image'")
    return parts


def _usage(r: oa.ChatOutcome) -> dict:
    return {"input_tokens": r.n_prompt, "output_tokens": r.n_out,
            "total_tokens": r.n_prompt + r.n_out,
            "input_tokens_details": {"cached_tokens": r.cached}}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _call_item(c: dict) -> dict:
    cid = c["id"].removeprefix("call_")
    return {"id": "fc_" + cid, "type": "function_call", "status": "completed",
            "arguments": c["function"]["arguments"], "call_id": "call_" + cid,
            "name": c["function"]["name"]}


def response(model: str, r: oa.ChatOutcome) -> dict:
    """The non-streamed answer."""
    output = []
    if r.content:
        output.append({"content": [_text_part(r.content)], "id": "msg_" + _rand(),
                       "role": "assistant", "status": "completed", "type": "message"})
    output += [_call_item(c) for c in r.calls or []]
    t = int(time.time())
    return {"completed_at": t, "created_at": t, "id": "resp_" + _rand(), "model": model,
            "object": "response", "output": output, "status": "completed", "usage": _usage(r)}


def _event(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Stream:
    """The streamed answer: response.created and response.in_progress first (in_progress again
    with each prompt_progress), an output message item whose text arrives as
    response.output_text.delta, function calls as output items with their arguments, the
    .done events closing each, and response.completed with the whole response and timings."""

    def __init__(self, model: str):
        self.model = model
        self.id, self.msg_id = "resp_" + _rand(), "msg_" + _rand()
        self.text_started = False

    def _in_progress(self, kind: str) -> dict:
        return {"type": kind, "response": {"id": self.id, "object": "response",
                                           "status": "in_progress"}}

    def start(self, n_prompt: int, cached: int) -> list[str]:
        return [_event(self._in_progress("response.created")),
                _event(self._in_progress("response.in_progress"))]

    def progress(self, prompt_progress: dict) -> list[str]:
        return [_event({**self._in_progress("response.in_progress"),
                        "prompt_progress": prompt_progress})]

    def text(self, delta: str, timings: dict | None = None) -> list[str]:
        if not delta:
            return []
        evs = []
        if not self.text_started:
            self.text_started = True
            evs.append({"type": "response.output_item.added", "item": {
                "content": [], "id": self.msg_id, "role": "assistant", "status": "in_progress",
                "type": "message"}})
            evs.append({"type": "response.content_part.added", "item_id": self.msg_id,
                        "part": {"type": "output_text", "text": ""}})
        evs.append({"type": "response.output_text.delta", "item_id": self.msg_id,
                    "delta": delta})
        if timings is not None:
            evs[-1]["timings"] = timings
        return [_event(e) for e in evs]

    def done(self, r: oa.ChatOutcome) -> list[str]:
        evs, output = [], []
        for c in r.calls or []:
            item = _call_item(c)
            evs.append({"type": "response.output_item.added",
                        "item": {**item, "arguments": "", "status": "in_progress"}})
            evs.append({"type": "response.function_call_arguments.delta",
                        "delta": item["arguments"], "item_id": item["id"]})
        if r.content:
            part = _text_part(r.content)
            item = {"type": "message", "status": "completed", "id": self.msg_id,
                    "content": [part], "role": "assistant"}
            evs += [{"type": "response.output_text.done", "item_id": self.msg_id,
                     "text": r.content},
                    {"type": "response.content_part.done", "item_id": self.msg_id, "part": part},
                    {"type": "response.output_item.done", "item": item}]
            output.append(item)
        for c in r.calls or []:
            item = _call_item(c)
            evs.append({"type": "response.output_item.done", "item": item})
            output.append(item)
        done = {"type": "response.completed", "response": {
            "id": self.id, "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": self.model, "output": output, "usage": _usage(r)}}
        if r.timings is not None:
            done["timings"] = r.timings
        evs.append(done)
        return [_event(e) for e in evs]

    def error(self, err: dict) -> str:
        return f"data: {json.dumps(err, ensure_ascii=False)}\n\n"

    def end(self) -> str:
        return ""  # llama-server ends a Responses stream without [DONE]
