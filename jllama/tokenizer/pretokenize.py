"""BPE pre-tokenizer splits exactly as llama.cpp's ``unicode_regex_split``.

llama.cpp does not run the tokenizer.json regexes with a Unicode-aware engine: it replaces
every non-ASCII code point by one byte naming its category ("collapsed" text) and runs
std::regex with ``\\p{X}`` rewritten to that byte plus an ASCII class. Quirks follow from that
(e.g. ``~`` is neither punctuation nor symbol, only White_Space code points count as ``\\s``),
so we do the same collapse and run Python's ``re`` in ASCII mode on it. Regexes without
categories but with non-ASCII literals run on the original text with non-ASCII whitespace
turned into vertical tab, as llama.cpp's std::wregex fallback does. Each regex refines the
pieces of the previous one and unmatched gaps stay pieces of their own.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

_CAT_CHAR = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
_CAT_ASCII = {
    "N": "0-9",
    "L": "A-Za-z",
    "P": "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    "M": "",
    "S": "\\$\\+<->^`\\|",
}
# White_Space code points above ASCII (llama.cpp's unicode_ranges_whitespace)
_NON_ASCII_WS = {0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                 0x3000}


class _Collapse(dict):
    """str.translate table built lazily: code point -> its category byte."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            ch = chr(cp)
        elif cp in _NON_ASCII_WS:
            ch = "\x0b"
        else:
            ch = _CAT_CHAR.get(unicodedata.category(chr(cp))[0], "\xd0")
        self[cp] = ch
        return ch


class _WsOnly(dict):
    def __missing__(self, cp: int) -> str:
        ch = "\x0b" if cp in _NON_ASCII_WS else chr(cp)
        self[cp] = ch
        return ch


_COLLAPSE = _Collapse()
_WS_ONLY = _WsOnly()

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
         r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a"
    "\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)

PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [GPT2],
    "starcoder": [r"\p{N}", GPT2],
    "llama3": [LLAMA3],
    "qwen2": [QWEN2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
    "deepseek-llm": [
        "[\r\n]",
        r"\s?[" + _DEEPSEEK_LETTERS + "]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "poro": [" ?[^(\\s|.,!?…。，、।۔،)]+"],
}


def _collapse_regex(expr: str) -> str:
    """Rewrite \\p{X} into collapsed-text classes (llama.cpp's regex_expr_collapsed)."""
    out: list[str] = []
    inside = False
    i = 0
    while i < len(expr):
        c = expr[i]
        if c == "[" and (i == 0 or expr[i - 1] != "\\"):
            out.append("[")
            inside = True
        elif inside and c == "]" and expr[i - 1] != "\\":
            out.append("]")
            inside = False
        elif (c == "\\" and i + 4 < len(expr) and expr[i + 1] == "p" and expr[i + 2] == "{"
              and expr[i + 4] == "}" and expr[i + 3] in _CAT_CHAR):
            cls = _CAT_CHAR[expr[i + 3]] + _CAT_ASCII[expr[i + 3]]
            out.append(cls if inside else f"[{cls}]")
            i += 4
        else:
            out.append(c)
        i += 1
    return "".join(out)


@cache
def _compile(expr: str) -> tuple[re.Pattern[str], bool]:
    collapsed = any(f"\\p{{{k}}}" in expr for k in _CAT_CHAR)
    if collapsed:
        expr = _collapse_regex(expr)
    if expr.endswith("$"):
        expr = expr[:-1] + r"\Z"  # ECMAScript '$' never matches before a final newline
    return re.compile(expr, re.ASCII), collapsed


def split(text: str, exprs: list[str]) -> list[str]:
    """Split ``text`` into pre-tokenizer words (str pieces of the original text)."""
    if not text:
        return []
    compiled = [_compile(e) for e in exprs]
    collapsed_text = text.translate(_COLLAPSE) if any(c for _, c in compiled) else ""
    ws_text = text.translate(_WS_ONLY) if not all(c for _, c in compiled) else ""
    bounds = [(0, len(text))]
    for pat, col in compiled:
        t = collapsed_text if col else ws_text
        new: list[tuple[int, int]] = []
        for s, e in bounds:
            pos = s
            for m in pat.finditer(t, s, e):
                ms, me = m.span()
                if ms > pos:
                    new.append((pos, ms))
                if me > ms:
                    new.append((ms, me))
                pos = me
            if pos < e:
                new.append((pos, e))
        bounds = new
    return [text[s:e] for s, e in bounds]
