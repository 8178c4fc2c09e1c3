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
from functools import lru_cache

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
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕ"
    "ἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭ"
    "Ꚁ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
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


@lru_cache(maxsize=None)
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
