"""Vocabulary state loaded from GGUF metadata, mirroring ``llama_vocab::impl::load``.

llama.cpp derives a lot from the metadata that the file does not spell out (default special
ids per tokenizer model, EOT/EOG detection by token text, attribute overrides); token ids only
match llama.cpp when every one of those quirks is reproduced, so they all live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jllama.errors import ModelError

# llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# GGUF token_type -> attr
_TYPE_TO_ATTR = {
    0: ATTR_UNDEFINED,
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

_EOT_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
}
_EOM_TEXTS = {"<|eom_id|>"}
_FIM_PAD_TEXTS = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}
_FIM_REP_TEXTS = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}
_FIM_SEP_TEXTS = {"<|file_sep|>"}
_EOG_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
}
_ALWAYS_RENDER = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}

# tokenizer.ggml.pre -> (pre-tokenizer name, clean_spaces, ignore_merges, add_bos default)
_BPE_PRE: dict[str, tuple[str, bool, bool, bool]] = {}


def _reg(names: list[str], pre: str, clean: bool = True, ignore: bool = False,
         bos: bool = False) -> None:
    for n in names:
        _BPE_PRE[n] = (pre, clean, ignore, bos)


_reg(["", "default"], "default")
_reg(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
     "llama3", ignore=True, bos=True)
_reg(["dbrx", "smaug-bpe"], "llama3")
_reg(["deepseek-llm"], "deepseek-llm", clean=False)
_reg(["deepseek-coder"], "deepseek-coder", clean=False)
_reg(["falcon"], "falcon")
_reg(["mpt", "olmo", "jais", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
      "jina-v2-de", "a.x-4.0", "mellum", "exaone4", "jina-v1-en", "jina-v2-code",
      "roberta-bpe"], "gpt2")
_reg(["starcoder", "refact", "codeshell", "exaone", "minerva-7b"], "starcoder")
_reg(["command-r", "smollm"], "starcoder", clean=False)
_reg(["qwen2", "deepseek-r1-qwen", "megrez"], "qwen2", clean=False)
_reg(["stablelm2"], "qwen2")
_reg(["poro-chat", "viking"], "poro", clean=False)
_reg(["bloom", "gpt3-finnish"], "poro")
_reg(["chatglm-bpe", "glm4"], "llama3")
_reg(["kormo", "f2llmv2", "hunyuan", "solar-open"], "qwen2", clean=False)
_reg(["trillion", "granite-docling"], "gpt2", clean=False)
_reg(["mellum2"], "starcoder")


@dataclass
class Vocab:
    """Everything the tokenizer needs, with llama.cpp's derived defaults applied."""

    kind: str  # "spm" | "bpe"
    pre: str
    tokens: list[str]
    scores: list[float]
    attrs: list[int]
    token_to_id: dict[str, int]
    bpe_ranks: dict[tuple[str, str], int] = field(default_factory=dict)
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    ignore_merges: bool = False
    eog_ids: set[int] = field(default_factory=set)
    special_cache: list[int] = field(default_factory=list)
    pieces: list[bytes | None] = field(default_factory=list)  # lazy token_to_piece(special)

    def piece(self, i: int) -> bytes:
        """token_to_piece(special=True), computed on first use (llama.cpp caches all upfront)."""
        p = self.pieces[i]
        if p is None:
            p = self.pieces[i] = _piece_for_cache(self, i)
        return p


def _attrs_from(meta: dict[str, Any], n: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [ATTR_NORMAL] * n
    return [_TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]]


def load_vocab(meta: dict[str, Any]) -> Vocab:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ModelError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    pre_name = meta.get("tokenizer.ggml.pre", "") or ""
    n = len(tokens)
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * n)]
    attrs = _attrs_from(meta, n)
    token_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in token_to_id:
            raise ModelError(f"duplicate token in vocabulary: {t!r} has ids {token_to_id[t]} and {i}")
        token_to_id[t] = i

    if model == "llama":
        v = Vocab("spm", "default", tokens, scores, attrs, token_to_id, bos_id=1, eos_id=2,
                  unk_id=0, add_bos=True, add_space_prefix=True)
    elif model == "gpt2":
        if pre_name not in _BPE_PRE:
            raise ModelError(f"unsupported pre-tokenizer type: {pre_name!r}")
        pre, clean, ignore, bos = _BPE_PRE[pre_name]
        v = Vocab("bpe", pre, tokens, scores, attrs, token_to_id, bos_id=11, eos_id=11,
                  add_bos=bos, clean_spaces=clean, ignore_merges=ignore)
        if pre_name in ("chatglm-bpe", "glm4"):
            v.bos_id = None
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ModelError("cannot find tokenizer merges in model file")
        ranks: dict[tuple[str, str], int] = {}
        for i, m in enumerate(merges):
            pos = m.find(" ", 1)
            pair = (m[:pos], m[pos + 1:]) if pos >= 0 else ("", "")
            ranks.setdefault(pair, i)
        v.bpe_ranks = ranks
    else:
        raise ModelError(f"unsupported tokenizer model: {model!r} (only 'llama' SPM and 'gpt2' BPE)")

    v.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", v.add_space_prefix))
    for attr_name, key in (("bos_id", "bos"), ("eos_id", "eos"), ("unk_id", "unknown"),
                           ("pad_id", "padding")):
        cur = getattr(v, attr_name)
        if cur is not None and cur >= n:
            setattr(v, attr_name, None)
        new = meta.get(f"tokenizer.ggml.{key}_token_id")
        if new is not None and 0 <= int(new) < n:
            setattr(v, attr_name, int(new))
    eot = meta.get("tokenizer.ggml.eot_token_id")
    v.eot_id = int(eot) if eot is not None and 0 <= int(eot) < n else None
    eom = meta.get("tokenizer.ggml.eom_token_id")
    v.eom_id = int(eom) if eom is not None and 0 <= int(eom) < n else None
    fim: dict[str, int | None] = {}
    for k in ("pad", "rep", "sep"):
        val = meta.get(f"tokenizer.ggml.fim_{k}_token_id")
        fim[k] = int(val) if val is not None and 0 <= int(val) < n else None
    if "tokenizer.ggml.add_bos_token" in meta:
        v.add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_eos_token" in meta:
        v.add_eos = bool(meta["tokenizer.ggml.add_eos_token"])

    _detect_specials(v, fim)
    v.special_cache = sorted(
        (i for i in range(n) if attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)),
        key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")),
    )
    v.pieces = [None] * n
    name = str(meta.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        # llama.cpp strips spaces after Phi-3's special tokens (model-name hack in load)
        for i in v.special_cache:
            attrs[i] |= ATTR_RSTRIP
        for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            if t in token_to_id:
                i = token_to_id[t]
                attrs[i] = (attrs[i] | ATTR_RSTRIP) if on else (attrs[i] & ~ATTR_RSTRIP)
    return v


def _detect_specials(v: Vocab, fim: dict[str, int | None]) -> None:
    """EOT/EOM/FIM/EOG detection by token text, as llama.cpp does after loading."""
    attrs = v.attrs

    def mark(i: int) -> None:
        attrs[i] |= ATTR_CONTROL

    for t, i in v.token_to_id.items():
        if v.eot_id is None and t in _EOT_TEXTS:
            v.eot_id = i
            mark(i)
        if v.eom_id is None and t in _EOM_TEXTS:
            v.eom_id = i
            mark(i)
        for k, texts in (("pad", _FIM_PAD_TEXTS), ("rep", _FIM_REP_TEXTS), ("sep", _FIM_SEP_TEXTS)):
            if fim[k] is None and t in texts:
                fim[k] = i
                mark(i)
    for t, i in v.token_to_id.items():
        if attrs[i] & ATTR_CONTROL and not attrs[i] & ATTR_UNUSED and "unused" in t:
            attrs[i] |= ATTR_UNUSED
    eog = {i for i in fim.values() if i is not None}
    for t, i in v.token_to_id.items():
        if t in _EOG_TEXTS:
            eog.add(i)
            mark(i)
    for t in _ALWAYS_RENDER:
        if t in v.token_to_id:
            attrs[v.token_to_id[t]] = ATTR_USER_DEFINED
    for i in (v.eos_id, v.eot_id, v.eom_id):
        if i is not None:
            eog.add(i)
    texts = {v.tokens[i]: i for i in eog}
    if ("<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                                or (("<|call|>" in texts or "<|calls|>" in texts) and "<|flush|>" in texts))):
        eog.discard(texts["<|end|>"])
        attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = ATTR_NORMAL
    v.eog_ids = eog


_BYTE_DECODER: dict[str, int] | None = None


def byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        _BYTE_DECODER = {c: b for b, c in byte_encoder().items()}
    return _BYTE_DECODER


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _piece_for_cache(v: Vocab, i: int) -> bytes:
    """llama.cpp's token_to_piece(special=True) for one token."""
    attr = v.attrs[i]
    text = v.tokens[i]
    if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
        return _raw(text)
    if v.kind == "spm":
        if attr & ATTR_NORMAL:
            return _raw(text.replace("\u2581", " "))
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""
    if attr & ATTR_NORMAL:
        dec = byte_decoder()
        out = bytearray()
        for ch in text:
            b = dec.get(ch)
            if b is None:
                u = _raw(ch)
                out += b"[UNK_BYTE_0x" + u.hex().encode() + _raw(text) + b"]"
            else:
                out.append(b)
        return bytes(out)
    return b""
