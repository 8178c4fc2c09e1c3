"""Vocabulary state loaded from GGUF metadata, mirroring ``llama_vocab::impl::load``.

llama.cpp derives a lot from the metadata that the file does not spell out (default special
ids per tokenizer model, EOT/EOG detection by token text, attribute overrides); token ids only
match llama.cpp when every one of those quirks is reproduced, so they all live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
_FIM_PRE_TEXTS = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                  "▁<PRE>", "<|code_prefix|>", "<|prefix|>"}
_FIM_SUF_TEXTS = {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                  "▁<SUF>", "<|code_suffix|>", "<|suffix|>"}
_FIM_MID_TEXTS = {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                  "▁<MID>", "<|code_middle|>", "<|middle|>"}
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

DNA_KMER_MARKER = "\ue000"  # hybriddna k-mer suffix (llama.cpp's dna_kmer_marker)


@dataclass(frozen=True)
class PreType:
    """What one ``tokenizer.ggml.pre`` string sets in llama_vocab::impl::load."""

    regexes: str  # key of pretokenize.PRE_REGEXES (LLAMA_VOCAB_PRE_TYPE_*, lowercase)
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    escape_whitespaces: bool = False  # SPM-style BPE: " " -> "\u2581" before merging
    no_bos: bool = False  # the default BOS id (11) is dropped
    add_sep: bool = False


# tokenizer.ggml.pre -> PreType, as llama.cpp 0c1e570 maps them (an unknown string is refused)
BPE_PRE: dict[str, PreType] = {}


def _reg(names: str, regexes: str, **kw: bool) -> None:
    for n in names.split():
        BPE_PRE[n] = PreType(regexes, **kw)


_reg("default", "default")
_reg("minicpm5", "minicpm5", ignore_merges=True)
_reg("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
     ignore_merges=True, add_bos=True)
_reg("deepseek-llm", "deepseek_llm", clean_spaces=False)
_reg("deepseek-coder", "deepseek_coder", clean_spaces=False)
_reg("deepseek-v3", "deepseek3_llm", clean_spaces=False)
_reg("spark2_5", "spark2_5", clean_spaces=False)
_reg("youtu", "youtu", clean_spaces=False, ignore_merges=True)
_reg("falcon", "falcon")
_reg("mpt", "gpt2")
_reg("starcoder refact mellum2 codeshell exaone minerva-7b", "starcoder")
_reg("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
     "exaone4 olmo jais", "gpt2")
_reg("jais-2", "jais2")
_reg("gemma4 granite-embed-multi-311m", "gemma4", escape_whitespaces=True)
_reg("sarvam-moe", "sarvam_moe", escape_whitespaces=True, clean_spaces=False)
_reg("jina-v1-en jina-v2-code roberta-bpe", "gpt2", add_sep=True)
_reg("whitespace", "whitespace")
_reg("command-r smollm", "starcoder", clean_spaces=False)
_reg("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", "qwen2", clean_spaces=False)
_reg("qwen35", "qwen35", clean_spaces=False)
_reg("stablelm2 megrez", "qwen2")
_reg("dbrx smaug-bpe", "dbrx")
_reg("poro-chat", "poro", clean_spaces=False)
_reg("bloom gpt3-finnish", "poro")
_reg("chatglm-bpe", "chatglm4", no_bos=True)
_reg("glm4 glm5", "chatglm4", no_bos=True, ignore_merges=True)
_reg("viking", "viking", clean_spaces=False)
_reg("tekken", "tekken", clean_spaces=False, ignore_merges=True, add_bos=True)
_reg("chameleon", "chameleon", add_bos=True, clean_spaces=False)
_reg("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", clean_spaces=False)
_reg("granite-embed-multi-97m", "granite_emb_multi", clean_spaces=False, ignore_merges=True)
_reg("tiny_aya cohere2moe", "tiny_aya", clean_spaces=False)
_reg("superbpe", "superbpe", clean_spaces=False)
_reg("trillion granite-docling", "gpt2", clean_spaces=False)
_reg("bailingmoe bailingmoe2 llada-moe", "bailingmoe", clean_spaces=False)
_reg("seed-coder", "seed_coder", clean_spaces=False)
_reg("hunyuan-dense hy_v4 joyai-llm", "deepseek3_llm", clean_spaces=False)
_reg("kimi-k2", "kimi_k2", clean_spaces=False)
_reg("ufakzeka", "ufakzeka", clean_spaces=False)
_reg("grok-2", "grok_2", clean_spaces=False)
_reg("afmoe", "afmoe", clean_spaces=False)
_reg("laguna", "laguna", clean_spaces=False)
_reg("exaone-moe", "exaone_moe", clean_spaces=False)


@dataclass
class Vocab:
    """Everything the tokenizer needs, with llama.cpp's derived defaults applied."""

    kind: str  # "spm" | "bpe" | "wpm" | "ugm" | "rwkv" | "test"
    pre: str  # BPE: key of pretokenize.PRE_REGEXES
    tokens: list[str]
    scores: list[float]
    attrs: list[int]
    token_to_id: dict[str, int]
    bpe_ranks: MergeRanks | dict[tuple[str, str], int] = field(default_factory=dict)
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    model: str = ""  # tokenizer.ggml.model
    add_sep: bool = False
    escape_whitespaces: bool = True
    remove_extra_whitespaces: bool = False
    lowercase: bool = True  # BERT normalizer
    strip_accents: bool = True
    charsmap: bytes = b""  # UGM: tokenizer.ggml.precompiled_charsmap
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    ignore_merges: bool = False
    eog_ids: set[int] = field(default_factory=set)
    # fill-in-the-middle tokens: pre/suf/mid/pad/rep/sep -> id (None: the vocab has none)
    fim: dict[str, int | None] = field(default_factory=dict)
    special_cache: list[int] = field(default_factory=list)
    pieces: list[bytes | None] = field(default_factory=list)  # lazy token_to_piece(special)

    def piece(self, i: int) -> bytes:
        """token_to_piece(special=True), computed on first use (llama.cpp caches all upfront)."""
        p = self.pieces[i]
        if p is None:
            p = self.pieces[i] = _piece_for_cache(self, i)
        return p


class MergeRanks:
    """BPE merge ranks: ``get((left, right))`` is the rank of the first merge ``"left right"``.

    llama.cpp splits each merge at its first space after the first character; a pair that
    split can give (left non-empty, no space after its first character) is looked up by the
    merge's own text, so the table is the file's strings as they are: a 280k-merge vocabulary
    (Llama 3) no longer splits every merge at load (~0.3 s of each start-up)."""

    __slots__ = ("_by_text",)

    def __init__(self, merges: list[str]):
        n = len(merges)
        # the first of equal merges keeps its rank
        self._by_text = dict(zip(reversed(merges), range(n - 1, -1, -1)))

    def get(self, pair: tuple[str, str], default: int | None = None) -> int | None:
        left, right = pair
        if not left or left.find(" ", 1) >= 0:
            return default  # no merge splits into this pair
        return self._by_text.get(f"{left} {right}", default)

    def __len__(self) -> int:
        return len(self._by_text)


def _attrs_from(meta: dict[str, Any], n: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [ATTR_NORMAL] * n
    # vectorised: 262k-token vocabularies (Gemma 3) spent ~0.1 s of every start here
    t = np.asarray(types[:n], dtype=np.int64)
    lut = np.array([_TYPE_TO_ATTR[i] for i in range(len(_TYPE_TO_ATTR))], np.int64)
    known = (t >= 0) & (t < len(lut))
    return np.where(known, lut[np.where(known, t, 0)], ATTR_UNDEFINED).tolist()


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

    def merges() -> MergeRanks:
        m = meta.get("tokenizer.ggml.merges")
        if m is None:
            raise ModelError("cannot find tokenizer merges in model file")
        return MergeRanks(m)

    if model == "llama":
        v = Vocab("spm", "default", tokens, scores, attrs, token_to_id, bos_id=1, eos_id=2,
                  unk_id=0, add_bos=True, add_space_prefix=True)
    elif model == "bert":
        v = Vocab("wpm", "default", tokens, scores, attrs, token_to_id, bos_id=101, unk_id=100,
                  sep_id=102, pad_id=0, mask_id=103, add_bos=True, add_sep=True,
                  clean_spaces=True)
    elif model in ("gpt2", "whitespace", "gemma4", "hybriddna"):
        if model == "gemma4":
            pre_name = "gemma4"  # llama.cpp forces it for this tokenizer model
        if pre_name == "":
            pre_name = "default"  # llama.cpp warns and uses the default regexes
        if pre_name not in BPE_PRE:
            raise ModelError(f"unknown pre-tokenizer type: {pre_name!r}")
        pt = BPE_PRE[pre_name]
        v = Vocab("bpe", pt.regexes, tokens, scores, attrs, token_to_id,
                  bos_id=None if model == "gemma4" else 11,
                  eos_id=None if model == "gemma4" else 11,
                  add_bos=pt.add_bos, clean_spaces=pt.clean_spaces,
                  ignore_merges=pt.ignore_merges, escape_whitespaces=pt.escape_whitespaces,
                  add_sep=pt.add_sep)
        if pt.no_bos:
            v.bos_id = None
        if pre_name == "whitespace":
            v.lowercase = False
        if model == "gpt2" and pre_name == "kimi-k2" and "tokenizer.ggml.merges" not in meta:
            v.bpe_ranks = MergeRanks([])  # Kimi-K2 ships without merges
        else:
            v.bpe_ranks = merges()
    elif model == "t5":
        v = Vocab("ugm", "default", tokens, scores, attrs, token_to_id, eos_id=1, unk_id=2,
                  pad_id=0, add_eos=True)
        cm = meta.get("tokenizer.ggml.precompiled_charsmap")
        if cm is not None:
            v.charsmap = bytes(int(x) & 0xFF for x in cm)
            if len(v.charsmap) < 4:
                raise ModelError("precompiled_charsmap too small for xcda_blob_size header")
            if int.from_bytes(v.charsmap[:4], "little") + 4 >= len(v.charsmap):
                raise ModelError("index out of array bounds in precompiled charsmap")
    elif model == "rwkv":
        v = Vocab("rwkv", "default", tokens, scores, attrs, token_to_id, escape_whitespaces=True)
    elif model == "test":
        v = Vocab("test", "default", tokens, scores, attrs, token_to_id)
    else:
        raise ModelError(f"unsupported tokenizer model: {model!r}")
    v.model = model
    if model == "hybriddna" and "<oov>" in token_to_id:
        # k-mer tokens (the block after <oov>) carry a marker that keeps them distinct from
        # text tokens in token_to_id; their text (what they detokenize to) drops it
        for i in range(token_to_id["<oov>"] + 1, n):
            t = tokens[i]
            if len(t) > 1 and t.endswith(DNA_KMER_MARKER):
                tokens[i] = t[:-1]

    v.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", v.add_space_prefix))
    v.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces",
                                               v.remove_extra_whitespaces))
    for attr_name, key in (("bos_id", "bos"), ("eos_id", "eos"), ("unk_id", "unknown"),
                           ("pad_id", "padding"), ("sep_id", "seperator"), ("mask_id", "mask")):
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
    for k, old in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle"), ("pad", ""),
                   ("rep", ""), ("sep", "")):
        val = meta.get(f"tokenizer.ggml.fim_{k}_token_id")
        if val is None and old:
            val = meta.get(f"tokenizer.ggml.{old}_token_id")  # deprecated keys
        fim[k] = int(val) if val is not None and 0 <= int(val) < n else None
    if "tokenizer.ggml.add_bos_token" in meta:
        v.add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_eos_token" in meta:
        v.add_eos = bool(meta["tokenizer.ggml.add_eos_token"])
    if "tokenizer.ggml.add_sep_token" in meta:
        v.add_sep = bool(meta["tokenizer.ggml.add_sep_token"])
    if v.kind == "bpe" and v.pre == "gemma4":
        v.add_bos = True  # llama.cpp overrides it for Gemma 4 (its PR #21500)
    if "tokenizer.ggml.normalizer.lowercase" in meta:
        v.lowercase = bool(meta["tokenizer.ggml.normalizer.lowercase"])
    v.strip_accents = v.lowercase
    if "tokenizer.ggml.normalizer.strip_accents" in meta:
        v.strip_accents = bool(meta["tokenizer.ggml.normalizer.strip_accents"])

    _detect_specials(v, fim)
    v.fim = fim
    special = np.flatnonzero(np.asarray(attrs, np.int64)
                             & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
    v.special_cache = sorted(special.tolist(),
                             key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")))
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

    ids = v.token_to_id  # in id order, so the lowest id is llama.cpp's first match

    def first(texts: set[str]) -> int | None:
        found = [ids[t] for t in texts if t in ids]
        if not found:
            return None
        mark(min(found))
        return min(found)

    if v.eot_id is None:
        v.eot_id = first(_EOT_TEXTS)
    if v.eom_id is None:
        v.eom_id = first(_EOM_TEXTS)
    for k, texts in (("pre", _FIM_PRE_TEXTS), ("suf", _FIM_SUF_TEXTS), ("mid", _FIM_MID_TEXTS),
                     ("pad", _FIM_PAD_TEXTS), ("rep", _FIM_REP_TEXTS), ("sep", _FIM_SEP_TEXTS)):
        if fim[k] is None:
            fim[k] = first(texts)
    texts_by_id = list(ids)  # a token's text as token_to_id holds it
    for i, a in enumerate(attrs):
        if a & ATTR_CONTROL and not a & ATTR_UNUSED and "unused" in texts_by_id[i]:
            attrs[i] |= ATTR_UNUSED
    eog = {fim[k] for k in ("pad", "rep", "sep") if fim[k] is not None}
    for t in _EOG_TEXTS:
        if t in ids:
            eog.add(ids[t])
            mark(ids[t])
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
    if v.kind == "rwkv":
        return unescape_rwkv(text)
    if v.kind == "test":
        return f"{i:x}".encode()  # llama.cpp's TEST vocabulary: the id in hex
    if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
        return _raw(text)
    if attr & ATTR_BYTE and v.kind in ("spm", "ugm", "bpe"):
        return bytes([int(text[3:5], 16)])
    if not attr & ATTR_NORMAL:
        return b""
    if v.kind != "bpe" or v.escape_whitespaces:
        return _raw(text.replace("\u2581", " "))
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


def unescape_rwkv(text: str) -> bytes:
    """llama_unescape_rwkv_token: RWKV vocab entries are Python-escaped byte strings."""
    out = bytearray()
    esc = False
    hex_left = 0
    acc = 0
    for c in _raw(text):
        if hex_left:
            acc = ((acc << 4) + (c - 0x61 + 10 if c >= 0x61 else c - 0x30)) & 0xFF
            hex_left -= 1
            if hex_left == 0:
                out.append(acc)
                acc = 0
            continue
        if esc:
            esc = False
            if c == 0x74:
                out.append(9)
            elif c == 0x6E:
                out.append(10)
            elif c == 0x72:
                out.append(13)
            elif c == 0x78:
                hex_left = 2
            else:
                out.append(c)
            continue
        if c == 0x5C:
            esc = True
            continue
        out.append(c)
    return bytes(out)
