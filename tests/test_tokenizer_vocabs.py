"""Every tokenizer kind and BPE pre-type llama.cpp 0c1e570 reads, against llama-cpp-python.

- llama.cpp's own test vocabularies beyond the eight in test_tokenizer.py (BERT WordPiece,
  gemma4's raw-text BPE, qwen35, ...) and nomic-bert-moe's UGM (T5-style unigram with a
  precompiled charsmap): its cases, a varied corpus, pieces and detokenization.
- Every ``tokenizer.ggml.pre`` string llama-vocab.cpp maps: one real byte-level BPE vocabulary
  (``gpt-2``) written again with only the pre string swapped, so each regex set runs on the same
  tokens and merges; expected ids come from the oracle loading that same file.
- RWKV and the whitespace model, whose vocabularies llama.cpp ships no test file for: small
  vocabularies written here from a tokenizer trained on WikiText-2 (the ``tokenizers`` package).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tokenizer import _cases, _check_vs_oracle, _fuzz_texts, _oracle, _tokenizer
from testdata import EXTRA_VOCABS

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


def _compare(path: Path, texts: list[str]) -> None:
    tk = _tokenizer(str(path))
    ora = _oracle(str(path))
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
def _swapped(vocab_dir: Path, tmp: Path, model: str, pre: str) -> Path:
    src = read_gguf(vocab_dir / "ggml-vocab-gpt-2.gguf")
    meta = dict(src.metadata)
    meta["tokenizer.ggml.model"] = model
    meta["tokenizer.ggml.pre"] = pre
    path = tmp / f"pre-{pre}.gguf"
    write_gguf(path, meta, [], dict(src.metadata_types))
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
    for text in CORPUS:
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
    from jllama.gguf.constants import ValueType
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
