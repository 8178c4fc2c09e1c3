"""Tokenizer built from GGUF metadata that reproduces llama.cpp's token ids and text.

``Tokenizer.encode`` follows ``llama_vocab::impl::tokenize``: special/user-defined tokens are
split out first (user-defined ones always, control ones only with ``parse_special``), then each
text fragment goes through SentencePiece bigram merging (``tokenizer.ggml.model == "llama"``)
or byte-level BPE with the pre-tokenizer chosen by ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from jllama.tokenizer.vocab import (
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_RSTRIP,
    ATTR_UNKNOWN,
    Vocab,
    load_vocab,
)

if TYPE_CHECKING:
    from jllama.gguf.reader import GGUFFile

__all__ = ["Tokenizer", "StreamDecoder"]

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale


class _FragmentEncoder(Protocol):
    def encode(self, text: str, out: list[int]) -> None: ...


class Tokenizer:
    """llama.cpp-compatible tokenizer (SPM, BPE, WPM, UGM and RWKV vocabularies)."""

    def __init__(self, vocab: Vocab, chat_template: str | None = None):
        self.vocab = vocab
        self.chat_template = chat_template
        self.n_vocab = len(vocab.tokens)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.eot_id = vocab.eot_id
        self.add_bos = vocab.add_bos
        self.add_eos = vocab.add_eos
        # what llama-server's rerank prompt needs: BOS q EOS SEP d EOS (SEP when add_sep)
        self.sep_id = vocab.sep_id
        self.add_sep = vocab.add_sep
        self.pad_id = vocab.pad_id
        self.special_ids = frozenset(vocab.special_cache)
        self._group_cache: dict[bool, dict[str, tuple[list[int], dict[str, int]]]] = {}
        self._impl: _FragmentEncoder
        if vocab.kind == "spm":
            from jllama.tokenizer.spm import SPM

            self._impl = SPM(vocab)
        elif vocab.kind == "bpe":
            from jllama.tokenizer.bpe import BPE

            self._impl = BPE(vocab)
        else:
            from jllama.tokenizer.wordlevel import RWKV, UGM, WPM, TestVocab

            impls = {"wpm": WPM, "ugm": UGM, "rwkv": RWKV, "test": TestVocab}
            self._impl = impls[vocab.kind](vocab)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> Tokenizer:
        meta = gguf_file.metadata
        return cls(load_vocab(meta), meta.get("tokenizer.chat_template"))

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        from jllama.gguf.reader import read_gguf

        return cls.from_gguf(read_gguf(path))

    # ------------------------------------------------------------------ queries
    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    @property
    def eog_ids(self) -> frozenset[int]:
        return frozenset(self.vocab.eog_ids)

    def piece_text(self, token_id: int) -> str:
        """The token's vocabulary text (what chat templates call ``bos_token`` etc.)."""
        return self.vocab.tokens[token_id]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, fallback_chatml: bool = False,
                            jinja: bool = True, **extra: Any) -> str:
        """Render ``messages`` with the model's template (bos/eos texts filled in).

        Without a template this raises, unless ``fallback_chatml`` (llama-server's default).
        ``jinja=False``: llama.cpp's built-in renderer that the template's source selects.
        """
        from jllama.tokenizer.chat import CHATML_TEMPLATE, render_chat

        tmpl = self.chat_template or (CHATML_TEMPLATE if fallback_chatml else None)
        return render_chat(
            tmpl, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.piece_text(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.piece_text(self.eos_id) if self.eos_id is not None else "",
            jinja=jinja, **extra)

    # ------------------------------------------------------------------ encode
    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens, longest first, like tokenizer_st_partition."""
        v = self.vocab
        present = self._present_specials(text, parse_special)
        frags: list[str | int] = [text]
        for tid in v.special_cache:
            if tid not in present:
                continue
            attr = v.attrs[tid]
            tok = v.tokens[tid]
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                pos = 0
                while True:
                    m = f.find(tok, pos)
                    if m < 0:
                        break
                    left = f[pos:m]
                    if attr & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        new.append(left)
                    new.append(tid)
                    pos = m + len(tok)
                    if attr & ATTR_RSTRIP:
                        while pos < len(f) and f[pos] in _C_SPACE:
                            pos += 1
                if pos < len(f):
                    new.append(f[pos:])
            frags = new
        return frags

    def _groups(self, parse_special: bool) -> dict[str, tuple[list[int], dict[str, int]]]:
        """Active special tokens grouped by first character: (lengths, text -> id)."""
        cached = self._group_cache.get(parse_special)
        if cached is not None:
            return cached
        v = self.vocab
        groups: dict[str, tuple[list[int], dict[str, int]]] = {}
        for tid in v.special_cache:
            if not parse_special and v.attrs[tid] & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            tok = v.tokens[tid]
            lengths, texts = groups.setdefault(tok[0], ([], {}))
            texts[tok] = tid
            if len(tok) not in lengths:
                lengths.append(len(tok))
        self._group_cache[parse_special] = groups
        return groups

    def _present_specials(self, text: str, parse_special: bool) -> set[int]:
        """Ids of active special tokens occurring in ``text``.

        Scanning the text once per special token costs seconds for Gemma's 6k control tokens
        on a long text, so tokens sharing a rare first character are looked up at that
        character's positions instead.
        """
        present: set[int] = set()
        for first, (lengths, texts) in self._groups(parse_special).items():
            count = text.count(first)
            if not count:
                continue
            if count * len(lengths) < len(texts) * (len(text) // 64 + 1):
                pos = text.find(first)
                while pos >= 0:
                    for n in lengths:
                        tid = texts.get(text[pos:pos + n])
                        if tid is not None:
                            present.add(tid)
                    pos = text.find(first, pos + 1)
            else:
                present.update(tid for tok, tid in texts.items() if tok in text)
        return present

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        v = self.vocab
        frags = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if v.kind == "wpm":
            # llama.cpp's WPM path adds [CLS] ... [SEP] whenever add_special, whatever add_bos
            if add_special and v.bos_id is not None:
                out.append(v.bos_id)
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    self._impl.encode(f, out)
            if add_special and v.sep_id is not None:
                out.append(v.sep_id)
            return out
        if v.kind in ("rwkv", "test"):
            add_special = False  # llama.cpp adds no BOS/EOS for these
        if add_special and v.add_bos and v.bos_id is not None:
            out.append(v.bos_id)
        impl = self._impl
        if v.kind == "spm":
            prev_special = True  # llama.cpp prefixes the first fragment too
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                    continue
                if v.add_space_prefix and prev_special:
                    f = " " + f
                impl.encode(f.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    impl.encode(f, out)
        if add_special and v.add_eos and v.eos_id is not None:
            out.append(v.eos_id)
        return out

    # ------------------------------------------------------------------ decode
    def token_to_piece(self, token_id: int, special: bool = True, lstrip: int = 0) -> bytes:
        """llama.cpp's token_to_piece: raw bytes (possibly partial UTF-8)."""
        v = self.vocab
        if not special and v.attrs[token_id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        piece = v.piece(token_id)
        while lstrip > 0 and piece.startswith(b" "):
            piece = piece[1:]
            lstrip -= 1
        return piece

    def detokenize(self, ids: Iterable[int], remove_special: bool = False,
                   unparse_special: bool = True) -> bytes:
        """llama_detokenize: bytes of the text for ``ids``."""
        v = self.vocab
        ids = list(ids)
        remove_space = v.add_space_prefix
        if remove_special and v.add_bos and ids and ids[0] == v.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and v.add_eos and ids and ids[-1] == v.eos_id:
            ids = ids[:-1]
        parts = []
        for i in ids:
            parts.append(self.token_to_piece(i, unparse_special, 1 if remove_space else 0))
            remove_space = False
        text = b"".join(parts)
        if v.clean_spaces:
            text = _clean_spaces(text)
        return text

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.detokenize(ids, remove_special=skip_special,
                               unparse_special=not skip_special).decode("utf-8", "replace")


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces passes (in-place algorithm, same indexing)."""
    t = bytearray(text)
    n = len(t)
    # pass 1: " ?", " !", " .", " ,"
    total = 1 if n else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # pass 2: " ' " -> "'"
    n2 = total
    total = 1 if n2 else 0
    i = 1
    while i < n2:
        x = t[i]
        if x == 0x27 and i + 1 < n2 and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # pass 3: contractions " 's", " 'm", " 'll", " 're", " 've"
    n3 = total
    total = 1 if n3 else 0
    for i in range(1, n3):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n3:
            x1 = t[i + 1]
            if x1 in b"td":
                pass
            elif x1 in b"sm":
                total -= 1
            elif i + 2 < n3:
                x2 = t[i + 2]
                if (x1, x2) in ((0x6C, 0x6C), (0x72, 0x65), (0x76, 0x65)):
                    total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])


class StreamDecoder:
    """Feed token ids one at a time; get back only text whose UTF-8 is complete."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.token_to_piece(token_id, self.special))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)

