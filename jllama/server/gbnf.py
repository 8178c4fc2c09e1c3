"""llama.cpp's GBNF grammars: the parser and the pushdown recognizer (src/llama-grammar.cpp).

The language and its corner cases follow llama.cpp: rules ``name ::= alternates``, literals with
``\\x \\u \\U \\t \\r \\n`` escapes, character classes (``[^...]`` negation, ``a-z`` ranges),
``.``, groups, ``* + ? {m} {m,} {m,n}`` (rewritten into helper rules exactly as llama.cpp does,
which fixes what ``{m,n}`` accepts), ``#`` comments, newlines ending a rule only outside groups,
``<[id]>`` / ``!<[id]>`` token terminals, undefined rules and left recursion rejected.

Matching is llama.cpp's: a set of stacks of grammar positions, each stack expanded until its top
is a terminal; a code point moves every stack whose terminal matches. Text arrives as token
bytes, decoded as llama.cpp's ``decode_utf8`` does (a token may end inside a UTF-8 sequence;
such a token is kept if some completion of the sequence could match). The expansion of a stack
set by one code point is cached per grammar, so a constrained request's candidate scan costs a
dictionary lookup per character once the grammar's common paths have been seen.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
MAX_INTERNED = 200_000  # states remembered per grammar (memo keys)
MAX_MEMO = 300_000  # memoized token answers per grammar
MAX_CACHE = 200_000  # memoized code point transitions per grammar
MAX_CP = 0x10FFFF

# element kinds: a character class, a rule reference, a token terminal
CHR, REF, TOK = 0, 1, 2
# a character class element: (CHR, negated, ((lo, hi), ...)); "." is a class of everything
# a rule reference: (REF, rule_id); a token: (TOK, negated, token_id)


class GrammarError(ValueError):
    """The grammar text is not valid GBNF (llama.cpp refuses it too)."""


# ---------------------------------------------------------------------------- parser
def _word(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "-"


class _Parser:
    def __init__(self, src: str, token_id: Callable[[str], int | None] | None):
        self.s = src + "\0"  # a sentinel like the C string's terminator
        self.token_id = token_id
        self.ids: dict[str, int] = {}
        self.rules: dict[int, list[tuple]] = {}

    # -- lexing helpers (positions are indices into self.s)
    def space(self, i: int, newline_ok: bool) -> int:
        s = self.s
        while s[i] in " \t#" or (newline_ok and s[i] in "\r\n"):
            if s[i] == "#":
                while s[i] not in "\0\r\n":
                    i += 1
            else:
                i += 1
        return i

    def name(self, i: int) -> int:
        j = i
        while _word(self.s[j]):
            j += 1
        if j == i:
            raise GrammarError(f"expecting name at {self._at(i)}")
        return j

    def _at(self, i: int) -> str:
        return self.s[i:i + 40].rstrip("\0") or "end of input"

    def symbol(self, name: str) -> int:
        return self.ids.setdefault(name, len(self.ids))

    def fresh(self, base: str) -> int:
        n = len(self.ids)
        self.ids[f"{base}_{n}"] = n
        return n

    def hexnum(self, i: int, size: int) -> tuple[int, int]:
        v = 0
        for k in range(size):
            c = self.s[i + k]
            if c not in "0123456789abcdefABCDEF" or c == "\0":
                raise GrammarError(f"expecting {size} hex chars at {self._at(i)}")
            v = v * 16 + int(c, 16)
        return v, i + size

    def char(self, i: int) -> tuple[int, int]:
        s = self.s
        if s[i] == "\\":
            e = s[i + 1]
            if e == "x":
                return self.hexnum(i + 2, 2)
            if e == "u":
                return self.hexnum(i + 2, 4)
            if e == "U":
                return self.hexnum(i + 2, 8)
            simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
            if e in simple:
                return simple[e], i + 2
            raise GrammarError(f"unknown escape at {self._at(i)}")
        if s[i] == "\0":
            raise GrammarError("unexpected end of input")
        return ord(s[i]), i + 1

    def token(self, i: int) -> tuple[int, int]:
        s = self.s
        if s[i] != "<":
            raise GrammarError(f"expecting '<' at {self._at(i)}")
        j = i + 1
        if s[j] == "[":
            k = j + 1
            while s[k].isdigit() and s[k].isascii():
                k += 1
            if k == j + 1:
                raise GrammarError(f"expecting integer at {self._at(j + 1)}")
            tid = int(s[j + 1:k])
            if tid > 0xFFFFFFFF:
                raise GrammarError(f"parsed token id is too big at {self._at(j + 1)}")
            if s[k] != "]":
                raise GrammarError(f"expecting ']' at {self._at(k)}")
            if s[k + 1] != ">":
                raise GrammarError(f"expecting '>' at {self._at(k + 1)}")
            return tid, k + 2
        if self.token_id is None:
            raise GrammarError(f"no vocab to parse token at {self._at(i)}")
        k = j
        while s[k] not in "\0>":
            k += 1
        if s[k] != ">":
            raise GrammarError(f"expecting '>' at {self._at(k)}")
        tid = self.token_id(s[i:k + 1])
        if tid is None:
            raise GrammarError(f"invalid token '{s[i:k + 1]}'")
        return tid, k + 1

    # -- grammar structure
    def parse(self) -> list[list[tuple]]:
        i = self.space(0, True)
        while self.s[i] != "\0":
            i = self.rule(i)
        n = len(self.ids)
        for name, rid in self.ids.items():
            if rid not in self.rules:
                raise GrammarError(f"Undefined rule identifier '{name}'")
        return [self.rules[r] for r in range(n)]

    def rule(self, i: int) -> int:
        j = self.name(i)
        name = self.s[i:j]
        rid = self.symbol(name)
        k = self.space(j, False)
        if self.s[k:k + 3] != "::=":
            raise GrammarError(f"expecting ::= at {self._at(k)}")
        k = self.alternates(self.space(k + 3, True), name, rid, False)
        if self.s[k] == "\r":
            k += 2 if self.s[k + 1] == "\n" else 1
        elif self.s[k] == "\n":
            k += 1
        elif self.s[k] != "\0":
            raise GrammarError(f"expecting newline or end at {self._at(k)}")
        return self.space(k, True)

    def alternates(self, i: int, name: str, rid: int, nested: bool) -> int:
        alts = []
        seq, i = self.sequence(i, name, nested)
        alts.append(tuple(seq))
        while self.s[i] == "|":
            i = self.space(i + 1, True)
            seq, i = self.sequence(i, name, nested)
            alts.append(tuple(seq))
        self.rules[rid] = alts  # a second definition replaces the first, as in llama.cpp
        return i

    def sequence(self, i: int, name: str, nested: bool) -> tuple[list[tuple], int]:
        s = self.s
        seq: list[tuple] = []
        last = 0  # where the last item starts (repetition operators apply to seq[last:])
        n_prev = 1  # how many rules the last item stands for (llama.cpp's blow-up guard)

        def repeat(lo: int, hi: int | None) -> None:
            nonlocal n_prev
            if last == len(seq):
                raise GrammarError(f"expecting preceding item to */+/?/{{ at {self._at(i)}")
            item = seq[last:]
            total = hi if hi is not None and hi > 0 else (lo if lo > 0 else 1)
            if n_prev * total > MAX_REPETITION:
                raise GrammarError("number of rules that are going to be repeated multiplied by "
                                   "the new repetition exceeds sane defaults, please reduce the "
                                   "number of repetitions or rule complexity")
            del seq[last:]
            for _ in range(lo):
                seq.extend(item)
            # llama.cpp's rewrite: x{m,n} = x..x (m times) then a chain of n-m optional rules,
            # x{m,} = x..x then one right-recursive rule; the helper rules are what they accept
            n_opt = 1 if hi is None else hi - lo
            prev_id = 0
            for k in range(n_opt):
                rid = self.fresh(name)
                tail = ((REF, rid if hi is None else prev_id),) if (k > 0 or hi is None) else ()
                self.rules[rid] = [tuple(item) + tail, ()]
                prev_id = rid
            if n_opt > 0:
                seq.append((REF, prev_id))
            n_prev *= total

        while s[i] != "\0":
            c = s[i]
            if c == '"':
                i += 1
                last, n_prev = len(seq), 1
                while s[i] != '"':
                    if s[i] == "\0":
                        raise GrammarError("unexpected end of input")
                    cp, i = self.char(i)
                    seq.append((CHR, False, ((cp, cp),)))
                i = self.space(i + 1, nested)
            elif c == "[":
                i += 1
                neg = s[i] == "^"
                if neg:
                    i += 1
                last, n_prev = len(seq), 1
                ranges = []
                while s[i] != "]":
                    if s[i] == "\0":
                        raise GrammarError("unexpected end of input")
                    lo, i = self.char(i)
                    hi = lo
                    if s[i] == "-" and s[i + 1] != "]":
                        if s[i + 1] == "\0":
                            raise GrammarError("unexpected end of input")
                        hi, i = self.char(i + 1)
                    ranges.append((lo, hi))
                seq.append((CHR, neg, tuple(ranges)))
                i = self.space(i + 1, nested)
            elif c in "<!":
                neg = c == "!"
                tid, i = self.token(i + 1 if neg else i)
                last, n_prev = len(seq), 1
                seq.append((TOK, neg, tid))
                i = self.space(i, nested)
            elif _word(c):
                j = self.name(i)
                rid = self.symbol(s[i:j])
                i = self.space(j, nested)
                last, n_prev = len(seq), 1
                seq.append((REF, rid))
            elif c == "(":
                i = self.space(i + 1, True)
                before = len(self.ids)
                sub = self.fresh(name)
                i = self.alternates(i, name, sub, True)
                n_prev = max(1, len(self.ids) - before)
                last = len(seq)
                seq.append((REF, sub))
                if s[i] != ")":
                    raise GrammarError(f"expecting ')' at {self._at(i)}")
                i = self.space(i + 1, nested)
            elif c == ".":
                last, n_prev = len(seq), 1
                seq.append((CHR, False, ((0, 0xFFFFFFFF),)))
                i = self.space(i + 1, nested)
            elif c in "*+?":
                i = self.space(i + 1, nested)
                repeat(*{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
            elif c == "{":
                i = self.space(i + 1, nested)
                j = i
                while s[j].isascii() and s[j].isdigit():
                    j += 1
                if j == i:
                    raise GrammarError(f"expecting an int at {self._at(i)}")
                lo = int(s[i:j])
                i = self.space(j, nested)
                hi: int | None = None
                if s[i] == "}":
                    hi = lo
                    i = self.space(i + 1, nested)
                elif s[i] == ",":
                    i = self.space(i + 1, nested)
                    j = i
                    while s[j].isascii() and s[j].isdigit():
                        j += 1
                    if j > i:
                        hi = int(s[i:j])
                        i = self.space(j, nested)
                    if s[i] != "}":
                        raise GrammarError(f"expecting '}}' at {self._at(i)}")
                    i = self.space(i + 1, nested)
                else:
                    raise GrammarError(f"expecting ',' at {self._at(i)}")
                if lo > MAX_REPETITION:
                    raise GrammarError("number of repetitions exceeds sane defaults, please "
                                       "reduce the number of repetitions")
                if hi is not None and hi > MAX_REPETITION:
                    hi = None
                repeat(lo, hi)
            else:
                break
        return seq, i


def _left_recursive(rules: list[list[tuple]]) -> int | None:
    """The first rule that can reach itself without consuming input (llama.cpp refuses these)."""
    n = len(rules)
    visited, busy, empty = [False] * n, [False] * n, [False] * n

    def visit(r: int) -> bool:
        if busy[r]:
            return True
        busy[r] = True
        if any(len(a) == 0 for a in rules[r]):
            empty[r] = True
        for alt in rules[r]:
            for el in alt:
                if el[0] != REF:
                    break
                if visit(el[1]):
                    return True
                if not empty[el[1]]:
                    break
        busy[r] = False
        visited[r] = True
        return False

    for r in range(n):
        if not visited[r] and visit(r):
            return r
    return None


# ---------------------------------------------------------------------------- grammar
Stack = tuple  # of (rule, alternative, element index) positions, top last
Stacks = tuple  # of Stack


class Grammar:
    """A parsed grammar and its cached code point transitions (shared by every request that
    sends the same text)."""

    def __init__(self, text: str, root: str = "root",
                 token_id: Callable[[str], int | None] | None = None):
        p = _Parser(text, token_id)
        self.rules = p.parse()
        if not self.rules:
            raise GrammarError("the grammar has no rules")
        self.names = {v: k for k, v in p.ids.items()}
        if root not in p.ids:
            raise GrammarError(f"grammar does not contain a '{root}' symbol")
        bad = _left_recursive(self.rules)
        if bad is not None:
            raise GrammarError("unsupported grammar, left recursion detected for nonterminal "
                               f"'{self.names[bad]}'")
        self.root = p.ids[root]
        self._cache: dict[tuple, Stacks] = {}
        self._ids: dict[tuple, int] = {}
        self._n_ids = 0
        self.memo: dict[tuple, object] = {}  # for GrammarConstraint: (state id, token) answers
        out: list[Stack] = []
        for a in range(len(self.rules[self.root])):
            self._expand(((self.root, a, 0),) if self.rules[self.root][a] else (), out)
        self.start: Stacks = tuple(out)

    def intern(self, state: tuple) -> int:
        """A small id for a matcher state (cheap memo keys). Past MAX_INTERNED states a new
        state gets a fresh id that is not remembered, so memory stays bounded on a long-lived
        server and ids stay unique."""
        i = self._ids.get(state)
        if i is None:
            i = self._n_ids
            self._n_ids += 1
            if len(self._ids) < MAX_INTERNED:
                self._ids[state] = i
        return i

    def element(self, pos: tuple) -> tuple:
        r, a, i = pos
        return self.rules[r][a][i]

    def _next(self, stack: Stack) -> Stack:
        """The stack after its top element is consumed."""
        r, a, i = stack[-1]
        rest = stack[:-1]
        return rest + ((r, a, i + 1),) if i + 1 < len(self.rules[r][a]) else rest

    def _expand(self, stack: Stack, out: list[Stack]) -> None:
        """llama_grammar_advance_stack: every stack reachable by expanding rule references on
        top, down to a terminal (or the empty stack: the input may end here)."""
        todo = [stack]
        seen = set()
        while todo:
            st = todo.pop()
            if st in seen:
                continue
            seen.add(st)
            if not st:
                if st not in out:
                    out.append(st)
                continue
            el = self.element(st[-1])
            if el[0] != REF:
                if st not in out:
                    out.append(st)
                continue
            after = self._next(st)
            for a, alt in enumerate(self.rules[el[1]]):
                todo.append(after + ((el[1], a, 0),) if alt else after)

    def accept_cp(self, stacks: Stacks, cp: int) -> Stacks:
        key = (stacks, cp)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out: list[Stack] = []
        for st in stacks:
            if not st:
                continue
            el = self.element(st[-1])
            if el[0] == CHR and _match(el, cp):
                self._expand(self._next(st), out)
        res = tuple(out)
        if len(self._cache) < MAX_CACHE:
            self._cache[key] = res
        return res

    def accept_token_id(self, stacks: Stacks, tok: int) -> Stacks:
        out: list[Stack] = []
        for st in stacks:
            if st:
                el = self.element(st[-1])
                if el[0] == TOK and (el[2] != tok) == el[1]:
                    self._expand(self._next(st), out)
        return tuple(out)

    def partial_ok(self, stacks: Stacks, partial: tuple[int, int]) -> bool:
        """Some stack's character class can match a completion of the partial UTF-8 sequence."""
        value, n_remain = partial
        if n_remain < 0 or (n_remain == 1 and value < 2):
            return False
        lo = value << (n_remain * 6)
        hi = lo | ((1 << (n_remain * 6)) - 1)
        if lo == 0:
            lo = {2: 1 << 11, 3: 1 << 16}.get(n_remain, lo)
        for st in stacks:
            if st:
                el = self.element(st[-1])
                if el[0] == CHR:
                    hit = any(a <= hi and lo <= b for a, b in el[2])
                    if hit != el[1]:
                        return True
        return False


def _match(el: tuple, cp: int) -> bool:
    return any(a <= cp <= b for a, b in el[2]) != el[1]


_UTF8_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)


def decode_utf8(data: bytes, partial: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
    """llama.cpp's decode_utf8: code points of ``data`` continuing ``partial`` (value,
    bytes still missing) and the new partial state; n_remain -1 marks invalid input. Like the C
    string it works on, the data ends at its first NUL byte."""
    cut = data.find(b"\0")
    if cut >= 0:
        data = data[:cut]
    cps: list[int] = []
    value, n_remain = partial
    i = 0
    while i < len(data) and n_remain > 0:
        b = data[i]
        if b >> 6 != 2:
            return [], (0, -1)
        value = (value << 6) + (b & 0x3F)
        i += 1
        n_remain -= 1
    if partial[1] > 0 and n_remain == 0:
        cps.append(value)
    while i < len(data):
        b = data[i]
        n_remain = _UTF8_LEN[b >> 4] - 1
        if n_remain < 0:
            return [], (0, n_remain)
        value = b & ((1 << (7 - n_remain)) - 1)
        i += 1
        while i < len(data) and n_remain > 0:
            value = (value << 6) + (data[i] & 0x3F)
            i += 1
            n_remain -= 1
        if n_remain == 0:
            cps.append(value)
    return cps, (value, n_remain) if n_remain > 0 else (0, 0) if n_remain == 0 else (0, -1)


class Matcher:
    """One request's position in a grammar: (stacks, partial UTF-8). Immutable states, so a
    candidate scan can try tokens without copying."""

    def __init__(self, grammar: Grammar):
        self.g = grammar

    def initial(self) -> tuple:
        return (self.g.start, (0, 0))

    def feed_bytes(self, state: tuple, data: bytes) -> tuple | None:
        """The state after ``data`` (one token's bytes), or None if the grammar rejects it
        (llama_grammar_reject_candidates' rules: a token ending in a partial character is kept
        when some completion of it can match)."""
        stacks, partial = state
        if not data or data[0] == 0:
            return None
        cps, nxt = decode_utf8(data, partial)
        if nxt[1] < 0:
            return None
        g = self.g
        for cp in cps:
            stacks = g.accept_cp(stacks, cp)
            if not stacks:
                return None
        if nxt[1] > 0 and not g.partial_ok(stacks, nxt):
            return None
        return (stacks, nxt)

    def feed_token(self, state: tuple, tok: int, data: bytes) -> tuple | None:
        """A token: matched by id where a stack waits for a token terminal, by its bytes
        elsewhere (llama_grammar_accept_token)."""
        stacks, partial = state
        by_id = self.g.accept_token_id(stacks, tok) if partial[1] == 0 else ()
        char_stacks = tuple(s for s in stacks if s and self.g.element(s[-1])[0] == CHR)
        by_text = self.feed_bytes((char_stacks, partial), data) if char_stacks else None
        if by_text is None:
            return (by_id, (0, 0)) if by_id else None
        if by_id:
            merged = by_text[0] + tuple(s for s in by_id if s not in by_text[0])
            return (merged, by_text[1])
        return by_text

    @staticmethod
    def can_end(state: tuple) -> bool:
        """End of generation is allowed: some stack is complete (llama.cpp's allow_eog)."""
        return any(not s for s in state[0])

    @staticmethod
    def must_end(state: tuple) -> bool:
        """Nothing can follow: every stack is complete."""
        return all(not s for s in state[0])
