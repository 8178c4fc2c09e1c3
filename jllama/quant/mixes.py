"""Which ggml type each tensor gets: llama.cpp's quantization mixes (``llama_tensor_get_type``).

A "file type" such as Q4_K_M is not one type: llama-quantize gives attention-V and FFN-down more
bits in some layers, keeps norms in F32, puts the output matrix in Q6_K, and falls back to a
32-block type when a row is not a multiple of 256. This module reproduces that choice for the
file types jllama can write (src/llama-quant.cpp at llama.cpp 0c1e570), plus the user controls
llama-quantize has (``--token-embedding-type``, ``--output-tensor-type``, ``--pure``,
``--tensor-type REGEX=TYPE``) and a YAML form of the same (``load_mix``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info

T = QType

# llama_ftype ids (llama.h) and the default tensor type of each file type we can write.
FTYPES: dict[str, tuple[int, QType]] = {
    "F32": (0, T.F32),
    "F16": (1, T.F16),
    "BF16": (32, T.BF16),
    "Q4_0": (2, T.Q4_0),
    "Q4_1": (3, T.Q4_1),
    "Q5_0": (8, T.Q5_0),
    "Q5_1": (9, T.Q5_1),
    "Q8_0": (7, T.Q8_0),
    "Q2_K": (10, T.Q2_K),
    "Q3_K_S": (11, T.Q3_K),
    "Q3_K_M": (12, T.Q3_K),
    "Q3_K_L": (13, T.Q3_K),
    "Q4_K_S": (14, T.Q4_K),
    "Q4_K_M": (15, T.Q4_K),
    "Q5_K_S": (16, T.Q5_K),
    "Q5_K_M": (17, T.Q5_K),
    "Q6_K": (18, T.Q6_K),
    "IQ4_NL": (25, T.IQ4_NL),
    "IQ4_XS": (30, T.IQ4_XS),
    "Q2_K_S": (21, T.Q2_K),
    "IQ2_XXS": (19, T.IQ2_XXS),
    "IQ2_XS": (20, T.IQ2_XS),
    "IQ3_XS": (22, T.IQ3_S),
    "IQ3_XXS": (23, T.IQ3_XXS),
    "IQ1_S": (24, T.IQ1_S),
    "IQ3_S": (26, T.IQ3_S),
    "IQ3_M": (27, T.IQ3_S),
    "IQ2_S": (28, T.IQ2_XS),  # sic: llama.cpp's IQ2_S file type defaults to IQ2_XS tensors
    "IQ2_M": (29, T.IQ2_S),
    "IQ1_M": (31, T.IQ1_M),
    "TQ1_0": (36, T.TQ1_0),
    "TQ2_0": (37, T.TQ2_0),
    "MXFP4_MOE": (38, T.MXFP4),
    # llama.cpp names file type 39 but has no rules for it (llama_model_quantize refuses it):
    # jllama writes it only as the bare type, every quantizable tensor NVFP4 (see mix_from_base)
    "NVFP4": (39, T.NVFP4),
    "Q1_0": (40, T.Q1_0),
    "Q2_0": (41, T.Q2_0),
}
FTYPE_BY_ID = {v[0]: k for k, v in FTYPES.items()}

# Tensor types we can produce (quantizers exist for all of them).
WRITABLE_TYPES = (
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS,
    T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M, T.IQ3_XXS, T.IQ3_S,
    T.TQ1_0, T.TQ2_0, T.MXFP4, T.NVFP4, T.Q1_0, T.Q2_0,
)  # fmt: skip
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# A bare K-type as a mix base (YAML mixes, the Python API) means "every quantizable tensor in
# this type" (llama-quantize's FTYPE --pure); this is the file type recorded for it. On
# `jllama quantize`'s command line Q3_K/Q4_K/Q5_K are llama-quantize's aliases of the _M mixes.
_PURE_BASE_FTYPE = {T.Q3_K: "Q3_K_M", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M", T.MXFP4: "MXFP4_MOE"}
# File types that exist only as the bare type (pure): llama.cpp 0c1e570 has no
# llama_tensor_get_type rules for them (llama_ftype_get_default_type: "invalid output file type")
_PURE_ONLY = ("NVFP4",)


class QuantWarning(UserWarning):
    """A mix setting that does nothing (e.g. a --tensor-type regex that matches no tensor)."""


def parse_type(name: str | int, what: str = "type") -> QType:
    """A writable ggml tensor type by name (case-insensitive) or id; QuantError otherwise."""
    try:
        t = QType(qtype_info(name).id)
    except KeyError:
        t = None
    if t is None or t not in WRITABLE_TYPES:
        known = ", ".join(x.name.lower() for x in WRITABLE_TYPES)
        raise QuantError(f"unknown {what} '{name}'; known types: {known}")
    return t


def parse_ftype(name: str) -> str:
    """A file type (mix) name, e.g. 'q4_k_m'; QuantError listing the known names otherwise."""
    key = str(name).upper()
    if key not in FTYPES:
        known = ", ".join(k.lower() for k in FTYPES)
        raise QuantError(f"unknown quantization type '{name}'; known: {known}")
    return key


@dataclass
class MixSpec:
    """Everything that decides the tensor -> type map (llama_model_quantize_params' part)."""

    ftype: str = "Q8_0"
    pure: bool = False
    token_embedding_type: QType | None = None
    output_tensor_type: QType | None = None
    # (regex, type), first match wins; matched with re.search like std::regex_search.
    overrides: list[tuple[str, QType]] = field(default_factory=list)
    # An importance matrix is given: llama.cpp's rules differ with one (qs.has_imatrix).
    has_imatrix: bool = False
    # llama-quantize's --leave-output-tensor (false: output.weight keeps its type) and COPY
    # (only_copy: no tensor is quantized, the file type stays the input's)
    quantize_output_tensor: bool = True
    only_copy: bool = False

    @property
    def ftype_id(self) -> int:
        return FTYPES[self.ftype][0]

    @property
    def default_type(self) -> QType:
        return FTYPES[self.ftype][1]


def parse_override(text: str) -> tuple[str, QType]:
    """``REGEX=TYPE`` as given to ``--tensor-type``: split at the first '=' and the regex
    lower-cased, as llama-quantize parses it (tensor names are lower case)."""
    pattern, sep, tname = text.partition("=")
    if not sep or not pattern or not tname:
        raise QuantError(f"--tensor-type wants REGEX=TYPE, got '{text}'")
    return _compile(pattern.lower()), parse_type(tname, f"type in --tensor-type {text}")


def _compile(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise QuantError(f"bad tensor regex '{pattern}': {e}") from None
    return pattern


def mix_from_base(base: str) -> MixSpec:
    """A mix from a file type name, or from a bare tensor type (then applied to all, --pure)."""
    key = str(base).upper()
    if key in _PURE_ONLY:  # the bare type: its file type has no mix rules of its own
        return MixSpec(ftype=key, pure=True)
    if key in FTYPES:
        return MixSpec(ftype=key)
    try:
        t = parse_type(base)
    except QuantError:
        known = ", ".join(k.lower() for k in FTYPES)
        types = ", ".join(x.name.lower() for x in WRITABLE_TYPES)
        raise QuantError(
            f"unknown mix base '{base}'; known file types: {known}; or a type: {types}"
        ) from None
    ftype = _PURE_BASE_FTYPE.get(t, t.name)
    return MixSpec(ftype=ftype, pure=True)


def mix_from_dict(d: Any, source: str = "mix") -> MixSpec:
    """``{base: q4_k_m, rules: [{match: REGEX, type: TYPE}, ...], token_embedding_type: T,
    output_tensor_type: T, pure: bool}`` -> MixSpec (rules are ordered, first match wins)."""
    if not isinstance(d, dict):
        raise QuantError(f"{source}: expected a mapping with 'base' and 'rules'")
    unknown = set(d) - {"base", "rules", "token_embedding_type", "output_tensor_type", "pure"}
    if unknown:
        raise QuantError(f"{source}: unknown keys {sorted(unknown)}")
    if "base" not in d:
        raise QuantError(f"{source}: 'base' (a file type like q4_k_m, or a type) is required")
    spec = mix_from_base(str(d["base"]))
    if d.get("pure"):
        spec.pure = True
    for key in ("token_embedding_type", "output_tensor_type"):
        if d.get(key) is not None:
            setattr(spec, key, parse_type(d[key], f"{key} in {source}"))
    rules = d.get("rules") or []
    if not isinstance(rules, list):
        raise QuantError(f"{source}: 'rules' must be a list of {{match, type}}")
    for i, r in enumerate(rules):
        if not isinstance(r, dict) or set(r) != {"match", "type"}:
            raise QuantError(f"{source}: rule {i + 1} must have exactly 'match' and 'type'")
        spec.overrides.append(
            (_compile(str(r["match"])), parse_type(r["type"], f"type in {source} rule {i + 1}"))
        )
    return spec


def load_mix(path: str | Path) -> MixSpec:
    """Read a YAML mix file (see ``mix_from_dict``)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise QuantError(f"cannot read mix {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise QuantError(f"mix {path} is not valid YAML: {e}") from None
    return mix_from_dict(data, str(path))


# ----------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class ModelInfo:
    """The hyperparameters llama_tensor_get_type looks at."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> ModelInfo:
        arch = str(md.get("general.architecture", ""))

        def first(key: str, default: int) -> int:
            v = md.get(f"{arch}.{key}", default)
            return int(v[0] if isinstance(v, list) else v)

        n_head = first("attention.head_count", 0)
        return cls(
            arch=arch,
            n_layer=first("block_count", 0),
            n_head=n_head,
            n_head_kv=first("attention.head_count_kv", n_head),
            n_expert=first("expert_count", 0),
        )


_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing (ggml order) dimensions of size 1 do not count."""
    dims = list(reversed(shape))
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return max(1, len(dims))


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization: 2-D+ weights that are not norms, routers, positions..."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


_LAYER_RE = re.compile(r"^blk\.(-?\d+)\.")


def layer_of(name: str) -> int:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: list[str]) -> list[str]:
    """The order llama.cpp walks (and writes) tensors: by layer (non-layer first), then name."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    n_attention_wv: int = 0
    n_ffn: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True
    fallbacks: list[str] = field(default_factory=list)


def _layer(st_counter: int, name: str, m: ModelInfo) -> int:
    if max(1, m.n_expert) > 1:
        li = layer_of(name)
        if li < 0 or li >= m.n_layer:
            raise QuantError(f"cannot determine the layer of tensor {name}")
        return li
    return st_counter


_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")  # the 1-2 bit file types


def _mix_rule(  # noqa: C901, PLR0912, PLR0915
    st: _State, m: ModelInfo, spec: MixSpec, t: QType, name: str, shape: tuple[int, ...], cat: str
) -> QType:
    """llama_tensor_get_type_impl, branch for branch (src/llama-quant.cpp at 0c1e570)."""
    ft = spec.ftype
    ncols = shape[-1] if shape else 1
    falcon = m.arch == "falcon"
    imat = spec.has_imatrix
    gqa4 = m.n_gqa >= 4
    attn_v = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    if m.arch == "glm5-next" and any(k in name for k in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if t not in FLOAT_TYPES:  # never below Q8_0 there
            return T.Q8_0
    if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
        if spec.output_tensor_type is not None:
            return spec.output_tensor_type
        if ft == "MXFP4_MOE":
            return T.Q8_0
        if falcon or ncols % qtype_info(t).block_size:
            return T.Q8_0
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return T.Q5_K
        return T.Q6_K if t != T.Q8_0 else t
    if ft == "MXFP4_MOE":
        # expert tensors (3-D) in MXFP4, everything else Q8_0
        expert = len(shape) >= 3 and shape[-3] > 1  # ggml ne[2]
        if m.arch == "bailingmoe3" and cat not in ("ffn_up", "ffn_gate", "ffn_down"):
            expert = False
        return T.MXFP4 if expert else T.Q8_0
    if cat == "token_embd":
        if spec.token_embedding_type is not None:
            return spec.token_embedding_type
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return T.Q2_K
        if ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return T.IQ3_S
        if ft in ("TQ1_0", "TQ2_0", "Q2_0"):
            return T.Q4_K
        return t
    if ft in _IQ_LOW:
        s_m = ft in ("IQ2_S", "IQ2_M")
        if attn_v:
            if gqa4 or m.n_expert >= 4:
                t = T.Q4_K
            else:
                t = T.IQ3_S if s_m else T.Q2_K
            st.i_attention_wv += 1
        elif m.n_expert == 8 and cat == "attn_k":
            t = T.Q4_K
        elif cat == "ffn_down":
            if st.i_ffn_down < st.n_ffn // 8:  # the counter, not the layer, in this branch
                t = T.IQ3_S if s_m else T.Q2_K
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if m.n_expert == 8:
                t = T.Q5_K
            elif ft in ("IQ1_S", "IQ1_M"):
                t = T.IQ2_XXS
            elif s_m:
                t = T.IQ3_S
        return t
    if attn_v:
        if ft == "Q2_K":
            t = T.Q4_K if gqa4 else T.Q3_K
        elif ft == "Q2_K_S" and gqa4:
            t = T.Q4_K
        elif ft == "IQ3_XXS":
            t = T.Q4_K if gqa4 else (T.IQ3_XXS if imat else T.IQ3_S)
        elif ft in ("IQ3_XS", "IQ3_S") and gqa4:
            t = T.Q4_K
        elif ft == "IQ3_M":
            t = T.Q4_K
        elif ft == "Q3_K_M":
            t = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
        elif ft == "Q3_K_L":
            t = T.Q5_K
        elif ft in ("IQ4_NL", "IQ4_XS") and gqa4:
            t = T.Q5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            t = T.Q6_K
        elif ft == "Q4_K_S" and st.i_attention_wv < 4:
            t = T.Q5_K
        if m.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        if m.n_expert == 8:
            t = T.Q8_0
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if m.n_expert == 8:
            t = T.Q8_0
        elif ft == "IQ3_XS":
            t = T.IQ3_XXS
        elif ft == "IQ3_XXS":
            t = T.IQ2_S
    elif cat == "attn_q":
        if ft == "IQ3_XS":
            t = T.IQ3_XXS
        elif ft == "IQ3_XXS":
            t = T.IQ2_S
    elif cat == "ffn_down":
        i, n = _layer(st.i_ffn_down, name, m), st.n_ffn
        if ft == "Q2_K":
            t = T.Q3_K
        elif ft == "Q2_K_S":
            if i < n // 8:
                t = T.Q4_K
        elif ft == "IQ3_XXS" and not imat:
            t = T.Q4_K if i < n // 8 else T.Q3_K
        elif ft == "Q3_K_M":
            if i < n // 16:
                t = T.Q5_K
            elif not falcon or _use_more_bits(i, n):
                t = T.Q4_K
            else:
                t = T.Q3_K
        elif ft == "IQ3_M" and (i < n // 8 or (m.n_expert == 8 and _use_more_bits(i, n))):
            t = T.Q4_K
        elif ft == "Q3_K_L":
            t = T.Q4_K if falcon else T.Q5_K
        elif ft == "Q4_K_M":
            if falcon:
                t = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            elif _use_more_bits(i, n):
                t = T.Q6_K
        elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not imat:
            t = T.Q5_K
        elif ft == "Q5_K_M" and _use_more_bits(i, n):
            t = T.Q6_K
        elif ft == "Q4_K_S" and not falcon and i < n // 8:
            t = T.Q5_K
        elif ft in ("Q4_0", "Q5_0") and imat and i < n // 8:
            t = T.Q4_1 if ft == "Q4_0" else T.Q5_1
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if not falcon:
            if m.n_expert == 8:
                if ft in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                          "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"):  # fmt: skip
                    t = T.Q5_K
            else:
                t = {
                    "Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K,
                    "IQ3_M": T.Q4_K,
                }.get(ft, t)  # fmt: skip
        elif ft == "Q3_K_L":
            t = T.Q4_K
    elif cat == "ffn_gate":
        i, n = _layer(st.i_ffn_gate, name, m), st.n_ffn
        if ft == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            t = T.IQ3_XXS
        st.i_ffn_gate += 1
    elif cat == "ffn_up":
        i, n = _layer(st.i_ffn_up, name, m), st.n_ffn
        if ft == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            t = T.IQ3_XXS
        st.i_ffn_up += 1
    return t


_FALLBACK = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
    T.IQ4_XS: T.IQ4_NL, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL,
    T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0, T.Q2_0: T.Q4_0,  # Q1_0 has none: llama.cpp refuses
}  # fmt: skip


def _fallback(st: _State, name: str, ncols: int, t: QType) -> QType:
    """tensor_type_fallback: a type whose blocks fit the row, else F16."""
    bs = qtype_info(t).block_size
    if ncols % bs == 0:
        return t
    st.fallbacks.append(name)
    if t in _FALLBACK:
        f = _FALLBACK[t]
    elif bs <= 32:  # already a 32-block type: no smaller block to demote to
        f = t
    else:
        raise QuantError(f"{name}: no fallback type for {t.name} with rows of {ncols}")
    return f if ncols % qtype_info(f).block_size == 0 else T.F16


def requires_imatrix(name: str, t: QType, ftype: str) -> bool:
    """tensor_requires_imatrix: the 1-3 bit lattice types make garbage without one."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if t in (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S):
        return True
    return t == T.Q2_K and ftype == "Q2_K_S"


def check_imatrix(plan: Plan, spec: MixSpec) -> None:
    """llama-quantize's refusal: a tensor whose type needs an importance matrix, and none."""
    if spec.has_imatrix:
        return
    for n, t in plan.types.items():
        if plan.quantized.get(n) and requires_imatrix(n, t, spec.ftype):
            raise QuantError(
                f"this quantization requires an importance matrix! (offending tensor: {n}, "
                f"target type: {t.name.lower()}); give one with --imatrix"
            )


@dataclass
class Plan:
    """The chosen type per tensor, in llama.cpp's tensor order."""

    types: dict[str, QType]
    ftype: str
    fallbacks: list[str]
    unmatched_overrides: list[str]
    # name -> whether llama.cpp quantizes it at all (tensor_allows_quantization)
    quantized: dict[str, bool] = field(default_factory=dict)


def plan_from_tensors(
    tensors: dict[str, tuple[tuple[int, ...], int]],
    metadata: dict[str, Any],
    spec: MixSpec,
    keep_order: bool = False,
) -> Plan:
    """name -> (shape in numpy order, current type id) -> chosen type per tensor.
    ``keep_order``: walk the tensors in the dict's order (llama-quantize's --keep-split walks
    them in file order; its per-layer counters follow the walk), not llama.cpp's name order."""
    if spec.ftype in _PURE_ONLY and not spec.pure:
        raise QuantError(
            f"llama.cpp has no {spec.ftype} mix (its quantize refuses that file type): give the "
            f"type for all tensors (--pure), or --tensor-type REGEX={spec.ftype.lower()}"
        )
    m = ModelInfo.from_metadata(metadata)
    names = list(tensors) if keep_order else llama_order(list(tensors))
    st = _State(n_ffn=m.n_layer)
    for n in names:
        c = _category(n)
        st.n_attention_wv += c in ("attn_v", "attn_qkv", "attn_kv_b")
        if c == "output":
            st.has_tied_embeddings = False
    default = spec.default_type
    matched: set[str] = set()
    out: dict[str, QType] = {}
    allowed: dict[str, bool] = {}
    for n in names:
        shape, cur = tensors[n]
        ncols = shape[-1] if shape else 1
        c = _category(n)
        allowed[n] = (
            not spec.only_copy
            and (spec.quantize_output_tensor or n != "output.weight")
            and allows_quantization(n, shape)
        )
        if not allowed[n]:
            out[n] = QType(cur)
            continue
        if spec.token_embedding_type is not None and c == "token_embd":
            out[n] = _check_fits(n, ncols, spec.token_embedding_type)
            continue
        if spec.output_tensor_type is not None and c == "output":
            out[n] = _check_fits(n, ncols, spec.output_tensor_type)
            continue
        t = default
        if t not in FLOAT_TYPES:
            manual = False
            for pattern, qt in spec.overrides:
                if re.search(pattern, n):
                    t, manual = qt, True
                    matched.add(pattern)
                    break
            if not manual and not spec.pure:
                t = _mix_rule(st, m, spec, t, n, tuple(shape), c)
            t = _fallback(st, n, ncols, t)
        out[n] = t
    unmatched = [p for p, _ in spec.overrides if p not in matched]
    for p in unmatched:
        warnings.warn(f"--tensor-type '{p}' matches no quantized tensor", QuantWarning, 2)
    return Plan(out, spec.ftype, st.fallbacks, unmatched, allowed)


def _check_fits(name: str, ncols: int, t: QType) -> QType:
    bs = qtype_info(t).block_size
    if ncols % bs:
        raise QuantError(f"{name}: rows of {ncols} cannot be {t.name} (blocks of {bs})")
    return t


def plan_types(gguf_file: Any, spec: MixSpec | str) -> dict[str, int]:
    """Tensor name -> ggml type id that llama-quantize would choose for ``gguf_file``
    (a ``jllama.gguf.reader.GGUFFile``) under ``spec`` (a MixSpec or a file type name)."""
    if isinstance(spec, str):
        spec = mix_from_base(spec)
    tensors = {n: (t.shape, t.qtype) for n, t in gguf_file.tensors.items()}
    plan = plan_from_tensors(tensors, gguf_file.metadata, spec)
    return {n: int(t) for n, t in plan.types.items()}
