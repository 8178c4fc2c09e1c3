"""Hugging Face checkpoint -> GGUF, as llama.cpp 0c1e570's convert_hf_to_gguf.py does it.

The goal is the same file, byte for byte, on the same input. What decides the bytes:

- hyperparameters: ``transformers.AutoConfig(...).to_dict()`` (its defaults, e.g. ``head_dim``
  and ``rope_parameters``, reach the file, so we read the config the same way), falling back
  to ``config.json``;
- tensors: every ``model*.safetensors`` part sorted by name, names sorted within a part (our
  own reader, no torch), renamed with gguf-py's tensor-name map, q/k permuted for llama's
  rotary layout, experts stacked, stored as F32 when 1-D or a norm, else as the ``outtype``
  (jllama.quant's converters, bit-exact with ggml's and gguf-py's);
- metadata keys, their order and their GGUF types: recorded with gguf-py's ``GGUFWriter``
  ``add_*`` methods (the upstream key table; jllama already depends on ``gguf``) in the
  reference's call order, then written by jllama.gguf.writer;
- ``general.*`` from gguf-py's ``Metadata`` heuristics (folder name, model card), size label
  from the tensors' parameter count;
- the tokenizer: byte-level BPE via ``transformers.AutoTokenizer`` (pre-tokenizer detected by the
  reference's hash of a fixed text's token ids), SentencePiece via ``sentencepiece``, special
  ids, ``add_*_token`` flags, merges and chat template via gguf-py's ``SpecialVocab``.

transformers and sentencepiece are the ``convert`` extra; torch is not needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from jllama.convert.common import ConvertError, gguf_py, need
from jllama.convert.safetensors import StTensor, index_tensors
from jllama.convert.special import SpecialVocab
from jllama.convert.vocab import bpe_vocab, spm_vocab
from jllama.errors import ModelError
from jllama.gguf.constants import QType
from jllama.gguf.writer import TensorSpec, write_gguf

log = logging.getLogger("jllama.convert")

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


# ----------------------------------------------------------------------------------------------
# hparams


def load_hparams(model_dir: Path) -> dict[str, Any]:
    if not (model_dir / "config.json").is_file():
        raise ConvertError(f"{model_dir}: no config.json (not a Hugging Face checkpoint folder)")
    transformers = need("transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(
            model_dir, trust_remote_code=False).to_dict()
    except Exception as e:  # the reference falls back to the raw file on any failure
        log.warning("AutoConfig failed on %s (%s); reading config.json", model_dir, e)
        try:
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as je:
            raise ConvertError(f"{model_dir / 'config.json'} is not valid JSON: {je}") from None
    for k in ("llm_config", "lm_config", "language_config", "lfm"):
        if k in config:
            config["text_config"] = config[k]
    if "thinker_config" in config:
        config["text_config"] = config["thinker_config"]["text_config"]
    return config


def model_architecture(hparams: dict[str, Any]) -> str:
    arch = None
    if arches := hparams.get("architectures"):
        arch = arches[0]
    if (tc := hparams.get("text_config", {})).get("architectures") is not None:
        arch = tc["architectures"][0]
    if arch is None:
        raise ConvertError("config.json names no architecture ('architectures')")
    return arch


# ----------------------------------------------------------------------------------------------
# the KV recorder


class _Kv:
    """gguf-py's GGUFWriter used only for its ``add_*`` methods: it records keys, values and
    types in call order (a repeated key keeps its first position, as in the reference)."""

    def __init__(self, arch_name: str):
        self.w = gguf_py().GGUFWriter(path=None, arch=arch_name)

    def __getattr__(self, name: str):
        return getattr(self.w, name)

    def items(self) -> tuple[dict[str, Any], dict]:
        gguf = gguf_py()
        meta, types = {}, {}
        for key, v in self.w.kv_data[0].items():
            val, vt, sub = v.value, v.type, v.sub_type
            if vt == gguf.GGUFValueType.ARRAY:
                if sub is None:
                    sub = (gguf.GGUFValueType.UINT8 if isinstance(val, bytes)
                           else gguf.GGUFValueType.get_type(val[0]))
                val = [_str(x) for x in val] if sub == gguf.GGUFValueType.STRING else list(val)
            elif vt == gguf.GGUFValueType.STRING:
                val = _str(val)
            meta[key] = val
            types[key] = (vt, sub)
        return meta, types


# Qwen MoE / DeepSeek checkpoints: one tensor per expert and part
_MLP_EXPERTS = ("model.layers.{bid}.mlp.experts.{x}.{w}.weight",
                "model.layers.{bid}.mlp.experts.{w}.weight", ("down_proj", "gate_proj", "up_proj"))


def _stack_experts(buffer: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """One layer's experts as one [n_expert, ...] array (taken out of ``buffer``)."""
    missing = [n for n in names if n not in buffer]
    if missing:
        raise ConvertError(f"expert tensor '{missing[0]}' is missing")
    datas = [buffer.pop(n) for n in names]
    for n, d in zip(names, datas):
        if d.shape != datas[0].shape:
            raise ConvertError(f"tensor '{n}' has shape {list(d.shape)}, the layer's other "
                               f"experts {list(datas[0].shape)}")
    return np.stack(datas)


def _read_back(f: IO[bytes], offset: int, n: int) -> np.ndarray:
    f.seek(offset)
    return np.frombuffer(f.read(n), np.uint8)


def _str(x: Any) -> str:
    return x.decode("utf-8", errors="surrogateescape") if isinstance(x, (bytes, bytearray)) else x


# ----------------------------------------------------------------------------------------------
# tensors


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF's rotary halves -> llama.cpp's interleaved pairs (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_SKIP_PREFIX = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.",
                "sound_encoder.", "sound_projection.", "speech_embeddings.")
_SKIP_IN = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.",
            "code2wav.", "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator",
            "patch_embed", "patch_embedding", "patch_merger.", "patch_merge_mlp.",
            "model.connector.")


class Converter:
    """One checkpoint's conversion. Subclasses are the architectures (``ARCHS``)."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    undo_permute = False

    def __init__(self, model_dir: Path, outtype: str, hparams: dict[str, Any], hf_arch: str,
                 model_name: str | None = None):
        gguf = gguf_py()
        self.dir = model_dir
        self.hf_arch = hf_arch
        self.model_name = model_name
        self.hparams = hparams
        self.arch = getattr(gguf.MODEL_ARCH, self.gguf_arch)
        self.tensors = self.filtered_tensors(index_tensors(model_dir))
        if "text_config" in self.hparams:
            self.hparams = {**self.hparams, **self.hparams["text_config"]}
        self.block_count = self.find_hparam(["n_layers", "num_hidden_layers", "n_layer",
                                             "num_layers"])
        self.tensor_map = gguf.get_tensor_name_map(self.arch, self.block_count)
        self.rope = self._rope_parameters()
        self.ftype = self._ftype(outtype)
        self.kv = _Kv(gguf.MODEL_ARCH_NAMES[self.arch])

    # -- hparams ---------------------------------------------------------------------------
    def find_hparam(self, keys: Iterable[str], optional: bool = False) -> Any:
        for k in keys:
            if k in self.hparams:
                return self.hparams[k]
        if optional:
            return None
        raise ConvertError(f"config.json has none of {list(keys)}")

    def _rope_parameters(self) -> dict[str, Any]:
        rp = self.hparams.get("rope_parameters", self.hparams.get("rope_scaling")) or {}
        theta = self.find_hparam(["global_rope_theta", "rope_global_theta", "rope_theta_global",
                                  "rope_theta", "rotary_emb_base"], optional=True)
        local = self.find_hparam(["local_rope_theta", "rope_local_theta", "rope_theta_local",
                                  "swa_rope_theta", "rope_local_base_freq"], optional=True)
        partial = self.find_hparam(["partial_rotary_factor", "rope_pct", "rope_percent"],
                                   optional=True)
        orig = self.find_hparam(["original_max_position_embeddings"], optional=True)
        if "full_attention" not in rp and "sliding_attention" not in rp:
            if local is not None:
                rp["sliding_attention"] = {"rope_theta": local}
            if "rope_theta" not in rp and theta is not None:
                rp["rope_theta"] = theta
            if "rope_type" not in rp and (t := rp.get("type")) is not None:
                rp["rope_type"] = t
            if "partial_rotary_factor" not in rp and partial is not None:
                rp["partial_rotary_factor"] = partial
            if "original_max_position_embeddings" not in rp and orig is not None:
                rp["original_max_position_embeddings"] = orig
        return rp

    def _ftype(self, outtype: str):
        gguf = gguf_py()
        F = gguf.LlamaFileType
        if outtype != "auto":
            return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
                    "q8_0": F.MOSTLY_Q8_0}[outtype]
        # the reference's guess: the dtype of the first tensor with 2+ dimensions
        for t in self.tensors.values():
            if len(t.shape) < 2:
                continue
            if t.dtype == "BF16":
                return F.MOSTLY_BF16
            if t.dtype == "F16":
                return F.MOSTLY_F16
        return F.MOSTLY_F16

    # -- tensors ---------------------------------------------------------------------------
    def filter_name(self, name: str) -> str | None:
        if name.startswith(_SKIP_PREFIX) or any(s in name for s in _SKIP_IN):
            return None
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        return name.replace("language_model.", "")

    def filtered_tensors(self, tensors: dict[str, StTensor]) -> dict[str, StTensor]:
        out = {}
        for name, t in tensors.items():
            if (new := self.filter_name(name)) is not None:
                out[new] = t
        return out

    def format_tensor_name(self, key, bid: int | None = None, suffix: str = ".weight") -> str:
        gguf = gguf_py()
        name = gguf.TENSOR_NAMES[key]
        return (name.format(bid=bid) if "{bid}" in name else name) + suffix

    def match_tensor(self, name: str, key, bid: int | None, suffix: str = ".weight") -> bool:
        gguf = gguf_py()
        if key not in gguf.MODEL_TENSORS[self.arch]:
            return False
        kn = gguf.TENSOR_NAMES[key]
        if "{bid}" in kn:
            if bid is None:
                return False
            kn = kn.format(bid=bid)
        elif bid is not None:
            return False
        return name == kn + suffix

    def map_tensor_name(self, name: str) -> str:
        new = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConvertError(f"tensor '{name}' has no GGUF name for {self.hf_arch}")
        return new

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The HF shape a tensor must have, when the config decides it (a mismatched shape is
        a broken checkpoint: one clear error instead of a file llama.cpp rejects)."""
        hp = self.hparams
        h = hp.get("hidden_size")
        v = hp.get("vocab_size")
        if name in ("model.embed_tokens.weight", "lm_head.weight") and h and v:
            return (v, h)
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or \
                name == "model.norm.weight":
            return (h,) if h else None
        nh, nkv = hp.get("num_attention_heads"), hp.get("num_key_value_heads")
        hd = hp.get("head_dim") or (h // nh if h and nh else None)
        if hd and h and nh and nkv:
            if name.endswith("self_attn.q_proj.weight") and "q_lora" not in name:
                return (nh * hd, h) if "DeepseekV2" not in self.hf_arch else None
            if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                return (nkv * hd, h)
        return None

    def modify(self, data: np.ndarray, name: str, bid: int | None) -> Iterator[tuple[str, np.ndarray]]:
        yield self.map_tensor_name(name), data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(())

    def finish_tensors(self) -> None:
        """Called after the last tensor: leftover buffered experts are an error."""
        if self._experts and any(self._experts):
            left = [k for d in self._experts for k in d]
            raise ConvertError(f"incomplete experts: {left[:4]}")

    _experts: list[dict[str, np.ndarray]] | None = None  # per layer: name -> buffered expert

    def buffer_expert(
        self, data: np.ndarray, name: str, bid: int, n_exp: int, src: str, dst: str,
        parts: tuple[str, ...],
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Per-expert checkpoint tensors, buffered until a layer has all ``n_exp * len(parts)``,
        then stacked as the reference does: ``src``/``dst`` are name patterns with ``{bid}``,
        ``{x}`` (expert) and ``{w}`` (part)."""
        if self._experts is None:
            self._experts = [{} for _ in range(self.block_count)]
        self._experts[bid][name] = data
        if len(self._experts[bid]) >= n_exp * len(parts):
            for w in parts:
                datas = _stack_experts(self._experts[bid], [
                    src.format(bid=bid, x=x, w=w) for x in range(n_exp)])
                yield from Converter.modify(self, datas, dst.format(bid=bid, w=w), bid)

    def tensor_qtype(self, new_name: str, bid: int | None, n_dims: int) -> int:
        gguf = gguf_py()
        T, F = gguf.MODEL_TENSOR, gguf.LlamaFileType
        if n_dims <= 1 or new_name.endswith("_norm.weight"):
            return int(QType.F32)
        force_f32 = (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP, T.POS_EMBD, T.TOKEN_TYPES,
                     T.SSM_CONV1D, T.SHORTCONV_CONV, T.TIME_MIX_FIRST, T.TIME_MIX_W1,
                     T.TIME_MIX_W2, T.TIME_MIX_DECAY_W1, T.TIME_MIX_DECAY_W2,
                     T.TIME_MIX_LERP_FUSED, T.POSNET_NORM1, T.POSNET_NORM2, T.V_ENC_EMBD_POS,
                     T.A_ENC_EMBD_POS, T.ALTUP_CORRECT_COEF, T.ALTUP_PREDICT_COEF,
                     T.SSM_CONV1D_Q, T.SSM_CONV1D_K, T.SSM_CONV1D_V, T.INDEXER_PROJ)
        if any(self.match_tensor(new_name, k, bid) for k in force_f32 if hasattr(T, k.name)) \
                or new_name[-7:] not in (".weight", ".lora_a", ".lora_b"):
            return int(QType.F32)
        return {F.ALL_F32: int(QType.F32), F.MOSTLY_F16: int(QType.F16),
                F.MOSTLY_BF16: int(QType.BF16), F.MOSTLY_Q8_0: int(QType.Q8_0)}[self.ftype]

    def prepare_tensors(self, spill: IO[bytes]) -> list[TensorSpec]:
        """Convert every tensor, in the reference's order. The converted bytes go to ``spill``
        (a temporary file) as they are made, so memory holds one tensor (or one layer's
        experts) at a time, not the model; the specs read them back while the GGUF is written."""
        from jllama.quant.quantizers import quantize_np

        specs: list[TensorSpec] = []
        seen: set[str] = set()
        loaded: Iterable[tuple[str, Callable[[], np.ndarray], StTensor | None]] = [
            *((n, (lambda a=a: a), None) for n, a in self.extra_tensors()),
            *((n, t.load, t) for n, t in self.tensors.items())]
        for name, load, st in loaded:
            if name.endswith((".attention.masked_bias", ".attention.bias",
                              ".rotary_emb.inv_freq")):
                continue
            if st is not None and (want := self.expected_shape(name)) is not None and \
                    tuple(st.shape) != tuple(want):
                raise ConvertError(f"tensor '{name}' has shape {list(st.shape)}, config.json "
                                   f"implies {list(want)}")
            data = load()
            if data.dtype not in (np.float16, np.float32):
                data = data.astype(np.float32)
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            for new_name, arr in self._modified(data, name, bid):
                if new_name in seen:
                    raise ConvertError(f"two tensors map to '{new_name}'")
                seen.add(new_name)
                qtype = self.tensor_qtype(new_name, bid, arr.ndim)
                shape = tuple(int(d) for d in arr.shape)
                if qtype == int(QType.Q8_0) and shape[-1] % 32:
                    log.warning("%s: rows of %d do not split into Q8_0 blocks; F16", new_name,
                                shape[-1])
                    qtype = int(QType.F16)
                raw = quantize_np(np.ascontiguousarray(arr, dtype=np.float32), qtype)
                off = spill.seek(0, os.SEEK_END)
                spill.write(memoryview(np.ascontiguousarray(raw).reshape(-1)))
                specs.append(TensorSpec(new_name, shape, qtype,
                                        lambda o=off, n=raw.nbytes: _read_back(spill, o, n)))
        self.finish_tensors()
        return specs

    def _modified(self, data: np.ndarray, name: str, bid: int | None):
        """``modify``, with a shape that breaks a reshape or an expert stack (a tensor the
        config does not describe) reported as one line naming the tensor."""
        it = iter(self.modify(data, name, bid))
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except (ValueError, IndexError, KeyError) as e:
                raise ConvertError(f"tensor '{name}' of shape {list(data.shape)} does not fit "
                                   f"{self.hf_arch}'s layout in config.json: {e}") from None
            yield item

    # -- metadata --------------------------------------------------------------------------
    def parameter_counts(self, specs: list[TensorSpec]) -> tuple[int, int, int, int]:
        total = shared = expert = esum = n_exp = 0
        for t in specs:
            size = math.prod(t.shape)
            if "_exps." in t.name and len(t.shape) >= 3:
                ec = t.shape[-2 if ".bias" in t.name else -3]
                expert += size // ec
                esum += ec
                n_exp += 1
            else:
                shared += size
            total += size
        return total, shared, expert, (esum // n_exp if n_exp else 0)

    def set_gguf_parameters(self) -> None:
        gguf, kv, fh = gguf_py(), self.kv, self.find_hparam
        kv.add_block_count(self.block_count)
        if (n := fh(["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                     "max_sequence_length", "model_max_length"], True)) is not None:
            kv.add_context_length(n)
        if (n := fh(["hidden_size", "n_embd", "dim"], True)) is not None:
            kv.add_embedding_length(n)
        if (n := fh(["prefix_dense_intermediate_size", "dense_intermediate_size",
                     "intermediate_size", "n_inner", "hidden_dim"], True)) is not None:
            kv.add_feed_forward_length(n)
        if (n := fh(["num_attention_heads", "n_head", "n_heads"], True)) is not None:
            kv.add_head_count(n)
        if (n := fh(["num_key_value_heads", "n_kv_heads"], True)) is not None:
            kv.add_head_count_kv(n)
        if self.hparams.get("is_causal") is False:
            kv.add_causal_attention(False)
        rp = self.rope.get("full_attention", self.rope)
        if (rt := rp.get("rope_type")) is not None:
            factor = rp.get("factor")
            R = gguf.RopeScalingType
            if rt == "linear" and factor is not None:
                kv.add_rope_scaling_type(R.LINEAR)
                kv.add_rope_scaling_factor(factor)
            elif rt == "yarn" and factor is not None:
                kv.add_rope_scaling_type(R.YARN)
                kv.add_rope_scaling_factor(factor)
                kv.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
                if (x := rp.get("extrapolation_factor")) is not None:
                    kv.add_rope_scaling_yarn_ext_factor(x)
                if (x := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
                    kv.add_rope_scaling_yarn_attn_factor(x)
                if (x := rp.get("beta_fast")) is not None:
                    kv.add_rope_scaling_yarn_beta_fast(x)
                if (x := rp.get("beta_slow")) is not None:
                    kv.add_rope_scaling_yarn_beta_slow(x)
            elif rt in ("su", "longrope"):
                kv.add_rope_scaling_type(R.LONGROPE)
        if "mrope_section" in self.rope:
            sec = list(self.rope["mrope_section"]) + [0] * 4
            kv.add_rope_dimension_sections(sec[:4])
        if (x := rp.get("rope_theta")) is not None:
            kv.add_rope_freq_base(x)
        if (x := self.rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            kv.add_rope_freq_base_swa(x)
        if (x := fh(["rms_norm_eps", "norm_eps"], True)) is not None:
            kv.add_layer_norm_rms_eps(x)
        if (x := fh(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], True)) is not None:
            kv.add_layer_norm_eps(x)
        if (x := fh(["num_local_experts", "num_experts", "n_routed_experts"], True)) is not None:
            kv.add_expert_count(x)
        if (x := fh(["num_experts_per_tok", "num_experts_per_token", "top_k_experts"],
                    True)) is not None:
            kv.add_expert_used_count(x)
        if (x := self.hparams.get("n_group")) is not None:
            kv.add_expert_group_count(x)
        if (x := self.hparams.get("topk_group")) is not None:
            kv.add_expert_group_used_count(x)
        if (sf := fh(["score_function", "scoring_func", "score_func", "moe_router_activation",
                      "moe_router_activation_func", "expert_selection_fn"], True)) is not None:
            # llama_expert_gating_func_type (SQRTSOFTPLUS is newer than the gguf package)
            funcs = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}
            if sf not in funcs:
                raise ConvertError(f"unsupported expert gating function '{sf}'")
            kv.add_uint32(f"{kv.arch}.expert_gating_func", funcs[sf])
        if (hd := self.hparams.get("head_dim")) is not None:
            kv.add_key_length(hd)
            kv.add_value_length(hd)
        kv.add_file_type(self.ftype)

    def set_vocab(self) -> None:
        self.vocab_gpt2()

    # -- vocabularies ----------------------------------------------------------------------
    def vocab_gpt2(self) -> None:
        tokens, toktypes, pre = self.vocab_base()
        self.kv.add_tokenizer_model("gpt2")
        self.kv.add_tokenizer_pre(pre)
        self.kv.add_token_list(tokens)
        self.kv.add_token_types(toktypes)
        SpecialVocab(self.dir, load_merges=True).add_to_gguf(self.kv.w)

    def vocab_base(self) -> tuple[list[str], list[int], str]:
        return bpe_vocab(self.dir, self.hparams)

    def vocab_sentencepiece(self) -> None:
        tokens, scores, toktypes = spm_vocab(self.dir, self.hparams)
        self.kv.add_tokenizer_model("llama")
        self.kv.add_tokenizer_pre("default")
        self.kv.add_token_list(tokens)
        self.kv.add_token_scores(scores)
        self.kv.add_token_types(toktypes)
        SpecialVocab(self.dir, n_vocab=len(tokens)).add_to_gguf(self.kv.w)

    def try_pooling_type(self) -> None:
        gguf = gguf_py()
        modules = self.dir / "modules.json"
        path = None
        if modules.is_file():
            for mod in json.loads(modules.read_text(encoding="utf-8")):
                if mod["type"].endswith("Pooling"):
                    path = mod["path"]
                    break
        modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                 "lasttoken": gguf.PoolingType.LAST}
        if path is not None:
            p = json.loads((self.dir / path / "config.json").read_text(encoding="utf-8"))
            if p.get("pooling_mode_mean_tokens"):
                t = gguf.PoolingType.MEAN
            elif p.get("pooling_mode_cls_token"):
                t = gguf.PoolingType.CLS
            elif p.get("pooling_mode_lasttoken"):
                t = gguf.PoolingType.LAST
            elif p.get("pooling_mode") in modes:
                t = modes[p["pooling_mode"]]
            else:
                raise ConvertError("only MEAN, CLS and LAST pooling are supported")
            self.kv.add_pooling_type(t)
        if (cp := self.hparams.get("classifier_pooling")) is not None:
            if cp not in ("cls", "mean"):
                raise ConvertError(f"unsupported classifier_pooling '{cp}'")
            # (a key the released gguf package does not know yet)
            self.kv.add_uint32(f"{self.kv.arch}.classifier.pooling_type", modes[cp].value)

    # -- the whole file --------------------------------------------------------------------
    def write(self, out: Path) -> int:
        directory = out.parent if str(out.parent) else Path(".")
        try:
            spill = tempfile.TemporaryFile(prefix=f".{out.name}.", dir=directory)
        except OSError as e:
            raise ConvertError(f"cannot write in {directory}: {e.strerror or e}") from None
        with spill:
            return self._write(out, spill)

    def _write(self, out: Path, spill: IO[bytes]) -> int:
        gguf = gguf_py()
        specs = self.prepare_tensors(spill)
        total, shared, expert, ecount = self.parameter_counts(specs)
        md = gguf.Metadata.load(None, self.dir, self.model_name, total)
        gen = self.dir / "generation_config.json"
        if md.sampling_penalty_repeat is None and gen.is_file():
            # llama.cpp 0c1e570 also takes HF's name for it (the gguf package does not yet)
            md.sampling_penalty_repeat = json.loads(gen.read_text(encoding="utf-8")).get(
                "repetition_penalty")
        if md.name is None:
            md.name = self.dir.name
        if md.size_label is None and total > 0:
            md.size_label = gguf.size_label(total, shared, expert, ecount)
        self.kv.add_type(gguf.GGUFType.MODEL)
        md.set_gguf_meta_model(self.kv.w)
        self.set_gguf_parameters()
        self.kv.add_quantization_version(gguf.GGML_QUANT_VERSION)
        self.set_vocab()
        meta, types = self.kv.items()
        return write_gguf(out, meta, specs, types)


# ----------------------------------------------------------------------------------------------
# architectures


class LlamaConverter(Converter):
    gguf_arch = "LLAMA"
    undo_permute = True

    def set_vocab(self) -> None:
        tc = self.dir / "tokenizer_config.json"
        if tc.is_file():
            cfg = json.loads(tc.read_text(encoding="utf-8"))
            if (aps := cfg.get("add_prefix_space")) is not None:
                self.kv.add_add_space_prefix(aps)
        if (self.dir / "tokenizer.model").is_file():
            self.vocab_sentencepiece()
        else:
            self.vocab_gpt2()
        if self.hparams.get("vocab_size", 32000) == 32016:  # CodeLlama's infill tokens
            sv = SpecialVocab(self.dir, types=("prefix", "suffix", "middle", "eot"))
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009),
                             ("eot", 32010)):
                sv.set_special(typ, tid)
            sv.add_to_gguf(self.kv.w)
        if self.hparams.get("vocab_size", 32000) == 49152:
            self.kv.add_add_bos_token(False)

    def set_gguf_parameters(self) -> None:
        super().set_gguf_parameters()
        self.kv.add_vocab_size(self.hparams["vocab_size"])
        rope_dim = self.hparams.get("head_dim")
        if rope_dim is None:
            rope_dim = self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        self.kv.add_rope_dimension_count(rope_dim)

    def filter_name(self, name: str) -> str | None:
        return super().filter_name(name.replace("text_model.", ""))

    def modify(self, data, name, bid):
        nh = self.find_hparam(["n_heads", "num_attention_heads"])
        nkv = self.find_hparam(["n_kv_heads", "num_key_value_heads"])
        if self.hf_arch == "LlamaModel":
            name = "model." + name
        if self.undo_permute:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, nh, nh)
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, nh, nkv)
        if "block_sparse_moe.experts" in name:
            yield from self.buffer_expert(
                data, name, bid, self.hparams["num_local_experts"],
                "model.layers.{bid}.block_sparse_moe.experts.{x}.{w}.weight",
                "layers.{bid}.feed_forward.experts.{w}.weight", ("w1", "w2", "w3"))
            return
        yield from super().modify(data, name, bid)

    def extra_tensors(self):
        rp = self.rope.get("full_attention", self.rope)
        if rp and rp.get("rope_type", "").lower() == "llama3":
            base = rp.get("rope_theta", 10000.0)
            dim = self.hparams.get("head_dim") or \
                self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
            # float32 exponent like torch.arange(..., dtype=float32) / dim, then a float32 pow
            expo = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float32)
            freqs = (np.float32(1.0) / np.power(np.float32(base), expo, dtype=np.float32))
            factor = rp.get("factor", 8.0)
            lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
            old = rp.get("original_max_position_embeddings", 8192)
            lo_wl, hi_wl = old / lo, old / hi
            out = []
            for f in freqs:
                wl = 2 * math.pi / f
                if wl < hi_wl:
                    out.append(1)
                elif wl > lo_wl:
                    out.append(factor)
                else:
                    s = (old / wl - lo) / (hi - lo)
                    out.append(1 / ((1 - s) / factor + s))
            yield self.format_tensor_name(gguf_py().MODEL_TENSOR.ROPE_FREQS), \
                np.array(out, dtype=np.float32)


class Qwen2Converter(Converter):
    gguf_arch = "QWEN2"

    def set_vocab(self) -> None:
        if (self.dir / "tokenizer.model").is_file():
            self.vocab_sentencepiece()
        else:
            self.vocab_gpt2()

    def set_gguf_parameters(self) -> None:
        super().set_gguf_parameters()
        self.try_pooling_type()

    def modify(self, data, name, bid):
        if self.hf_arch == "Qwen2Model":
            name = f"model.{name}"
        yield from super().modify(data, name, bid)


class Qwen3Converter(Qwen2Converter):
    gguf_arch = "QWEN3"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        readme = self.dir / "README.md"
        text = readme.read_text(encoding="utf-8").lower() if readme.exists() else ""
        hints = [h.lower() for h in (self.dir.name, str(self.hparams.get("_name_or_path", "")),
                                     str(self.hparams.get("model_type", "")), self.hf_arch) if h]
        if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text or \
                any("qwen3-reranker" in h or "qwen3-vl-reranker" in h for h in hints) or \
                "sequenceclassification" in self.hf_arch.lower():
            raise ConvertError("Qwen3 reranker checkpoints are not supported by convert-hf")


class Qwen2MoeConverter(Converter):
    gguf_arch = "QWEN2MOE"

    def set_gguf_parameters(self) -> None:
        super().set_gguf_parameters()
        if (x := self.hparams.get("moe_intermediate_size")) is not None:
            self.kv.add_expert_feed_forward_length(x)
        if (x := self.hparams.get("shared_expert_intermediate_size")) is not None:
            self.kv.add_expert_shared_feed_forward_length(x)

    def modify(self, data, name, bid):
        if name.endswith(("mlp.experts.down_proj", "mlp.experts.down_proj.weight")):
            yield from super().modify(data, name if name.endswith(".weight") else
                                      f"{name}.weight", bid)
            return
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj.weight")):
            if data.ndim < 3 or data.shape[-2] % 2:
                raise ConvertError(f"unexpected gate_up_proj shape for {name}: {data.shape}")
            nff = data.shape[-2] // 2
            base = name.removesuffix(".weight").removesuffix(".gate_up_proj")
            yield from super().modify(np.ascontiguousarray(data[..., :nff, :]),
                                      f"{base}.gate_proj.weight", bid)
            yield from super().modify(np.ascontiguousarray(data[..., nff:, :]),
                                      f"{base}.up_proj.weight", bid)
            return
        if "experts" in name:
            yield from self.buffer_expert(
                data, name, bid, self.find_hparam(["num_local_experts", "num_experts"]),
                *_MLP_EXPERTS)
            return
        yield from super().modify(data, name, bid)


class Qwen3MoeConverter(Qwen2MoeConverter):
    gguf_arch = "QWEN3MOE"


class Gemma3Converter(Converter):
    gguf_arch = "GEMMA3"

    def set_vocab(self) -> None:
        if (self.dir / "tokenizer.model").is_file():
            self.vocab_sentencepiece()
            self.kv.add_add_space_prefix(False)
        else:
            self.vocab_gpt2()

    def set_gguf_parameters(self) -> None:
        super().set_gguf_parameters()
        hp, kv = self.hparams, self.kv
        kv.add_context_length(hp.get("max_position_embeddings", 131072))
        kv.add_head_count(hp.get("num_attention_heads", 8))
        kv.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
        kv.add_key_length(hp.get("head_dim", 256))
        kv.add_value_length(hp.get("head_dim", 256))
        kv.add_rope_freq_base(self.rope.get("full_attention", self.rope).get("rope_theta",
                                                                             1_000_000.0))
        if hp.get("attn_logit_softcapping") is not None:
            raise ConvertError("Gemma 3 has no attn_logit_softcapping; config.json sets one")
        if cap := hp.get("final_logit_softcapping"):
            kv.add_final_logit_softcapping(cap)
        if hp.get("sliding_window_pattern") != 1:
            kv.add_sliding_window(hp["sliding_window"])
        kv.add_head_count_kv(hp.get("num_key_value_heads", 4))

    def modify(self, data, name, bid):
        if "embed_tokens.weight" in name:  # rows past the tokenizer's vocabulary are dropped
            if (self.dir / "tokenizer.model").is_file():
                n_real = len(spm_vocab(self.dir, self.hparams)[0])
            else:
                tj = json.loads((self.dir / "tokenizer.json").read_text(encoding="utf-8"))
                n_real = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
            data = data[:n_real]
        if name.endswith("norm.weight"):  # Gemma3RMSNorm scales by (1 + weight)
            data = data + data.dtype.type(1.0)
        yield from super().modify(data, name, bid)


class DeepseekV2Converter(Converter):
    """DeepSeek-V2/V3 (MLA attention, routed + shared experts)."""

    gguf_arch = "DEEPSEEK2"

    def filter_name(self, name: str) -> str | None:
        if "sam_model" in name or "qwen2_model" in name:
            return None
        return super().filter_name(name)

    def set_vocab(self) -> None:
        self.vocab_gpt2()

    def set_gguf_parameters(self) -> None:
        # MLA is stored as MQA (one KV group) with bigger heads, decompressed at run time
        self.hparams["num_key_value_heads"] = 1
        self.hparams["rms_norm_eps"] = self.hparams.get("rms_norm_eps", 1e-6)
        super().set_gguf_parameters()
        hp, kv = self.hparams, self.kv
        has_moe = hp.get("n_routed_experts") is not None
        first_dense = hp.get("first_k_dense_replace")
        if first_dense is None:
            first_dense = 0 if has_moe else hp["num_hidden_layers"]
        kv.add_leading_dense_block_count(first_dense)
        kv_lora = hp.get("kv_lora_rank", 512)
        kv.add_vocab_size(hp["vocab_size"])
        if hp.get("q_lora_rank") is not None:
            kv.add_q_lora_rank(hp["q_lora_rank"])
        kv.add_kv_lora_rank(kv_lora)
        kv.add_key_length(kv_lora + hp["qk_rope_head_dim"])
        kv.add_value_length(kv_lora)
        kv.add_key_length_mla(hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])
        kv.add_value_length_mla(hp["v_head_dim"])
        kv.add_expert_feed_forward_length(self.find_hparam(["moe_intermediate_size",
                                                            "intermediate_size"]))
        if (x := hp.get("n_routed_experts")) is not None:
            kv.add_expert_count(x)
        kv.add_expert_shared_count(hp.get("n_shared_experts", 0))
        if (x := hp.get("routed_scaling_factor")) is not None:
            kv.add_expert_weights_scale(x)
        if hp.get("norm_topk_prob"):
            kv.add_expert_weights_norm(hp["norm_topk_prob"])
        kv.add_rope_dimension_count(hp["qk_rope_head_dim"])
        if (m := self.rope.get("mscale_all_dim")) is not None:
            kv.add_rope_scaling_yarn_log_mul(0.1 * m)

    def modify(self, data, name, bid):
        import re

        if self.hparams.get("tie_word_embeddings", False) and \
                name in ("lm_head.weight", "model.lm_head.weight"):
            return
        m = re.match(r"model.layers.(\d+)", name)
        if m and int(m.group(1)) >= self.hparams["num_hidden_layers"]:
            return  # multi-token-prediction layers
        if "mlp.experts" in name:
            yield from self.buffer_expert(
                data, name, bid, self.hparams["n_routed_experts"], *_MLP_EXPERTS)
            return
        if name.endswith("kv_b_proj.weight"):
            nkv, vd = self.hparams["num_key_value_heads"], self.hparams["v_head_dim"]
            nope = self.hparams["qk_nope_head_dim"]
            if data.shape[0] != nkv * (vd + nope):
                raise ConvertError(f"tensor '{name}' has {data.shape[0]} rows, config.json "
                                   f"implies {nkv * (vd + nope)}")
            kv_b = data.reshape(nkv, vd + nope, data.shape[-1])
            k_b = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            v_b = np.ascontiguousarray(kv_b[:, nope:])
            yield from super().modify(k_b, name.replace("kv_b_proj", "k_b_proj"), bid)
            yield from super().modify(v_b, name.replace("kv_b_proj", "v_b_proj"), bid)
            return
        yield from super().modify(data, name, bid)


ARCHS: dict[str, type[Converter]] = {
    "DeepseekV2ForCausalLM": DeepseekV2Converter, "DeepseekV3ForCausalLM": DeepseekV2Converter,
    "Gemma3ForCausalLM": Gemma3Converter,
    "LlamaForCausalLM": LlamaConverter, "LLaMAForCausalLM": LlamaConverter,
    "MistralForCausalLM": LlamaConverter, "MixtralForCausalLM": LlamaConverter,
    "LlamaModel": LlamaConverter,
    "Qwen2ForCausalLM": Qwen2Converter, "Qwen2Model": Qwen2Converter,
    "Qwen3ForCausalLM": Qwen3Converter, "Qwen3Model": Qwen3Converter,
    "Qwen2MoeForCausalLM": Qwen2MoeConverter, "Qwen3MoeForCausalLM": Qwen3MoeConverter,
}


def convert_hf(model_dir: str | Path, out: str | Path, outtype: str = "auto",
               model_name: str | None = None) -> int:
    """Convert the checkpoint folder ``model_dir`` into the GGUF file ``out``; returns its size.

    Raises ``ConvertError`` / ``ModelError`` (one line each) for a missing folder, config or
    weight file, an unknown architecture, or a tensor whose shape the config contradicts."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConvertError(f"{model_dir} is not a directory")
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    hparams = load_hparams(model_dir)
    hf_arch = model_architecture(hparams)
    cls = ARCHS.get(hf_arch)
    if cls is None:
        raise ConvertError(f"architecture {hf_arch} is not supported by convert-hf (supported: "
                           f"{', '.join(sorted(ARCHS))})")
    try:
        conv = cls(model_dir, outtype, hparams, hf_arch, model_name)
        return conv.write(Path(out))
    except ModelError as e:
        raise ConvertError(str(e)) from None
