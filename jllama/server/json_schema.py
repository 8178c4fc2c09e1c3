"""JSON Schema → GBNF with llama.cpp's rules (common/json-schema.cpp, json-schema-to-grammar.cpp).

llama-server turns ``json_schema`` and ``response_format: json_schema`` into a grammar; the
language that grammar accepts is the contract, so the rules here are llama.cpp's: the schema
keywords it reads and the order it reads them in (``$ref``, then ``oneOf``/``anyOf``, ``type``
lists as alternatives, ``const``, ``enum``, then by type or by the structural keywords), its
whitespace rule between tokens, object properties in schema order with the required ones first
and any subset of the optional ones after them (in order), ``additionalProperties`` (absent:
none when ``properties`` is given, anything otherwise), integer ranges spelled digit by digit,
``minLength``/``maxLength``, ``minItems``/``maxItems``, tuples, ``allOf`` merged into one
object (or an enum intersection), the date/time/uuid formats, and anchored ``pattern``s
translated to grammar rules (other patterns accept any string, as llama.cpp does).
"""

from __future__ import annotations

import json
import math
import re

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
UNBOUNDED = 2**31 - 1

SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'

# name: (body, rules it uses)
PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false")', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part)', ("integral-part",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? '
               'space "}"', ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? space "]"', ("value",)),
    "uuid": ('"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} '
             '"-" [0-9a-fA-F]{12} "\\""', ()),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\""', ("char",)),
    "null": ('"null"', ()),
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
             ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\""', ("date",)),
    "time-string": ('"\\"" time "\\""', ("time",)),
    "date-time-string": ('"\\"" date-time "\\""', ("date-time",)),
}
RESERVED = {"root", *PRIMITIVES}

_BAD_NAME = re.compile(r"[^a-zA-Z0-9-]+")
_LIT_ESC = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
_NON_LITERAL = set("|.()[]{}*+?^$")
_REGEX_ONLY_ESCAPES = set("^$.[]()|{}*+?")


class SchemaError(ValueError):
    """The schema cannot be turned into a grammar (llama.cpp refuses it as well)."""


def literal(s: str) -> str:
    return '"' + "".join(_LIT_ESC.get(c, c) for c in s) + '"'


def dump(v) -> str:
    """JSON text as nlohmann's dump() writes it (no spaces, UTF-8 kept)."""
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def repetition(item: str, lo: int, hi: int, sep: str = "") -> str:
    """llama.cpp's build_repetition (hi == UNBOUNDED: no upper limit)."""
    bounded = hi != UNBOUNDED
    if hi == 0:
        return ""
    if lo == 0 and hi == 1:
        return item + "?"
    if not sep:
        if lo == 1 and not bounded:
            return item + "+"
        if lo == 0 and not bounded:
            return item + "*"
        return f"{item}{{{lo},{hi if bounded else ''}}}"
    rest = repetition(f"({sep} {item})", max(lo - 1, 0), hi - 1 if bounded else hi)
    out = f"{item} {rest}"
    return f"({out})?" if lo == 0 else out


def _digits(lo: int, hi: int) -> str:
    if lo == hi == 1:
        return "[0-9]"
    if lo == hi:
        return f"[0-9]{{{lo}}}"
    return f"[0-9]{{{lo},{hi if hi != UNBOUNDED else ''}}}"


def _drange(a: str, b: str) -> str:
    return f"[{a}]" if a == b else f"[{a}-{b}]"


def _uniform(lo: str, hi: str) -> str:
    """Decimal strings of one length from lo to hi (inclusive), digit by digit."""
    i = 0
    while i < len(lo) and i < len(hi) and lo[i] == hi[i]:
        i += 1
    out = f'"{lo[:i]}"' if i > 0 else ""
    if i < len(lo) and i < len(hi):
        if i > 0:
            out += " "
        n = len(lo) - i - 1
        if n > 0:
            lo_sub, hi_sub = lo[i + 1:], hi[i + 1:]
            zeros, nines = "0" * n, "9" * n
            reached = False
            out += "("
            if lo_sub == zeros:
                out += _drange(lo[i], chr(ord(hi[i]) - 1)) + " " + _digits(n, n)
            else:
                out += f"[{lo[i]}] (" + _uniform(lo_sub, nines) + ")"
                if lo[i] < chr(ord(hi[i]) - 1):
                    out += " | "
                    if hi_sub == nines:
                        out += _drange(chr(ord(lo[i]) + 1), hi[i])
                        reached = True
                    else:
                        out += _drange(chr(ord(lo[i]) + 1), chr(ord(hi[i]) - 1))
                    out += " " + _digits(n, n)
            if not reached:
                out += " | " + _drange(hi[i], hi[i]) + " " + _uniform(zeros, hi_sub)
            out += ")"
        else:
            out += f"[{lo[i]}-{hi[i]}]"
    return out


def int_range(lo: int, hi: int, decimals: int = 16, top: bool = True) -> str:
    """llama.cpp's build_min_max_int: integers in [lo, hi] (INT_MIN / INT_MAX: unbounded)."""
    has_lo, has_hi = lo != INT_MIN, hi != INT_MAX
    if has_lo and has_hi:
        if lo < 0 and hi < 0:
            return '"-" (' + int_range(-hi, -lo, decimals, True) + ")"
        out = ""
        if lo < 0:
            out = '"-" (' + int_range(0, -lo, decimals, True) + ") | "
            lo = 0
        lo_s, hi_s = str(lo), str(hi)
        for d in range(len(lo_s), len(hi_s)):
            out += _uniform(lo_s, "9" * d) + " | "
            lo_s = "1" + "0" * d
        return out + _uniform(lo_s, hi_s)
    fewer = max(decimals - 1, 1)
    if has_lo:
        if lo < 0:
            return ('"-" (' + int_range(INT_MIN, -lo, decimals, False) + ") | [0] | [1-9] "
                    + _digits(0, decimals - 1))
        if lo == 0:
            return "[0] | [1-9] " + _digits(0, fewer) if top else _digits(1, decimals)
        if lo <= 9:
            c = str(lo)
            start = "1" if top else "0"
            out = ""
            if c > start:
                out = _drange(start, chr(ord(c) - 1)) + " " + _digits(1, fewer) + " | "
            return out + _drange(c, "9") + " " + _digits(0, fewer)
        s = str(lo)
        c = s[0]
        out = ""
        if c > "1":
            out = _drange("1" if top else "0", chr(ord(c) - 1)) + " " + _digits(len(s), fewer) \
                + " | "
        out += _drange(c, c) + " (" + int_range(int(s[1:]), INT_MAX, fewer, False) + ")"
        if c < "9":
            out += " | " + _drange(chr(ord(c) + 1), "9") + " " + _digits(len(s) - 1, fewer)
        return out
    if has_hi:
        if hi >= 0:
            out = '"-" [1-9] ' + _digits(0, fewer) + " | " if top else ""
            return out + int_range(0, hi, decimals, True)
        return '"-" (' + int_range(-hi, INT_MAX, decimals, False) + ")"
    raise SchemaError("At least one of min_value or max_value must be set")


def _escape_len(p: str, i: int) -> int:
    """Length of a GBNF escape at p[i] (0: not one llama.cpp's grammar parser knows)."""
    if i + 1 >= len(p) or p[i] != "\\":
        return 0
    n = {"x": 2, "u": 4, "U": 8}.get(p[i + 1])
    if n is None:
        return 2 if p[i + 1] in 'trn\\"[]-' else 0
    if i + 2 + n > len(p) or any(c not in "0123456789abcdefABCDEF" for c in p[i + 2:i + 2 + n]):
        return 0
    return 2 + n


class _Unsupported(Exception):
    pass


class _Invalid(Exception):
    pass


def _count(s: dict, key: str, default: int) -> int:
    if key not in s:
        return default
    v = s[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SchemaError(f"{key} must be a non-negative integer")
    return v


def _bound(s: dict, key: str, up: bool) -> int:
    v = s[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SchemaError(f"{key} must be a number")
    if isinstance(v, int):
        return v
    return math.ceil(v) if up else math.floor(v)


def _format(s: dict) -> str | None:
    f = s.get("format")
    if not isinstance(f, str):
        return None
    if f in ("date", "time", "date-time"):
        return f
    if f == "uuid" or (len(f) == 5 and f.startswith("uuid") and "1" <= f[4] <= "5"):
        return "uuid"
    return None


class Converter:
    def __init__(self, root: dict):
        self.doc = root
        self.rules: dict[str, str] = {"space": SPACE}
        self.resolving: set[str] = set()
        self.errors: list[str] = []

    # ------------------------------------------------------------------ rules
    def add(self, name: str, body: str) -> str:
        key = _BAD_NAME.sub("-", name)
        if key not in self.rules or self.rules[key] == body:
            self.rules[key] = body
            return key
        i = 0
        while f"{key}{i}" in self.rules and self.rules[f"{key}{i}"] != body:
            i += 1
        self.rules[f"{key}{i}"] = body
        return f"{key}{i}"

    def primitive(self, name: str, which: str | None = None) -> str:
        body, deps = PRIMITIVES[which or name]
        n = self.add(name, body)
        for d in deps:
            if d not in self.rules:
                self.primitive(d)
        return n

    def grammar(self) -> str:
        return "".join(f"{k} ::= {v}\n" for k, v in sorted(self.rules.items()))

    # ------------------------------------------------------------------ schema walk
    def resolve(self, ref: str) -> dict:
        target = self.doc
        for sel in ref[1:].split("/")[1:]:
            if isinstance(target, dict) and sel in target:
                target = target[sel]
            elif isinstance(target, list):
                idx = int(sel) if sel.isdigit() else len(target)
                if idx >= len(target):
                    raise SchemaError(f"cannot resolve $ref {ref}, {sel} is out of range")
                target = target[idx]
            else:
                raise SchemaError(f"cannot resolve $ref {ref}, {sel} not found")
        return target

    def kind(self, s) -> tuple:
        """The schema node as llama.cpp's schema builder classifies it."""
        if not isinstance(s, dict):
            raise SchemaError("schema must be an object")
        if "$ref" in s:
            ref = s["$ref"]
            if not isinstance(ref, str):
                raise SchemaError("$ref must be a string")
            if not ref.startswith("#/"):
                raise SchemaError(f"unsupported $ref {ref}, only references into the same "
                                  "document are supported")
            return ("ref", ref)
        for key in ("oneOf", "anyOf"):
            if key in s:
                return ("anyOf", self._alts(s[key]))
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                raise SchemaError("type must not be empty")
            return ("anyOf", [{**s, "type": x} for x in t])
        if "const" in s:
            return ("const", s["const"])
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise SchemaError("enum must be a non-empty array")
            return ("enum", s["enum"])
        if t is not None and not isinstance(t, str):
            raise SchemaError("type must be a string or an array of strings")
        has_props = "properties" in s or ("additionalProperties" in s
                                          and s["additionalProperties"] is not True)
        if t is None:
            if has_props:
                return ("object", s)
            if "allOf" in s:
                return ("allOf", self._alts(s["allOf"]))
            if "items" in s or "prefixItems" in s:
                return ("array", s)
            if any(k in s for k in ("pattern", "minLength", "maxLength")) or _format(s):
                return ("string", s)
            return ("any",)
        if t == "object":
            if not has_props and "allOf" in s:
                return ("allOf", self._alts(s["allOf"]))
            return ("object", s)
        if t == "string":
            if "allOf" in s:
                return ("allOf", self._alts(s["allOf"]))
            return ("string", s)
        if t in ("array", "integer", "number", "boolean", "null"):
            return (t, s)
        raise SchemaError(f"unrecognized type {t}")

    @staticmethod
    def _alts(v) -> list:
        if not isinstance(v, list):
            raise SchemaError("must be an array of schemas")
        if not v:
            raise SchemaError("must not be empty")
        return v

    def visit(self, s, name: str) -> str:
        rule = name + "-" if name in RESERVED else (name or "root")
        sub = name + "-" if name else ""
        k = self.kind(s)
        tag = k[0]
        if tag == "ref":
            return self.add(rule, self.ref(k[1]))
        if tag == "anyOf":
            alts = [self.visit(a, name + ("-" if name else "alternative-") + str(i))
                    for i, a in enumerate(k[1])]
            return self.add(rule, " | ".join(alts))
        if tag == "allOf":
            return self.all_of(k[1], name, rule)
        if tag == "const":
            return self.add(rule, literal(dump(k[1])))
        if tag == "enum":
            return self.add(rule, "(" + " | ".join(literal(dump(v)) for v in k[1]) + ")")
        if tag == "object":
            props, required, extra = self.object_parts(s)
            if not props and extra == "any":
                return self.add(rule, self.primitive("object"))
            return self.add(rule, self.object_rule(props, required, name, extra))
        if tag == "array":
            key = "items" if "items" in s else "prefixItems" if "prefixItems" in s else None
            items = s.get(key, {}) if key else None
            if isinstance(items, list):
                parts = [self.visit(it, f"{sub}tuple-{i}") for i, it in enumerate(items)]
                return self.add(rule, '"[" space ' + ' "," space '.join(parts) + ' space "]"')
            lo = _count(s, "minItems", 0)
            hi = _count(s, "maxItems", -1)
            if key is None and lo == 0 and hi < 0:
                return self.primitive("root" if rule == "root" else "array", "array")
            if items is not None and self.kind(items)[0] == "any" and lo == 0 and hi < 0:
                return self.primitive("root" if rule == "root" else "array", "array")
            item = self.visit(items if items is not None else {}, sub + "item")
            rep = repetition(item, lo, UNBOUNDED if hi < 0 else hi, '"," space')
            return self.add(rule, '"[" space ' + rep + ' space "]"')
        if tag == "string":
            pattern = s.get("pattern")
            if pattern is not None and not isinstance(pattern, str):
                raise SchemaError("pattern must be a string")
            fmt = _format(s)
            lo, hi = _count(s, "minLength", 0), _count(s, "maxLength", -1)
            if pattern:
                return self.pattern(pattern, rule)
            if fmt == "uuid":
                return self.primitive("root" if rule == "root" else "uuid", "uuid")
            if fmt is not None:
                return self.add(rule, self.primitive(fmt + "-string"))
            if lo > 0 or hi >= 0:
                ch = self.primitive("char")
                return self.add(rule, '"\\"" ' + repetition(ch, lo, UNBOUNDED if hi < 0 else hi)
                                + ' "\\""')
            return self.primitive("root" if rule == "root" else "string", "string")
        if tag == "integer":
            lo, hi = INT_MIN, INT_MAX
            if "minimum" in s:
                lo = _bound(s, "minimum", True)
            elif "exclusiveMinimum" in s:
                lo = _bound(s, "exclusiveMinimum", False) + 1
            if "maximum" in s:
                hi = _bound(s, "maximum", False)
            elif "exclusiveMaximum" in s:
                hi = _bound(s, "exclusiveMaximum", True) - 1
            if lo == INT_MIN and hi == INT_MAX:
                return self.primitive("root" if rule == "root" else "integer", "integer")
            return self.add(rule, "(" + int_range(lo, hi) + ")")
        if tag in ("number", "boolean", "null"):
            return self.primitive("root" if rule == "root" else tag, tag)
        return self.add(rule, self.primitive("value"))  # any

    def ref(self, ref: str) -> str:
        frag = ref.split("#", 1)[1] if "#" in ref else ref
        name = "ref" + _BAD_NAME.sub("-", frag)
        if name not in self.rules and ref not in self.resolving:
            target = self.resolve(ref)
            self.resolving.add(ref)
            name = self.visit(target, name)
            self.resolving.discard(ref)
        return name

    def object_parts(self, s: dict) -> tuple[list, set, object]:
        req = s.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        props = s.get("properties", {})
        if "properties" in s and not isinstance(props, dict):
            raise SchemaError("properties must be an object")
        extra: object = None
        if "additionalProperties" in s:
            ap = s["additionalProperties"]
            if isinstance(ap, bool):
                extra = "any" if ap else None
            elif isinstance(ap, dict):
                extra = "any" if self.kind(ap)[0] == "any" else ap
            else:
                raise SchemaError("additionalProperties must be a boolean or a schema")
        elif "properties" not in s:
            extra = "any"
        return list(props.items()), {p for p in required if p in props}, extra

    def object_rule(self, props: list, required: set, name: str, extra) -> str:
        pre = name + "-" if name else ""
        kv: dict[str, str] = {}
        req, opt = [], []
        for p, ps in props:
            r = self.visit(ps, pre + p)
            kv[p] = self.add(pre + p + "-kv", literal(dump(p)) + ' space ":" space ' + r)
            (req if p in required else opt).append(p)
        if extra is not None:
            sub = pre + "additional"
            val = self.primitive("value") if extra == "any" else self.visit(extra, sub + "-value")
            key = (self.add(sub + "-k", self.not_strings([p for p, _ in props])) if props
                   else self.primitive("string"))
            kv["*"] = self.add(sub + "-kv", f'{key} ":" space {val}')
            opt.append("*")
        if not req and not opt:
            return '"{" space "}"'
        out = '"{" space ' + ' "," space '.join(kv[p] for p in req)
        if opt:
            out += " ("
            if req:
                out += ' "," space ( '

            def chain(ks: list[str], first_optional: bool) -> str:
                k = ks[0]
                comma = f'( "," space {kv[k]} )'
                if first_optional:
                    res = comma + ("*" if k == "*" else "?")
                else:
                    res = kv[k] + (" " + comma + "*" if k == "*" else "")
                if len(ks) > 1:
                    res += " " + self.add(pre + k + "-rest", chain(ks[1:], True))
                return res

            out += " | ".join(chain(opt[i:], False) for i in range(len(opt)))
            if req:
                out += " )"
            out += " )?"
        return out + ' space "}"'

    def all_of(self, alts: list, name: str, rule: str) -> str:
        props: list = []
        required: set = set()
        enums: dict[str, int] = {}

        def add(comp, is_required: bool) -> None:
            k = self.kind(comp)
            if k[0] == "ref":
                add(self.resolve(k[1]), is_required)
            elif k[0] == "object":
                ps, _, _ = self.object_parts(comp)
                for p, ps_ in ps:
                    props.append((p, ps_))
                    if is_required:
                        required.add(p)
            elif k[0] == "enum":
                for v in k[1]:
                    lit = literal(dump(v))
                    enums[lit] = enums.get(lit, 0) + 1

        for a in alts:
            k = self.kind(a)
            if k[0] == "anyOf":
                for b in k[1]:
                    add(b, False)
            else:
                add(a, True)
        both = [e for e in sorted(enums) if enums[e] == len(alts)]
        if both:
            return self.add(rule, "(" + " | ".join(both) + ")")
        return self.add(rule, self.object_rule(props, required, name, None))

    def not_strings(self, strings: list[str]) -> str:
        """A JSON string that is none of ``strings`` (a trie of their characters)."""
        trie: dict = {}
        for s in strings:
            node = trie
            for c in s:
                node = node.setdefault(c, {})
            node[None] = True
        ch = self.primitive("char")

        def walk(node: dict) -> str:
            kids = sorted(((c, n) for c, n in node.items() if c is not None),
                          key=lambda x: ord(x[0]))
            parts = []
            for c, n in kids:
                has_kids = any(k is not None for k in n)
                parts.append(f"[{c}]" + (f" ({walk(n)})" if has_kids else f" {ch}+"))
            out = " | ".join(parts)
            if kids:
                out += ' | [^"' + "".join(c for c, _ in kids) + f"] {ch}*"
            return out

        return '["] ( ' + walk(trie) + " )" + ("" if None in trie else "?") + ' ["]'

    # ------------------------------------------------------------------ patterns
    def pattern(self, pattern: str, name: str) -> str:
        saved = dict(self.rules)
        try:
            return self._pattern(pattern, name)
        except _Unsupported:
            self.rules = saved
            return self.add(name, self.primitive("string"))
        except _Invalid as e:
            self.rules = saved
            self.errors.append(f"Invalid pattern {pattern}: {e}")
            return ""

    def _pattern(self, pattern: str, name: str) -> str:
        if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
            raise _Unsupported("not anchored with '^' and '$'")
        p = pattern[1:-1]
        n = len(p)
        subs: dict[str, str] = {}
        pos = 0
        depth = 0

        def to_rule(x: tuple[str, bool]) -> str:
            return f'"{x[0]}"' if x[1] else x[0]

        def transform() -> tuple[str, bool]:
            nonlocal pos, depth
            seq: list[tuple[str, bool]] = []

            def joined() -> tuple[str, bool]:
                out: list[tuple[str, bool]] = []
                lit = ""
                for s, is_lit in seq:
                    if is_lit:
                        lit += s
                    else:
                        if lit:
                            out.append((lit, True))
                            lit = ""
                        out.append((s, False))
                if lit:
                    out.append((lit, True))
                return " ".join(to_rule(x) for x in out), False

            while pos < n:
                c = p[pos]
                if c == ".":
                    seq.append((self.add("dot", "[^\\x0A\\x0D]"), False))
                    pos += 1
                elif c == "(":
                    pos += 1
                    if pos < n and p[pos] == "?":
                        if pos + 1 < n and p[pos + 1] == ":":
                            pos += 2
                        else:
                            raise _Unsupported("unsupported group syntax")
                    depth += 1
                    if depth > 100:
                        raise _Unsupported("pattern nesting too deep")
                    seq.append(("(" + to_rule(transform()) + ")", False))
                elif c == ")":
                    pos += 1
                    if depth == 0:
                        raise _Invalid("unbalanced parentheses")
                    depth -= 1
                    return joined()
                elif c in "^$":
                    raise _Unsupported("anchor inside the pattern")
                elif c == "[":
                    cls = "["
                    pos += 1
                    while pos < n and p[pos] != "]":
                        if p[pos] == "\\":
                            k = _escape_len(p, pos)
                            if k == 0:
                                raise _Unsupported("unsupported escape in character class")
                            cls += p[pos:pos + k]
                            pos += k
                        else:
                            cls += p[pos]
                            pos += 1
                    if pos >= n:
                        raise _Invalid("unterminated character class")
                    seq.append((cls + "]", False))
                    pos += 1
                elif c == "|":
                    seq.append(("|", False))
                    pos += 1
                elif c in "*+?":
                    if not seq:
                        raise _Invalid("nothing to repeat")
                    seq[-1] = (to_rule(seq[-1]) + c, False)
                    pos += 1
                elif c == "{":
                    j = p.find("}", pos)
                    if j < 0:
                        raise _Unsupported("unterminated curly brackets")
                    nums = p[pos + 1:j].split(",")
                    pos = j + 1
                    if len(nums) not in (1, 2):
                        raise _Unsupported("wrong number of values in curly brackets")
                    try:
                        if len(nums) == 1:
                            lo = hi = int(nums[0])
                        else:
                            lo = int(nums[0]) if nums[0] else 0
                            hi = int(nums[1]) if nums[1] else UNBOUNDED
                    except ValueError:
                        raise _Unsupported("invalid number in curly brackets") from None
                    if not seq:
                        raise _Invalid("nothing to repeat")
                    s, is_lit = seq[-1]
                    if not is_lit:
                        if s not in subs:
                            subs[s] = self.add(f"{name}-{len(subs) + 1}", s)
                        s = subs[s]
                    seq[-1] = (repetition(f'"{s}"' if is_lit else s, lo, hi), False)
                else:
                    lit = ""
                    while pos < n:
                        if p[pos] == "\\":
                            if pos == n - 1:
                                raise _Invalid("trailing backslash")
                            if p[pos + 1] in _REGEX_ONLY_ESCAPES:
                                lit += p[pos + 1]
                                pos += 2
                            else:
                                k = _escape_len(p, pos)
                                if k == 0:
                                    raise _Unsupported("unsupported escape")
                                lit += p[pos:pos + k]
                                pos += k
                        elif p[pos] == '"':
                            lit += '\\"'
                            pos += 1
                        elif p[pos] not in _NON_LITERAL and (
                                pos == n - 1 or not lit or p[pos + 1] == "."
                                or p[pos + 1] not in _NON_LITERAL):
                            lit += p[pos]
                            pos += 1
                        else:
                            break
                    if not lit:
                        raise _Unsupported(f"unsupported character: {c}")
                    seq.append((lit, True))
            return joined()

        rule = to_rule(transform())
        if depth != 0:
            raise _Invalid("unbalanced parentheses")
        return self.add(name, '"\\"" (' + rule + ') "\\""')


def schema_to_grammar(schema) -> str:
    """The GBNF text for a JSON schema (llama.cpp's json_schema_to_grammar); raises SchemaError
    where llama.cpp refuses the schema."""
    c = Converter(schema)
    try:
        c.visit(schema, "")
    except RecursionError:
        raise SchemaError("the schema nests too deeply") from None
    if c.errors:
        raise SchemaError("JSON schema conversion failed:\n" + "\n".join(c.errors))
    return c.grammar()
