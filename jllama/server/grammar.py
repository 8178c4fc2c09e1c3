"""JSON-constrained decoding: a byte-level JSON recognizer and a lazily masked token pick.

``response_format: json_object`` must yield parseable JSON even from a 135M model. A full logit
mask would check all ~50k vocabulary entries at every step in Python; instead the token the
engine already sampled is checked first (almost always valid once the model is on track), and
only when it is not are the best candidates scanned in logit order until valid ones are found.
Accepting a valid draw and otherwise drawing from the valid candidates is exactly sampling from
the masked distribution (rejection sampling), so nothing is approximated except that the
fallback draw ignores the repetition penalties and looks at the top ``TOP_CANDIDATES`` first.

The recognizer works on bytes, not characters: JSON's structure is ASCII and any byte >= 0x80 is
legal inside a string, so tokens holding half of a UTF-8 character need no special case.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from jllama.server.gbnf import MAX_MEMO, Grammar, Matcher

TOP_CANDIDATES = 256
MAX_WS = 8  # consecutive whitespace bytes allowed between tokens (stops endless newlines)
MAX_DEPTH = 24

# modes
VALUE, OBJ_FIRST, OBJ_KEY, COLON, ARR_FIRST, AFTER, STR_VAL, STR_KEY, NUM, LIT, DONE = range(11)
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESC = frozenset(b'"\\/bfnrt')
_NUM_END_OK = frozenset((1, 2, 4, 7))

# state: (stack, mode, aux, ws) — stack is a str of 'o'/'a'; aux is the string escape state,
# the number sub-state or the literal's remaining bytes
State = tuple


def initial(root: str = "object") -> State:
    return ("", VALUE, "root-object" if root == "object" else None, 0)


def _close_value(stack: str) -> State:
    return (stack, DONE if not stack else AFTER, None, 0)


def _start_value(stack: str, b: int, root_object: bool) -> State | None:
    if root_object and b != 0x7B:
        return None
    if b == 0x7B:  # {
        return None if len(stack) >= MAX_DEPTH else (stack + "o", OBJ_FIRST, None, 0)
    if b == 0x5B:  # [
        return None if len(stack) >= MAX_DEPTH else (stack + "a", ARR_FIRST, None, 0)
    if b == 0x22:
        return (stack, STR_VAL, 0, 0)
    if b == 0x2D:
        return (stack, NUM, 0, 0)
    if b == 0x30:
        return (stack, NUM, 1, 0)
    if b in _DIGITS:
        return (stack, NUM, 2, 0)
    for lit in (b"true", b"false", b"null"):
        if b == lit[0]:
            return (stack, LIT, lit[1:], 0)
    return None


def step(s: State, b: int) -> State | None:
    """Advance by one byte; None when the byte cannot continue valid JSON."""
    stack, mode, aux, ws = s
    if mode in (STR_VAL, STR_KEY):
        if aux == 0:
            if b == 0x22:
                return (stack, COLON, None, 0) if mode == STR_KEY else _close_value(stack)
            if b == 0x5C:
                return (stack, mode, 1, 0)
            return None if b < 0x20 else s
        if aux == 1:
            if b == 0x75:  # \u
                return (stack, mode, 5, 0)
            return (stack, mode, 0, 0) if b in _ESC else None
        if b not in _HEX:
            return None
        return (stack, mode, 0 if aux == 2 else aux - 1, 0)
    if mode == NUM:
        if b in _DIGITS:
            if aux == 1:
                return None  # no leading zeros
            if aux == 0 and b == 0x30:
                return (stack, NUM, 1, 0)
            return (stack, NUM, {0: 2, 2: 2, 3: 4, 4: 4, 5: 7, 6: 7, 7: 7}[aux], 0)
        if b == 0x2E and aux in (1, 2):
            return (stack, NUM, 3, 0)
        if b in (0x65, 0x45) and aux in (1, 2, 4):
            return (stack, NUM, 5, 0)
        if b in (0x2B, 0x2D) and aux == 5:
            return (stack, NUM, 6, 0)
        if aux in _NUM_END_OK:
            nxt = _close_value(stack)
            return step(nxt, b)
        return None
    if mode == LIT:
        if b != aux[0]:
            return None
        return _close_value(stack) if len(aux) == 1 else (stack, LIT, aux[1:], 0)
    if b in _WS:
        return None if ws >= MAX_WS else (stack, mode, aux, ws + 1)
    if mode == VALUE:
        return _start_value(stack, b, aux == "root-object")
    if mode == ARR_FIRST:
        if b == 0x5D:
            return _close_value(stack[:-1])
        return _start_value(stack, b, False)
    if mode == OBJ_FIRST:
        if b == 0x7D:
            return _close_value(stack[:-1])
        return (stack, STR_KEY, 0, 0) if b == 0x22 else None
    if mode == OBJ_KEY:
        return (stack, STR_KEY, 0, 0) if b == 0x22 else None
    if mode == COLON:
        return (stack, VALUE, None, 0) if b == 0x3A else None
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:
            return (stack, OBJ_KEY if top == "o" else VALUE, None, 0)
        if (b == 0x7D and top == "o") or (b == 0x5D and top == "a"):
            return _close_value(stack[:-1])
        return None
    return None  # DONE: only whitespace (handled above) may follow


def feed(s: State, data: bytes) -> State | None:
    for b in data:
        s = step(s, b)
        if s is None:
            return None
    return s


def is_done(s: State) -> bool:
    return s[1] == DONE


class JsonConstraint:
    """Per-request JSON state (generic, or guided by a JSON schema) plus the shared token byte
    table."""

    def __init__(self, token_bytes: list[bytes], eog: frozenset[int], root: str = "object",
                 schema: dict | None = None):
        self.tokens = token_bytes
        self.eog = eog
        node = compile_schema(schema) if schema is not None else None
        if node is None or node == ANY or node == ("anyobj",):
            self.state = initial(root)
            self._feed, self._done = feed, is_done
        else:
            self.state = schema_initial(node)
            self._feed, self._done = schema_feed, _stack_done

    def accepts(self, tok: int):
        if tok in self.eog:
            return self.state if self._done(self.state) else None
        piece = self.tokens[tok] if tok < len(self.tokens) else b""
        if not piece:
            return None
        return self._feed(self.state, piece)

    def advance(self, tok: int) -> None:
        nxt = self.accepts(tok)
        if nxt is None:
            raise ValueError(f"token {tok} violates the JSON constraint")
        self.state = nxt

    @property
    def done(self) -> bool:
        return self._done(self.state)

    def pick(self, drawn: int, logits: Callable[[], np.ndarray] | np.ndarray, temperature: float,
             top_p: float, rng: np.random.Generator, top_k: int = 0, min_p: float = 0.0,
             sampler=None) -> int:
        """``drawn`` if it keeps the output valid, else a draw among the valid candidates.
        ``logits`` may be a callable: fetching them from the device is skipped when the draw
        is valid. The redraw runs llama.cpp's chain on the masked candidates, in its order
        (common_sampler_sample resamples that way). With the request's ``sampler``
        (dist.HostSampler, which drew ``drawn``) it is that whole chain and its generators on
        the same chain input; without it top-k, top-p and min-p on the untempered
        distribution, then temperature."""
        if self.accepts(drawn) is not None:
            return drawn
        if sampler is not None and sampler.row is not None:
            return sampler.sample(sampler.row, self._allowed(sampler.row, top_k))
        if callable(logits):
            logits = logits()
        logits = np.asarray(logits, np.float32)[: len(self.tokens)]
        k = min(TOP_CANDIDATES, logits.shape[0])
        top = np.argpartition(-logits, k - 1)[:k]
        top = top[np.argsort(-logits[top], kind="stable")]
        valid = [int(t) for t in top if self.accepts(int(t)) is not None]
        if not valid:  # the model strays far: scan the whole vocabulary in logit order
            for t in np.argsort(-logits, kind="stable"):
                if self.accepts(int(t)) is not None:
                    return int(t)
            raise ValueError("no token can continue the JSON output")
        if temperature <= 0 or len(valid) == 1:
            return valid[0]
        if top_k > 0:
            valid = valid[:top_k]
        z = logits[valid].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        keep = ((np.cumsum(p) - p) < top_p) & (p >= min_p * p[0])
        keep[0] = True
        z = np.where(keep, z / temperature, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        return valid[int(rng.choice(len(valid), p=p))]


    def _allowed(self, row: np.ndarray, top_k: int) -> np.ndarray:
        """A mask of valid tokens holding at least the ``top_k`` best valid ones by logit (all
        of them when top-k is off): top-k on the masked row then keeps what llama.cpp's
        grammar-then-chain keeps, without testing every token of the vocabulary."""
        n = min(len(self.tokens), row.shape[0])
        mask = np.zeros(row.shape[0], bool)
        want = top_k if top_k > 0 else n
        found = 0
        for t in np.argsort(-np.asarray(row[:n], np.float32), kind="stable"):
            if self.accepts(int(t)) is not None:
                mask[t] = True
                found += 1
                if found >= want:
                    break
        if not found:
            raise ValueError("no token can continue the JSON output")
        return mask


def _stack_done(stack: tuple) -> bool:
    return not stack


# ---------------------------------------------------------------------------- JSON schemas
# A schema compiles to a tree of nodes; the constrained output is the schema's canonical
# layout (``json.dumps`` spacing, properties in schema order, only the required ones when the
# schema lists them). Covered: object with properties, array (items), string, number, integer,
# boolean, null, enum, const; anything else (anyOf, $ref, free objects) falls back to generic
# JSON for that value.
ANY = ("any",)
Node = tuple


def compile_schema(s, depth: int = 0) -> Node:
    if not isinstance(s, dict) or depth > 12:
        return ANY
    if "const" in s:
        return ("lit", json.dumps(s["const"], ensure_ascii=False).encode())
    if isinstance(s.get("enum"), list) and s["enum"]:
        return ("enum", tuple(json.dumps(v, ensure_ascii=False).encode() for v in s["enum"]))
    t = s.get("type")
    if isinstance(t, list):
        t = t[0] if len(t) == 1 else None
    if t == "object" or (t is None and isinstance(s.get("properties"), dict)):
        props = s.get("properties")
        if not isinstance(props, dict) or not props:
            return ("anyobj",)
        req = s.get("required")
        keys = [k for k in props if not isinstance(req, list) or k in req] or list(props)
        parts: list[Node] = []
        for i, k in enumerate(keys):
            key = ("{" if i == 0 else ", ") + json.dumps(k, ensure_ascii=False) + ": "
            parts += [("lit", key.encode()), compile_schema(props[k], depth + 1)]
        parts.append(("lit", b"}"))
        merged: list[Node] = []
        for p in parts:
            if merged and p[0] == "lit" and merged[-1][0] == "lit":
                merged[-1] = ("lit", merged[-1][1] + p[1])
            else:
                merged.append(p)
        return ("seq", tuple(merged))
    if t == "array":
        return ("arr", compile_schema(s.get("items"), depth + 1))
    if t == "string":
        return ("str",)
    if t in ("number", "integer"):
        return ("num", t == "integer")
    if t == "boolean":
        return ("enum", (b"true", b"false"))
    if t == "null":
        return ("lit", b"null")
    return ANY


def _start(node: Node) -> tuple:
    k = node[0]
    if k == "seq":
        return ("seq", node[1], 0)
    if k == "lit":
        return ("lit", node[1], 0)
    if k == "enum":
        return ("enum", node[1], b"")
    if k == "str":
        return ("str", -1)
    if k == "num":
        return ("num", node[1], -1)
    if k == "arr":
        return ("arr", node[1], 0)
    if k == "anyobj":
        return ("any", initial("object"))
    return ("any", initial("any"))


def schema_initial(node: Node) -> tuple:
    return (_start(node),)


def schema_step(stack: tuple, b: int) -> tuple | None:
    """Advance a stack of schema frames by one byte (None: the byte is not allowed)."""
    while stack:
        top, rest = stack[-1], stack[:-1]
        k = top[0]
        if k == "seq":
            kids, i = top[1], top[2]
            if i == len(kids):
                stack = rest
                continue
            stack = rest + (("seq", kids, i + 1), _start(kids[i]))
            continue
        if k == "lit":
            lit, i = top[1], top[2]
            if lit[i] != b:
                return None
            return _pop_done(rest if i + 1 == len(lit) else rest + (("lit", lit, i + 1),))
        if k == "enum":
            pre = top[2] + bytes((b,))
            alts = [a for a in top[1] if a.startswith(pre)]
            if not alts:
                return None
            return _pop_done(rest if pre in alts else rest + (("enum", top[1], pre),))
        if k == "str":
            sub = top[1]
            if sub == -1:
                return rest + (("str", 0),) if b == 0x22 else None
            if sub == 0:
                if b == 0x22:
                    return _pop_done(rest)
                if b == 0x5C:
                    return rest + (("str", 1),)
                return None if b < 0x20 else stack
            if sub == 1:
                if b == 0x75:
                    return rest + (("str", 5),)
                return rest + (("str", 0),) if b in _ESC else None
            if b not in _HEX:
                return None
            return rest + (("str", 0 if sub == 2 else sub - 1),)
        if k == "num":
            is_int, sub = top[1], top[2]
            if sub == -1:
                if b == 0x2D:
                    return rest + (("num", is_int, 0),)
                if b == 0x30:
                    return rest + (("num", is_int, 1),)
                return rest + (("num", is_int, 2),) if b in _DIGITS else None
            if b == 0x30 and sub == 0:
                return rest + (("num", is_int, 1),)
            if b in _DIGITS and sub != 1:
                return rest + (("num", is_int, {0: 2, 2: 2, 3: 4, 4: 4, 5: 7, 6: 7, 7: 7}[sub]),)
            if not is_int:
                if b == 0x2E and sub in (1, 2):
                    return rest + (("num", is_int, 3),)
                if b in (0x65, 0x45) and sub in (1, 2, 4):
                    return rest + (("num", is_int, 5),)
                if b in (0x2B, 0x2D) and sub == 5:
                    return rest + (("num", is_int, 6),)
            if sub in _NUM_END_OK:  # the number ended: the byte belongs to the parent
                stack = rest
                continue
            return None
        if k == "arr":
            item, ph = top[1], top[2]
            if ph == 0:
                return rest + (("arr", item, 1),) if b == 0x5B else None
            if ph in (1, 2) and b == 0x5D:
                return _pop_done(rest)
            if ph == 2:
                return rest + (("arr", item, 3),) if b == 0x2C else None
            if ph == 3 and b == 0x20:
                return rest + (("arr", item, 4),)
            stack = rest + (("arr", item, 2), _start(item))
            continue
        if k == "any":
            g = top[1]
            nxt = step(g, b)
            if nxt is not None:
                return _pop_done(rest) if is_done(nxt) and nxt[1] != NUM else rest + (("any", nxt),)
            if g[1] == NUM and not g[0] and g[2] in _NUM_END_OK:
                stack = rest
                continue
            return None
        return None
    return None


def _pop_done(stack: tuple) -> tuple:
    """Drop finished sequences so that an empty stack means 'complete'."""
    while stack and stack[-1][0] == "seq" and stack[-1][2] == len(stack[-1][1]):
        stack = stack[:-1]
    return stack


def schema_feed(stack: tuple, data: bytes) -> tuple | None:
    for b in data:
        stack = schema_step(stack, b)
        if stack is None:
            return None
    return stack


# ---------------------------------------------------------------------------- GBNF grammars
class GrammarConstraint(JsonConstraint):
    """llama.cpp's ``grammar`` request field (GBNF; also what JSON schemas compile to): the
    same lazily masked pick as the JSON recognizer, with llama.cpp's grammar semantics: end of
    generation is allowed where a parse is complete, and the request ends by itself when
    nothing more can follow."""

    def __init__(self, token_bytes: list[bytes], eog: frozenset[int], grammar: Grammar):
        self.tokens = token_bytes
        self.eog = eog
        self.g = grammar
        self.m = Matcher(grammar)
        self.state = self.m.initial()
        self._sid = grammar.intern(self.state)

    def accepts(self, tok: int):
        # a candidate scan asks about many tokens from one state, and requests sharing the
        # grammar revisit the same states: answers are memoized per (state, token, bytes)
        eog = tok in self.eog
        piece = self.tokens[tok] if tok < len(self.tokens) else b""
        key = (self._sid, tok, piece, eog)
        memo = self.g.memo
        hit = memo.get(key, memo)
        if hit is not memo:
            return hit
        if eog:
            res = self.state if self.m.can_end(self.state) else None
        else:
            res = self.m.feed_token(self.state, tok, piece)
        if len(memo) < MAX_MEMO:
            memo[key] = res
        return res

    def advance(self, tok: int) -> None:
        super().advance(tok)
        self._sid = self.g.intern(self.state)

    @property
    def done(self) -> bool:
        return self.m.must_end(self.state)


_GRAMMARS: dict[tuple[str, str], object] = {}


def compile_grammar(text: str, root: str = "root", token_id=None):
    """A parsed grammar, shared by requests sending the same text (its transition cache with
    it); raises gbnf.GrammarError."""
    key = (text, root)
    g = _GRAMMARS.get(key)
    if g is None:
        g = Grammar(text, root, token_id)
        if len(_GRAMMARS) >= 16:
            _GRAMMARS.pop(next(iter(_GRAMMARS)))
        _GRAMMARS[key] = g
    return g
