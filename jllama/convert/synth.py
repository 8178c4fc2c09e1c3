"""Random-weight GGUFs with the real shapes and real tokenizers of published models.

For benchmarks and scale tests of models jllama cannot download: each named shape carries the
published config.json numbers (hidden size, layers, heads, head_dim, n_ff, vocabulary, rope,
sliding window, experts, MLA ranks) and the metadata keys and tensor names llama.cpp's converter
writes for that architecture, with the tokenizer metadata of a real vocabulary GGUF copied in
(padded with unused control tokens up to the model's vocabulary size).

Weights are N(0, 0.02) matrices and norms near 1 (so a forward pass neither explodes nor
flattens), each drawn from its own seed (``seed`` and the tensor name: reproducible, and any one
tensor can be regenerated alone), stored F16 like a converter's ``--outtype f16`` (1-D tensors
F32). They are produced one tensor at a time inside ``write_gguf``, so writing an 8B model holds
one tensor (at most the embedding) in memory, never the model.

``write_random_blocks`` writes a quantized file directly instead (an 8B Q4_K_M in seconds, where
quantizing the F16 file takes minutes to an hour): the header ``jllama quantize`` would write for
the F16 file under a mix, with random codes and small finite scales in the quantized tensors
(``jllama.quant.randblocks``). Its values are random: for speed and memory benchmarks only, the
text such a model writes is meaningless.

``layers`` and ``tiny`` scale a shape down for tests: fewer blocks; width 256 with 4 heads
(n_ff 512, 8 experts), keeping the head size, the vocabulary and every architectural feature.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from jllama.errors import JllamaError
from jllama.gguf.constants import QType, ValueType, qtype_info
from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import TensorSpec, write_gguf


@dataclass(frozen=True)
class Shape:
    """A model's published hyperparameters (config.json) and where its tokenizer comes from."""

    arch: str
    vocab: str  # ggml-vocab-NAME.gguf of llama.cpp's tests, or "registry:NAME"
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    tied: bool
    rope_base: float
    eps: float
    ctx: int
    params: float  # the published parameter count (billions), for the plan check
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA3_ROPE = {"factor": 32.0, "low": 1.0, "high": 4.0, "orig": 8192}

SHAPES: dict[str, Shape] = {
    # SmolLM2's own tokenizer is not among llama.cpp's test vocabularies (the GPU machine has
    # only those); StarCoder's has exactly SmolLM2's 49152 tokens
    "smollm2-135m": Shape("llama", "starcoder", 49152, 576, 30, 9, 3, 64, 1536, True,
                          100000.0, 1e-5, 8192, 0.135),
    "llama-3.2-1b": Shape("llama", "llama-bpe", 128256, 2048, 16, 32, 8, 64, 8192, True,
                          500000.0, 1e-5, 131072, 1.24, {"rope3": _LLAMA3_ROPE}),
    "llama-3.2-3b": Shape("llama", "llama-bpe", 128256, 3072, 28, 24, 8, 128, 8192, True,
                          500000.0, 1e-5, 131072, 3.21, {"rope3": _LLAMA3_ROPE}),
    "llama-3.1-8b": Shape("llama", "llama-bpe", 128256, 4096, 32, 32, 8, 128, 14336, False,
                          500000.0, 1e-5, 131072, 8.03, {"rope3": {**_LLAMA3_ROPE,
                                                                   "factor": 8.0}}),
    "qwen2.5-1.5b": Shape("qwen2", "qwen2", 151936, 1536, 28, 12, 2, 128, 8960, True,
                          1e6, 1e-6, 32768, 1.54),
    "qwen2.5-7b": Shape("qwen2", "qwen2", 152064, 3584, 28, 28, 4, 128, 18944, False,
                        1e6, 1e-6, 32768, 7.62),
    "qwen3-4b": Shape("qwen3", "qwen2", 151936, 2560, 36, 32, 8, 128, 9728, True,
                      1e6, 1e-6, 40960, 4.02),
    "gemma-3-270m": Shape("gemma3", "registry:gemma3-270m", 262144, 640, 18, 4, 1, 256, 2048,
                          True, 1e6, 1e-6, 32768, 0.27, {"swa": 512}),
    "gemma-3-1b": Shape("gemma3", "registry:gemma3-270m", 262144, 1152, 26, 4, 1, 256, 6912,
                        True, 1e6, 1e-6, 32768, 1.0, {"swa": 512}),
    "gemma-3-4b": Shape("gemma3", "registry:gemma3-270m", 262208, 2560, 34, 8, 4, 256, 10240,
                        True, 1e6, 1e-6, 131072, 3.88, {"swa": 1024, "linear_rope": 8.0}),
    "qwen3-30b-a3b": Shape("qwen3moe", "qwen2", 151936, 2048, 48, 32, 4, 128, 6144, False,
                           1e6, 1e-6, 40960, 30.5, {"n_expert": 128, "n_used": 8, "n_ff_exp": 768}),
    "deepseek-v2-lite": Shape("deepseek2", "deepseek-llm", 102400, 2048, 27, 16, 16, 192, 10944,
                              False, 10000.0, 1e-6, 163840, 15.7,
                              {"n_expert": 64, "n_used": 6, "n_ff_exp": 1408, "n_shared": 2,
                               "n_dense": 1, "kv_rank": 512, "nope": 128, "rope_dim": 64,
                               "v_dim": 128, "yarn": {"factor": 40.0, "orig": 4096,
                                                      "mscale_all_dim": 0.707}}),
}


def scaled(shape: Shape, layers: int | None = None, tiny: bool = False) -> Shape:
    """``shape`` with ``layers`` blocks and, with ``tiny``, width 256 (see the module doc)."""
    s = shape
    if tiny:
        kv = max(1, 4 * s.n_head_kv // s.n_head)
        ex = dict(s.extra)
        if "n_expert" in ex:
            ex.update(n_expert=8, n_used=min(ex["n_used"], 4), n_ff_exp=256)
        if "kv_rank" in ex:
            ex.update(kv_rank=128, nope=64, rope_dim=32, v_dim=64)
        if "swa" in ex:
            ex["swa"] = 8
        hd = min(s.head_dim, 64) if s.arch != "deepseek2" else 96
        s = replace(s, n_embd=256, n_head=4, n_head_kv=kv if s.arch != "deepseek2" else 4,
                    head_dim=hd, n_ff=512, ctx=4096, extra=ex)
    if layers is not None:
        if layers < 1:
            raise JllamaError(f"--layers must be at least 1, got {layers}")
        if s.arch == "deepseek2" and layers not in (26, 27):
            # llama.cpp 0c1e570 tells V2-Lite's layout (attn_q, no q LoRA) by its layer count
            raise JllamaError("deepseek2 without q LoRA (V2-Lite) loads in llama.cpp only with "
                              "26 or 27 layers")
        s = replace(s, n_layer=layers)
    return s


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    kind: str  # "mat", "router", "norm", "bias", "rope_freqs", "embd"

    @property
    def qtype(self) -> QType:
        # routers stay F32 in F16 files: convert_hf_to_gguf forces FFN_GATE_INP to F32
        return QType.F16 if len(self.shape) >= 2 and self.kind != "router" else QType.F32

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


def _attn(s: Shape, p: str) -> list[PlannedTensor]:
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    t = [PlannedTensor(p + "attn_norm.weight", (s.n_embd,), "norm"),
         PlannedTensor(p + "attn_q.weight", (q, s.n_embd), "mat"),
         PlannedTensor(p + "attn_k.weight", (kv, s.n_embd), "mat"),
         PlannedTensor(p + "attn_v.weight", (kv, s.n_embd), "mat")]
    if s.arch == "qwen2":
        t += [PlannedTensor(p + f"attn_{x}.bias", (n,), "bias")
              for x, n in (("q", q), ("k", kv), ("v", kv))]
    if s.arch in ("qwen3", "qwen3moe", "gemma3"):
        t += [PlannedTensor(p + "attn_q_norm.weight", (s.head_dim,), "norm"),
              PlannedTensor(p + "attn_k_norm.weight", (s.head_dim,), "norm")]
    t.append(PlannedTensor(p + "attn_output.weight", (s.n_embd, q), "mat"))
    if s.arch == "gemma3":
        t.append(PlannedTensor(p + "post_attention_norm.weight", (s.n_embd,), "norm"))
    return t


def _mla(s: Shape, p: str) -> list[PlannedTensor]:
    e = s.extra
    kr, nope, rd, vd = e["kv_rank"], e["nope"], e["rope_dim"], e["v_dim"]
    return [PlannedTensor(p + "attn_norm.weight", (s.n_embd,), "norm"),
            PlannedTensor(p + "attn_q.weight", (s.n_head * (nope + rd), s.n_embd), "mat"),
            PlannedTensor(p + "attn_kv_a_mqa.weight", (kr + rd, s.n_embd), "mat"),
            PlannedTensor(p + "attn_kv_a_norm.weight", (kr,), "norm"),
            # the converter splits kv_b per head: k_b [head, kv_rank, nope], v_b [head, v, rank]
            PlannedTensor(p + "attn_k_b.weight", (s.n_head, kr, nope), "mat"),
            PlannedTensor(p + "attn_v_b.weight", (s.n_head, vd, kr), "mat"),
            PlannedTensor(p + "attn_output.weight", (s.n_embd, s.n_head * vd), "mat")]


def _dense_ffn(p: str, n_embd: int, n_ff: int, sfx: str = "") -> list[PlannedTensor]:
    return [PlannedTensor(p + f"ffn_gate{sfx}.weight", (n_ff, n_embd), "mat"),
            PlannedTensor(p + f"ffn_up{sfx}.weight", (n_ff, n_embd), "mat"),
            PlannedTensor(p + f"ffn_down{sfx}.weight", (n_embd, n_ff), "mat")]


def plan(s: Shape) -> list[PlannedTensor]:
    """Every tensor of ``s`` in the converter's order: name, shape, kind."""
    hd = s.head_dim
    t = [PlannedTensor("token_embd.weight", (s.n_vocab, s.n_embd), "embd")]
    if "rope3" in s.extra:
        t.append(PlannedTensor("rope_freqs.weight", (hd // 2,), "rope_freqs"))
    for i in range(s.n_layer):
        p = f"blk.{i}."
        t += _mla(s, p) if s.arch == "deepseek2" else _attn(s, p)
        t.append(PlannedTensor(p + "ffn_norm.weight", (s.n_embd,), "norm"))
        e = s.extra
        if "n_expert" in e and i >= e.get("n_dense", 0):
            ne, ff = e["n_expert"], e["n_ff_exp"]
            t += [PlannedTensor(p + "ffn_gate_inp.weight", (ne, s.n_embd), "router"),
                  PlannedTensor(p + "ffn_gate_exps.weight", (ne, ff, s.n_embd), "mat"),
                  PlannedTensor(p + "ffn_up_exps.weight", (ne, ff, s.n_embd), "mat"),
                  PlannedTensor(p + "ffn_down_exps.weight", (ne, s.n_embd, ff), "mat")]
            if e.get("n_shared"):
                t += _dense_ffn(p, s.n_embd, ff * e["n_shared"], "_shexp")
        else:
            t += _dense_ffn(p, s.n_embd, s.n_ff)
        if s.arch == "gemma3":
            t.append(PlannedTensor(p + "post_ffw_norm.weight", (s.n_embd,), "norm"))
    t.append(PlannedTensor("output_norm.weight", (s.n_embd,), "norm"))
    if not s.tied:
        t.append(PlannedTensor("output.weight", (s.n_vocab, s.n_embd), "mat"))
    return t


def n_params(s: Shape) -> int:
    return sum(t.n_elements for t in plan(s) if t.kind != "rope_freqs")


def hparams(s: Shape) -> tuple[dict[str, Any], dict[str, tuple[ValueType, ValueType | None]]]:
    """The ``general.*`` and ``{arch}.*`` metadata llama.cpp's converter writes for ``s``."""
    a, e = s.arch, s.extra
    f32 = (ValueType.FLOAT32, None)
    md: dict[str, Any] = {
        "general.architecture": a,
        "general.type": "model",
        "general.name": "jllama synth",
        f"{a}.block_count": s.n_layer,
        f"{a}.context_length": s.ctx,
        f"{a}.embedding_length": s.n_embd,
        f"{a}.feed_forward_length": s.n_ff,
        f"{a}.attention.head_count": s.n_head,
        f"{a}.attention.head_count_kv": s.n_head_kv,
        f"{a}.rope.freq_base": s.rope_base,
        f"{a}.attention.layer_norm_rms_epsilon": s.eps,
        "general.file_type": 1,
    }
    types = {f"{a}.rope.freq_base": f32, f"{a}.attention.layer_norm_rms_epsilon": f32}
    if a == "llama":
        md[f"{a}.vocab_size"] = s.n_vocab
        md[f"{a}.rope.dimension_count"] = s.head_dim
    if a in ("qwen3", "qwen3moe", "gemma3"):
        md[f"{a}.attention.key_length"] = s.head_dim
        md[f"{a}.attention.value_length"] = s.head_dim
    if a == "gemma3":
        md[f"{a}.attention.sliding_window"] = e["swa"]
        if "linear_rope" in e:
            md[f"{a}.rope.scaling.type"] = "linear"
            md[f"{a}.rope.scaling.factor"] = e["linear_rope"]
            types[f"{a}.rope.scaling.factor"] = f32
    if "n_expert" in e:
        md[f"{a}.expert_count"] = e["n_expert"]
        md[f"{a}.expert_used_count"] = e["n_used"]
        md[f"{a}.expert_feed_forward_length"] = e["n_ff_exp"]
    if a == "deepseek2":
        kr, rd = e["kv_rank"], e["rope_dim"]
        md.update({
            f"{a}.leading_dense_block_count": e["n_dense"],
            f"{a}.attention.kv_lora_rank": kr,
            f"{a}.attention.key_length": kr + rd,
            f"{a}.attention.value_length": kr,
            f"{a}.attention.key_length_mla": e["nope"] + rd,
            f"{a}.attention.value_length_mla": e["v_dim"],
            f"{a}.rope.dimension_count": rd,
            f"{a}.expert_shared_count": e["n_shared"],
            f"{a}.expert_weights_scale": 1.0,
            f"{a}.expert_gating_func": 1,  # softmax (V2)
            f"{a}.rope.scaling.type": "yarn",
            f"{a}.rope.scaling.factor": e["yarn"]["factor"],
            f"{a}.rope.scaling.original_context_length": e["yarn"]["orig"],
            f"{a}.rope.scaling.yarn_log_multiplier": 0.1 * e["yarn"]["mscale_all_dim"],
        })
        md[f"{a}.attention.head_count_kv"] = 1  # MLA: one latent "head" in the cache
        for k in ("expert_weights_scale", "rope.scaling.factor",
                  "rope.scaling.yarn_log_multiplier"):
            types[f"{a}.{k}"] = f32
    return md, types


def vocab_metadata(src: str | os.PathLike[str], n_vocab: int):
    """The ``tokenizer.*`` metadata of GGUF ``src``, padded to ``n_vocab`` tokens."""
    g = read_gguf(src)
    md = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    types = {k: v for k, v in g.metadata_types.items() if k in md}
    toks = list(md["tokenizer.ggml.tokens"])
    if len(toks) > n_vocab:
        raise JllamaError(f"{src}: {len(toks)} tokens do not fit a vocabulary of {n_vocab}")
    pad = n_vocab - len(toks)
    md["tokenizer.ggml.tokens"] = toks + [f"<|synth_pad_{i}|>" for i in range(pad)]
    if "tokenizer.ggml.token_type" in md:
        md["tokenizer.ggml.token_type"] = list(md["tokenizer.ggml.token_type"]) + [3] * pad
    if "tokenizer.ggml.scores" in md:
        md["tokenizer.ggml.scores"] = list(md["tokenizer.ggml.scores"]) + [0.0] * pad
    return md, types


def _tensor_data(t: PlannedTensor, s: Shape, seed: int) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
        if t.kind == "rope_freqs":  # llama 3's rope scaling factors, as the converter computes
            r = s.extra["rope3"]
            base, hd = s.rope_base, s.head_dim
            freqs = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
            wavelen = 2 * np.pi / freqs
            lo_w, hi_w = r["orig"] / r["low"], r["orig"] / r["high"]
            smooth = (r["orig"] / wavelen - r["low"]) / (r["high"] - r["low"])
            f = np.where(wavelen < hi_w, 1.0,
                         np.where(wavelen > lo_w, r["factor"],
                                  1.0 / ((1 - smooth) / r["factor"] + smooth)))
            a = f.astype(np.float32)
        elif t.kind == "norm":
            a = (1.0 + 0.02 * rng.standard_normal(t.shape, dtype=np.float32))
        elif t.kind in ("bias", "router"):
            a = 0.02 * rng.standard_normal(t.shape, dtype=np.float32)
        else:
            # drawn in slices of ~16M values straight into the F16 array: peak memory is the
            # tensor's F16 bytes plus one slice, not an F32 copy of an 8B model's embedding
            out = np.empty(t.shape, np.float16)
            flat = out.reshape(t.shape[0], -1)
            step = max(1, (1 << 24) // flat.shape[1])
            for r in range(0, flat.shape[0], step):
                n = min(step, flat.shape[0] - r)
                flat[r:r + n] = rng.standard_normal((n, flat.shape[1]), dtype=np.float32) * 0.02
            return out.view(np.uint8)
        return a.astype(np.float16 if t.qtype == QType.F16 else np.float32).view(np.uint8)

    return make


def _metadata(shape: Shape, vocab: str | os.PathLike[str]):
    md, types = hparams(shape)
    vmd, vtypes = vocab_metadata(vocab, shape.n_vocab)
    md.update(vmd)
    types.update(vtypes)
    return md, types


def write(shape: Shape, path: str | os.PathLike[str], vocab: str | os.PathLike[str],
          seed: int = 0, on_tensor: Callable[[TensorSpec], None] | None = None) -> int:
    """Write ``shape`` as an F16 GGUF at ``path`` (tokenizer from GGUF ``vocab``); its size."""
    md, types = _metadata(shape, vocab)
    specs = [TensorSpec(t.name, t.shape, int(t.qtype), _tensor_data(t, shape, seed))
             for t in plan(shape)]
    return write_gguf(path, md, specs, types, on_tensor=on_tensor)


# bytes of random blocks drawn by one task: fixed (not per core) so a seed gives the same file
# on every machine; small enough to spread an 8B model's matrices over 16 cores
_CHUNK = 16 << 20


def _random_block_data(t: PlannedTensor, qtype: int, seed: int, pool) -> Callable[[], np.ndarray]:
    from jllama.quant.randblocks import random_blocks

    info = qtype_info(qtype)
    n_blocks = t.n_elements // info.block_size
    per = max(1, _CHUNK // info.type_size)

    def make() -> np.ndarray:
        out = np.empty((n_blocks, info.type_size), np.uint8)
        key = zlib.crc32(t.name.encode())

        def fill(i: int) -> None:
            rng = np.random.default_rng([seed, key, i])
            out[i * per:(i + 1) * per] = random_blocks(qtype, min(per, n_blocks - i * per), rng)

        list(pool.map(fill, range((n_blocks + per - 1) // per)))
        return out.reshape(-1)

    return make


def _float_data(t: PlannedTensor, qtype: int, s: Shape, seed: int) -> Callable[[], np.ndarray]:
    """``write``'s values of ``t`` in float type ``qtype`` (a mix may move F16 to F32 or BF16)."""
    make = _tensor_data(t, s, seed)
    if qtype == int(t.qtype):
        return make

    def convert() -> np.ndarray:
        a = make().view(np.float16 if t.qtype == QType.F16 else np.float32).astype(np.float32)
        if qtype == int(QType.F32):
            return a.view(np.uint8)
        if qtype == int(QType.F16):
            return a.astype(np.float16).view(np.uint8)
        return (a.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16, truncated

    return convert


def random_block_types(shape: Shape, ftype: str, md: dict[str, Any] | None = None
                       ) -> tuple[Any, dict[str, QType]]:
    """The MixSpec of file type ``ftype`` and the type ``jllama quantize`` gives each tensor of
    ``shape``'s F16 file under it (in the order it writes them)."""
    from jllama.quant.mixes import mix_from_base, plan_from_tensors

    spec = mix_from_base(ftype)
    if md is None:
        md = hparams(shape)[0]
    p = plan_from_tensors({t.name: (t.shape, int(t.qtype)) for t in plan(shape)}, md, spec)
    return spec, dict(p.types)


def write_random_blocks(shape: Shape, path: str | os.PathLike[str],
                        vocab: str | os.PathLike[str], ftype: str, seed: int = 0,
                        on_tensor: Callable[[TensorSpec], None] | None = None,
                        threads: int | None = None) -> int:
    """Write ``shape`` straight in file type ``ftype`` (a ``jllama quantize`` mix name such as
    q4_k_m, or a tensor type for all, e.g. q6_k) with random quantized blocks; its size.

    The header (metadata, tensor order and types) is the one ``jllama quantize`` writes for the
    F16 file of ``write``; quantized tensors hold random codes with small finite scales
    (``jllama.quant.randblocks``), float tensors ``write``'s values. For speed and memory
    benchmarks only: the model's output is meaningless. No importance matrix is needed (the
    types are those chosen without one). Tensors are drawn on ``threads`` threads (default: one
    per core) one at a time, so memory holds the largest tensor, not the model."""
    from concurrent.futures import ThreadPoolExecutor

    from jllama.quant.quantize import output_metadata
    from jllama.quant.randblocks import RANDOM_BLOCK_TYPES

    md, types = _metadata(shape, vocab)
    spec, qtypes = random_block_types(shape, ftype, md)
    floats = (QType.F32, QType.F16, QType.BF16)
    missing = sorted({t.name for t in qtypes.values()
                      if t not in floats and t not in RANDOM_BLOCK_TYPES})
    if missing:
        raise JllamaError(f"{ftype}: no random-block layout for {', '.join(missing)}")
    planned = {t.name: t for t in plan(shape)}
    md, types = output_metadata(md, types, spec.ftype_id)
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        specs = []
        for name, qt in qtypes.items():
            t = planned[name]
            if qt in floats:
                data = _float_data(t, int(qt), shape, seed)
            else:
                data = _random_block_data(t, int(qt), seed, pool)
            specs.append(TensorSpec(name, t.shape, int(qt), data))
        return write_gguf(path, md, specs, types, on_tensor=on_tensor)


def find_vocab(shape: Shape, vocab: str | os.PathLike[str] | None = None) -> str:
    """The tokenizer GGUF for ``shape``: ``vocab`` if given (a file, or a folder holding
    ``ggml-vocab-NAME.gguf``); else the registry model it names, or llama.cpp's test vocabulary
    from ``$JLLAMA_SHARED_DATA/vocab`` or jllama's test-data cache."""
    from jllama import registry

    fname = f"ggml-vocab-{shape.vocab}.gguf"
    if vocab is not None:
        p = os.fspath(vocab)
        return os.path.join(p, fname) if os.path.isdir(p) else p
    if shape.vocab.startswith("registry:"):
        return str(registry.fetch(shape.vocab.split(":", 1)[1]))
    dirs = [os.path.join(os.environ["JLLAMA_SHARED_DATA"], "vocab")] \
        if os.environ.get("JLLAMA_SHARED_DATA") else []
    dirs.append(str(registry.cache_dir() / "testdata" / "vocab"))
    for d in dirs:
        if os.path.isfile(os.path.join(d, fname)):
            return os.path.join(d, fname)
    raise JllamaError(f"no {fname} in {' or '.join(dirs)}: pass --vocab (llama.cpp's "
                      "models/ folder holds it)")
