"""BPE pre-tokenizer splits exactly as llama.cpp's ``unicode_regex_split``.

llama.cpp does not run the tokenizer.json regexes with a Unicode-aware engine: it replaces
every non-ASCII code point by one byte naming its category ("collapsed" text) and runs
std::regex with ``\\p{X}`` rewritten to that byte plus an ASCII class. Quirks follow from that
(e.g. ``\\p{Lu}`` means any letter, only White_Space code points count as ``\\s``), so we do
the same collapse and run Python's ``re`` in ASCII mode on it. Regexes without categories run
on the original text with non-ASCII whitespace turned into vertical tab, as llama.cpp's
std::wregex fallback does. A few exact regex strings are not run as regexes at all but by
hand-written splitters (Kimi-K2's ``\\p{Han}+``, AFMoE's digit grouping); those are ported in
``_CUSTOM``. Each regex refines the pieces of the previous one and unmatched gaps stay pieces
of their own.

``PRE_REGEXES`` is keyed by llama.cpp's LLAMA_VOCAB_PRE_TYPE_* name (lowercase); which
``tokenizer.ggml.pre`` string selects which one is decided in vocab.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

from jllama.tokenizer.ucd import category, is_han, is_whitespace, tolower

# category -> collapsed byte, and the ASCII members of the class (llama.cpp's k_ucat_map)
_CAT_CHAR = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
_CAT_ASCII = {
    "N": "0-9",
    "L": "A-Za-z",
    "P": "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    "M": "",
    "S": "\\$\\+<->^`\\|~",
}
# \p{..} names llama.cpp rewrites; the letter subclasses all mean "any letter"
_UCAT = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S",
         "Lu": "L", "Ll": "L", "Lt": "L", "Lm": "L", "Lo": "L"}


class _Collapse(dict):
    """str.translate table built lazily: code point -> its category byte."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            ch = chr(cp)
        elif is_whitespace(cp):
            ch = "\x0b"
        else:
            ch = _CAT_CHAR.get(category(cp), "\xd0")
        self[cp] = ch
        return ch


class _WsOnly(dict):
    def __missing__(self, cp: int) -> str:
        ch = "\x0b" if cp > 0x7F and is_whitespace(cp) else chr(cp)
        self[cp] = ch
        return ch


_COLLAPSE = _Collapse()
_WS_ONLY = _WsOnly()

PRE_REGEXES: dict[str, list[str]] = {
    # LLAMA_VOCAB_PRE_TYPE_LLAMA3
    "llama3": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_JAIS2
    "jais2": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}",
    ],
    # LLAMA_VOCAB_PRE_TYPE_DBRX, SMAUG
    "dbrx": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM
    "deepseek_llm": [
        "[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM, HUNYUAN_DENSE, JOYAI_LLM, HY_V4
    "deepseek3_llm": [
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_SPARK2_5
    "spark2_5": [
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
        "\\p{N}",
    ],
    # LLAMA_VOCAB_PRE_TYPE_YOUTU
    "youtu": [
        "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER
    "deepseek_coder": [
        "[\r\n]",
        "\\s?\\p{L}+",
        "\\s?\\p{P}+",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}",
    ],
    # LLAMA_VOCAB_PRE_TYPE_FALCON
    "falcon": [
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "[0-9][0-9][0-9]",
    ],
    # LLAMA_VOCAB_PRE_TYPE_STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2
    "starcoder": [
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ],
    # LLAMA_VOCAB_PRE_TYPE_GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    "gpt2": [
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ],
    # LLAMA_VOCAB_PRE_TYPE_STABLELM2, QWEN2, HUNYUAN, SOLAR_OPEN
    "qwen2": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_QWEN35
    "qwen35": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_PORO, BLOOM, GPT3_FINNISH
    "poro": [
        " ?[^(\\s|.,!?…。，、।۔،)]+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_CHATGLM4
    "chatglm4": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_VIKING
    "viking": [
        " ?[^(\\s|.,!?…。，、।۔،)]+",
        "\\p{N}",
    ],
    # LLAMA_VOCAB_PRE_TYPE_TEKKEN
    "tekken": [
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_CHAMELEON
    "chameleon": [
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        "([\\t\\n]|    |  )",
        "\\p{N}",
        "[\\p{P}!-/:-@\\[-`{-~]",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ],
    # LLAMA_VOCAB_PRE_TYPE_GPT4O, MINIMAX_M2
    "gpt4o": [
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_GRANITE_EMB_MULTI
    "granite_emb_multi": [
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_TINY_AYA
    "tiny_aya": [
        "\\d{1,3}(?=(?:\\d{3})*\\b)",
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_KIMI_K2
    "kimi_k2": [
        "\\p{Han}+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_SUPERBPE
    "superbpe": [
        "\\p{N}+",
        "(?=(\\d{3})+(?!\\d))",
    ],
    # LLAMA_VOCAB_PRE_TYPE_BAILINGMOE
    "bailingmoe": [
        "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_SEED_CODER
    "seed_coder": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_UFAKZEKA
    "ufakzeka": [
        "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_GROK_2
    "grok_2": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_AFMOE
    "afmoe": [
        "\\p{AFMoE_digits}",
        "[一-鿿㐀-䶿豈-﫿぀-ゟ゠-ヿ･-ﾟ⼀-⿟เ-๿຀-໿ក-៿က-႟ꩠ-ꩿꧠ-꧿가-힯ᄀ-ᇿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_LAGUNA
    "laguna": [
        "[^\\n]+|[\\n]+",
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_EXAONE_MOE
    "exaone_moe": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_GEMMA4
    "gemma4": [
        "[^\\n]+|[\\n]+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_SARVAM_MOE
    "sarvam_moe": [
        "[^\\n]+|[\\n]+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_MINICPM5
    "minicpm5": [
        "\\p{N}{1,3}",
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_WHITESPACE
    "whitespace": [
        "\\S+",
    ],
    # LLAMA_VOCAB_PRE_TYPE_DEFAULT
    "default": [
        "[\\p{P}\\$\\+<=>\\^~\\|]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "\\p{N}+",
        "[0-9][0-9][0-9]",
    ],
}


_UCAT_RE = re.compile(r"\\p\{(\w{1,2})\}")


def _uses_categories(expr: str) -> bool:
    return any(m.group(1) in _UCAT for m in _UCAT_RE.finditer(expr))


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
        elif c == "\\" and (m := _UCAT_RE.match(expr, i)) and m.group(1) in _UCAT:
            cat = _UCAT[m.group(1)]
            cls = _CAT_CHAR[cat] + _CAT_ASCII[cat]
            out.append(cls if inside else f"[{cls}]")
            i = m.end() - 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


@cache
def _compile(expr: str) -> tuple[re.Pattern[str], bool]:
    collapsed = _uses_categories(expr)
    if collapsed:
        expr = _collapse_regex(expr)
    if expr.endswith("$"):
        expr = expr[:-1] + r"\Z"  # ECMAScript '$' never matches before a final newline
    return re.compile(expr, re.ASCII), collapsed


# ---------------------------------------------------------------------------- custom splitters
# Each takes the text and one piece (start, end) and returns the cut lengths inside it.

def _split_kimi_k2(text: str, s: int, e: int) -> list[int]:
    """llama.cpp's unicode_regex_split_custom_kimi_k2 (all K2 patterns at once)."""
    cps = [ord(c) for c in text[s:e]]
    n = len(cps)

    def cp(i: int) -> int:
        return cps[i] if 0 <= i < n else -1

    def cat(i: int) -> str:
        return category(cps[i]) if 0 <= i < n else ""

    def ws(i: int) -> bool:
        return 0 <= i < n and is_whitespace(cps[i])

    def letter(i: int) -> bool:
        return cat(i) == "L" and not is_han(cps[i])

    out: list[int] = []
    prev = 0
    pos = 0

    def add(end: int) -> None:
        nonlocal prev
        if end > prev:
            out.append(end - prev)
        prev = end

    while pos < n:
        c = cps[pos]
        if is_han(c):
            while 0 <= pos < n and is_han(cps[pos]):
                pos += 1
            add(pos)
            continue
        lead_ok = not (c in (13, 10) or cat(pos) in ("L", "N"))
        if letter(pos) or (lead_ok and letter(pos + 1)):
            lead = False
            if lead_ok:
                lead = True
                pos += 1
            has = False
            while letter(pos):
                has = True
                pos += 1
            if has or (not lead and letter(pos)):
                if not has:
                    pos += 1
                while letter(pos):
                    pos += 1
                if cp(pos) == 0x27 and pos + 1 < n:
                    c1 = tolower(cp(pos + 1))
                    if c1 in (0x73, 0x74, 0x6D, 0x64):
                        pos += 2
                    elif pos + 2 < n:
                        c2 = tolower(cp(pos + 2))
                        if (c1, c2) in ((0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C)):
                            pos += 3
                add(pos)
                continue
            if lead:
                pos -= 1
        if cat(pos) == "N":
            ini = pos
            while cat(pos) == "N":
                pos += 1
                if pos - ini >= 3:
                    add(pos)
                    ini = pos
            add(pos)
            continue
        q = pos + 1 if c == 0x20 else pos

        def word_char(i: int) -> bool:
            return 0 <= i < n and not (ws(i) or cat(i) in ("L", "N"))

        if word_char(q):
            pos = q
            while word_char(pos):
                pos += 1
            while cp(pos) in (13, 10):
                pos += 1
            add(pos)
            continue
        k = 0
        last_nl = 0
        while ws(pos + k):
            if cps[pos + k] in (13, 10):
                last_nl = pos + k + 1
            k += 1
        if last_nl > 0:
            pos = last_nl
            add(pos)
            continue
        if k > 1 and pos + k < n:
            pos += k - 1
            add(pos)
            continue
        if k > 0:
            pos += k
            add(pos)
            continue
        pos += 1
        add(pos)
    return out


def _split_digit_groups(text: str, s: int, e: int) -> list[int]:
    """llama.cpp's unicode_regex_split_custom_afmoe: digit runs cut in threes from the right.

    As there, text before a digit run is not a piece of its own: it joins the run's first group
    (later regexes then see e.g. "x1" as one piece)."""
    out: list[int] = []
    prev = s
    pos = s

    def add(end: int) -> None:
        nonlocal prev
        if end > prev:
            out.append(end - prev)
        prev = end

    while pos < e:
        if category(ord(text[pos])) != "N":
            pos += 1
            continue
        start = pos
        while pos < e and category(ord(text[pos])) == "N":
            pos += 1
        cur = start
        rem = (pos - start) % 3
        if rem:
            cur += rem
            add(cur)
        while cur < pos:
            cur += 3
            add(cur)
    add(e)
    return out


_CUSTOM: dict[str, Callable[[str, int, int], list[int]]] = {
    "\\p{Han}+": _split_kimi_k2,
    "\\p{AFMoE_digits}": _split_digit_groups,
    "\\d{1,3}(?=(?:\\d{3})*\\b)": _split_digit_groups,  # tiny_aya: llama.cpp reuses AFMoE's
}


def split(text: str, exprs: list[str]) -> list[str]:
    """Split ``text`` into pre-tokenizer words (str pieces of the original text)."""
    if not text:
        return []
    regexes = [e for e in exprs if e not in _CUSTOM]
    compiled = {e: _compile(e) for e in regexes}
    collapsed_text = text.translate(_COLLAPSE) if any(c for _, c in compiled.values()) else ""
    ws_text = text.translate(_WS_ONLY) if not all(c for _, c in compiled.values()) else ""
    bounds = [(0, len(text))]
    for expr in exprs:
        new: list[tuple[int, int]] = []
        custom = _CUSTOM.get(expr)
        if custom is not None:
            for s, e in bounds:
                pos = s
                for ln in custom(text, s, e):
                    new.append((pos, pos + ln))
                    pos += ln
            bounds = new
            continue
        pat, col = compiled[expr]
        t = collapsed_text if col else ws_text
        for s, e in bounds:
            # std::regex sees only the piece: no look-behind into, or look-ahead past, it
            sub = t[s:e]
            pos = 0
            for m in pat.finditer(sub):
                ms, me = m.span()
                if ms > pos:
                    new.append((s + pos, s + ms))
                if me > ms:
                    new.append((s + ms, s + me))
                pos = me
            if pos < len(sub):
                new.append((s + pos, e))
        bounds = new
    return [text[s:e] for s, e in bounds]
