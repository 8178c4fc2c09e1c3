"""SentencePiece-style tokenization as llama.cpp's llm_tokenizer_spm_session.

llama.cpp runs the score-ordered bigram merge over a whole text fragment, which is far too
slow in Python for a 1 MB file. A merge can only join symbols into a vocabulary token, so
cutting the text where no vocabulary token can span the cut gives identical results; we cut
before a "▁" whose preceding character never precedes "▁" inside any token, and cache the
result per piece (pieces are roughly words and repeat a lot).
"""

from __future__ import annotations

import heapq

from jllama.tokenizer.vocab import Vocab

SPACE = "\u2581"


class SPM:
    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._cache: dict[str, list[int]] = {}
        before: set[str] = set()
        for t in vocab.tokens:
            j = t.find(SPACE, 1)
            while j > 0:
                before.add(t[j - 1])
                j = t.find(SPACE, j + 1)
        self._joins_space = before
        self._byte_ids: list[int | None] = []
        t2i = vocab.token_to_id
        for b in range(256):
            tid = t2i.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = t2i.get(chr(b))
            self._byte_ids.append(tid)

    def _pieces(self, text: str) -> list[str]:
        joins = self._joins_space
        out: list[str] = []
        start = 0
        i = text.find(SPACE, 1)
        while i > 0:
            if text[i - 1] not in joins:
                out.append(text[start:i])
                start = i
            i = text.find(SPACE, i + 1)
        out.append(text[start:])
        return out

    def _piece_ids(self, s: str) -> list[int]:
        t2i = self.vocab.token_to_id
        scores = self.vocab.scores
        n = len(s)
        start = list(range(n))
        ln = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            size = ln[left] + ln[right]
            tid = t2i.get(s[start[left]:start[left] + size])
            if tid is not None:
                heap.append((-scores[tid], left, right, size))

        for i in range(1, n):
            add(i - 1, i)
        heapq.heapify(heap)

        def add_push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            size = ln[left] + ln[right]
            tid = t2i.get(s[start[left]:start[left] + size])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, size))

        while heap:
            _, left, right, size = heapq.heappop(heap)
            if ln[left] == 0 or ln[right] == 0 or ln[left] + ln[right] != size:
                continue
            ln[left] = size
            ln[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_push(prev[left], left)
            add_push(left, nxt[left])
        out: list[int] = []
        i = 0
        while i != -1:
            sym = s[start[i]:start[i] + ln[i]]
            tid = t2i.get(sym)
            if tid is not None:
                out.append(tid)
            else:
                for b in sym.encode("utf-8", "surrogatepass"):
                    bid = self._byte_ids[b]
                    if bid is None:
                        bid = self.vocab.unk_id if self.vocab.unk_id is not None else 0
                    out.append(bid)
            i = nxt[i]
        return out

    def encode(self, text: str, out: list[int]) -> None:
        """Tokenize one raw fragment that is already space-prefixed and escaped."""
        cache = self._cache
        for piece in self._pieces(text):
            if not piece:
                continue
            ids = cache.get(piece)
            if ids is None:
                ids = self._piece_ids(piece)
                if len(cache) < 1_000_000:
                    cache[piece] = ids
            out.extend(ids)
