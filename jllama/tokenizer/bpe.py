"""Byte-level BPE (llama.cpp's llm_tokenizer_bpe_session) with a per-word cache.

llama.cpp merges the lowest-rank adjacent pair, leftmost first on ties, one merge at a time;
the simple rescan loop below makes the same choices. Words repeat a lot in real text, so the
result per pre-tokenized word is cached.
"""

from __future__ import annotations

import heapq

from jllama.tokenizer.pretokenize import PRE_REGEXES, split
from jllama.tokenizer.ucd import is_whitespace, tolower
from jllama.tokenizer.vocab import DNA_KMER_MARKER, Vocab, byte_encoder

_RAW_TEXT_PRE = ("gemma4", "sarvam_moe", "whitespace")


class BPE:
    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.exprs = PRE_REGEXES[vocab.pre]
        # SPM-style BPE vocabularies hold raw UTF-8 text (and <0xXX> byte tokens)
        self.byte_encode = vocab.pre not in _RAW_TEXT_PRE
        enc = byte_encoder()
        self._byte_map = [enc[b] for b in range(256)]
        self._cache: dict[str, list[int]] = {}

    def _word_ids(self, word: str) -> list[int]:
        """Token ids for one byte-encoded word."""
        t2i = self.vocab.token_to_id
        if self.vocab.ignore_merges and word in t2i:
            return [t2i[word]]
        if self.vocab.pre == "gemma4" and not word.strip("\n") and word in t2i:
            return [t2i[word]]  # newline runs are whole tokens (llama.cpp PR #21343)
        ranks = self.vocab.bpe_ranks
        syms = list(word) if len(word) <= 48 else self._merge_long(word)
        while len(syms) > 1:
            best = None
            bi = -1
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            syms[bi:bi + 2] = [syms[bi] + syms[bi + 1]]
        out: list[int] = []
        for s in syms:
            tid = t2i.get(s)
            if tid is not None:
                out.append(tid)
                continue
            # llama.cpp falls back to single-byte tokens of the symbol's UTF-8 bytes
            for b in s.encode("utf-8", "surrogatepass"):
                if self.byte_encode:
                    one = t2i.get(chr(b)) if b < 0x80 else None
                else:
                    one = t2i.get(f"<0x{b:02X}>")
                if one is not None:
                    out.append(one)
        return out

    def _merge_long(self, word: str) -> list[str]:
        """Heap-ordered merges for long words (the rescan loop is quadratic), as llama.cpp.

        Bigrams pop by (rank, left index); a bigram is stale once either side has changed,
        which the recorded combined length detects because symbols only grow rightwards.
        """
        ranks = self.vocab.bpe_ranks
        n = len(word)
        ln = [1] * n
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            r = ranks.get((word[left:left + ln[left]], word[right:right + ln[right]]))
            if r is not None:
                heapq.heappush(heap, (r, left, right, ln[left] + ln[right]))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if ln[left] == 0 or ln[right] == 0 or ln[left] + ln[right] != size:
                continue
            ln[left] = size
            ln[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out: list[str] = []
        i = 0
        while i != -1:
            out.append(word[i:i + ln[i]])
            i = nxt[i]
        return out

    def encode(self, text: str, out: list[int]) -> None:
        if self.vocab.model == "hybriddna":
            self._encode_dna(text, out)
            return
        if self.vocab.model == "whitespace":
            # llama.cpp's whitespace session: drop White_Space, BPE each run in between
            low = self.vocab.lowercase
            seg: list[str] = []
            for ch in text + " ":
                if is_whitespace(ord(ch)):
                    if seg:
                        self._encode(text="".join(seg), out=out)
                        seg = []
                else:
                    seg.append(chr(tolower(ord(ch))) if low else ch)
            return
        self._encode(text, out)

    def _encode_dna(self, text: str, out: list[int]) -> None:
        """llama.cpp's hybriddna session: <dna>...</dna> spans become 6-mer tokens."""
        t2i = self.vocab.token_to_id
        begin, end, oov = t2i.get("<dna>"), t2i.get("</dna>"), t2i.get("<oov>")
        if begin is None or end is None or oov is None:
            self._encode(text, out)
            return
        pos = 0
        while pos < len(text):
            start = text.find("<dna>", pos)
            if start < 0:
                self._encode(text[pos:], out)
                break
            if start > pos:
                self._encode(text[pos:start], out)
            out.append(begin)
            c0 = start + len("<dna>")
            stop = text.find("</dna>", c0)
            seq = text[c0:] if stop < 0 else text[c0:stop]
            raw = bytes(b - 32 if 0x61 <= b <= 0x7A else b
                        for b in seq.encode("utf-8", "surrogatepass"))
            for i in range(0, len(raw), 6):  # k-mers of bytes, as llama.cpp
                kmer = raw[i:i + 6].ljust(6, b"A").decode("utf-8", "surrogateescape")
                out.append(t2i.get(kmer + DNA_KMER_MARKER, oov))
            if stop < 0:
                break
            out.append(end)
            pos = stop + len("</dna>")

    def _encode(self, text: str, out: list[int]) -> None:
        if self.vocab.escape_whitespaces:
            text = text.replace(" ", "\u2581")
        cache = self._cache
        bm = self._byte_map
        for piece in split(text, self.exprs):
            ids = cache.get(piece)
            if ids is None:
                if self.byte_encode:
                    word = "".join([bm[b] for b in piece.encode("utf-8", "surrogatepass")])
                else:
                    word = piece
                ids = self._word_ids(word)
                if len(cache) < 1_000_000:
                    cache[piece] = ids
            out.extend(ids)
