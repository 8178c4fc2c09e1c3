"""Every tokenizer kind and BPE pre-type llama.cpp 0c1e570 reads, against llama-cpp-python.

- llama.cpp's own test vocabularies beyond the eight in test_tokenizer.py (BERT WordPiece,
  gemma4's raw-text BPE, qwen35, ...) and nomic-bert-moe's UGM (T5-style unigram with a
  precompiled charsmap): its cases, a varied corpus, pieces and detokenization.
- Every ``tokenizer.ggml.pre`` string llama-vocab.cpp maps, on a byte-level BPE trained here
  (``tokenizers``) on the test texts without pre-splitting, written with each pre string: its merges
  cross every boundary, so a regex set cutting anywhere else changes the ids (checked by swapping
  sets); expected ids come from the oracle loading that same file.
- RWKV and the whitespace model, which llama.cpp ships no test vocabulary for: an RWKV-world
  vocabulary written as convert_hf_to_gguf does (from gpt-2's tokens as bytes), and the BPE
  above under ``tokenizer.ggml.model = whitespace``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from test_tokenizer import _cases, _check_vs_oracle, _fuzz_texts, _oracle, _tokenizer
from testdata import EXTRA_VOCABS

from jllama.gguf.constants import ValueType
from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import write_gguf
from jllama.tokenizer.vocab import BPE_PRE

pytestmark = pytest.mark.oracle

CORPUS = [
    "Hello world! It's 2024-05-06, isn't it? I'd've 12345678 apples; WE'LL see, DON'T.",
    "  leading spaces\n\n\ttabs\r\nCRLF   trailing   ",
    "def f(x):\n    return x**2  # comment\n\n\nclass A: pass\n",
    "Ünïcödé àccénts naïve café ÀÉÎÕÜ ǅungla ß e\u0301 a\u0308",
    "中文字符测试，你好世界。日本語のテキスト カタカナ ｶﾀｶﾅ 한국어 텍스트",
    "emoji 😀👍🏽🇫🇷 and symbols ~`!@#$%^&*()_+-=[]{}|;':\",./<>? ±×÷€£¥",
    "numbers: 1 12 123 1234 12345 123456 1234567 3.14159 ١٢٣ ⅷ ² 10,000,000",
    "Ελληνικά Русский текст עברית العربية हिन्दी देवनागरी ไทย ก่",
    "mixed\u00a0nbsp\u2003em\u3000ideographic \u200bzero-width\u0085nel",
    "CamelCaseWords HTTPServer iPhone XMLHttpRequest",
    "   ",
    "a\n",
    "\n\n\n",
    "<sentinel:12> IMGIMGABZ x",
]


def _texts() -> list[str]:
    return CORPUS + _fuzz_texts(40)


def _check_sep(tk, ora) -> None:
    """SEP/PAD ids and add_sep: what a rerank prompt is built from."""
    lc, v = ora.lc, ora.vocab

    def tid(t: int) -> int | None:
        return t if t >= 0 else None

    assert (tk.sep_id, tk.pad_id, tk.add_sep) == (
        tid(lc.llama_vocab_sep(v)), tid(lc.llama_vocab_pad(v)), bool(lc.llama_vocab_get_add_sep(v)))


def _compare(path: Path, texts: list[str]) -> None:
    tk = _tokenizer(str(path))
    ora = _oracle(str(path))
    _check_sep(tk, ora)
    for text in texts:
        for add_special in (True, False):
            want = ora.tokenize(text, add_special, False)
            assert tk.encode(text, add_special) == want, (text, add_special)
            for remove, unparse in ((False, True), (True, False)):
                assert tk.detokenize(want, remove, unparse) == ora.detokenize(
                    want, remove, unparse), (text, remove, unparse)


@pytest.mark.parametrize("name", EXTRA_VOCABS)
def test_extra_vocab_cases(extra_vocab_dir: Path, name: str) -> None:
    path = extra_vocab_dir / f"ggml-vocab-{name}.gguf"
    tk = _tokenizer(str(path))
    cases = _cases(path)
    bad = [(t, w, g) for t, w in cases if (g := tk.encode(t, add_special=False)) != w]
    assert not bad, f"{len(bad)} of {len(cases)} differ, first: {bad[0]!r}"
    _check_vs_oracle(path, cases)
    _compare(path, _texts())


@pytest.mark.slow  # 250k-token vocabulary: every piece is compared
def test_ugm_nomic_bert_moe(extra_vocab_dir: Path) -> None:
    path = extra_vocab_dir / "ggml-vocab-nomic-bert-moe.gguf"
    tk = _tokenizer(str(path))
    assert tk.vocab.kind == "ugm" and tk.vocab.charsmap
    _check_vs_oracle(path, [(t, _oracle(str(path)).tokenize(t, False, False)) for t in CORPUS])
    _compare(path, _texts())


# ---------------------------------------------------------------------------- pre-types
@functools.cache
def _boundary_bpe() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained with the ``tokenizers`` package on the test
    texts themselves *without* pre-splitting: its merges cross every word, space, digit and
    script boundary, so a pre-tokenizer that cuts one place differently changes the ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=20000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    hf.train_from_iterator(_texts() * 2, trainer=trainer)
    model = json.loads(hf.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _swapped(vocab_dir: Path, tmp: Path, model: str, pre: str) -> Path:
    """The boundary-crossing BPE written with ``tokenizer.ggml.pre = pre``."""
    tokens, merges = _boundary_bpe()
    eot = tokens.index("<|endoftext|>")
    meta = {"general.architecture": "gpt2", "tokenizer.ggml.model": model,
            "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if i == eot else 1 for i in range(len(tokens))],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": eot,
            "tokenizer.ggml.eos_token_id": eot}
    path = tmp / f"pre-{pre}.gguf"
    write_gguf(path, meta, [], {"tokenizer.ggml.token_type": (ValueType.ARRAY, ValueType.INT32),
                                "tokenizer.ggml.bos_token_id": (ValueType.UINT32, None),
                                "tokenizer.ggml.eos_token_id": (ValueType.UINT32, None)})
    return path


# llama.cpp's whitespace pre-type runs BPE on raw text with spaces; only its whitespace model
# (which drops them first) can use it (a byte-level vocabulary aborts in llama.cpp)
_PRE_NAMES = sorted(set(BPE_PRE) - {"whitespace"})


@pytest.mark.parametrize("pre", _PRE_NAMES)
def test_pre_type(vocab_dir: Path, tmp_path: Path, pre: str) -> None:
    path = _swapped(vocab_dir, tmp_path, "gpt2", pre)
    tk = _tokenizer(str(path))
    ora = _oracle(str(path))
    assert (tk.bos_id, tk.eos_id, tk.add_bos) == (ora.bos(), ora.eos(), ora.add_bos())
    _check_sep(tk, ora)
    for text in _texts():
        for add_special in (True, False):
            want = ora.tokenize(text, add_special, False)
            assert tk.encode(text, add_special) == want, (text, add_special)
        assert tk.detokenize(want, False, True) == ora.detokenize(want, False, True), text


def test_whitespace_model(vocab_dir: Path, tmp_path: Path) -> None:
    path = _swapped(vocab_dir, tmp_path, "whitespace", "whitespace")
    _compare(path, CORPUS)


def test_rwkv_world(vocab_dir: Path, tmp_path: Path) -> None:
    """An RWKV-world vocabulary written as convert_hf_to_gguf does (repr-escaped bytes), from
    gpt-2's first 8000 tokens (all 256 single bytes among them)."""
    from jllama.tokenizer.vocab import byte_decoder

    src = read_gguf(vocab_dir / "ggml-vocab-gpt-2.gguf")
    dec = byte_decoder()
    tokens = ["<s>"]
    seen: set[bytes] = set()
    for t in src.metadata["tokenizer.ggml.tokens"][:8000]:
        b = bytes(dec[c] for c in t)
        if b not in seen:
            seen.add(b)
            tokens.append(repr(b)[2:-1])
    assert len(seen) >= 256 and all(bytes([i]) in seen for i in range(256))
    meta = {"general.architecture": "rwkv7", "tokenizer.ggml.model": "rwkv",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1)}
    path = tmp_path / "rwkv.gguf"
    write_gguf(path, meta, [], {"tokenizer.ggml.token_type": (ValueType.ARRAY, ValueType.INT32)})
    tk = _tokenizer(str(path))
    assert tk.vocab.kind == "rwkv"
    _check_vs_oracle(path, [(t, _oracle(str(path)).tokenize(t, False, False)) for t in CORPUS])
    _compare(path, _texts())


def test_hybriddna_model(tmp_path: Path) -> None:
    """hybriddna: BPE text around <dna>...</dna> spans of marker-suffixed 6-mer tokens."""
    import itertools

    from jllama.tokenizer.vocab import DNA_KMER_MARKER

    tokens, merges = _boundary_bpe()
    tags = ["<dna>", "</dna>", "<oov>"]
    kmers = ["".join(p) + DNA_KMER_MARKER for p in itertools.product("ACGT", repeat=6)]
    all_tokens = tokens + tags + kmers
    types = [1] * len(tokens) + [3] * len(tags) + [1] * len(kmers)
    meta = {"general.architecture": "gpt2", "tokenizer.ggml.model": "hybriddna",
            "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": all_tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    path = tmp_path / "hybriddna.gguf"
    write_gguf(path, meta, [], {"tokenizer.ggml.token_type": (ValueType.ARRAY, ValueType.INT32)})
    texts = ["gene <dna>acgtacGTTTCAnnA</dna> end", "<dna>ACG", "x</dna>y<dna></dna>",
             "<dna>AC\u00e9GT\u00e9\u00e9ACGTAC</dna>"] + CORPUS[:4]
    _compare(path, texts)
    ids = _tokenizer(str(path)).encode(texts[0], add_special=False)
    first_kmer = len(tokens) + len(tags)
    assert sum(i >= first_kmer for i in ids) == 2 and len(tokens) + 2 in ids  # ACGTAC GTTTCA, oov
    assert _tokenizer(str(path)).detokenize(ids) == b"gene <dna>ACGTACGTTTCA<oov></dna> end"


def test_test_model(vocab_dir: Path, tmp_path: Path) -> None:
    """llama.cpp's TEST vocabulary type (hash of 5-byte chunks; pieces are hex ids)."""
    tokens, _ = _boundary_bpe()
    meta = {"general.architecture": "gpt2", "tokenizer.ggml.model": "test",
            "tokenizer.ggml.tokens": tokens}
    path = tmp_path / "test.gguf"
    write_gguf(path, meta, [])
    _compare(path, _texts())
