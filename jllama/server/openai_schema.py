"""OpenAI request validation and response shapes.

Requests are checked by hand rather than through a model library: the server must answer every
malformed field with OpenAI's error envelope naming the offending ``param``, and the rules are
few. Responses are plain dicts shaped after OpenAI's spec (the tests validate them against
``openapi.yaml``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from jllama import __version__
from jllama.engine.sampling import SamplingParams

# llama-server's form, b<build>-<commit> (clients check the leading "b"): jllama's version here
FINGERPRINT = f"b{__version__}-jllama"


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _default_type(status)
        self.extra: dict = {}  # more fields for the error object (llama-server's n_ctx, ...)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code, **self.extra}}


def _default_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            408: "timeout_error", 503: "server_overloaded", 504: "timeout_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------- field checks
def _num(body: dict, name: str, default: float | None, lo: float | None = None,
         hi: float | None = None) -> float | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"'{name}' must be a number, got {type(v).__name__}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {type(v).__name__}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {type(v).__name__}", "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 16:
            raise bad("stop", "'stop' may hold at most 16 strings")
        return [s for s in v if s]
    raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")


def _logit_bias(body: dict, n_vocab: int, tokenize=None) -> dict[int, float]:
    """llama-server's logit_bias: an object {token id or text: bias} or a list of [token id or
    text, bias] pairs; a text stands for each of its tokens; a bias is a number, or false to
    ban the token. OpenAI's +-100 (force / ban) become effectively infinite biases."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, list) and all(isinstance(e, list) and len(e) == 2 for e in v):
        pairs = [(e[0], e[1]) for e in v]
    else:
        raise bad("logit_bias", "'logit_bias' must map token ids (or texts) to numbers, or be a "
                  "list of [token id or text, number] pairs", "invalid_type")
    out = {}
    for k, b in pairs:
        if b is False:
            bias = float("-inf")
        elif isinstance(b, bool) or not isinstance(b, (int, float)) or b != b:
            raise bad("logit_bias", f"'logit_bias' value for {k!r} must be a number or false")
        else:
            bias = float(b) if abs(b) < 100 else (1e9 if b > 0 else -1e9)
        if isinstance(k, int) and not isinstance(k, bool):
            toks = [k]
        elif isinstance(k, str) and k.strip().lstrip("-").isdigit():
            toks = [int(k)]
        elif isinstance(k, str) and tokenize is not None:
            toks = tokenize(k)
        else:
            raise bad("logit_bias", f"'logit_bias' key {k!r} is not a token id")
        for tok in toks:
            if not 0 <= tok < n_vocab:
                raise bad("logit_bias", f"'logit_bias' token id {tok} is outside the vocabulary "
                          f"(0..{n_vocab - 1})")
            out[tok] = bias
    return out


@dataclass
class GenOptions:
    """What both endpoints share: sampling, limits, stops, output constraints."""

    max_tokens: int | None
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    response_format: dict | None = None
    cache_prompt: bool = True
    n: int = 1
    extra: dict = field(default_factory=dict)
    lora: dict[int, float] | None = None  # llama-server's per-request adapter scales by id
    grammar: str | None = None  # llama.cpp's GBNF ``grammar`` field
    json_schema: dict | None = None  # from ``json_schema`` or ``response_format``
    n_probs: int = 0  # top candidates reported per token (n_probs / logprobs / top_logprobs)
    post_sampling_probs: bool = False  # llama-server: probabilities after the sampling chain
    ignore_eos: bool = False
    id_slot: int = -1  # llama-server's id_slot: the slot to run in (-1: any)
    n_keep: int = 0  # llama-server's context shift: tokens kept (-1: the whole prompt)
    n_discard: int = 0  # ... and dropped per shift (0: half of the rest)
    n_cache_reuse: int | None = None  # llama-server's (None: the server's --cache-reuse)


def lora_scales(value: Any, param: str = "lora") -> dict[int, float]:
    """llama-server's ``[{"id": i, "scale": s}, ...]`` (parse_lora_request) as {id: scale}."""
    if not isinstance(value, list):
        raise bad(param, f"'{param}' must be a list of {{\"id\": int, \"scale\": number}}")
    out = {}
    for e in value:
        i, s = (e.get("id"), e.get("scale", 0.0)) if isinstance(e, dict) else (None, None)
        if (not isinstance(i, int) or isinstance(i, bool)
                or not isinstance(s, int | float) or isinstance(s, bool)):
            raise bad(param, f"'{param}' entries must be {{\"id\": int, \"scale\": number}}, "
                      f"got {e!r}")
        out[i] = float(s)
    return out


def _probs_count(body: dict, chat: bool) -> int:
    """llama-server: chat asks with ``logprobs: true`` (+ ``top_logprobs``, default 20); the
    completion endpoints with ``n_probs`` or its alias ``logprobs`` (a count)."""
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise bad("logprobs", "'logprobs' must be true or false", "invalid_type")
        if lp:
            return _int(body, "top_logprobs", 20, 0, 20)
        if body.get("top_logprobs") is not None:
            raise bad("top_logprobs", "top_logprobs requires logprobs to be set to true")
        return 0
    name = "n_probs" if body.get("n_probs") is not None else "logprobs"
    v = body.get(name)
    if isinstance(v, bool):  # OpenAI clients may send logprobs: false
        return 0
    return _int(body, name, 0, 0, 100)


def _constraint_fields(body: dict, rf: dict | None) -> tuple[str | None, dict | None]:
    """llama-server's grammar sources: ``grammar`` (GBNF), ``json_schema``, and
    ``response_format`` (json_object: its optional ``schema``; json_schema: ``json_schema.
    schema``); an empty schema means any object."""
    grammar = body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise bad("grammar", "'grammar' must be a string (GBNF)", "invalid_type")
    schema = body.get("json_schema")
    if rf is not None:
        if rf["type"] == "json_object":
            if "schema" in rf or schema is None:
                schema = rf.get("schema", {})
        else:
            schema = rf["json_schema"].get("schema", {})
    if schema is not None and not isinstance(schema, dict):
        raise bad("json_schema", "the JSON schema must be an object", "invalid_type")
    if schema is not None and grammar:
        raise bad("grammar", "Cannot use both json_schema and grammar")
    if schema is not None and not schema:
        schema = {"type": "object"}
    return grammar or None, schema


def extended_sampling(body: dict) -> dict:
    """llama-server's further sampler fields (server-schema.cpp): its soft limits clamp rather
    than refuse, so these do too; unset fields keep SamplingParams' (llama.cpp's) defaults."""
    out = {}
    for name, lo, hi in (("typical_p", None, None), ("top_n_sigma", None, None),
                         ("xtc_probability", 0.0, 1.0), ("xtc_threshold", 0.0, 1.0),
                         ("dynatemp_range", None, None), ("dynatemp_exponent", None, None)):
        v = _num(body, name, None)
        if v is not None:
            out[name] = min(max(v, lo if lo is not None else v), hi if hi is not None else v)
    mk = _int(body, "min_keep", None)
    if mk is not None:
        out["min_keep"] = max(mk, 0)
    m = _int(body, "mirostat", None)
    if m is not None:
        out["mirostat"] = min(max(m, 0), 2)
    for name in ("mirostat_tau", "mirostat_eta", "dry_multiplier"):
        v = _num(body, name, None)
        if v is not None:
            out[name] = v
    base = _num(body, "dry_base", None)
    if base is not None:  # below 1 DRY would be off: llama-server takes the default instead
        out["dry_base"] = base if base >= 1.0 else SamplingParams.dry_base
    for name in ("dry_allowed_length", "dry_penalty_last_n"):  # hard limits: refused
        v = _int(body, name, None, 0, 2**31 - 1)
        if v is not None:
            out[name] = v
    if body.get("dry_sequence_breakers") is not None:
        brk = body["dry_sequence_breakers"]
        if (not isinstance(brk, list) or not brk
                or not all(isinstance(x, str) for x in brk)):
            raise bad("dry_sequence_breakers",
                      "Error: dry_sequence_breakers must be a non-empty array of strings")
        out["dry_sequence_breakers"] = tuple(brk)
    return out


def parse_common(body: dict, n_vocab: int, chat: bool = False,
                 tokenize=None) -> GenOptions:
    """``tokenize``: text -> token ids, for logit_bias keys given as text."""
    # llama-server's defaults, not OpenAI's: the reference behaviour is llama.cpp's
    temperature = _num(body, "temperature", 0.8, 0.0, 2.0)
    top_p = _num(body, "top_p", 0.95, 0.0, 1.0)
    top_k = _int(body, "top_k", 40, 0, None)  # llama.cpp extension; 0 = off
    min_p = _num(body, "min_p", 0.05, 0.0, 1.0)
    fp = _num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    pp = _num(body, "presence_penalty", 0.0, -2.0, 2.0)
    rp = _num(body, "repeat_penalty", 1.0, 0.0, None)
    seed = _int(body, "seed", None)
    mt = body.get("max_completion_tokens", None)
    max_tokens = _int(body, "max_tokens", None, 1, None)
    if mt is not None:
        max_tokens = _int(body, "max_completion_tokens", None, 1, None)
    n = _int(body, "n", 1, 1, None)
    stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
    if so and not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = bool(so and so.get("include_usage"))
    n_probs = _probs_count(body, chat)
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("response_format", "'response_format.type' must be 'text', 'json_object' "
                      "or 'json_schema'")
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name", ""), str):
                raise bad("response_format", "'response_format.json_schema' must be an object "
                          "with 'name' and 'schema'")
        if rf["type"] == "text":
            rf = None
    grammar, schema = _constraint_fields(body, rf)
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=rp,
        frequency_penalty=fp, presence_penalty=pp, seed=seed,
        logit_bias=_logit_bias(body, n_vocab, tokenize), **extended_sampling(body))
    return GenOptions(max_tokens=max_tokens, params=params, stop=_stop(body), stream=stream,
                      include_usage=include_usage, response_format=rf,
                      cache_prompt=_bool(body, "cache_prompt", True), n=n,
                      lora=lora_scales(body["lora"]) if body.get("lora") else None,
                      grammar=grammar, json_schema=schema, n_probs=n_probs,
                      ignore_eos=_bool(body, "ignore_eos", False),
                      post_sampling_probs=_bool(body, "post_sampling_probs", False),
                      id_slot=_int(body, "id_slot", -1), n_keep=_int(body, "n_keep", 0),
                      n_discard=_int(body, "n_discard", 0),
                      n_cache_reuse=_int(body, "n_cache_reuse", None, lo=0, hi=2**31 - 1))


def message_text(content: Any, param: str, images: list | None = None,
                 marker: str = "") -> str:
    """Flatten OpenAI content (a string or a list of text parts) to one string. With
    ``images`` (a list to fill), ``image_url`` parts are accepted too: each adds its URL to
    ``images`` and ``marker`` where it stood (llama-server's multimodal chat)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "image_url" and images is not None:
                iu = p.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise bad(f"{param}[{i}].image_url", "an image part needs "
                              "'image_url': {'url': ...}")
                images.append((f"{param}[{i}].image_url", url))
                parts.append(marker)
                continue
            if kind not in ("text", "input_text"):
                raise bad(f"{param}[{i}]", "only text content parts are supported"
                          + (" (and image_url with --mmproj)" if images is None else ""),
                          "unsupported_content")
            if not isinstance(p.get("text"), str):
                raise bad(f"{param}[{i}].text", "a text part needs a string 'text'")
            parts.append(p["text"])
        return "".join(parts)
    raise bad(param, "message content must be a string or a list of text parts", "invalid_type")


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def parse_messages(body: dict, images: list | None = None, marker: str = "",
                   allow_empty: bool = False) -> list[dict]:
    """The conversation; with ``images`` (a list to fill), image_url parts are collected
    there in order and leave ``marker`` (the server's media marker) in their message's text.
    ``allow_empty``: an empty conversation is fine (llama-server's Anthropic endpoint)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not (msgs or allow_empty):
        raise bad("messages", "'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"'role' must be one of {', '.join(ROLES)}, "
                      f"got {role!r}")
        msg = {"role": "system" if role == "developer" else role,
               "content": message_text(m.get("content"), f"messages[{i}].content", images,
                                          marker)}
        rc = m.get("reasoning_content") if role == "assistant" else None
        if isinstance(rc, str) and rc:  # earlier thoughts, for templates that show them
            msg["reasoning_content"] = rc
        if role == "assistant" and m.get("tool_calls"):
            tcs = m["tool_calls"]
            if not isinstance(tcs, list):
                raise bad(f"messages[{i}].tool_calls", "'tool_calls' must be a list")
            calls = []
            for j, tc in enumerate(tcs):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"messages[{i}].tool_calls[{j}]", "a tool call needs "
                              "'function.name' and 'function.arguments'")
                args = fn.get("arguments", "{}")
                try:
                    args_obj = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    args_obj = args
                calls.append({"id": tc.get("id", ""), "type": "function",
                              "function": {"name": fn["name"], "arguments": args_obj}})
            msg["tool_calls"] = calls
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id", "")
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def continuation(body: dict, messages: list[dict]) -> str | None:
    """The text of the final assistant message that the reply continues, or None: llama-server's
    ``continue_final_message`` (true, "content" or "reasoning_content"), or its prefill of a
    conversation that ends with an assistant message (prefill_assistant, on by default). Its
    text parts are joined by blank lines (common_chat_msg::render_content). Refuses what
    llama-server refuses (oaicompat_chat_params_parse): two assistant messages at the end, a
    continuation with add_generation_prompt, continuing a message with tool calls."""
    cfm = body.get("continue_final_message")
    explicit = cfm is True or cfm in ("content", "reasoning_content")
    add_gen = body.get("add_generation_prompt", True) is not False
    ends_assistant = bool(messages) and messages[-1]["role"] == "assistant"
    if not explicit and ends_assistant:
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise bad("messages", "Cannot have 2 or more assistant messages at the end of the "
                      "list.")
        add_gen = False
    elif not explicit:
        return None
    if add_gen:
        raise bad("continue_final_message", "Cannot set both add_generation_prompt and "
                  "continue_final_message to true.")
    if not ends_assistant:
        return None  # llama.cpp renders the conversation without a generation prompt
    if messages[-1].get("tool_calls"):
        raise bad("messages", "Cannot continue an assistant message that contains tool calls.")
    raw = body["messages"][-1].get("content")
    if isinstance(raw, list):
        return "\n\n".join(p["text"] for p in raw
                            if isinstance(p, dict) and p.get("type") in ("text", "input_text")
                            and isinstance(p.get("text"), str) and p["text"])
    return raw if isinstance(raw, str) else ""


def legacy_messages(body: dict, marker: str = "") -> list[dict]:
    """The conversation (already checked by ``parse_messages``) as llama.cpp's chat path
    without Jinja reads it (common_chat_templates_apply_legacy): each message's role as sent
    and its content, a content array as text parts (an image part: the media marker), which
    the built-in templates join by newlines."""
    out = []
    for m in body["messages"]:
        c = m.get("content")
        if isinstance(c, list):
            c = [{"type": "text", "text": p["text"]} if p.get("type") in ("text", "input_text")
                 else {"type": "media_marker", "text": marker} for p in c]
        out.append({"role": m["role"], "content": c if c is not None else ""})
    return out


def parse_tools(body: dict) -> tuple[list[dict] | None, Any]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice", "'tool_choice' needs 'tools'")
        return None, None
    if not isinstance(tools, list):
        raise bad("tools", "'tools' must be a list", "invalid_type")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise bad(f"tools[{i}]", "each tool must be {'type': 'function', 'function': "
                      "{'name': ..., 'parameters': ...}}")
    names = {t["function"]["name"] for t in tools}
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in names:
            raise bad("tool_choice", f"'tool_choice' names an unknown function {name!r}")
    elif choice not in ("none", "auto", "required"):
        raise bad("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                  "{'type': 'function', 'function': {'name': ...}}")
    if choice == "none" or not tools:
        return None, "none"
    return tools, choice


# ---------------------------------------------------------------------------- responses
@dataclass
class ChatOutcome:
    """A finished chat generation, for the APIs that llama-server answers from its chat path
    in their own shapes (Anthropic Messages, OpenAI Responses)."""

    content: str | None
    calls: list[dict] | None  # OpenAI tool calls (arguments as JSON text)
    finish: str | None  # "stop" (end token or stop string), "length"
    stop_word: str | None
    n_prompt: int
    cached: int
    n_out: int
    timings: dict | None = None  # llama-server's result_timings


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def logprobs_of(probs: list[dict] | None) -> dict | None:
    """llama-server's ``logprobs`` of a choice or chunk (null when none were asked for)."""
    return {"content": probs} if probs else None


def chat_response(rid: str, model: str, created: int, content: str | None,
                  tool_calls: list[dict] | None, finish: str, use: dict,
                  logprobs: dict | None = None, reasoning: str | None = None) -> dict:
    msg: dict = {"role": "assistant", "content": content, "refusal": None}
    if reasoning:
        msg["reasoning_content"] = reasoning  # llama-server's field for split-off thoughts
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish,
                         "logprobs": logprobs}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None,
               usage_: dict | None = None, choices: bool = True, logprobs: dict | None = None,
               index: int = 0) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "system_fingerprint": FINGERPRINT,
         "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": logprobs}]
         if choices else []}
    if usage_ is not None:
        d["usage"] = usage_
    return d


def completion_response(rid: str, model: str, created: int, text: str, finish: str | None,
                        use: dict | None, logprobs: dict | None = None, index: int = 0) -> dict:
    d = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "system_fingerprint": FINGERPRINT,
         "choices": [{"index": index, "text": text, "finish_reason": finish,
                      "logprobs": logprobs}]}
    if use is not None:
        d["usage"] = use
    return d
