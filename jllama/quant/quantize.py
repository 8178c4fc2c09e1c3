"""Quantize a GGUF model file, as ``llama-quantize`` does (optionally with an importance matrix,
whose column weights go to ggml's weighted quantizers: quant/imatrix.py).

The tensor -> type map comes from ``mixes``; each tensor is decoded to float32 and re-encoded by
the reference quantizers in ``quantizers``, streamed into the atomic GGUF writer one tensor at a
time, in llama.cpp's tensor order and with its metadata changes (``general.file_type``,
``general.quantization_version``, no split keys). Tensors whose type does not change are copied
byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from jllama.errors import QuantError
from jllama.gguf.constants import QType, ValueType, qtype_info
from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import TensorSpec, tensor_nbytes, write_gguf
from jllama.quant.formats import dequantize_np
from jllama.quant.imatrix import QuantImatrix, quantize_metadata
from jllama.quant.mixes import (
    MixSpec,
    Plan,
    check_imatrix,
    mix_from_base,
    mix_from_dict,
    plan_from_tensors,
    plan_types,
)
from jllama.quant.quantizers import quantize_np

GGML_QNT_VERSION = 2
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_ROWS_ELEMS = 1 << 22  # elements converted per slice: bounds the float32 temporaries


def is_quantized(qtype: int) -> bool:
    """Block types (what llama-quantize refuses to requantize without the flag)."""
    return qtype_info(qtype).block_size > 1


def quantize_tensor(
    data: np.ndarray,
    from_qtype: int,
    to_qtype: int,
    shape: tuple[int, ...],
    imatrix: np.ndarray | None = None,
) -> np.ndarray:
    """Re-encode one tensor: raw GGUF bytes of type ``from_qtype`` (or a float array) of logical
    ``shape`` (numpy order) -> uint8 ``[rows, row_bytes]`` of ``to_qtype``.

    ``imatrix``: the column weights, ``shape[-1]`` of them per matrix (for a 3-D expert tensor
    ``[n_expert, rows, cols]``, one slice per expert, as llama-quantize hands them out).
    Same type in and out returns the bytes unchanged (as llama-quantize copies them)."""
    from_qtype, to_qtype = int(from_qtype), int(to_qtype)
    row = int(shape[-1]) if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    rows_per_mat = int(shape[-2]) if len(shape) > 1 else 1
    if imatrix is not None:
        imatrix = np.asarray(imatrix, np.float32).reshape(-1, row)
        if imatrix.shape[0] * rows_per_mat != rows:
            raise QuantError(
                f"imatrix of {imatrix.size} values does not fit a tensor of shape {shape}"
            )

    def encode(x: np.ndarray, first_row: int) -> np.ndarray:
        if imatrix is None:
            return quantize_np(x, to_qtype)
        out = np.empty((x.shape[0], tensor_nbytes((1, row), to_qtype)), np.uint8)
        r = 0
        while r < x.shape[0]:  # a slice may straddle experts: each gets its own weights
            mat = (first_row + r) // rows_per_mat
            n = min(x.shape[0] - r, (mat + 1) * rows_per_mat - first_row - r)
            out[r : r + n] = quantize_np(x[r : r + n], to_qtype, imatrix[mat])
            r += n
        return out

    data = np.asarray(data)
    if data.dtype != np.uint8:  # a float array: its type is the array's, not from_qtype
        x = np.ascontiguousarray(data, dtype=np.float32).reshape(rows, row)
        return encode(x, 0)
    raw = data.reshape(rows, -1)
    expect = tensor_nbytes((rows, row), from_qtype) // max(rows, 1)
    if raw.shape[1] != expect:
        raise QuantError(
            f"tensor of shape {shape} in {qtype_info(from_qtype).name} needs "
            f"{expect} bytes per row, got {raw.shape[1]}"
        )
    if from_qtype == to_qtype:
        return raw
    out = np.empty((rows, tensor_nbytes((1, row), to_qtype)), np.uint8)
    step = max(1, _ROWS_ELEMS // max(row, 1))
    for s in range(0, rows, step):
        x = dequantize_np(np.asarray(raw[s : s + step]), from_qtype, row)
        out[s : s + step] = encode(x, s)
    return out


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]
    from_type: str
    to_type: str
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeReport:
    out_path: str
    ftype: str
    tensors: list[TensorReport]
    n_elements: int
    file_size: int
    fallbacks: list[str]
    unmatched_overrides: list[str]
    # tensors quantized without importance weights although an imatrix was given
    imatrix_missing: list[str] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors)

    @property
    def bpw_before(self) -> float:
        return 8.0 * self.bytes_before / max(1, self.n_elements)

    @property
    def bpw_after(self) -> float:
        return 8.0 * self.bytes_after / max(1, self.n_elements)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.to_type] = out.get(t.to_type, 0) + 1
        return out


def output_metadata(
    metadata: dict[str, Any], types: dict[str, tuple[ValueType, ValueType | None]], ftype_id: int
) -> tuple[dict[str, Any], dict[str, tuple[ValueType, ValueType | None]]]:
    """llama-quantize's metadata edit: split keys dropped, version and file type (re)set last."""
    md = {k: v for k, v in metadata.items() if k not in _SPLIT_KEYS}
    mt = {k: v for k, v in types.items() if k in md}
    for key, val in (
        ("general.quantization_version", GGML_QNT_VERSION),
        ("general.file_type", ftype_id),
    ):
        md.pop(key, None)
        md[key] = val
        mt[key] = (ValueType.UINT32, None)
    return md, mt


def quantize_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    spec: MixSpec,
    allow_requantize: bool = False,
    on_tensor: Callable[[TensorReport], None] | None = None,
    imatrix: QuantImatrix | None = None,
) -> QuantizeReport:
    """Quantize ``in_path`` to ``out_path`` with the mix ``spec``; returns what was done.

    ``imatrix``: importance weights (``jllama.quant.imatrix.load_for_quantize``); as in
    llama-quantize, one left empty by --include/--exclude-weights counts as none."""
    src = read_gguf(in_path)
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise QuantError("output file must differ from the input file")
    if imatrix is not None and not imatrix.weights:
        imatrix = None
    if imatrix is not None:
        for name, w in imatrix.weights.items():
            if not np.isfinite(w).all():
                raise QuantError(f"imatrix contains non-finite values ({name})")
        spec = replace(spec, has_imatrix=True)
    plan: Plan = plan_from_tensors(
        {n: (t.shape, t.qtype) for n, t in src.tensors.items()}, src.metadata, spec
    )
    check_imatrix(plan, spec)  # llama-quantize refuses before it reads any data
    for name, new in plan.types.items():
        t = src.tensors[name]
        if int(new) != t.qtype and is_quantized(t.qtype) and not allow_requantize:
            raise QuantError(
                f"requantizing from type {t.type_name} is disabled ({name}); "
                "pass --allow-requantize to decode and re-encode it"
            )
    md, mt = output_metadata(src.metadata, src.metadata_types, spec.ftype_id)
    if imatrix is not None:
        for key, val, vt in quantize_metadata(imatrix):
            md.pop(key, None)  # gguf_set_val_*: the key moves to the end
            md[key] = val
            mt[key] = (vt, None)

    reports: dict[str, TensorReport] = {}
    specs: list[TensorSpec] = []
    missing: list[str] = []
    for name, new in plan.types.items():
        t = src.tensors[name]
        rep = TensorReport(
            name, t.shape, t.type_name, QType(new).name, t.nbytes, tensor_nbytes(t.shape, new)
        )
        reports[name] = rep
        qw = None
        if imatrix is not None and int(new) != t.qtype:
            qw = imatrix.weights.get(name)
            n_want = t.shape[-1] * (t.shape[-3] if len(t.shape) >= 3 else 1)
            if qw is None:
                missing.append(name)
            elif qw.size != n_want:
                if name not in ("token_embd.weight", "per_layer_token_embd.weight"):
                    raise QuantError(
                        f"imatrix size {qw.size} is different from tensor size {n_want} for {name}"
                    )
                qw = None

        def produce(t=t, new=new, qw=qw) -> np.ndarray:
            return quantize_tensor(t.data, t.qtype, int(new), t.shape, qw)

        specs.append(TensorSpec(name, t.shape, int(new), produce))

    def done(ts: TensorSpec) -> None:
        if on_tensor is not None:
            on_tensor(reports[ts.name])

    size = write_gguf(out_path, md, specs, mt, on_tensor=done)
    n_el = sum(t.n_elements for t in src.tensors.values())
    return QuantizeReport(
        str(out_path),
        spec.ftype,
        list(reports.values()),
        n_el,
        size,
        plan.fallbacks,
        plan.unmatched_overrides,
        missing,
    )


def quantize_on_load(gguf_file: Any, quant: MixSpec | str | dict[str, Any]):
    """A ``load_weights`` transform that re-encodes tensors to the mix ``quant`` while loading.

    ``quant`` is a MixSpec, a base name ('q4_k_m', 'q8_0', 'q5_k'), or the YAML mapping of
    ``mix_from_dict`` with one extra key, ``allow_requantize`` (default true here: asking for a
    mix on load is asking to re-encode already-quantized weights). Returns
    ``transform(name, raw, qtype, shape) -> (raw, qtype)``; the bytes are what
    ``jllama quantize`` (and llama-quantize) would write.
    """
    allow = True
    if isinstance(quant, MixSpec):
        spec = quant
    elif isinstance(quant, str):
        spec = mix_from_base(quant)
    else:
        d = dict(quant)
        allow = bool(d.pop("allow_requantize", True))
        spec = mix_from_dict(d, "quant")
    types = plan_types(gguf_file, spec)
    if not allow:
        for name, new in types.items():
            cur = gguf_file.tensors[name].qtype
            if new != cur and is_quantized(cur):
                raise QuantError(
                    f"quant: requantizing from type {qtype_info(cur).name} is disabled ({name}); "
                    "set allow_requantize: true"
                )

    def transform(name: str, raw: Any, qtype: int, shape: tuple[int, ...]) -> tuple[Any, int]:
        new = types.get(name, int(qtype))
        if new == int(qtype):
            return raw, qtype
        return quantize_tensor(raw, qtype, new, shape), new

    return transform
