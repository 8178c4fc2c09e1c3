"""The non-merge tokenizers of llama.cpp: WPM (BERT WordPiece), UGM (SentencePiece unigram as
T5/XLM-R vocabularies use it) and RWKV's greedy trie.

Each mirrors its llama.cpp session class (llm_tokenizer_{wpm,ugm,rwkv}_session) on bytes, as
llama.cpp works on UTF-8 bytes: longest matches and the unigram lattice are per byte offset.
"""

from __future__ import annotations

import unicodedata

import numpy as np

from jllama.tokenizer.ucd import category, is_whitespace, nfd_first, tolower
from jllama.tokenizer.vocab import (
    ATTR_NORMAL,
    ATTR_UNUSED,
    ATTR_USER_DEFINED,
    Vocab,
    unescape_rwkv,
)

_ESCAPED_SPACE = "\u2581".encode()


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _is_chinese_char(cp: int) -> bool:
    # llama.cpp copies HF's range 0x2B920 (not 0x2B820) for extension E
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WPM:
    """BERT WordPiece: BertNormalizer-style split, then greedy longest match per word."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.ids = {_raw(t): i for i, t in enumerate(vocab.tokens)}
        self.max_len = max((len(k) for k in self.ids), default=0)

    def words(self, text: str) -> list[str]:
        v = self.vocab
        words = [""]
        for ch in text:
            cp = ord(ch)
            if v.strip_accents:
                cp = nfd_first(cp)
            if is_whitespace(cp):
                if words[-1]:
                    words.append("")
                continue
            cat = category(cp)
            if cp == 0 or cp == 0xFFFD or (cat == "C" and _is_control(cp)):
                continue
            if v.strip_accents and cat == "M":
                continue
            s = chr(tolower(cp) if v.lowercase else cp)
            if cat == "P" or (cp < 0x7F and cat == "S") or _is_chinese_char(cp):
                if words[-1]:
                    words.append("")
                words[-1] = s
                words.append("")
            else:
                words[-1] += s
        if not words[-1]:
            words.pop()
        return words

    def encode(self, text: str, out: list[int]) -> None:
        ids = self.ids
        unk = self.vocab.unk_id
        for word in self.words(text):
            w = _ESCAPED_SPACE + _raw(word)
            n = len(w)
            start = len(out)
            i = 0
            while i < n:
                for j in range(min(n, i + self.max_len + 1), i, -1):
                    tid = ids.get(w[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:
                    del out[start:]
                    break
            if len(out) == start:
                out.append(unk if unk is not None else -1)


def _is_control(cp: int) -> bool:
    """llama.cpp's CONTROL flag: general category Cc/Cf/Co/Cs (unassigned Cn is UNDEFINED)."""
    return unicodedata.category(chr(cp)) in ("Cc", "Cf", "Co", "Cs")


class UGM:
    """SentencePiece unigram: charsmap normalisation, then the best-score Viterbi path."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.ids: dict[bytes, int] = {}
        user: list[bytes] = []
        scores = np.asarray(vocab.scores, np.float32)
        normal = [i for i, a in enumerate(vocab.attrs) if a & ATTR_NORMAL]
        lo = scores[normal].min() if normal else np.float32(np.finfo(np.float32).max)
        self.unk_score = float(np.float32(lo) - np.float32(10.0))
        for i, (t, a) in enumerate(zip(vocab.tokens, vocab.attrs)):
            if a & (ATTR_NORMAL | ATTR_USER_DEFINED | ATTR_UNUSED):
                self.ids[_raw(t)] = i
            if a & ATTR_USER_DEFINED:
                user.append(_raw(t))
        self.max_len = max((len(k) for k in self.ids), default=0)
        # llama.cpp's trie walk for user-defined tokens stops where no token continues, match
        # or not: keep every prefix of every user-defined token
        self.user_prefixes = {u[:k] for u in user for k in range(1, len(u) + 1)}
        self.user_max = max((len(u) for u in user), default=0)
        cm = vocab.charsmap
        if cm:
            size = int.from_bytes(cm[:4], "little")
            self.xcda = np.frombuffer(cm[4:4 + size], "<u4").astype(np.int64).tolist()
            self.repl = cm[4 + size:]
        else:
            self.xcda, self.repl = [], b""

    def _prefix(self, s: bytes, off: int) -> tuple[bytes, int]:
        """(normalised bytes, input bytes consumed) for the input at ``off``."""
        k = 0
        while k < self.user_max and off + k < len(s) and s[off:off + k + 1] in self.user_prefixes:
            k += 1
        if k > 0:
            return s[off:off + k], k
        best_len = 0
        best_off = 0
        xc = self.xcda
        if xc:
            def base(i: int) -> int:
                p = xc[i]
                return (p >> 10) << ((p & (1 << 9)) >> 6)

            node = base(0)
            for p in range(off, len(s)):
                c = s[p]
                if c == 0:
                    break
                node ^= c
                if node >= len(xc):
                    raise ValueError("index out of array bounds in XCDA array")
                if xc[node] & ((1 << 31) | 0xFF) != c:
                    break
                leaf = (xc[node] >> 8) & 1
                node ^= base(node)
                if leaf:
                    best_len = p - off + 1
                    best_off = xc[node] & ((1 << 31) - 1)
        if best_len > 0:
            end = self.repl.index(b"\0", best_off)
            return self.repl[best_off:end], best_len
        n = _utf8_len(s[off])
        return s[off:off + n], n

    def normalize(self, text: str) -> bytes:
        v = self.vocab
        s = _raw(text)
        space = _ESCAPED_SPACE if v.escape_whitespaces else b" "
        prepend = v.add_space_prefix  # treat_whitespace_as_suffix is never set from GGUF
        merge = v.remove_extra_whitespaces
        out = bytearray()
        prepended = False
        in_word = False
        off = 0
        while off < len(s):
            norm, used = self._prefix(s, off)
            for c in norm:
                if c != 0x20:
                    if not in_word:
                        in_word = True
                        if (prepend and not prepended) or merge:
                            out += space
                            prepended = True
                    out.append(c)
                else:
                    in_word = False
                    if not merge:
                        out += space
            off += used
        return bytes(out)

    def encode(self, text: str, out: list[int]) -> None:
        v = self.vocab
        s = self.normalize(text)
        n = len(s)
        if n == 0:
            return
        unk = v.unk_id if v.unk_id is not None else -1
        best_id = [unk] * (n + 1)
        best_from = [0] * (n + 1)
        best_score = [-1.7976931348623157e308] * (n + 1)
        best_score[0] = 0.0
        ids = self.ids
        scores = v.scores
        attrs = v.attrs
        off = 0
        while off < n:
            cu = min(_utf8_len(s[off]), n - off)
            cur = best_score[off]
            single = False
            for end in range(off + 1, min(n, off + self.max_len) + 1):
                tid = ids.get(s[off:end])
                if tid is None:
                    continue
                if end - off == cu:
                    single = True
                sc = cur + (0.0 if attrs[tid] & ATTR_USER_DEFINED else scores[tid])
                if sc > best_score[end]:
                    best_id[end], best_from[end], best_score[end] = tid, off, sc
            if not single:
                end = off + cu
                sc = cur + self.unk_score
                if sc > best_score[end]:
                    best_id[end], best_from[end], best_score[end] = unk, off, sc
            off += cu
        rev: list[int] = []
        prev_unk = False
        pos = n
        while True:
            tid = best_id[pos]
            is_unk = tid == unk
            if not (prev_unk and is_unk):
                rev.append(tid)
            if best_from[pos] == 0:
                break
            prev_unk = is_unk
            pos = best_from[pos]
        out.extend(reversed(rev))


def _utf8_len(b: int) -> int:
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[b >> 4]


class RWKV:
    """Greedy longest match over the unescaped byte vocabulary."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.ids: dict[bytes, int] = {}
        for i, t in enumerate(vocab.tokens):
            self.ids[unescape_rwkv(t)] = i  # later duplicates win, as trie inserts overwrite
        self.max_len = max((len(k) for k in self.ids), default=0)

    def encode(self, text: str, out: list[int]) -> None:
        s = _raw(text)
        ids = self.ids
        unk = self.vocab.unk_id if self.vocab.unk_id is not None else -1
        pos = 0
        n = len(s)
        while pos < n:
            tid, end = None, pos
            for j in range(min(n, pos + self.max_len), pos, -1):
                t = ids.get(s[pos:j])
                if t is not None:
                    tid, end = t, j
                    break
            if tid is None:
                out.append(unk)
                pos += 1
            else:
                out.append(tid)
                pos = end


class TestVocab:
    """llama.cpp's TEST vocabulary type: each 5-byte chunk hashes (h = h*31 + byte) to an id."""

    def __init__(self, vocab: Vocab):
        self.n = len(vocab.tokens)

    def encode(self, text: str, out: list[int]) -> None:
        s = _raw(text)
        for i in range(0, len(s), 5):
            h = 0
            for b in s[i:i + 5]:
                h = (h * 31 + b) & 0xFFFFFFFFFFFFFFFF
            out.append(h % self.n)
