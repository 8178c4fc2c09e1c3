"""Tokenizer vocabularies for convert-hf, as convert_hf_to_gguf.py reads them.

Byte-level BPE (``tokenizer.json``) goes through ``transformers.AutoTokenizer`` because the
pre-tokenizer is identified by the token ids it produces for a fixed text (the reference's hash
table in pretok_hashes.py), and added tokens that are not pre-normalised are normalised by an
encode/decode round trip: both are the tokenizer library's behaviour, not the file's.
SentencePiece (``tokenizer.model``) goes through ``sentencepiece``.
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

from jllama.convert.common import ConvertError, need
from jllama.convert.pretok_hashes import CHKTXT, PRE_BY_HASH

log = logging.getLogger("jllama.convert")

# gguf token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def looks_special(token: str | bytes) -> bool:
    """Added tokens some models forget to mark special (the reference's list)."""
    text = token.decode("utf-8") if isinstance(token, (bytes, bytearray)) else token
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def bpe_pre(tokenizer) -> str:
    h = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if h not in PRE_BY_HASH:
        raise ConvertError(f"the BPE pre-tokenizer of this tokenizer.json is not one llama.cpp "
                           f"knows (hash {h})")
    return PRE_BY_HASH[h]


def bpe_vocab(model_dir: Path, hparams: dict[str, Any]) -> tuple[list[str], list[int], str]:
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
        raise ConvertError(f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model)")
    transformers = need("transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ConvertError(f"{model_dir}: cannot load the tokenizer: {e}") from None
    vocab = tok.vocab
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise ConvertError(f"tokenizer has ids up to {max(vocab.values())}, config.json's "
                           f"vocab_size is {vocab_size}")
    pre = bpe_pre(tok)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        t = reverse[i]
        if t in added:
            if not decoder[i].normalized:
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            if decoder[i].special or looks_special(t):
                types.append(CONTROL)
            else:
                t = t.replace("\u2581", " ")  # user-defined tokens pre-normalised (Gemma)
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(t)
    return tokens, types, pre


def spm_vocab(model_dir: Path, hparams: dict[str, Any]) -> tuple[list[bytes], list[float],
                                                                 list[int]]:
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no tokenizer.model")
    spm = need("sentencepiece")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    n = sp.vocab_size()
    vocab_size = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size") or n
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(n, vocab_size)):
        kind = NORMAL
        if sp.IsUnknown(i):
            kind = UNKNOWN
        elif sp.IsControl(i):
            kind = CONTROL
        elif sp.IsUnused(i):
            kind = UNUSED
        elif sp.IsByte(i):
            kind = BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    if n > vocab_size:
        log.warning("tokenizer.model has %d pieces, vocab_size is %d: ignoring the rest", n,
                    vocab_size)
    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for key, tid in json.loads(added_file.read_text(encoding="utf-8")).items():
            if tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = key.encode("utf-8"), -1000.0, USER_DEFINED
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        dec = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for tid, data in dec.items():
            tid = int(tid)
            if tid >= vocab_size:
                continue
            t: str = data["content"]
            if data.get("special") or looks_special(t):
                types[tid] = CONTROL
            else:
                t = t.replace("\u2581", " ")
                types[tid] = USER_DEFINED
            scores[tid] = -1000.0
            tokens[tid] = t.encode("utf-8")
    return tokens, scores, types
