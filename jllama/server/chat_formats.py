"""Chat output formats: which reasoning tags and tool-call syntax a chat template implies, and
how a reply splits into ``reasoning_content``, ``content`` and ``tool_calls``.

llama.cpp 0c1e570 (common/chat.cpp, chat-auto-parser*.cpp, chat-peg-parser.cpp) finds these by
rendering the template with probe messages and diffing the results; jllama recognises the same
families by markers in the template source and parses them by hand, matching what llama.cpp's
parser returns for each family (tests/test_server_chat_formats.py holds llama.cpp's own expected
values: the cases of its tests/test-chat.cpp and outputs of common_chat_parse recorded with
experiments/chat_format_oracle.py):

- hermes: ``<tool_call>{"name": .., "arguments": {..}}</tool_call>`` (Hermes 2 Pro / 3, Qwen 2.5,
  Qwen 3, QwQ), any number of them after optional content;
- llama3: a bare ``{"name": .., "parameters": {..}}`` object ending the reply (Llama 3.1-3.3);
  ``<|python_tag|>`` code stays content, as in llama.cpp;
- mistral-nemo: ``[TOOL_CALLS][{"name", "arguments", "id"}, ...]``;
- firefunction-v2: `` functools[{"name", "arguments"}, ...]``;
- functionary-v3.1: ``<function=NAME>{..}</function>`` repeated;
- functionary-v3.2: the prompt ends in ``>>>``: ``all\\n<content>`` or ``NAME\\n{..}``;
- deepseek-r1: ``<｜tool▁calls▁begin｜>`` + ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n
  ```json\\n{..}```<｜tool▁call▁end｜>`` ...;
- command-r7b: ``<|START_THINKING|>..<|END_THINKING|>``, ``<|START_RESPONSE|>..
  <|END_RESPONSE|>``, ``<|START_ACTION|>[{"tool_call_id", "tool_name", "parameters"}]
  <|END_ACTION|>``;
- generic: a template that cannot describe tools. llama.cpp 0c1e570 drops the tools then;
  jllama keeps its fallback (jllama/server/tools.py: the tools in a system message, Hermes
  calls or bare JSON parsed back).

Reasoning: a reply that starts (after whitespace) with the template's thinking tag has its
thoughts up to the end tag split off; when the generation prompt itself opened the tag
(DeepSeek R1, QwQ: "thinking forced open") the reply starts inside the thoughts. Arguments are
the model's own JSON text, as llama.cpp returns them. Output llama.cpp would reject as not
matching the format is returned as plain content here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")

_DEC = json.JSONDecoder()
_WS = " \t\n\r"


@dataclass(frozen=True)
class ChatFormat:
    name: str  # the tool-call syntax ("generic": the template cannot describe tools)
    think: tuple[str, str] | None = None  # reasoning start / end tags

    @property
    def native_tools(self) -> bool:
        return self.name != "generic"


def detect(src: str) -> ChatFormat:
    """The format a chat template's source implies (llama.cpp's specialised detection first,
    then the families its autoparser finds)."""
    think = ("<think>", "</think>") if "<think>" in src else None
    if ">>>all" in src and ">>>${recipient}" in src:
        return ChatFormat("functionary-v3.2")
    if "<|START_ACTION|>" in src:
        return ChatFormat("command-r7b", ("<|START_THINKING|>", "<|END_THINKING|>")
                          if "<|START_THINKING|>" in src else None)
    if "tool▁calls▁begin" in src:
        return ChatFormat("deepseek-r1", think)
    if "[TOOL_CALLS]" in src:
        return ChatFormat("mistral-nemo", think)
    if "functools" in src:
        return ChatFormat("firefunction-v2", think)
    if "<function=" in src and "</function>" in src and "<tool_call>" not in src:
        return ChatFormat("functionary-v3.1", think)
    if "<tool_call>" in src:
        return ChatFormat("hermes", think)
    if '"parameters": dictionary' in src:
        return ChatFormat("llama3", think)
    return ChatFormat("generic", think)


def generation_prompt(with_gen: str, without_gen: str) -> str:
    """What ``add_generation_prompt`` appended (llama.cpp's
    common_chat_template_generation_prompt: the part after the common prefix)."""
    n = 0
    for a, b in zip(with_gen, without_gen):
        if a != b:
            break
        n += 1
    return with_gen[n:]


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # name, arguments, id


class NoMatch(Exception):
    """The text does not follow the format (llama.cpp: 'does not match the expected format')."""


# ---------------------------------------------------------------------------- JSON helpers
def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _object_raw(s: str, i: int) -> tuple[list[tuple[str, str, object]], int]:
    """The JSON object at ``s[i]`` as [(key, raw value text, value)] in order, and its end."""
    if i >= len(s) or s[i] != "{":
        raise NoMatch
    items = []
    i = _skip_ws(s, i + 1)
    if i < len(s) and s[i] == "}":
        return items, i + 1
    while True:
        if i >= len(s) or s[i] != '"':
            raise NoMatch
        try:
            key, i = json.decoder.scanstring(s, i + 1)
        except ValueError:
            raise NoMatch from None
        i = _skip_ws(s, i)
        if i >= len(s) or s[i] != ":":
            raise NoMatch
        i = _skip_ws(s, i + 1)
        try:
            val, end = _DEC.raw_decode(s, i)
        except ValueError:
            raise NoMatch from None
        items.append((key, s[i:end], val))
        i = _skip_ws(s, end)
        if i < len(s) and s[i] == ",":
            i = _skip_ws(s, i + 1)
            continue
        if i < len(s) and s[i] == "}":
            return items, i + 1
        raise NoMatch


def _call_object(s: str, i: int, names: set[str], name_key: str, args_key: str,
                 id_key: str | None = None, first: tuple[str, ...] = ()) -> tuple[tuple, int]:
    """One {name_key: NAME, args_key: {..}} object at ``s[i]`` -> ((name, raw args, id), end).
    ``first``: keys allowed before the name (llama.cpp's parsers want the name first)."""
    items, end = _object_raw(s, i)
    keys = [k for k, _, _ in items]
    while keys and keys[0] in first:
        keys.pop(0)
    if not keys or keys[0] != name_key:
        raise NoMatch
    d = {k: (raw, v) for k, raw, v in items}
    name = d[name_key][1]
    if not isinstance(name, str) or name not in names or args_key not in d:
        raise NoMatch
    raw, val = d[args_key]
    if not isinstance(val, dict):
        raise NoMatch
    cid = ""
    if id_key is not None:
        if id_key not in d:
            raise NoMatch
        cid = str(d[id_key][1])
    return (name, raw, cid), end


def _call_list(s: str, i: int, names: set[str], **kw) -> tuple[list[tuple], int]:
    if i >= len(s) or s[i] != "[":
        raise NoMatch
    calls = []
    i = _skip_ws(s, i + 1)
    while True:
        call, i = _call_object(s, i, names, **kw)
        calls.append(call)
        i = _skip_ws(s, i)
        if i < len(s) and s[i] == ",":
            i = _skip_ws(s, i + 1)
            continue
        if i < len(s) and s[i] == "]":
            return calls, i + 1
        raise NoMatch


def _expect(s: str, i: int, lit: str) -> int:
    if not s.startswith(lit, i):
        raise NoMatch
    return i + len(lit)


def _end(s: str, i: int) -> None:
    if s[i:].strip(_WS):
        raise NoMatch


# ---------------------------------------------------------------------------- tool syntaxes
# each: (text, names) -> (content, calls) for a complete reply, NoMatch when it does not fit;
# START: where a call can begin (what a stream holds back)
def _hermes(s: str, names: set[str]) -> tuple[str, list]:
    i = s.find("<tool_call>")
    if i < 0:
        return s, []
    content, calls, j = s[:i], [], i
    while j < len(s) and s[j:].strip(_WS):
        j = _expect(s, _skip_ws(s, j), "<tool_call>")
        call, j = _call_object(s, _skip_ws(s, j), names, "name", "arguments")
        j = _expect(s, _skip_ws(s, j), "</tool_call>")
        calls.append(call)
    return content, calls


_LLAMA3_RE = re.compile(r'\{\s*"(?:type|name)"\s*:')


def _llama3(s: str, names: set[str]) -> tuple[str, list]:
    m = _LLAMA3_RE.search(s)
    if not m:
        return s, []
    call, j = _call_object(s, m.start(), names, "name", "parameters", first=("type",))
    _end(s, j)
    return s[:m.start()], [call]


def _marker_list(marker: str, **kw):
    def parse(s: str, names: set[str]) -> tuple[str, list]:
        i = s.find(marker)
        if i < 0:
            return s, []
        calls, j = _call_list(s, _skip_ws(s, i + len(marker)), names, **kw)
        _end(s, j)
        return s[:i], calls
    return parse


def _functionary31(s: str, names: set[str]) -> tuple[str, list]:
    i = s.find("<function=")
    if i < 0:
        return s, []
    calls, j = [], i
    while s[j:].strip(_WS):
        j = _expect(s, _skip_ws(s, j), "<function=")
        k = s.find(">", j)
        name = s[j:k] if k >= 0 else ""
        if name not in names:
            raise NoMatch
        items_start = k + 1
        try:
            val, j = _DEC.raw_decode(s, items_start)
        except ValueError:
            raise NoMatch from None
        if not isinstance(val, dict):
            raise NoMatch
        calls.append((name, s[items_start:j], ""))
        j = _expect(s, j, "</function>")
    return s[:i], calls


def _functionary32(s: str, names: set[str]) -> tuple[str, list]:
    # the generation prompt ended in ">>>": the reply starts with its recipient
    if s.startswith("all\n"):
        return s[4:], []
    k = s.find("\n")
    if k < 0 or s[:k] not in names:
        return s, []
    try:
        val, j = _DEC.raw_decode(s, k + 1)
    except ValueError:
        raise NoMatch from None
    if not isinstance(val, dict):
        raise NoMatch
    _end(s, j)
    return "", [(s[:k], s[k + 1:j], "")]


_R1 = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "function<｜tool▁sep｜>",
       "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")


def _deepseek_r1(s: str, names: set[str]) -> tuple[str, list]:
    i = s.find(_R1[0])
    if i < 0:
        return s, []
    calls, j = [], i + len(_R1[0])
    while True:
        j = _skip_ws(s, j)
        if s.startswith(_R1[4], j):
            _end(s, j + len(_R1[4]))
            return s[:i], calls
        j = _expect(s, j, _R1[1])
        j = _expect(s, j, _R1[2])
        k = s.find("\n", j)
        name = s[j:k] if k >= 0 else ""
        if name not in names:
            raise NoMatch
        j = _skip_ws(s, _expect(s, k + 1, "```json"))
        try:
            val, end = _DEC.raw_decode(s, j)
        except ValueError:
            raise NoMatch from None
        if not isinstance(val, dict):
            raise NoMatch
        calls.append((name, s[j:end], ""))
        j = _expect(s, _skip_ws(s, end), "```")
        j = _expect(s, _skip_ws(s, j), _R1[3])


def _command_r7b(s: str, names: set[str]) -> tuple[str, list]:
    # reasoning (<|START_THINKING|>) is split off before; what is left is either a response
    # block or an action block
    t = s.lstrip(_WS)
    if t.startswith("<|START_RESPONSE|>"):
        body = t[len("<|START_RESPONSE|>"):]
        k = body.find("<|END_RESPONSE|>")
        return (body if k < 0 else body[:k]), []
    if t.startswith("<|START_ACTION|>"):
        j = _skip_ws(t, len("<|START_ACTION|>"))
        calls, j = _call_list(t, j, names, name_key="tool_name", args_key="parameters",
                              id_key="tool_call_id", first=("tool_call_id",))
        j = _expect(t, _skip_ws(t, j), "<|END_ACTION|>")
        _end(t, j)
        return "", calls
    return s, []


_SYNTAX = {
    "hermes": (_hermes, ("<tool_call>",)),
    "llama3": (_llama3, ("{",)),
    "mistral-nemo": (_marker_list("[TOOL_CALLS]", name_key="name", args_key="arguments",
                                  id_key="id"), ("[TOOL_CALLS]",)),
    "firefunction-v2": (_marker_list("functools", name_key="name", args_key="arguments"),
                        ("functools",)),
    "functionary-v3.1": (_functionary31, ("<function=",)),
    "functionary-v3.2": (_functionary32, ()),
    "deepseek-r1": (_deepseek_r1, (_R1[0],)),
    "command-r7b": (_command_r7b, ("<|START_ACTION|>",)),
}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------- the parser
@dataclass
class ChatParser:
    """Splits one reply (complete, or the text so far while streaming).

    ``gen_prompt``: what add_generation_prompt appended to the prompt (it tells whether the
    thoughts are already open); ``tools``: the request's tool names to parse calls for (None:
    no tool parsing); ``reasoning_format``: none leaves the thoughts in the content."""

    fmt: ChatFormat
    gen_prompt: str = ""
    reasoning_format: str = "deepseek"
    tools: set[str] | None = None
    parallel: bool = True  # the request's parallel_tool_calls (llama-server's default: the
    # template's supports_parallel_tool_calls, true for every family here that has several)
    _opening: bool = field(default=True, init=False, repr=False)  # no thoughts before the rest
    _last: Parsed | None = field(default=None, init=False, repr=False)  # the last partial parse

    def _split_reasoning(self, text: str, partial: bool) -> tuple[str, str]:
        """(reasoning, rest); sets ``_opening``."""
        self._opening = True
        if self.fmt.think is None:
            return "", text
        start, end = self.fmt.think
        g = self.gen_prompt.rfind(start)
        if g >= 0 and end in self.gen_prompt[g:]:
            return "", text  # the prompt opened and closed the thoughts (thinking disabled)
        forced = g >= 0
        if self.reasoning_format == "none":
            # llama.cpp's content then starts with the tag the prompt opened, or the reply's
            # own tag without the whitespace before it
            if forced:
                return "", self.gen_prompt[g:] + text
            t = text.lstrip(_WS)
            if t.startswith(start):
                return "", t
            return "", "" if partial and start.startswith(t) else text
        self._opening = False
        if forced:
            body = self.gen_prompt[g + len(start):] + text
            k = body.find(end)
            if k < 0:
                if partial:
                    body = body[:len(body) - _partial_suffix(body, end)]
                return (body if body.strip(_WS) else ""), ""
            r = body[:k]
            return (r if r.strip(_WS) else ""), body[k + len(end):]
        t = text.lstrip(_WS)
        if not t.startswith(start):
            self._opening = True
            if partial and start.startswith(t):
                return "", ""  # may become the tag
            return "", text
        body = t[len(start):].lstrip(_WS)
        k = body.find(end)
        if k < 0:
            if partial:
                body = body[:len(body) - _partial_suffix(body, end)]
            return body, ""
        return body[:k], body[k + len(end):].lstrip(_WS)

    def parse(self, text: str, partial: bool = False) -> Parsed:
        reasoning, rest = self._split_reasoning(text, partial)
        out = Parsed(reasoning=reasoning)
        syntax = _SYNTAX.get(self.fmt.name)
        if self.fmt.name == "command-r7b" and not self.tools:
            syntax = (_command_r7b, ())  # responses are unwrapped with or without tools
        elif self.fmt.name == "functionary-v3.2":
            pass  # its replies always start with a recipient
        elif not self.tools:
            syntax = None
        if syntax is None:
            out.content = rest
            return out
        fn, starts = syntax
        names = self.tools or set()
        if partial:
            cur = self._partial(out, rest, fn, starts, names)
            last = self._last
            if last is not None and len(cur.calls) < len(last.calls):
                # a call that parsed, followed by the first characters of what comes next
                # (another call, text the format will reject): keep what was sent
                cur = Parsed(last.content, cur.reasoning, last.calls)
            self._last = cur
            return cur
        try:
            content, out.calls = self._calls(fn, rest, names)
            # whitespace alone opening the reply before its calls is no content (after
            # thoughts llama.cpp keeps it)
            out.content = ("" if out.calls and self._opening and not content.strip(_WS)
                           else content)
        except NoMatch:
            out.content = rest
        return out

    def _calls(self, fn, rest: str, names: set[str]) -> tuple[str, list]:
        content, calls = fn(rest, names)
        # without parallel_tool_calls llama.cpp's parsers take one call (its Hermes parser
        # takes any number either way)
        if len(calls) > 1 and not self.parallel and self.fmt.name != "hermes":
            raise NoMatch
        return content, calls

    def _partial(self, out: Parsed, rest: str, fn, starts: tuple[str, ...],
                 names: set[str]) -> Parsed:
        """While streaming: content up to where a call may begin; calls once they parse."""
        if self.fmt.name in ("functionary-v3.2", "command-r7b"):
            try:
                content, calls = fn(rest, names)
            except NoMatch:
                content, calls = "", []
            if self.fmt.name == "functionary-v3.2" and not calls:
                if rest.startswith("all\n"):
                    content = rest[4:]
                elif "\n" not in rest or rest.split("\n", 1)[0] in names:
                    content = ""  # a recipient line still coming, or a call's arguments
            if self.fmt.name == "command-r7b" and not calls:
                t = rest.lstrip(_WS)
                if t.startswith("<|START_RESPONSE|>"):
                    content = content[:len(content) - _partial_suffix(content,
                                                                      "<|END_RESPONSE|>")]
                else:
                    content = ""
            out.content, out.calls = content, calls
            return out
        cut = len(rest)
        for m in starts:
            k = rest.find(m)
            if k >= 0:
                cut = min(cut, k)
            else:
                cut = min(cut, len(rest) - _partial_suffix(rest, m))
        if cut < len(rest):
            try:
                content, calls = self._calls(fn, rest, names)
                if calls:
                    out.content = "" if self._opening and not content.strip(_WS) else content
                    out.calls = calls
                    return out
            except NoMatch:
                pass
        out.content = rest[:cut]
        if self._opening and not out.content.strip(_WS):
            out.content = ""  # whitespace before a call would not be content
        return out


def diff(prev: Parsed, new: Parsed) -> tuple[str, str, list[tuple[int, tuple]]]:
    """(reasoning delta, content delta, new calls with their index) between two parses of
    a growing reply (llama.cpp's common_chat_msg_diff, with calls sent whole)."""
    def tail(a: str, b: str) -> str:
        return b[len(a):] if b.startswith(a) else ""
    return (tail(prev.reasoning, new.reasoning), tail(prev.content, new.content),
            [(i, c) for i, c in enumerate(new.calls) if i >= len(prev.calls)])
