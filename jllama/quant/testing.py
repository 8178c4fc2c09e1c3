"""Test beds for quantization mixes and kernels: a tiny random llama GGUF that llama.cpp loads
(rows of 256, so every K-quant applies and the per-layer rules differ), and random GGUF blocks."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jllama.gguf.constants import QType, ValueType, qtype_info
from jllama.gguf.writer import TensorSpec, write_gguf

# Byte offsets of each type's f16 fields inside one block: random bytes elsewhere are valid codes,
# random bytes there could be inf/NaN scales.
F16_FIELDS = {
    QType.Q4_0: [0],
    QType.Q4_1: [0, 2],
    QType.Q5_0: [0],
    QType.Q5_1: [0, 2],
    QType.Q8_0: [0],
    QType.Q4_K: [0, 2],
    QType.Q5_K: [0, 2],
    QType.Q6_K: [208],
    QType.Q2_K: [80, 82],
    QType.Q3_K: [108],
    QType.IQ4_NL: [0],
    QType.IQ4_XS: [0],
    QType.TQ1_0: [52],
    QType.TQ2_0: [64],
    QType.Q1_0: [0],
    QType.Q2_0: [0],
    QType.MXFP4: [],  # its scale is an E8M0 exponent: see E8M0_FIELDS
    QType.NVFP4: [],  # UE4M3 scale bytes: every byte is a finite scale (2^-10..240, or 0)
    QType.IQ3_XXS: [0],
    QType.IQ3_S: [0],
    QType.IQ2_XXS: [0],
    QType.IQ2_XS: [0],
    QType.IQ2_S: [0],
    QType.IQ1_S: [0],
    QType.IQ1_M: [],  # its f16 scale is split into nibbles: see random_blocks
}


# Byte offsets of E8M0 exponents (scale 2^(e-128)): random ones would overflow (e near 255) or
# give f32 denormal scales and products (e < 2; XLA's f32 ops flush those); real weights' sit
# around 2^-18..2^6.
E8M0_FIELDS = {QType.MXFP4: [0]}


def random_blocks(qtype: QType, rows: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks ``[rows, row bytes]``: every code and bit pattern, finite f16 scales
    (and E8M0 exponents of real weights' range)."""
    info = qtype_info(int(qtype))
    nb = row_len // info.block_size
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, nb, info.type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        f = rng.uniform(-0.05, 0.05, (rows, nb)).astype(np.float16)
        raw[..., off : off + 2] = f[..., None].view(np.uint8).reshape(rows, nb, 2)
    for off in E8M0_FIELDS.get(qtype, []):
        raw[..., off] = rng.integers(110, 135, (rows, nb), dtype=np.uint8)
    if qtype == QType.IQ1_M:  # its f16 scale lies in the top nibbles of bytes 49, 51, 53, 55
        f = rng.uniform(-0.05, 0.05, (rows, nb)).astype(np.float16).view(np.uint16)
        for k in range(4):
            nib = ((f >> (4 * k)) & 15).astype(np.uint8)
            raw[..., 49 + 2 * k] = (raw[..., 49 + 2 * k] & 15) | (nib << 4)
    return raw.reshape(rows, nb * info.type_size)


def _spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A valid SentencePiece-style vocabulary: unk/bos/eos, the 256 byte tokens, then words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        a, b = divmod(i, len(letters))
        word = "\u2581" + (letters[a % 26] if a else "") + letters[b]
        tokens.append(word)
        types.append(1)
        i += 1
    scores = [0.0] * 3 + [0.0] * 256 + [-float(k) for k in range(len(tokens) - 259)]
    return tokens, scores, types


def tiny_llama(
    path: str | os.PathLike[str],
    n_embd: int = 256,
    n_layer: int = 8,
    n_head: int = 4,
    n_head_kv: int = 1,
    n_ff: int = 512,
    n_vocab: int = 320,
    tied: bool = False,
    seed: int = 0,
) -> int:
    """Write a random F32 llama model to ``path``; returns the file size."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head
    tokens, scores, ttypes = _spm_vocab(n_vocab)
    md: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "jllama tiny random llama",
        "general.file_type": 0,
        "llama.block_count": n_layer,
        "llama.context_length": 256,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.rope.dimension_count": hd,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": n_vocab,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": ttypes,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    types = {
        "tokenizer.ggml.scores": (ValueType.ARRAY, ValueType.FLOAT32),
        "tokenizer.ggml.token_type": (ValueType.ARRAY, ValueType.INT32),
        "llama.attention.layer_norm_rms_epsilon": (ValueType.FLOAT32, None),
        "llama.rope.freq_base": (ValueType.FLOAT32, None),
        "tokenizer.ggml.add_bos_token": (ValueType.BOOL, None),
    }

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        # a few outlier columns, like real weights, so the scale searches have work to do
        w = rng.standard_normal((rows, cols)).astype(np.float32) * scale
        w[:, rng.integers(0, cols, 2)] *= 8
        return w

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    arrays: list[tuple[str, np.ndarray]] = [("token_embd.weight", mat(n_vocab, n_embd, 0.5))]
    for i in range(n_layer):
        p = f"blk.{i}."
        arrays += [
            (p + "attn_norm.weight", norm(n_embd)),
            (p + "attn_q.weight", mat(n_embd, n_embd, 0.5 * n_embd**-0.5)),
            (p + "attn_k.weight", mat(n_head_kv * hd, n_embd, 0.5 * n_embd**-0.5)),
            (p + "attn_v.weight", mat(n_head_kv * hd, n_embd, 0.5 * n_embd**-0.5)),
            (p + "attn_output.weight", mat(n_embd, n_embd, 0.5 * n_embd**-0.5)),
            (p + "ffn_norm.weight", norm(n_embd)),
            (p + "ffn_gate.weight", mat(n_ff, n_embd, 0.5 * n_embd**-0.5)),
            (p + "ffn_up.weight", mat(n_ff, n_embd, 0.5 * n_embd**-0.5)),
            (p + "ffn_down.weight", mat(n_embd, n_ff, 0.5 * n_ff**-0.5)),
        ]
    arrays.append(("output_norm.weight", norm(n_embd)))
    if not tied:
        arrays.append(("output.weight", mat(n_vocab, n_embd, n_embd**-0.5)))
    specs = [
        TensorSpec(n, a.shape, int(QType.F32), lambda a=a: a.view(np.uint8)) for n, a in arrays
    ]
    return write_gguf(path, md, specs, types)


def llama_cpp_quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    ftype: str,
    allow_requantize: bool = True,
    pure: bool = False,
    token_embedding_type: QType | None = None,
    output_tensor_type: QType | None = None,
    overrides: list[tuple[str, QType]] | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    kv_overrides: list[tuple[str, Any]] | None = None,
    nthread: int = 1,
    quantize_output_tensor: bool = True,
    only_copy: bool = False,
    keep_split: bool = False,
    dry_run: bool = False,
    prune_layers: list[int] | None = None,
    max_buf_size: int | None = None,
) -> None:
    """The oracle: llama.cpp's own ``llama_model_quantize`` (llama-cpp-python), same knobs.

    ``imatrix``: name -> column weights (what llama-quantize's load_imatrix hands over);
    ``kv_overrides``: (key, bool/int/float/str) pairs, as llama-quantize's --override-kv (and
    its ``quantize.imatrix.*`` keys). ``ftype`` 'COPY' sets only_copy (as llama-quantize)."""
    import ctypes

    import llama_cpp

    from jllama.quant.mixes import FTYPES

    p = llama_cpp.llama_model_quantize_default_params()
    if ftype.upper() == "COPY":
        ftype, only_copy = "F32", True
    p.ftype = FTYPES[ftype.upper()][0]
    p.allow_requantize = allow_requantize
    p.pure = pure
    p.nthread = nthread
    p.quantize_output_tensor = quantize_output_tensor
    p.only_copy = only_copy
    p.keep_split = keep_split
    p.dry_run = dry_run
    if max_buf_size is not None:
        p.max_buf_size = max_buf_size
    keep_prune = None
    if prune_layers:
        keep_prune = (ctypes.c_int32 * (len(prune_layers) + 1))(*prune_layers, -1)
        p.prune_layers = ctypes.cast(keep_prune, type(p.prune_layers))
    if token_embedding_type is not None:
        p.token_embedding_type = int(token_embedding_type)
    if output_tensor_type is not None:
        p.output_tensor_type = int(output_tensor_type)
    keep = None
    if overrides:
        arr_t = llama_cpp.llama_model_tensor_override * (len(overrides) + 1)
        keep = arr_t(
            *[llama_cpp.llama_model_tensor_override(pat.encode(), int(t)) for pat, t in overrides],
            llama_cpp.llama_model_tensor_override(None, 0),
        )
        p.tt_overrides = ctypes.cast(keep, type(p.tt_overrides))
    keep_im = keep_kv = None
    if imatrix:
        arrs = [np.ascontiguousarray(v, np.float32) for v in imatrix.values()]
        im_t = llama_cpp.llama_model_imatrix_data * (len(arrs) + 1)
        keep_im = (
            im_t(
                *[
                    llama_cpp.llama_model_imatrix_data(
                        k.encode(), a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
                    )
                    for k, a in zip(imatrix, arrs, strict=True)
                ],
                llama_cpp.llama_model_imatrix_data(None, None, 0),
            ),
            arrs,
        )
        p.imatrix = ctypes.cast(keep_im[0], type(p.imatrix))
    if kv_overrides:
        kv_t = llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1)
        keep_kv = kv_t()
        for o, (key, val) in zip(keep_kv, kv_overrides, strict=False):
            o.key = key.encode()
            if isinstance(val, str):
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                o.value.val_str = val.encode()[:127]
            elif isinstance(val, bool):
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
                o.value.val_bool = val
            elif isinstance(val, float):
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
                o.value.val_f64 = val
            else:
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                o.value.val_i64 = int(val)
        p.kv_overrides = ctypes.cast(keep_kv, type(p.kv_overrides))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    del keep, keep_im, keep_kv, keep_prune
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")
