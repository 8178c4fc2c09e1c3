"""Tiny random GGUF models that llama.cpp loads, for architecture tests against the oracle.

Real checkpoints of every architecture are too big for the test suite, so each architecture is
checked on a few-layer random model written here and run by both jllama and llama-cpp-python.
``write_gguf`` is generic (any arch, any hyperparameters, any tensors); ``dense_tensors`` makes
the usual decoder tensors with a scale that keeps logits well spread (greedy choices are then
decided by margins far above float rounding), and ``gpt2_tokenizer`` a valid byte-level BPE
vocabulary so that llama.cpp's vocab loader accepts the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# Text the toy BPE learns its merges from; any English will do.
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. the cat sat on the mat and the dog sat on "
    "the log. in the beginning there was the word, and the word was with the model. "
    "def main():\n    return print('hello world')\n"
)


def _byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map (what byte-level BPE vocabularies store)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def gpt2_tokenizer(n_merges: int = 40, specials: tuple[str, ...] = ("<|endoftext|>",
                                                                     "<|im_start|>",
                                                                     "<|im_end|>")):
    """(tokens, token_types, merges, bos_id, eos_id): 256 byte tokens, learned merges, specials."""
    bu = _byte_unicode()
    tokens = [bu[b] for b in range(256)]
    words = [[bu[b] for b in (" " + w if i else w).encode()] for i, w in
             enumerate(_CORPUS.split(" "))]
    merges: list[str] = []
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:], strict=False))
        if not pairs:
            break
        (a, b), _n = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    eos = len(tokens)
    tokens += list(specials)
    return tokens, [int(t) for t in types], merges, eos, eos


def _add_hparam(w: gguf.GGUFWriter, key: str, v) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, list | tuple):
        w.add_array(key, list(v))
    else:
        raise TypeError(f"hparam {key}: unsupported type {type(v).__name__}")


def write_gguf(path: str | Path, arch: str, hparams: dict, tensors: dict[str, np.ndarray],
               tokenizer: str = "gpt2",
               qtype: Q | Callable[[str, np.ndarray], Q | None] | None = None,
               pre: str = "qwen2", specials: tuple[str, ...] | None = None,
               extra_merges: tuple[str, ...] = ()) -> Path:
    """Write a GGUF llama.cpp can load.

    ``hparams`` keys are relative to the arch prefix (``"block_count"`` → ``"{arch}.block_count"``);
    keys containing a ``.`` at the start (``".general.name"``) are written without the prefix.
    ``tensors`` are float arrays in numpy order; with ``qtype`` every tensor of 2+ dimensions
    whose rows fit the block size is stored quantized (norms and biases stay F32, as converters
    do). ``qtype`` may instead be a function ``(name, array) -> qtype or None`` (None: F32).
    ``tokenizer``: ``"gpt2"`` (byte-level BPE, ``tokenizer.ggml.pre = pre``); ``specials``:
    its control tokens (the first is EOS), default ``gpt2_tokenizer``'s; ``extra_merges``:
    merges (``"a b"``, byte-level text) added after the learned ones, each with its token.
    """
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    for k, v in hparams.items():
        _add_hparam(w, k[1:] if k.startswith(".") else f"{arch}.{k}", v)
    if tokenizer != "gpt2":
        raise ValueError(f"tokenizer '{tokenizer}' is not supported (only 'gpt2')")
    toks, types, merges, bos, eos = (gpt2_tokenizer() if specials is None
                                     else gpt2_tokenizer(specials=specials))
    for m in extra_merges:
        merges = merges + [m]
        toks = toks + [m.replace(" ", "")]
        types = types + [int(gguf.TokenType.NORMAL)]
    n_vocab = tensors["token_embd.weight"].shape[0]
    if n_vocab < len(toks):
        raise ValueError(f"token_embd has {n_vocab} rows; the tokenizer needs {len(toks)}")
    # pad to the embedding's row count with unused control tokens
    pad = [f"<|unused{i}|>" for i in range(n_vocab - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(toks + pad)
    w.add_token_types(types + [int(gguf.TokenType.CONTROL)] * len(pad))
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, np.float32)
        if callable(qtype):
            qt = qtype(name, arr)
        else:
            bs = gguf.GGML_QUANT_SIZES[qtype][0] if qtype is not None else 1
            qt = qtype if arr.ndim >= 2 and arr.shape[-1] % bs == 0 else None
        if qt is not None and qt not in (Q.F32,):
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dense_tensors(seed: int, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                  head_dim: int, n_vocab: int, *, qkv_bias: bool = False, qk_norm: bool = False,
                  post_norms: bool = False, tied: bool = True, std: float = 0.08,
                  embd_std: float = 0.15, norm_offset: float = 1.0) -> dict[str, np.ndarray]:
    """Decoder tensors named as llama.cpp expects (blk.N.attn_q.weight, ...), seeded.

    Norm weights are ``norm_offset + N(0, 0.1)``: pass 1.0 for archs storing the scale itself.
    """
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, s: float = std) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * s).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (norm_offset + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t: dict[str, np.ndarray] = {"token_embd.weight": mat(n_vocab, n_embd, embd_std)}
    qd, kvd = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(n_embd)
        t[p + "attn_q.weight"] = mat(qd, n_embd)
        t[p + "attn_k.weight"] = mat(kvd, n_embd)
        t[p + "attn_v.weight"] = mat(kvd, n_embd)
        if qkv_bias:
            t[p + "attn_q.bias"] = mat(1, qd, 0.1)[0]
            t[p + "attn_k.bias"] = mat(1, kvd, 0.1)[0]
            t[p + "attn_v.bias"] = mat(1, kvd, 0.1)[0]
        if qk_norm:
            t[p + "attn_q_norm.weight"] = norm(head_dim)
            t[p + "attn_k_norm.weight"] = norm(head_dim)
        t[p + "attn_output.weight"] = mat(n_embd, qd)
        t[p + "ffn_norm.weight"] = norm(n_embd)
        t[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_up.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_down.weight"] = mat(n_embd, n_ff)
        if post_norms:
            t[p + "post_attention_norm.weight"] = norm(n_embd)
            t[p + "post_ffw_norm.weight"] = norm(n_embd)
    t["output_norm.weight"] = norm(n_embd)
    if not tied:
        t["output.weight"] = mat(n_vocab, n_embd)
    return t


def dense_hparams(n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                  head_dim: int, **extra) -> dict:
    """The ``{arch}.*`` keys every decoder needs; ``extra`` adds or overrides keys."""
    h = {
        "context_length": 4096,
        "block_count": n_layer,
        "embedding_length": n_embd,
        "feed_forward_length": n_ff,
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 10000.0,
    }
    h.update(extra)
    return h


def write_tiny_llama(path: str | Path, seed: int, n_vocab: int = 300, **shape) -> Path:
    """A Q8_0 llama of ``shape`` (dense_tensors' arguments) with the test vocabulary."""
    import gguf

    return write_gguf(path, "llama", dense_hparams(**shape),
                      dense_tensors(seed, n_vocab=n_vocab, **shape),
                      qtype=gguf.GGMLQuantizationType.Q8_0)


def write_lora(path: str | Path, arch: str, base: dict[str, np.ndarray], targets: list[str],
               rank: int = 8, alpha: float = 16.0, seed: int = 0, std: float = 0.1,
               qtype: Q = Q.F32) -> Path:
    """A random LoRA adapter GGUF for the base tensors ``base`` (name -> array, numpy order), in
    the layout convert_lora_to_gguf.py writes, written with jllama's own GGUF writer.

    For each name N in ``targets``: ``N.lora_a`` [rank, n_in] and ``N.lora_b`` [n_out, rank]
    (PEFT's A and B), except ``token_embd.weight``, whose lora_a the converter transposes to
    [n_vocab, rank]. Metadata as the converter's LoraModel: general.type = adapter,
    adapter.type = lora, adapter.lora.alpha (f32), the base architecture. F32, F16 or Q8_0 data
    (the converter's f32 / f16 / q8_0 outtypes; Q8_0 needs rank and rows in 32s)."""
    from jllama.gguf.constants import ValueType
    from jllama.gguf.writer import TensorSpec
    from jllama.gguf.writer import write_gguf as jl_write

    rng = np.random.default_rng(seed)
    dt = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype)
    specs = []
    for name in targets:
        n_out, n_in = base[name].shape
        if name == "token_embd.weight":  # PEFT's embedding A is [rank, n_vocab], B [n_embd, rank]
            n_out, n_in = n_in, n_out
        a = rng.standard_normal((rank, n_in)) * std
        b = rng.standard_normal((n_out, rank)) * std
        if name == "token_embd.weight":
            a = a.T  # [n_vocab, rank]: rows gathered by token id (llm_build_inp_embd)
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            arr = np.ascontiguousarray(arr, np.float32)
            raw = arr.astype(dt) if dt is not None else gguf.quants.quantize(arr, qtype)
            specs.append(TensorSpec(name + suffix, arr.shape, int(qtype),
                                    lambda r=raw: r.view(np.uint8)))
    meta = {"general.architecture": arch, "general.type": "adapter",
            "general.name": f"tiny-{arch}-lora", "adapter.type": "lora",
            "adapter.lora.alpha": float(alpha),
            "general.file_type": {Q.F32: 0, Q.F16: 1, Q.Q8_0: 7}[qtype],
            "general.quantization_version": 2}
    types = {"adapter.lora.alpha": (ValueType.FLOAT32, None)}
    jl_write(path, meta, specs, metadata_types=types)
    return Path(path)


# ChatML, as SmolLM2/Qwen write it (enough for the server's chat-shaped endpoints)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FIM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
                "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|fim_repo|>",
                "<|file_sep|>")


def write_server_model(path: str | Path, fim: bool = True, seed: int = 5,
                       fim_keys: dict[str, int] | None = None) -> Path:
    """A tiny llama (F16) with a ChatML template for the server's API tests; ``fim``: its vocab
    has Qwen's FIM tokens (found by their text, as llama.cpp finds them without metadata keys),
    else only the chat specials; ``fim_keys``: tokenizer.ggml.fim_{pre,suf,...}_token_id
    metadata ({"pre": id, ...})."""
    import gguf

    shp = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16)
    keys = {f".tokenizer.ggml.fim_{k}_token_id": v for k, v in (fim_keys or {}).items()}
    return write_gguf(path, "llama", {**dense_hparams(**shp), ".tokenizer.chat_template": CHATML,
                                      **keys},
                      dense_tensors(seed, n_vocab=320, **shp),
                      qtype=gguf.GGMLQuantizationType.F16,
                      specials=FIM_SPECIALS if fim else FIM_SPECIALS[:3])


def realigned(src: str | Path, dst: str | Path, mod: int = 32) -> Path:
    """A copy of a GGUF file whose data section starts at ``mod`` mod 64 (GGUF aligns it to
    32 only, so real files come both ways): the same metadata, tensors and bytes, plus a
    padding key whose length moves the header. llama.cpp and jllama both ignore the key."""
    from jllama.gguf.reader import read_gguf
    from jllama.gguf.writer import TensorSpec, write_gguf

    g = read_gguf(src)
    specs = [TensorSpec(t.name, tuple(t.shape), int(t.qtype), lambda t=t: np.asarray(t.data))
             for t in g.tensors.values()]
    for pad in range(64):
        meta = {**g.metadata, "jllama.test.pad": "x" * pad}
        write_gguf(dst, meta, specs, g.metadata_types)
        if read_gguf(dst).data_offset % 64 == mod:
            return Path(dst)
    raise AssertionError(f"no padding puts {src}'s data section at {mod} mod 64")


def mapped_ranges(path: str | Path) -> list[tuple[int, int]]:
    """[start, end) addresses of this process's mappings of ``path`` (/proc/self/maps): where a
    weight read in place from the file must lie."""
    import os

    path = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 6 and head[5] == path:
                a, b = head[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    return out
