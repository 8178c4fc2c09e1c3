"""Tiny random Hugging Face checkpoints with real tokenizers, for `jllama convert-hf` tests.

A checkpoint folder is what convert_hf_to_gguf.py reads: ``config.json``, the weights in
(optionally sharded) ``model*.safetensors`` with ``model.safetensors.index.json``, and the
tokenizer files. The tokenizers are real ones, rebuilt from llama.cpp's tokenizer test
vocabularies (tests/testdata.py), so their BPE pre-tokenizer hashes are the ones
convert_hf_to_gguf.py knows:

- ``llama3``: Llama 3's byte-level BPE ``tokenizer.json`` (128,000 tokens + 256 specials, its
  split regex, BOS added by the template post-processor) -> ``tokenizer.ggml.pre = llama-bpe``;
- ``qwen2``: Qwen2's (NFC normaliser, its split regex, no BOS) -> ``qwen2``;
- ``spm``: LLaMA 2's SentencePiece ``tokenizer.model`` (32,000 pieces with their scores and
  byte-fallback pieces), written as the protobuf sentencepiece reads.

Weights are random (seeded) and written with ``safetensors``; hyperparameters are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import testdata

LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\\n' }}{% endif %}"
)


def _vocab(name: str) -> dict:
    from jllama.gguf import read_gguf

    g = read_gguf(testdata.vocab(name))
    m = g.metadata
    return {k: list(m[k]) if not isinstance(m[k], (str, int, float)) else m[k]
            for k in m if k.startswith("tokenizer.")}


def _bpe_json(v: dict, split: str, *, nfc: bool, bos: str | None, n_normal: int) -> dict:
    tokens, types = v["tokenizer.ggml.tokens"], v["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i in range(n_normal, len(tokens)) if types[i] == 3]
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
            "use_regex": True}
    if bos is not None:
        bos_id = tokens.index(bos)
        post = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
             "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": bos is not None,
                  "vocab": {tokens[i]: i for i in range(n_normal)},
                  "merges": v["tokenizer.ggml.merges"]},
    }


def write_llama3_tokenizer(d: Path) -> None:
    v = _vocab("llama-bpe")
    tj = _bpe_json(v, LLAMA3_SPLIT, nfc=False, bos="<|begin_of_text|>", n_normal=128000)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True, "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE}))


def write_qwen2_tokenizer(d: Path) -> None:
    v = _vocab("qwen2")
    tj = _bpe_json(v, QWEN2_SPLIT, nfc=True, bos=None, n_normal=151643)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "errors": "replace", "clean_up_tokenization_spaces": False, "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML_TEMPLATE}))


def write_spm_tokenizer(d: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    v = _vocab("llama-spm")
    m = pb.ModelProto()
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 6: pb.ModelProto.SentencePiece.BYTE}
    for tok, score, t in zip(v["tokenizer.ggml.tokens"], v["tokenizer.ggml.scores"],
                             v["tokenizer.ggml.token_type"]):
        p = m.pieces.add()
        p.piece, p.score, p.type = tok, score, kinds[t]
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(m.pieces)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id = 0, 1, 2
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    (d / "tokenizer.model").write_bytes(m.SerializeToString())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": False,
        "tokenizer_class": "LlamaTokenizer", "chat_template": LLAMA3_TEMPLATE}))


TOKENIZERS = {"llama3": (write_llama3_tokenizer, 128256), "qwen2": (write_qwen2_tokenizer, 151936),
              "spm": (write_spm_tokenizer, 32000)}


def write_weights(d: Path, tensors: dict[str, np.ndarray], dtype: str = "bfloat16",
                  shards: int = 1) -> None:
    """``tensors`` (float32 numpy) as ``dtype`` in ``shards`` files; an index when sharded."""
    import torch
    from safetensors.torch import save_file

    names = list(tensors)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = ("model.safetensors" if shards == 1 else
                 f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
        save_file({n: torch.from_numpy(tensors[n]).to(getattr(torch, dtype)).contiguous()
                   for n in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        total = sum(t.size for t in tensors.values()) * (4 if dtype == "float32" else 2)
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def dense_tensors(cfg: dict, rng: np.random.Generator, *, qkv_bias: bool = False,
                  qk_norm: bool = False, tied: bool = False, moe: str | None = None) -> dict:
    """HF tensor names -> float32 arrays for a llama-like decoder described by ``cfg``."""
    h, ff, nv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    t = {"model.embed_tokens.weight": w(nv, h, scale=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = w(nh * hd)
            t[p + "self_attn.k_proj.bias"] = w(nkv * hd)
            t[p + "self_attn.v_proj.bias"] = w(nkv * hd)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        if moe is None:
            t[p + "mlp.gate_proj.weight"] = w(ff, h)
            t[p + "mlp.up_proj.weight"] = w(ff, h)
            t[p + "mlp.down_proj.weight"] = w(h, ff)
        elif moe == "mixtral":
            ne = cfg["num_local_experts"]
            t[p + "block_sparse_moe.gate.weight"] = w(ne, h)
            for e in range(ne):
                q = p + f"block_sparse_moe.experts.{e}."
                t[q + "w1.weight"] = w(ff, h)
                t[q + "w2.weight"] = w(h, ff)
                t[q + "w3.weight"] = w(ff, h)
        else:  # qwen2moe / qwen3moe
            ne, mff = cfg["num_experts"], cfg["moe_intermediate_size"]
            t[p + "mlp.gate.weight"] = w(ne, h)
            for e in range(ne):
                q = p + f"mlp.experts.{e}."
                t[q + "gate_proj.weight"] = w(mff, h)
                t[q + "up_proj.weight"] = w(mff, h)
                t[q + "down_proj.weight"] = w(h, mff)
            if moe == "qwen2moe":
                sff = cfg["shared_expert_intermediate_size"]
                t[p + "mlp.shared_expert.gate_proj.weight"] = w(sff, h)
                t[p + "mlp.shared_expert.up_proj.weight"] = w(sff, h)
                t[p + "mlp.shared_expert.down_proj.weight"] = w(h, sff)
                t[p + "mlp.shared_expert_gate.weight"] = w(1, h)
    t["model.norm.weight"] = norm(h)
    if not tied:
        t["lm_head.weight"] = w(nv, h)
    return t


# A model card and sampling defaults, as real checkpoints ship them: general.* (license, tags,
# languages, base model) and general.sampling.* come from these.
MODEL_CARD = """---
license: apache-2.0
language:
- en
- zh
tags:
- chat
base_model: Qwen/Qwen2.5-0.5B
pipeline_tag: text-generation
---

# Tiny random Qwen2.5
"""
GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.8}


def write_checkpoint(d: Path, cfg: dict, tensors: dict, tokenizer: str, *,
                     dtype: str = "bfloat16", shards: int = 1, card: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if card:
        (d / "README.md").write_text(MODEL_CARD)
        (d / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    TOKENIZERS[tokenizer][0](d)
    write_weights(d, tensors, dtype, shards)
    return d


def llama_config(tokenizer: str = "llama3", **kw) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": TOKENIZERS[tokenizer][1],
           "bos_token_id": 128000, "eos_token_id": 128009, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "hidden_act": "silu"}
    cfg.update(kw)
    return cfg


def qwen2_config(**kw) -> dict:
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
           "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "hidden_act": "silu", "use_sliding_window": False}
    cfg.update(kw)
    return cfg


def qwen3_config(**kw) -> dict:
    cfg = qwen2_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32)
    cfg.update(kw)
    return cfg


def qwen_moe_config(kind: str, **kw) -> dict:
    if kind == "qwen2moe":
        cfg = qwen2_config(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64, decoder_sparse_step=1,
                           tie_word_embeddings=False)
    else:
        cfg = qwen3_config(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def mixtral_config(**kw) -> dict:
    cfg = llama_config("spm", architectures=["MixtralForCausalLM"], model_type="mixtral",
                       num_local_experts=4, num_experts_per_tok=2, bos_token_id=1,
                       eos_token_id=2, rope_theta=1000000.0)
    cfg.update(kw)
    return cfg


def gemma3_config(**kw) -> dict:
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "rope_local_base_freq": 10000.0, "sliding_window": 64, "sliding_window_pattern": 6,
           "query_pre_attn_scalar": 32, "vocab_size": 32000, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "hidden_activation": "gelu_pytorch_tanh"}
    cfg.update(kw)
    return cfg


def gemma3_tensors(cfg: dict, rng: np.random.Generator) -> dict:
    t = dense_tensors(cfg, rng, qk_norm=True, tied=True)
    h = cfg["hidden_size"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "pre_feedforward_layernorm.weight"] = (rng.standard_normal(h) * 0.1).astype(
            np.float32)
        t[p + "post_feedforward_layernorm.weight"] = (rng.standard_normal(h) * 0.1).astype(
            np.float32)
    return t


def deepseek2_config(**kw) -> dict:
    """DeepSeek-V2-Lite's shape in miniature: no q LoRA, MLA, first layer dense."""
    cfg = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
           "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 32,
           "q_lora_rank": None, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32,
           "v_head_dim": 32, "routed_scaling_factor": 1.0, "topk_method": "greedy",
           "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "vocab_size": TOKENIZERS["llama3"][1], "bos_token_id": 128000,
           "eos_token_id": 128009, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "hidden_act": "silu"}
    cfg.update(kw)
    return cfg


def deepseek2_tensors(cfg: dict, rng: np.random.Generator) -> dict:
    h, nv, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kvl, ff, mff = cfg["kv_lora_rank"], cfg["intermediate_size"], cfg["moe_intermediate_size"]

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    t = {"model.embed_tokens.weight": w(nv, h, scale=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = w(nh * (nope + rope), h)
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = w(kvl + rope, h)
        t[p + "self_attn.kv_a_layernorm.weight"] = norm(kvl)
        t[p + "self_attn.kv_b_proj.weight"] = w(nh * (nope + vd), kvl)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * vd)
        if i < cfg["first_k_dense_replace"]:
            t[p + "mlp.gate_proj.weight"] = w(ff, h)
            t[p + "mlp.up_proj.weight"] = w(ff, h)
            t[p + "mlp.down_proj.weight"] = w(h, ff)
            continue
        t[p + "mlp.gate.weight"] = w(cfg["n_routed_experts"], h)
        for e in range(cfg["n_routed_experts"]):
            q = p + f"mlp.experts.{e}."
            t[q + "gate_proj.weight"] = w(mff, h)
            t[q + "up_proj.weight"] = w(mff, h)
            t[q + "down_proj.weight"] = w(h, mff)
        sff = mff * cfg["n_shared_experts"]
        t[p + "mlp.shared_experts.gate_proj.weight"] = w(sff, h)
        t[p + "mlp.shared_experts.up_proj.weight"] = w(sff, h)
        t[p + "mlp.shared_experts.down_proj.weight"] = w(h, sff)
    t["model.norm.weight"] = norm(h)
    t["lm_head.weight"] = w(nv, h)
    return t
