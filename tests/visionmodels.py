"""Tiny random vision-language models for the mmproj tests.

The vision half is a Hugging Face ``Gemma3ForConditionalGeneration`` checkpoint (the SigLIP
tower and the Gemma 3 projector, random, in the layout convert_hf_to_gguf.py reads) converted
by llama.cpp's own ``convert_hf_to_gguf.py --mmproj``; the text half is a tiny ``gemma3`` GGUF
(tests/tinymodels.py) whose tokenizer has Gemma's image markers as control tokens, with the
projector's output width.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import gguf
import numpy as np
from tinymodels import dense_hparams, dense_tensors, write_gguf

TEXT = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=1, head_dim=64)
SPECIALS = ("<end_of_turn>", "<start_of_turn>", "<start_of_image>", "<end_of_image>")



def _randn(rng):
    """``w(*shape, s=0.05)``: f32 draws of N(0, s²) from ``rng`` (every writer's weights)."""
    def w(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    return w


def f16(a):
    return a.astype(np.float16)


def vision_config(image_size: int = 64, patch_size: int = 8, n_embd: int = 64,
                  n_layer: int = 2, n_head: int = 4, tokens_per_image: int = 4) -> dict:
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "mm_tokens_per_image": tokens_per_image, "image_token_index": 300,
        "boi_token_index": 301, "eoi_token_index": 302,
        "text_config": {"model_type": "gemma3_text", "hidden_size": TEXT["n_embd"],
                        "intermediate_size": TEXT["n_ff"], "num_hidden_layers": TEXT["n_layer"],
                        "num_attention_heads": TEXT["n_head"],
                        "num_key_value_heads": TEXT["n_head_kv"], "head_dim": TEXT["head_dim"],
                        "vocab_size": 320, "rms_norm_eps": 1e-6},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": n_embd,
                          "intermediate_size": 2 * n_embd, "num_hidden_layers": n_layer,
                          "num_attention_heads": n_head, "image_size": image_size,
                          "patch_size": patch_size, "layer_norm_eps": 1e-6,
                          "hidden_act": "gelu_pytorch_tanh", "num_channels": 3},
    }


def vision_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = _randn(rng)
    v = cfg["vision_config"]
    d, ff, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n_pos = (v["image_size"] // p) ** 2

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    pre = "vision_tower.vision_model."
    t = {pre + "embeddings.patch_embedding.weight": w(d, 3, p, p, s=0.1),
         pre + "embeddings.patch_embedding.bias": w(d, s=0.1),
         pre + "embeddings.position_embedding.weight": w(n_pos, d, s=0.2)}
    for i in range(v["num_hidden_layers"]):
        q = f"{pre}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            t[q + ln + ".weight"], t[q + ln + ".bias"] = norm(d), w(d, s=0.1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[q + f"self_attn.{proj}.weight"], t[q + f"self_attn.{proj}.bias"] = w(d, d, s=0.15), w(d)
        t[q + "mlp.fc1.weight"], t[q + "mlp.fc1.bias"] = w(ff, d, s=0.15), w(ff)
        t[q + "mlp.fc2.weight"], t[q + "mlp.fc2.bias"] = w(d, ff, s=0.15), w(d)
    t[pre + "post_layernorm.weight"], t[pre + "post_layernorm.bias"] = norm(d), w(d, s=0.1)
    t["multi_modal_projector.mm_input_projection_weight"] = w(d, cfg["text_config"]["hidden_size"],
                                                              s=0.2)
    t["multi_modal_projector.mm_soft_emb_norm.weight"] = (0.1 * rng.standard_normal(d)).astype(
        np.float32)
    return t


def write_vision_checkpoint(d: Path, cfg: dict, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_seq_length": cfg["mm_tokens_per_image"], "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor"}))
    save_file(vision_tensors(cfg, seed), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def write_text_model(path: Path, seed: int = 3, **extra) -> Path:
    tensors = dense_tensors(seed, n_vocab=320, qk_norm=True, post_norms=True, tied=True,
                            embd_std=0.05, **TEXT)
    hp = dense_hparams(**TEXT, **{"rope.freq_base": 1e6}, **extra)
    return write_gguf(path, "gemma3", hp, tensors, specials=SPECIALS)


def _clip_writer(path, n_embd_out: int, image_size: int, patch: int, d: int, n_layer: int,
                 n_head: int) -> gguf.GGUFWriter:
    """An mmproj GGUF's writer with the vision keys every projector type has."""
    g = gguf.GGUFWriter(str(path), "clip")
    g.add_type("mmproj")
    g.add_bool("clip.has_vision_encoder", True)
    g.add_uint32("clip.vision.projection_dim", n_embd_out)
    g.add_uint32("clip.vision.image_size", image_size)
    g.add_uint32("clip.vision.patch_size", patch)
    g.add_uint32("clip.vision.embedding_length", d)
    g.add_uint32("clip.vision.feed_forward_length", 2 * d)
    g.add_uint32("clip.vision.block_count", n_layer)
    g.add_uint32("clip.vision.attention.head_count", n_head)
    return g


def _encoder_blocks(g, w, mat, d: int, n_layer: int, legacy_ffn: bool = False) -> None:
    """The ViT blocks (pre-norm, biased attention and GELU MLP) as the converter names them;
    ``mat`` writes a matrix (f16 or quantized), ``w`` draws random f32 values. ``legacy_ffn``:
    legacy/convert_image_encoder_to_gguf.py's names, fc1 as ffn_down and fc2 as ffn_up."""
    up, down = ("ffn_down", "ffn_up") if legacy_ffn else ("ffn_up", "ffn_down")
    for i in range(n_layer):
        b = f"v.blk.{i}."
        for ln in ("ln1", "ln2"):
            g.add_tensor(b + ln + ".bias", w(d, s=0.1))
            g.add_tensor(b + ln + ".weight", 1.0 + w(d, s=0.1))
        g.add_tensor(b + up + ".bias", w(2 * d))
        mat(b + up + ".weight", w(2 * d, d, s=0.15))
        g.add_tensor(b + down + ".bias", w(d))
        mat(b + down + ".weight", w(d, 2 * d, s=0.15))
        for t in ("attn_k", "attn_out", "attn_q", "attn_v"):
            g.add_tensor(b + t + ".bias", w(d))
            mat(b + t + ".weight", w(d, d, s=0.15))


def _finish(g) -> None:
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def write_mmproj(path, n_embd_out: int = 128, seed: int = 0, image_size: int = 64,
                 patch: int = 8, d: int = 64, n_layer: int = 2, n_head: int = 4,
                 n_merge: int = 4, block_type: gguf.GGMLQuantizationType | None = None) -> None:
    """A gemma3 mmproj as convert_hf_to_gguf.py --mmproj writes it (f16 matrices, f32 norms,
    biases and embeddings, f16 input projection)."""
    rng = np.random.default_rng(seed)
    w = _randn(rng)

    def mat(name, a):  # the encoder's matrices: f16, or ``block_type`` (llama-quantize'd)
        if block_type is None:
            g.add_tensor(name, f16(a))
        else:
            g.add_tensor(name, gguf.quants.quantize(a, block_type), raw_dtype=block_type)

    g = _clip_writer(path, n_embd_out, image_size, patch, d, n_layer, n_head)
    g.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    g.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    g.add_string("clip.projector_type", "gemma3")
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    g.add_bool("clip.use_gelu", True)
    g.add_uint32("clip.vision.projector.scale_factor", n_merge)
    g.add_tensor("mm.input_projection.weight", f16(w(d, n_embd_out, s=0.2)))
    g.add_tensor("mm.soft_emb_norm.weight", 1.0 + w(d, s=0.1))
    g.add_tensor("v.patch_embd.bias", w(d, s=0.1))
    g.add_tensor("v.patch_embd.weight", w(d, 3, patch, patch, s=0.1))
    g.add_tensor("v.position_embd.weight", w((image_size // patch) ** 2, d, s=0.2))
    _encoder_blocks(g, w, mat, d, n_layer)
    g.add_tensor("v.post_ln.bias", w(d, s=0.1))
    g.add_tensor("v.post_ln.weight", 1.0 + w(d, s=0.1))
    _finish(g)


def write_llava_mmproj(path, n_embd_out: int = 128, seed: int = 0, image_size: int = 56,
                       patch: int = 14, d: int = 64, n_layer: int = 3, n_head: int = 4) -> None:
    """A LLaVA-1.5 mmproj (``clip.projector_type = mlp``) as convert_hf_to_gguf.py --mmproj
    writes one for LlavaForConditionalGeneration: CLIP with a class embedding and a
    pre-LayerNorm, quick-GELU, no post-LayerNorm, the two-layer MLP projector; f16 matrices."""
    rng = np.random.default_rng(seed)
    w = _randn(rng)

    g = _clip_writer(path, n_embd_out, image_size, patch, d, n_layer, n_head)
    g.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    g.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    g.add_string("clip.projector_type", "mlp")
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    g.add_bool("clip.use_gelu", False)
    n_pos = (image_size // patch) ** 2 + 1
    g.add_tensor("mm.0.weight", f16(w(n_embd_out, d, s=0.15)))
    g.add_tensor("mm.0.bias", w(n_embd_out))
    g.add_tensor("mm.2.weight", f16(w(n_embd_out, n_embd_out, s=0.15)))
    g.add_tensor("mm.2.bias", w(n_embd_out))
    g.add_tensor("v.class_embd", w(d, s=0.3))
    g.add_tensor("v.patch_embd.weight", f16(w(d, 3, patch, patch, s=0.1)))
    g.add_tensor("v.position_embd.weight", f16(w(n_pos, d, s=0.2)))
    g.add_tensor("v.pre_ln.weight", 1.0 + w(d, s=0.1))
    g.add_tensor("v.pre_ln.bias", w(d, s=0.1))
    _encoder_blocks(g, w, lambda name, a: g.add_tensor(name, f16(a)), d, n_layer)
    _finish(g)


LLAVA16_PINPOINTS = ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168))  # (w, h)


def write_llava16_mmproj(path, n_embd_out: int = 128, seed: int = 1, image_size: int = 56,
                         patch: int = 14, d: int = 64, n_hf_layer: int = 4, n_head: int = 4,
                         pinpoints=LLAVA16_PINPOINTS, feature_layers=None) -> None:
    """A LLaVA-1.6 mmproj as llama.cpp's legacy/convert_image_encoder_to_gguf.py writes one
    (llava_surgery_v2.py's projector and image_newline, then CLIP): mlp projector, the grid
    pinpoints flattened, anyres / spatial_unpad keys, ``feature_layer`` from the checkpoint's
    select layer -2 (so ``block_count`` = the deepest feature layer, the layers above dropped),
    fc1/fc2 named ffn_down/ffn_up, the newline as ``model.image_newline`` (f32).
    ``feature_layers``: several (as granite's vision_feature_layer list): stacked features,
    mm.0 as wide as all of them."""
    rng = np.random.default_rng(seed)
    w = _randn(rng)

    layers = list(feature_layers or [n_hf_layer - 2 + 1])  # to_non_negative(-2)
    feature_layer = max(layers)
    g = _clip_writer(path, n_embd_out, image_size, patch, d, feature_layer, n_head)
    g.add_bool("clip.has_text_encoder", False)
    g.add_bool("clip.has_llava_projector", True)
    g.add_uint32("general.file_type", 1)
    g.add_string("clip.projector_type", "mlp")
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    g.add_array("clip.vision.image_grid_pinpoints", [v for p in pinpoints for v in p])
    g.add_uint32("clip.vision.image_crop_resolution", image_size)
    g.add_string("clip.vision.image_aspect_ratio", "anyres")
    g.add_uint32("clip.vision.image_split_resolution", image_size)
    g.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
    g.add_array("clip.vision.feature_layer", layers)
    g.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    g.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    g.add_bool("clip.use_gelu", False)
    g.add_tensor("model.image_newline", w(n_embd_out, s=0.3))
    g.add_tensor("mm.0.weight", f16(w(n_embd_out, d * len(layers), s=0.15)))
    g.add_tensor("mm.0.bias", w(n_embd_out))
    g.add_tensor("mm.2.weight", f16(w(n_embd_out, n_embd_out, s=0.15)))
    g.add_tensor("mm.2.bias", w(n_embd_out))
    g.add_tensor("v.class_embd", w(d, s=0.3))
    g.add_tensor("v.patch_embd.weight", f16(w(d, 3, patch, patch, s=0.1)))
    g.add_tensor("v.position_embd.weight", f16(w((image_size // patch) ** 2 + 1, d, s=0.2)))
    g.add_tensor("v.pre_ln.weight", 1.0 + w(d, s=0.1))
    g.add_tensor("v.pre_ln.bias", w(d, s=0.1))
    _encoder_blocks(g, w, lambda name, a: g.add_tensor(name, f16(a)), d, feature_layer,
                    legacy_ffn=True)
    _finish(g)


def write_llama_text_model(path: Path, seed: int = 5) -> Path:
    """A tiny llama text model of width 128 (LLaVA-1.5's text side)."""
    shape = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)
    tensors = dense_tensors(seed, n_vocab=320, tied=False, embd_std=0.3, **shape)
    return write_gguf(path, "llama", dense_hparams(**shape), tensors)


def write_idefics3_mmproj(path, n_embd_out: int = 128, seed: int = 0, image_size: int = 32,
                          patch: int = 8, d: int = 64, n_layer: int = 2, n_head: int = 4,
                          scale_factor: int = 2, longest_edge: int = 64) -> None:
    """A SmolVLM / Idefics3 mmproj (``clip.projector_type = idefics3``) as convert_hf_to_gguf.py
    --mmproj writes one (conversion/smolvlm.py): SigLIP with patch bias and post-LayerNorm,
    GELU, eps 1e-5, the embeddings forced to f32, f16 matrices, ``mm.model.fc`` (no bias) of
    width ``scale_factor``² x d, and the preprocessor's longest edge."""
    rng = np.random.default_rng(seed)
    w = _randn(rng)

    g = _clip_writer(path, n_embd_out, image_size, patch, d, n_layer, n_head)
    g.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    g.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    g.add_string("clip.projector_type", "idefics3")
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    g.add_uint32("clip.vision.projector.scale_factor", scale_factor)
    g.add_bool("clip.use_gelu", True)
    g.add_uint32("clip.vision.preproc_image_size", longest_edge)
    g.add_tensor("mm.model.fc.weight", f16(w(n_embd_out, scale_factor ** 2 * d, s=0.1)))
    g.add_tensor("v.patch_embd.bias", w(d, s=0.1))
    g.add_tensor("v.patch_embd.weight", w(d, 3, patch, patch, s=0.1))
    g.add_tensor("v.position_embd.weight", w((image_size // patch) ** 2, d, s=0.2))
    _encoder_blocks(g, w, lambda name, a: g.add_tensor(name, f16(a)), d, n_layer)
    g.add_tensor("v.post_ln.bias", w(d, s=0.1))
    g.add_tensor("v.post_ln.weight", 1.0 + w(d, s=0.1))
    _finish(g)


# SmolVLM's image markers are added tokens of its (SmolLM2, byte-level BPE) vocabulary;
# "\n\n" is an ordinary merged token there
SMOLVLM_SPECIALS = ("<end_of_utterance>", "<|im_start|>", "<fake_token_around_image>",
                    "<global-img>", "<image>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4))


def write_smolvlm_text_model(path: Path, seed: int = 10) -> Path:
    """A tiny llama text model of width 128 with SmolVLM's image marker tokens."""
    shape = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)
    tensors = dense_tensors(seed, n_vocab=320, tied=False, embd_std=0.3, **shape)
    return write_gguf(path, "llama", dense_hparams(**shape), tensors, pre="smollm",
                      specials=SMOLVLM_SPECIALS, extra_merges=("Ċ Ċ",))


def idefics3_config(image_size: int = 32, patch_size: int = 8, n_embd: int = 64,
                    n_layer: int = 2, n_head: int = 4, scale_factor: int = 2) -> dict:
    """A tiny ``Idefics3ForConditionalGeneration`` config.json (SmolVLM's layout), text width
    128 (write_smolvlm_text_model's)."""
    return {
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
        "scale_factor": scale_factor, "image_token_id": 302,
        "text_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "vocab_size": 320, "rms_norm_eps": 1e-5},
        "vision_config": {"model_type": "idefics3_vision", "hidden_size": n_embd,
                          "intermediate_size": 2 * n_embd, "num_hidden_layers": n_layer,
                          "num_attention_heads": n_head, "image_size": image_size,
                          "patch_size": patch_size, "layer_norm_eps": 1e-5,
                          "hidden_act": "gelu_pytorch_tanh", "num_channels": 3},
    }


def write_idefics3_checkpoint(d: Path, cfg: dict, longest_edge: int = 64, seed: int = 0) -> Path:
    """The vision tower and connector of a random SmolVLM checkpoint (HF tensor names), with
    the preprocessor's longest edge, for convert_hf_to_gguf.py --mmproj."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    w = _randn(rng)
    v = cfg["vision_config"]
    dd, ff, p, sf = v["hidden_size"], v["intermediate_size"], v["patch_size"], cfg["scale_factor"]

    pre = "model.vision_model."
    t = {pre + "embeddings.patch_embedding.weight": w(dd, 3, p, p, s=0.1),
         pre + "embeddings.patch_embedding.bias": w(dd, s=0.1),
         pre + "embeddings.position_embedding.weight": w((v["image_size"] // p) ** 2, dd, s=0.2)}
    for i in range(v["num_hidden_layers"]):
        q = f"{pre}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            t[q + ln + ".weight"], t[q + ln + ".bias"] = 1.0 + w(dd, s=0.1), w(dd, s=0.1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[q + f"self_attn.{proj}.weight"], t[q + f"self_attn.{proj}.bias"] = w(dd, dd, s=0.15), w(dd)
        t[q + "mlp.fc1.weight"], t[q + "mlp.fc1.bias"] = w(ff, dd, s=0.15), w(ff)
        t[q + "mlp.fc2.weight"], t[q + "mlp.fc2.bias"] = w(dd, ff, s=0.15), w(dd)
    t[pre + "post_layernorm.weight"], t[pre + "post_layernorm.bias"] = 1.0 + w(dd, s=0.1), w(dd, s=0.1)
    t["model.connector.modality_projection.proj.weight"] = w(128, sf * sf * dd, s=0.1)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"longest_edge": longest_edge},
        "max_image_size": {"longest_edge": v["image_size"]}, "do_image_splitting": True}))
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with no pixel data (a decompression bomb's
    header: refused before any decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- Qwen2-VL
QWEN2VL_TEXT = dict(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32)
QWEN2VL_SPECIALS = ("<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>")
# M-RoPE sections of the tiny text model: (t, h, w) over head_dim / 2 = 16 rotated pairs
QWEN2VL_SECTIONS = [4, 6, 6, 0]


def qwen2vl_config(embed_dim: int = 64, depth: int = 3, num_heads: int = 4, patch: int = 14,
                   mlp_ratio: int = 2) -> dict:
    """A tiny Qwen2VLForConditionalGeneration config (HF's keys, as convert_hf_to_gguf.py
    reads them)."""
    t = QWEN2VL_TEXT
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": t["n_embd"], "intermediate_size": t["n_ff"],
        "num_hidden_layers": t["n_layer"], "num_attention_heads": t["n_head"],
        "num_key_value_heads": t["n_head_kv"], "vocab_size": 320, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": QWEN2VL_SECTIONS[:3]},
        "vision_start_token_id": 300, "vision_end_token_id": 301, "image_token_id": 302,
        "vision_config": {"depth": depth, "embed_dim": embed_dim, "hidden_size": t["n_embd"],
                          "hidden_act": "quick_gelu", "mlp_ratio": mlp_ratio,
                          "num_heads": num_heads, "in_channels": 3, "patch_size": patch,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


def qwen2vl_vision_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The ``visual.*`` tensors of HF's Qwen2-VL vision tower (Conv3d patch embedding, fused
    qkv, LayerNorms, quick-GELU MLP, the ln_q + 2-layer MLP patch merger), random."""
    rng = np.random.default_rng(seed)
    w = _randn(rng)
    v = cfg["vision_config"]
    d, p = v["embed_dim"], v["patch_size"]
    ff, out, m = d * v["mlp_ratio"], v["hidden_size"], 4 * d

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"visual.patch_embed.proj.weight": w(d, 3, 2, p, p, s=0.06)}
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        t[b + "norm1.weight"], t[b + "norm1.bias"] = norm(d), w(d, s=0.1)
        t[b + "norm2.weight"], t[b + "norm2.bias"] = norm(d), w(d, s=0.1)
        t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"] = w(3 * d, d, s=0.15), w(3 * d)
        t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = w(d, d, s=0.15), w(d)
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = w(ff, d, s=0.15), w(ff)
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = w(d, ff, s=0.15), w(d)
    t["visual.merger.ln_q.weight"], t["visual.merger.ln_q.bias"] = norm(d), w(d, s=0.1)
    t["visual.merger.mlp.0.weight"], t["visual.merger.mlp.0.bias"] = w(m, m, s=0.1), w(m)
    t["visual.merger.mlp.2.weight"], t["visual.merger.mlp.2.bias"] = w(out, m, s=0.1), w(out)
    return t


def _qwen_attention(g, mat, t: dict, b: str, h: str, d: int) -> None:
    """A Qwen2-VL / 2.5-VL block's attention as the converter writes it: the fused qkv split
    into q, k, v (biases f32, matrices through ``mat``)."""
    qkv_w, qkv_b = t[h + "attn.qkv.weight"], t[h + "attn.qkv.bias"]
    g.add_tensor(b + "attn_out.bias", t[h + "attn.proj.bias"])
    mat(b + "attn_out.weight", t[h + "attn.proj.weight"])
    for j, x in enumerate("qkv"):
        g.add_tensor(b + f"attn_{x}.bias", qkv_b[j * d:(j + 1) * d])
    for j, x in enumerate("qkv"):
        mat(b + f"attn_{x}.weight", qkv_w[j * d:(j + 1) * d])


def _qwen_preprocessor(d: Path, patch: int) -> None:
    """preprocessor_config.json of a Qwen2-VL / Qwen2.5-VL checkpoint (CLIP's mean and std)."""
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "patch_size": patch,
        "temporal_patch_size": 2}))


def write_qwen2vl_checkpoint(d: Path, cfg: dict | None = None, seed: int = 0) -> Path:
    """A tiny Qwen2-VL vision tower in HF's layout, for convert_hf_to_gguf.py --mmproj."""
    from safetensors.numpy import save_file

    cfg = cfg or qwen2vl_config()
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    _qwen_preprocessor(d, cfg["vision_config"]["patch_size"])
    save_file(qwen2vl_vision_tensors(cfg, seed), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return d


def write_qwen2vl_mmproj(path, dtype=np.float16, seed: int = 0,
                         cfg: dict | None = None) -> None:
    """The mmproj convert_hf_to_gguf.py --mmproj writes for ``write_qwen2vl_checkpoint``'s
    tower (same keys, names, order and types: matrices and the two patch kernels in
    ``dtype``, norms and biases f32; checked equal to the converter's file), without torch."""
    cfg = cfg or qwen2vl_config()
    v = cfg["vision_config"]
    t = qwen2vl_vision_tensors(cfg, seed)
    d = v["embed_dim"]
    # feed_forward_length: the converter writes the text width there (2 * d here too)
    g = _clip_writer(path, cfg["hidden_size"], 560, v["patch_size"], d, v["depth"],
                     v["num_heads"])
    g.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    g.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    g.add_string("clip.projector_type", "qwen2vl_merger")
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)

    def mat(name, a):
        g.add_tensor(name, a.astype(dtype))

    for i in range(v["depth"]):
        b, h = f"v.blk.{i}.", f"visual.blocks.{i}."
        _qwen_attention(g, mat, t, b, h, d)
        g.add_tensor(b + "ffn_up.bias", t[h + "mlp.fc1.bias"])
        mat(b + "ffn_up.weight", t[h + "mlp.fc1.weight"])
        g.add_tensor(b + "ffn_down.bias", t[h + "mlp.fc2.bias"])
        mat(b + "ffn_down.weight", t[h + "mlp.fc2.weight"])
        for ln, src in (("ln1", "norm1"), ("ln2", "norm2")):
            g.add_tensor(b + ln + ".bias", t[h + src + ".bias"])
            g.add_tensor(b + ln + ".weight", t[h + src + ".weight"])
    g.add_tensor("v.post_ln.bias", t["visual.merger.ln_q.bias"])
    g.add_tensor("v.post_ln.weight", t["visual.merger.ln_q.weight"])
    for j in (0, 2):
        g.add_tensor(f"mm.{j}.bias", t[f"visual.merger.mlp.{j}.bias"])
        mat(f"mm.{j}.weight", t[f"visual.merger.mlp.{j}.weight"])
    k = t["visual.patch_embed.proj.weight"]
    mat("v.patch_embd.weight", np.ascontiguousarray(k[:, :, 0]))
    mat("v.patch_embd.weight.1", np.ascontiguousarray(k[:, :, 1]))
    _finish(g)


def write_qwen2vl_text_model(path: Path, seed: int = 11, qtype=None) -> Path:
    """A tiny ``qwen2vl`` text model (qwen2's block, q/k/v biases, M-RoPE sections) of width
    128, with Qwen2-VL's vision markers as control tokens."""
    tensors = dense_tensors(seed, n_vocab=320, qkv_bias=True, tied=False, embd_std=0.3,
                            **QWEN2VL_TEXT)
    hp = dense_hparams(**QWEN2VL_TEXT, **{"rope.freq_base": 1e6,
                                          "rope.dimension_sections": QWEN2VL_SECTIONS})
    return write_gguf(path, "qwen2vl", hp, tensors, specials=QWEN2VL_SPECIALS, qtype=qtype)


def qwen25vl_config(hidden: int = 64, depth: int = 4, num_heads: int = 4, ff: int = 96,
                    fullatt: tuple[int, ...] = (1, 3)) -> dict:
    """A tiny Qwen2_5_VLForConditionalGeneration config (window attention in the layers not
    in ``fullatt``)."""
    cfg = qwen2vl_config()
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    cfg["model_type"] = "qwen2_5_vl"
    cfg["vision_config"] = {
        "depth": depth, "hidden_size": hidden, "intermediate_size": ff, "num_heads": num_heads,
        "out_hidden_size": cfg["hidden_size"], "fullatt_block_indexes": list(fullatt),
        "window_size": 112, "hidden_act": "silu", "in_chans": 3, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2}
    return cfg


def qwen25vl_vision_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF's Qwen2.5-VL vision tower: RMS norms (weights only), fused qkv, gated SiLU MLP with
    biases, the ln_q (RMS) + 2-layer MLP merger; random."""
    rng = np.random.default_rng(seed)
    w = _randn(rng)
    v = cfg["vision_config"]
    d, p, ff = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    out, m = v["out_hidden_size"], 4 * v["hidden_size"]

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"visual.patch_embed.proj.weight": w(d, 3, 2, p, p, s=0.06)}
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        t[b + "norm1.weight"], t[b + "norm2.weight"] = norm(d), norm(d)
        t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"] = w(3 * d, d, s=0.15), w(3 * d)
        t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = w(d, d, s=0.15), w(d)
        for name, shape in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            t[b + f"mlp.{name}.weight"], t[b + f"mlp.{name}.bias"] = w(*shape, s=0.15), w(shape[0])
    t["visual.merger.ln_q.weight"] = norm(d)
    t["visual.merger.mlp.0.weight"], t["visual.merger.mlp.0.bias"] = w(m, m, s=0.1), w(m)
    t["visual.merger.mlp.2.weight"], t["visual.merger.mlp.2.bias"] = w(out, m, s=0.1), w(out)
    return t


def write_qwen25vl_checkpoint(d: Path, cfg: dict | None = None, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    cfg = cfg or qwen25vl_config()
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    _qwen_preprocessor(d, 14)
    save_file(qwen25vl_vision_tensors(cfg, seed), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return d


def write_qwen25vl_mmproj(path, dtype=np.float16, seed: int = 0,
                          cfg: dict | None = None) -> None:
    """The mmproj convert_hf_to_gguf.py --mmproj writes for ``write_qwen25vl_checkpoint``'s
    tower (same keys, names, order and types; checked equal to the converter's file by
    experiments/qwen2vl_vs_libmtmd.py), without torch."""
    cfg = cfg or qwen25vl_config()
    v = cfg["vision_config"]
    t = qwen25vl_vision_tensors(cfg, seed)
    d = v["hidden_size"]
    g = gguf.GGUFWriter(str(path), "clip")
    g.add_type("mmproj")
    g.add_bool("clip.has_vision_encoder", True)
    g.add_uint32("clip.vision.projection_dim", v["out_hidden_size"])
    g.add_uint32("clip.vision.image_size", 560)
    g.add_uint32("clip.vision.patch_size", v["patch_size"])
    g.add_uint32("clip.vision.embedding_length", d)
    g.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    g.add_uint32("clip.vision.block_count", v["depth"])
    g.add_uint32("clip.vision.attention.head_count", v["num_heads"])
    g.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    g.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    g.add_string("clip.projector_type", "qwen2.5vl_merger")
    g.add_bool("clip.use_silu", True)
    g.add_uint32("clip.vision.n_wa_pattern", v["fullatt_block_indexes"][0] + 1)
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)

    def mat(name, a):
        g.add_tensor(name, a.astype(dtype))

    for i in range(v["depth"]):
        b, h = f"v.blk.{i}.", f"visual.blocks.{i}."
        _qwen_attention(g, mat, t, b, h, d)
        for ours, hf in (("ffn_down", "down_proj"), ("ffn_gate", "gate_proj"),
                         ("ffn_up", "up_proj")):
            g.add_tensor(b + ours + ".bias", t[h + f"mlp.{hf}.bias"])
            mat(b + ours + ".weight", t[h + f"mlp.{hf}.weight"])
        g.add_tensor(b + "ln1.weight", t[h + "norm1.weight"])
        g.add_tensor(b + "ln2.weight", t[h + "norm2.weight"])
    g.add_tensor("v.post_ln.weight", t["visual.merger.ln_q.weight"])
    for j in (0, 2):
        g.add_tensor(f"mm.{j}.bias", t[f"visual.merger.mlp.{j}.bias"])
        mat(f"mm.{j}.weight", t[f"visual.merger.mlp.{j}.weight"])
    k = t["visual.patch_embed.proj.weight"]
    mat("v.patch_embd.weight", np.ascontiguousarray(k[:, :, 0]))
    mat("v.patch_embd.weight.1", np.ascontiguousarray(k[:, :, 1]))
    _finish(g)


def text_engine(path: Path, ctx: int = 256):
    """(Engine, Tokenizer) on a tiny text model, with llama.cpp's default f16 KV cache."""
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics
    from jllama.tokenizer import Tokenizer

    g = read_gguf(path)
    spec, model = build_model(g)
    eng = Engine(spec, model, ctx_size=ctx,
                 numerics=Numerics(cache_type_k="f16", cache_type_v="f16"))
    return eng, Tokenizer.from_gguf(g)


def gradient_image(shape: tuple[int, int], seed: int = 0, noise: float = 30) -> np.ndarray:
    """uint8 RGB [h, w, 3]: smooth gradients plus noise, so that resampling weights matter."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
