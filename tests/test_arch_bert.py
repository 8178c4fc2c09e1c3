"""BERT, nomic-bert and jina-bert-v2 encoders (embeddings, every pooling type, reranker head) vs llama-cpp-python.

A tiny random ``bert`` GGUF in llama.cpp's tensor layout with a small WordPiece vocabulary is
run by both; llama-cpp-python's ``Llama.embed`` (embedding=True) gives the expected vectors.
llama.cpp's CPU graph is not reproduced op for op here (attention, norms in plain f32 XLA), so
vectors are compared to 2e-5 (measured: under 1e-6; the outputs are of order 1).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from jllama.gguf.reader import read_gguf
from jllama.models import bert, load_weights
from jllama.tokenizer import Tokenizer

pytestmark = pytest.mark.oracle

N_EMBD, N_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 128, 2, 64
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "embedding", "rank"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "Embedding, rank: DOG?", "a"]


def _vocab() -> tuple[list[str], list[int]]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    types = [3, 2, 3, 3, 3]
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?':":
        tokens += ["\u2581" + c, c]
        types += [1, 1]
    for wd in WORDS:
        tokens.append("\u2581" + wd)
        types.append(1)
    return tokens, types


def _write(path: Path, pooling: int, arch: str = "bert", seed: int = 0,
           xlmr: Path | None = None, qtype: gguf.GGMLQuantizationType | None = None,
           rerank_template: str | None = None, n_ctx: int = N_CTX) -> Path:
    """A tiny encoder (``n_ctx``: its trained context, the position table's rows); with ``xlmr`` (an XLM-R style UGM vocabulary file) its first 4000 tokens,
    scores and charsmap stand in for the WordPiece vocabulary, as in XLM-RoBERTa rerankers.
    ``rerank_template``: the GGUF's ``rerank`` chat template (llama-server's /rerank prompt)."""
    rng = np.random.default_rng(seed)
    tokens, types = _vocab()
    if xlmr is not None:
        src = read_gguf(xlmr).metadata
        tokens = src["tokenizer.ggml.tokens"][:4000]
        types = [int(x) for x in src["tokenizer.ggml.token_type"][:4000]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_uint32(f"{arch}.context_length", n_ctx)
    w.add_uint32(f"{arch}.embedding_length", N_EMBD)
    w.add_uint32(f"{arch}.feed_forward_length", N_FF)
    w.add_uint32(f"{arch}.block_count", N_LAYER)
    w.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    w.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-12)
    w.add_bool(f"{arch}.attention.causal", False)
    nomic = arch == "nomic-bert"
    jina = arch == "jina-bert-v2"
    if nomic:
        w.add_float32(f"{arch}.rope.freq_base", 1000.0)
    w.add_uint32(f"{arch}.pooling_type", pooling)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if xlmr is None:
        w.add_tokenizer_model("bert")
        w.add_uint32("tokenizer.ggml.token_type_count", 2)
        ids = (("bos", 2), ("seperator", 3), ("unknown", 1), ("padding", 0), ("mask", 4))
    else:
        w.add_tokenizer_model("t5")
        w.add_token_scores([float(x) for x in src["tokenizer.ggml.scores"][:4000]])
        w.add_precompiled_charsmap(bytes(src["tokenizer.ggml.precompiled_charsmap"]))
        w.add_add_space_prefix(True)
        w.add_remove_extra_whitespaces(True)
        w.add_add_bos_token(True)
        w.add_add_eos_token(True)
        w.add_uint32("tokenizer.ggml.token_type_count", 1)
        ids = (("bos", 0), ("eos", 2), ("seperator", 2), ("unknown", 3), ("padding", 1))
    for key, tid in ids:
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", tid)
    if rerank_template is not None:
        w.add_string("tokenizer.chat_template.rerank", rerank_template)

    def t(name: str, *shape: int, s: float = 0.3) -> None:
        arr = (rng.standard_normal(shape) * s).astype(np.float32)
        if qtype is not None and name.startswith("blk.") and name.endswith(".weight"):
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    def norm(name: str) -> None:
        w.add_tensor(name + ".weight", (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
        w.add_tensor(name + ".bias", (0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))

    t("token_embd.weight", len(tokens), N_EMBD)
    t("token_types.weight", 2 if xlmr is None else 1, N_EMBD)
    if arch == "bert":
        t("position_embd.weight", n_ctx, N_EMBD)
    norm("token_embd_norm")
    for i in range(N_LAYER):
        p = f"blk.{i}."
        if nomic:  # fused QKV, no biases, SiLU-gated FFN (as nomic-embed-text)
            t(p + "attn_qkv.weight", 3 * N_EMBD, N_EMBD, s=N_EMBD ** -0.5)
            t(p + "attn_output.weight", N_EMBD, N_EMBD, s=N_EMBD ** -0.5)
        else:
            for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
                t(p + n + ".weight", N_EMBD, N_EMBD, s=N_EMBD ** -0.5)
                t(p + n + ".bias", N_EMBD, s=0.05)
        norm(p + "attn_output_norm")
        if jina:  # Q/K LayerNorms, a second post-attention norm, GEGLU with the gate in up
            norm(p + "attn_q_norm")
            norm(p + "attn_k_norm")
            norm(p + "attn_norm_2")
        if nomic:
            t(p + "ffn_gate.weight", N_FF, N_EMBD, s=N_EMBD ** -0.5)
        n_up = 2 * N_FF if jina else N_FF
        t(p + "ffn_up.weight", n_up, N_EMBD, s=N_EMBD ** -0.5)
        t(p + "ffn_down.weight", N_EMBD, N_FF, s=N_FF ** -0.5)
        if not nomic:
            t(p + "ffn_up.bias", n_up, s=0.05)
            t(p + "ffn_down.bias", N_EMBD, s=0.05)
        norm(p + "layer_output_norm")
    if arch == "bert":  # the classifier head (jina-bert-v2's is a different shape)
        t("cls.weight", N_EMBD, N_EMBD, s=N_EMBD ** -0.5)
        t("cls.bias", N_EMBD, s=0.05)
        t("cls.output.weight", 1, N_EMBD, s=N_EMBD ** -0.5)
        t("cls.output.bias", 1, s=0.05)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("arch", "pooling"), [("bert", 0), ("bert", 1), ("bert", 2),
                                               ("bert", 3), ("bert", 4), ("nomic-bert", 0),
                                               ("nomic-bert", 1), ("jina-bert-v2", 1),
                                               ("jina-bert-v2", 2)])
def test_encoder_embeddings_vs_oracle(tmp_path: Path, arch: str, pooling: int) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _write(tmp_path / f"{arch}-{pooling}.gguf", pooling, arch)
    g = read_gguf(path)
    spec = bert.spec_from_gguf(g)
    assert spec.pooling == bert.POOLING[pooling]
    w = load_weights(g)
    tk = Tokenizer.from_gguf(g)
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=N_CTX, n_batch=N_CTX,
                          n_ubatch=N_CTX, verbose=False)
    try:
        for text in TEXTS:
            ids = tk.encode(text, add_special=True)
            assert ids == llm.tokenize(text.encode(), add_bos=True, special=False)
            want = np.asarray(llm.embed(text), np.float32)
            got = bert.embed(spec, w, np.asarray(ids))
            if pooling == 4:
                want = want[:1]  # llama-cpp-python reads n_embd floats; the score is the first
            assert got.shape == want.shape, (got.shape, want.shape)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=text)
    finally:
        llm.close()


def test_xlmr_reranker_vs_oracle(tmp_path: Path, extra_vocab_dir: Path) -> None:
    """An XLM-RoBERTa-style reranker: ``bert`` graph, T5/UGM vocabulary, rank pooling through
    the classifier head; the query/document pair joined as llama-server's /rerank does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _write(tmp_path / "xlmr-rank.gguf", 4, xlmr=extra_vocab_dir /
                  "ggml-vocab-nomic-bert-moe.gguf")
    g = read_gguf(path)
    spec = bert.spec_from_gguf(g)
    w = load_weights(g)
    tk = Tokenizer.from_gguf(g)
    assert tk.vocab.kind == "ugm"
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=N_CTX, n_batch=N_CTX,
                          n_ubatch=N_CTX, verbose=False)
    try:
        for text in ["what is a fox?</s></s>The quick brown fox.", "Ça va ? 東京 ok", "x"]:
            ids = tk.encode(text, add_special=True)
            assert ids == llm.tokenize(text.encode(), add_bos=True, special=False)
            want = np.asarray(llm.embed(text), np.float32)[:1]
            got = bert.embed(spec, w, np.asarray(ids))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=text)
    finally:
        llm.close()


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0", "Q5_1"])
def test_bert_quantized_vs_oracle(tmp_path: Path, qname: str) -> None:
    """Quantized layer weights go through the quantized kernels (common.linear)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    qtype = gguf.GGMLQuantizationType[qname]
    path = _write(tmp_path / f"bert-{qname}.gguf", 1, qtype=qtype)
    g = read_gguf(path)
    spec = bert.spec_from_gguf(g)
    w = load_weights(g)
    tk = Tokenizer.from_gguf(g)
    assert w("blk.0.ffn_up.weight").qtype == int(qtype)
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=N_CTX, n_batch=N_CTX,
                          n_ubatch=N_CTX, verbose=False)
    try:
        for text in TEXTS:
            want = np.asarray(llm.embed(text), np.float32)
            got = bert.embed(spec, w, np.asarray(tk.encode(text)))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=text)
    finally:
        llm.close()
