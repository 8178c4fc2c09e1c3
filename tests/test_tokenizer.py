"""Tokenizer vs llama.cpp: the llama.cpp vocab test cases, and llama-cpp-python as oracle.

The ``.inp``/``.out`` pairs beside llama.cpp's ``ggml-vocab-*.gguf`` files (fixture
``vocab_dir``: ``shared/data/vocab``, or fetched from the oracle's source package; see
testdata.py) are llama.cpp's own tokenizer tests (ids for add_special=False,
parse_special=False). Decoding, special-token parsing, EOG sets
and whole-file tokenization are compared with llama-cpp-python (llama.cpp 0c1e570).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import pytest
from testdata import VOCABS

from jllama.tokenizer import StreamDecoder, Tokenizer

SEP = "\n__ggml_vocab_test__\n"


def _cases(path: Path) -> list[tuple[str, list[int]]]:
    inp = path.with_name(path.name + ".inp").read_bytes().decode("utf-8").split(SEP)
    if inp and inp[-1] == "":
        inp = inp[:-1]
    out = path.with_name(path.name + ".out").read_bytes().decode("utf-8").split("\n")
    if out and out[-1] == "":
        out = out[:-1]
    assert len(inp) == len(out), f"{path}: {len(inp)} inputs, {len(out)} outputs"
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inp, out)]


@functools.cache
def _tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_path(path)


class Oracle:
    """llama-cpp-python's vocabulary functions (vocab-only model)."""

    def __init__(self, path: Path):
        llama_cpp = pytest.importorskip("llama_cpp")
        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        n_max = len(raw) + 8
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_special,
                                   parse_special)
        assert n >= 0
        return list(buf[:n])

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (self.lc.llama_token * max(len(ids), 1))(*ids)
        size = 64 + 256 * len(ids)  # some vocabularies hold long whitespace-run tokens
        buf = ctypes.create_string_buffer(size)
        n = self.lc.llama_detokenize(self.vocab, arr, len(ids), buf, size, remove_special,
                                     unparse_special)
        assert n >= 0
        return buf.raw[:n]

    def piece(self, tok: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(4096)  # MPT has a 512-space token
        n = self.lc.llama_token_to_piece(self.vocab, tok, buf, 4096, 0, special)
        assert n >= 0
        return buf.raw[:n]

    def n_vocab(self) -> int:
        return self.lc.llama_vocab_n_tokens(self.vocab)

    def is_eog(self, tok: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, tok))

    def bos(self) -> int | None:
        t = self.lc.llama_vocab_bos(self.vocab)
        return t if t >= 0 else None  # LLAMA_TOKEN_NULL

    def eos(self) -> int | None:
        t = self.lc.llama_vocab_eos(self.vocab)
        return t if t >= 0 else None

    def add_bos(self) -> bool:
        return bool(self.lc.llama_vocab_get_add_bos(self.vocab))

    def add_eos(self) -> bool:
        return bool(self.lc.llama_vocab_get_add_eos(self.vocab))


_ORACLES: dict[str, Oracle] = {}


def _oracle(path: str) -> Oracle:
    if path not in _ORACLES:
        _ORACLES[path] = Oracle(Path(path))
    return _ORACLES[path]


@pytest.fixture(scope="module", autouse=True)
def _close_oracles():
    """Free llama.cpp objects before interpreter shutdown (their __del__ fails late)."""
    yield
    for ora in _ORACLES.values():
        ora.llm.close()
    _ORACLES.clear()


def _vocab_path(vocab_dir: Path, name: str) -> Path:
    return vocab_dir / f"ggml-vocab-{name}.gguf"


# ---------------------------------------------------------------------------- llama.cpp cases
@pytest.mark.parametrize("name", VOCABS)
def test_vocab_cases(vocab_dir: Path, name: str) -> None:
    path = _vocab_path(vocab_dir, name)
    tk = _tokenizer(str(path))
    cases = _cases(path)
    assert len(cases) > 10
    bad = [(text, want, got) for text, want in cases
           if (got := tk.encode(text, add_special=False, parse_special=False)) != want]
    assert not bad, f"{len(bad)} of {len(cases)} differ, first: {bad[0]!r}"


# ---------------------------------------------------------------------------- oracle
SPECIAL_TEXTS = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hello [/INST] answer</s>  <s> again",
    "<|user|>\nHello <|end|>\n<|assistant|>   x<|endoftext|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhey<|eot_id|>",
    "<｜begin▁of▁sentence｜>x ø ü y<｜end▁of▁sentence｜>",
    ">>TITLE<< a >>ABSTRACT<<b<|endoftext|>",
    "<fim_prefix>def f():<fim_suffix>\n<fim_middle>",
    "plain text, no specials",
    "",
]


def _check_vs_oracle(path: Path, cases: list[tuple[str, list[int]]]) -> None:
    tk = _tokenizer(str(path))
    ora = _oracle(str(path))
    n = ora.n_vocab()
    assert tk.n_vocab == n
    assert (tk.bos_id, tk.eos_id) == (ora.bos(), ora.eos())
    assert (tk.add_bos, tk.add_eos) == (ora.add_bos(), ora.add_eos())
    assert {i for i in range(n) if tk.is_eog(i)} == {i for i in range(n) if ora.is_eog(i)}
    for special in (True, False):
        bad = [i for i in range(n) if tk.token_to_piece(i, special) != ora.piece(i, special)]
        assert not bad, f"token_to_piece(special={special}) differs for ids {bad[:10]}"
    for text in SPECIAL_TEXTS:
        for add_special in (True, False):
            for parse_special in (True, False):
                assert tk.encode(text, add_special, parse_special) == ora.tokenize(
                    text, add_special, parse_special), (text, add_special, parse_special)
    for text, ids in cases:
        ids_bos = tk.encode(text, add_special=True)
        for seq in (ids, ids_bos):
            for remove, unparse in ((False, True), (True, False), (False, False)):
                assert tk.detokenize(seq, remove, unparse) == ora.detokenize(seq, remove, unparse), (
                    text, remove, unparse)
        assert tk.decode(ids, skip_special=True) == ora.detokenize(ids, True, False).decode(
            "utf-8", "replace")


@pytest.mark.oracle
@pytest.mark.parametrize("name", VOCABS)
def test_vs_oracle(vocab_dir: Path, name: str) -> None:
    path = _vocab_path(vocab_dir, name)
    _check_vs_oracle(path, _cases(path))


@pytest.mark.oracle
@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_models_vs_oracle(vocab_dir: Path, model: str, request: pytest.FixtureRequest) -> None:
    """Real models: the llama.cpp test inputs (ids from the oracle), specials, pieces, EOG."""
    path = request.getfixturevalue(model)
    ora = _oracle(str(path))
    texts = [t for t, _ in _cases(_vocab_path(vocab_dir, "llama-spm"))]
    cases = [(t, ora.tokenize(t, False, False)) for t in texts]
    tk = _tokenizer(str(path))
    for text, want in cases:
        assert tk.encode(text, add_special=False) == want, text
    _check_vs_oracle(path, cases)


def test_stream_decoder_utf8(vocab_dir: Path) -> None:
    """Byte tokens of a multi-byte character only produce text once it is complete."""
    tk = _tokenizer(str(_vocab_path(vocab_dir, "llama-spm")))
    byte_ids = [tk.vocab.token_to_id[f"<0x{b:02X}>"] for b in "€".encode()]
    dec = StreamDecoder(tk)
    assert [dec.feed(i) for i in byte_ids] == ["", "", "€"]
    dec2 = StreamDecoder(tk)
    assert dec2.feed(byte_ids[0]) == ""
    assert dec2.flush() == "\ufffd"
    ids = tk.encode("Hello wörld, 你好!", add_special=True)
    dec3 = StreamDecoder(tk)
    text = "".join(dec3.feed(i) for i in ids) + dec3.flush()
    assert text == tk.decode(ids, skip_special=True)


def test_special_ids_and_eog(smollm2_path: Path) -> None:
    tk = _tokenizer(str(smollm2_path))
    im_end = tk.vocab.token_to_id["<|im_end|>"]
    assert tk.is_eog(im_end) and tk.is_eog(tk.eos_id)
    assert im_end in tk.special_ids
    assert tk.encode("<|im_start|>", add_special=False, parse_special=True) == [
        tk.vocab.token_to_id["<|im_start|>"]]
    assert tk.chat_template and "im_start" in tk.chat_template


# ---------------------------------------------------------------------------- whole file
def _wiki(wiki_test_path: Path) -> str:
    return wiki_test_path.read_text(encoding="utf-8")


@pytest.mark.oracle
@pytest.mark.parametrize(("model", "n_expected"), [("smollm2_path", 303_415),
                                                    ("gemma3_path", 295_216)])
def test_wiki_matches_llama_cpp(wiki_test_path: Path, model: str, n_expected: int,
                                request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    text = _wiki(wiki_test_path)
    ids = _tokenizer(str(path)).encode(text, add_special=True)
    ref = _oracle(str(path)).llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    assert len(ref) == n_expected
    head = text[:200_000]  # parse_special over real text too (wiki has "<unk>" markers)
    assert _tokenizer(str(path)).encode(head, parse_special=True) == _oracle(
        str(path)).llm.tokenize(head.encode("utf-8"), add_bos=True, special=True)
    if ids != ref:
        k = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
        pytest.fail(f"{len(ids)} vs {len(ref)} tokens; first difference at {k}: "
                    f"{ids[k - 2:k + 4]} vs {ref[k - 2:k + 4]}")


@pytest.mark.oracle
@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_long_words_vs_oracle(model: str, request: pytest.FixtureRequest) -> None:
    """Long unsplittable runs take the heap-ordered merge path; ids must not change."""
    import random

    path = request.getfixturevalue(model)
    rng = random.Random(0)
    texts = ["a" * 3000, "ab" * 1500 + "c", "".join(rng.choice("abcdefgh") for _ in range(8000)),
             " " * 2000 + "x", "日本語" * 700, "\n" * 500 + "end"]
    tk = _tokenizer(str(path))
    ora = _oracle(str(path))
    for text in texts:
        assert tk.encode(text) == ora.tokenize(text, True, False), text[:20]


_FUZZ_POOLS = [
    " \t\n\r\x0b\x0c\x85\xa0\u2000\u3000", "abcXYZ'sdtmlrve", "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éüßøµÀÖ", "αβγΩώ", "日本語中文한국어", "😀👍🏽",
    "\u0301\u0308", "١٢٣४५", "←→∑∞", "\u200b\u200d\ufeff", "ǅǈ", "\x01\x1f\x7f", "ⅫⅣ", "𝔘𝔫",
    "ｶﾀｶﾅ", "ก่", "<|im_end|><unk><s></s><start_of_turn><|endoftext|>",
]


def _fuzz_texts(n: int) -> list[str]:
    import random

    rng = random.Random(1234)
    return ["".join(rng.choice(rng.choice(_FUZZ_POOLS)) for _ in range(rng.randint(1, 40)))
            for _ in range(n)]


@pytest.mark.oracle
@pytest.mark.parametrize("name", VOCABS + ["smollm2_path", "gemma3_path"])
def test_fuzz_vs_oracle(vocab_dir: Path, name: str, request: pytest.FixtureRequest) -> None:
    """Random mixes of scripts, categories, whitespace kinds and specials (encode + decode)."""
    path = request.getfixturevalue(name) if name.endswith("_path") else _vocab_path(vocab_dir,
                                                                                     name)
    tk = _tokenizer(str(path))
    ora = _oracle(str(path))
    for text in _fuzz_texts(150):
        for parse_special in (False, True):
            ref = ora.tokenize(text, True, parse_special)
            assert tk.encode(text, True, parse_special) == ref, (text, parse_special)
            assert tk.detokenize(ref, False, parse_special) == ora.detokenize(
                ref, False, parse_special), (text, parse_special)
