"""Quantize a GGUF model file, as ``llama-quantize`` does (optionally with an importance matrix,
whose column weights go to ggml's weighted quantizers: quant/imatrix.py).

The tensor -> type map comes from ``mixes``; each tensor is decoded to float32 and re-encoded by
the reference quantizers in ``quantizers``, streamed into the atomic GGUF writer one tensor at a
time, in llama.cpp's tensor order and with its metadata changes (``general.file_type``,
``general.quantization_version``, no split keys). Tensors whose type does not change are copied
byte for byte. A tensor's rows are quantized in chunks on a thread pool (numpy releases the GIL
in its loops); every row is encoded on its own, so the bytes do not depend on the thread count.
llama-quantize's other parameters are here too: kv overrides, pruned layers, --dry-run,
--keep-split on a single file, --leave-output-tensor and COPY (MixSpec), the buffer bound.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from jllama.errors import QuantError
from jllama.gguf.constants import QType, ValueType, qtype_info
from jllama.gguf.overrides import apply_kv_overrides
from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import TensorSpec, tensor_nbytes, write_gguf
from jllama.quant.formats import dequantize_np
from jllama.quant.imatrix import QuantImatrix, quantize_metadata
from jllama.quant.mixes import (
    MixSpec,
    Plan,
    check_imatrix,
    llama_order,
    mix_from_base,
    mix_from_dict,
    plan_from_tensors,
    plan_types,
    requires_imatrix,
)
from jllama.quant.quantizers import quantize_np

GGML_QNT_VERSION = 2
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_ROWS_ELEMS = 1 << 22  # elements converted per slice: bounds the float32 temporaries
_MIN_CHUNK = 32 * 512  # llama-quantize's smallest chunk of elements per thread


def is_quantized(qtype: int) -> bool:
    """Block types (what llama-quantize refuses to requantize without the flag)."""
    return qtype_info(qtype).block_size > 1


def default_threads() -> int:
    """llama-quantize's default thread count (std::thread::hardware_concurrency), counted as the
    CPUs this process may run on (a container's or taskset's limit, not the host's cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _row_jobs(rows: int, row: int, row_bytes: int, nthread: int, max_buf_size: int | None):
    """Row ranges [s, e) for the workers. Every row is quantized on its own (ggml's quantizers
    are per row), so any split gives the same bytes; the split only sets speed and memory."""
    slab = max(1, _ROWS_ELEMS // max(row, 1))
    if max_buf_size:  # llama-quantize's --max-buffer-size: bytes in flight for all workers
        slab = min(slab, max(1, int(max_buf_size) // max(1, row_bytes * nthread)))
    per = slab
    if nthread > 1:
        # at least llama-quantize's chunk (32*512 elements): smaller ones cost more in numpy's
        # per-call overhead than the second thread brings
        per = min(slab, max(-(-_MIN_CHUNK // max(row, 1)), -(-rows // nthread)))
    return [(s, min(rows, s + per)) for s in range(0, rows, per)]


def quantize_tensor(
    data: np.ndarray,
    from_qtype: int,
    to_qtype: int,
    shape: tuple[int, ...],
    imatrix: np.ndarray | None = None,
    nthread: int = 1,
    max_buf_size: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """Re-encode one tensor: raw GGUF bytes of type ``from_qtype`` (or a float array) of logical
    ``shape`` (numpy order) -> uint8 ``[rows, row_bytes]`` of ``to_qtype``.

    ``imatrix``: the column weights, ``shape[-1]`` of them per matrix (for a 3-D expert tensor
    ``[n_expert, rows, cols]``, one slice per expert, as llama-quantize hands them out).
    ``nthread``: row chunks quantized concurrently (numpy releases the GIL in its loops); the
    bytes do not depend on it. ``max_buf_size``: bytes of rows in flight at once (bounds the
    float temporaries, as llama-quantize's --max-buffer-size). ``pool``: an executor to reuse.
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

        def rows_of(s: int, e: int) -> np.ndarray:
            return x[s:e]

        src_row_bytes = 4 * row
    else:
        raw = data.reshape(rows, -1)
        expect = tensor_nbytes((rows, row), from_qtype) // max(rows, 1)
        if raw.shape[1] != expect:
            raise QuantError(
                f"tensor of shape {shape} in {qtype_info(from_qtype).name} needs "
                f"{expect} bytes per row, got {raw.shape[1]}"
            )
        if from_qtype == to_qtype:
            return raw

        def rows_of(s: int, e: int) -> np.ndarray:
            return dequantize_np(np.asarray(raw[s:e]), from_qtype, row)

        src_row_bytes = expect
    out = np.empty((rows, tensor_nbytes((1, row), to_qtype)), np.uint8)
    nthread = max(1, int(nthread))
    jobs = _row_jobs(rows, row, src_row_bytes + out.shape[1] + 4 * row, nthread, max_buf_size)

    def work(job: tuple[int, int]) -> None:
        s, e = job
        out[s:e] = encode(rows_of(s, e), s)

    if nthread == 1 or len(jobs) == 1:
        for job in jobs:
            work(job)
    elif pool is not None:
        list(pool.map(work, jobs))  # list(): re-raises a worker's exception here
    else:
        with ThreadPoolExecutor(min(nthread, len(jobs))) as own:
            list(own.map(work, jobs))
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
    # --dry-run: the real run would refuse for want of an importance matrix
    will_require_imatrix: bool = False

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


# llama_model_loader's guess of a file type from its most common tensor type (COPY keeps the
# input's general.file_type, or this guess with LLAMA_FTYPE_GUESSED when the key is missing)
_GUESSED_FTYPE = {
    "F32": 0, "F16": 1, "BF16": 32, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7,
    "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "TQ1_0": 36, "TQ2_0": 37,
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ3_XXS": 23, "IQ1_S": 24, "IQ1_M": 31,
    "IQ4_NL": 25, "IQ4_XS": 30, "IQ3_S": 26, "NVFP4": 39, "Q1_0": 40, "Q2_0": 41,
}  # fmt: skip
_FTYPE_GUESSED = 1024
_BLK_RE = re.compile(r"blk\.(\d+)\.")


def _input_ftype(src: Any, names: list[str]) -> int:
    if "general.file_type" in src.metadata:
        return int(src.metadata["general.file_type"])
    counts: dict[str, int] = {}
    best, best_n = "F32", 0
    for n in names:  # the loader's walk: the first type to reach the highest count wins
        t = src.tensors[n].type_name
        counts[t] = counts.get(t, 0) + 1
        if counts[t] > best_n:
            best, best_n = t, counts[t]
    return _GUESSED_FTYPE.get(best, 0) | _FTYPE_GUESSED


def prune_names(names: list[str], prune: list[int]) -> tuple[dict[str, str], int]:
    """llama-quantize's --prune-layers (remap_layer): tensors of the pruned blocks dropped, the
    blocks after them renumbered to close the gap. ``names`` in llama.cpp's order; returns
    new name -> old name for the kept tensors and the new block count."""
    prune = sorted(set(prune))
    mapped: dict[int, str] = {}
    next_id = 0
    out: dict[str, str] = {}
    for name in names:
        m = _BLK_RE.search(name)
        if not m or not prune:
            out[name] = name
            continue
        blk = int(m.group(1))
        if blk not in mapped:
            if blk in prune:
                mapped[blk] = ""
            elif blk < prune[0]:
                mapped[blk], next_id = str(blk), blk + 1
            else:
                mapped[blk], next_id = str(next_id), next_id + 1
        if mapped[blk]:
            out[name[: m.start(1)] + mapped[blk] + name[m.end(1) :]] = name
    return out, next_id


def kv_override_value(val: bool | int | float | str) -> tuple[Any, ValueType]:
    """How llama_model_quantize writes a kv override into the output: int as uint32 of its
    absolute value (llama.cpp #14182), float as float32, bool, str."""
    if isinstance(val, bool):
        return val, ValueType.BOOL
    if isinstance(val, int):
        return abs(val) & 0xFFFFFFFF, ValueType.UINT32
    if isinstance(val, float):
        return val, ValueType.FLOAT32
    return str(val), ValueType.STRING


def split_path(prefix: str | os.PathLike[str], split_no: int, split_count: int) -> str:
    """llama_split_path: PREFIX-00001-of-00003.gguf (split_no counts from 0)."""
    return f"{prefix}-{split_no + 1:05d}-of-{split_count:05d}.gguf"


def quantize_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None,
    spec: MixSpec,
    allow_requantize: bool = False,
    on_tensor: Callable[[TensorReport], None] | None = None,
    imatrix: QuantImatrix | None = None,
    *,
    nthread: int | None = None,
    kv_overrides: list[tuple[str, bool | int | float | str]] | None = None,
    prune_layers: list[int] | None = None,
    dry_run: bool = False,
    keep_split: bool = False,
    max_buf_size: int | None = None,
) -> QuantizeReport:
    """Quantize ``in_path`` to ``out_path`` with the mix ``spec``; returns what was done
    (llama_model_quantize with the same parameters writes the same bytes).

    ``imatrix``: importance weights (``jllama.quant.imatrix.load_for_quantize``); as in
    llama-quantize, one left empty by --include/--exclude-weights counts as none.
    ``nthread``: worker threads (None or <= 0: the CPUs this process may use); the bytes do not
    depend on it. ``kv_overrides``: (key, value) pairs set in the output's metadata, in order
    (``jllama.gguf.overrides.parse_kv_override`` reads llama.cpp's KEY=TYPE:VALUE).
    ``prune_layers``: block numbers to drop (the rest renumbered). ``dry_run``: plan and sizes
    only, nothing written (``out_path`` may be None). ``keep_split``: write
    ``out_path-00001-of-00001.gguf`` as llama-quantize does (split inputs are not read here).
    ``max_buf_size``: bytes of tensor rows in flight (memory only, not the result)."""
    src = read_gguf(in_path)
    n_split = int(src.metadata.get("split.count", 1) or 1)
    if n_split > 1:
        raise QuantError(
            f"{in_path} is shard 1 of a {n_split}-file split model; jllama quantizes single "
            "files: merge it first (llama-gguf-split --merge)"
        )
    if keep_split and out_path is not None:
        out_path = split_path(out_path, 0, 1)
    if not dry_run:
        if out_path is None:
            raise QuantError("no output file given")
        same = os.path.abspath(in_path) == os.path.abspath(out_path)
        if not same and os.path.exists(out_path):
            same = os.path.samefile(in_path, out_path)
        if same:
            raise QuantError(f"input and output files are the same: '{in_path}'")
    nthread = default_threads() if not nthread or nthread <= 0 else int(nthread)
    if imatrix is not None and not imatrix.weights:
        imatrix = None
    if imatrix is not None:
        for name, w in imatrix.weights.items():
            if not np.isfinite(w).all():
                raise QuantError(f"imatrix contains non-finite values ({name})")
        spec = replace(spec, has_imatrix=True)
    overrides = list(kv_overrides or [])
    # llama.cpp's loader reads the model's hyperparameters through the overrides too
    arch = str(src.metadata.get("general.architecture", ""))
    hp = {k: v for k, v in overrides if k.startswith(f"{arch}.")}
    model_md = apply_kv_overrides(src, hp).metadata if hp else src.metadata
    names = llama_order(list(src.tensors))
    renamed, n_block = prune_names(names, list(prune_layers or []))
    if keep_split:  # llama-quantize then walks and writes the tensors in the input's order
        renamed = dict(sorted(renamed.items(), key=lambda kv: src.tensors[kv[1]].offset))
    plan: Plan = plan_from_tensors(
        {n: (src.tensors[o].shape, src.tensors[o].qtype) for n, o in renamed.items()},
        model_md,
        spec,
        keep_order=keep_split,
    )
    will_require_imatrix = False
    if dry_run:
        will_require_imatrix = not spec.has_imatrix and any(
            plan.quantized.get(n) and requires_imatrix(n, t, spec.ftype)
            for n, t in plan.types.items()
        )
    else:
        check_imatrix(plan, spec)  # llama-quantize refuses before it reads any data
        for name, new in plan.types.items():
            t = src.tensors[renamed[name]]
            if int(new) != t.qtype and is_quantized(t.qtype) and not allow_requantize:
                raise QuantError(
                    f"requantizing from type {t.type_name} is disabled ({name}); "
                    "pass --allow-requantize to decode and re-encode it"
                )
    ftype_id = _input_ftype(src, names) if spec.only_copy else spec.ftype_id
    md, mt = output_metadata(src.metadata, src.metadata_types, ftype_id)
    extra = [(k, *kv_override_value(v)) for k, v in overrides]
    if imatrix is not None:
        extra += list(quantize_metadata(imatrix))
    if prune_layers:
        extra.append((f"{arch}.block_count", n_block, ValueType.UINT32))
    for key, val, vt in extra:
        md.pop(key, None)  # gguf_set_val_*: the key moves to the end
        md[key] = val
        mt[key] = (vt, None)

    reports: dict[str, TensorReport] = {}
    specs: list[TensorSpec] = []
    missing: list[str] = []
    pool = ThreadPoolExecutor(nthread) if nthread > 1 and not dry_run else None
    for name, new in plan.types.items():
        t = src.tensors[renamed[name]]
        rep = TensorReport(
            name, t.shape, t.type_name, QType(new).name, t.nbytes, tensor_nbytes(t.shape, new)
        )
        reports[name] = rep
        qw = None
        if imatrix is not None and int(new) != t.qtype and not dry_run:
            qw = imatrix.weights.get(t.name)  # the pre-pruning name (remap_imatrix)
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
            return quantize_tensor(
                t.data, t.qtype, int(new), t.shape, qw, nthread, max_buf_size, pool
            )

        specs.append(TensorSpec(name, t.shape, int(new), produce))

    def done(ts: TensorSpec) -> None:
        if on_tensor is not None:
            on_tensor(reports[ts.name])

    size = 0
    try:
        if dry_run:
            for ts in specs:
                done(ts)
        else:
            size = write_gguf(out_path, md, specs, mt, on_tensor=done)
    finally:
        if pool is not None:
            pool.shutdown()
    n_el = sum(t.n_elements for t in src.tensors.values())
    return QuantizeReport(
        "" if dry_run else str(out_path),
        "COPY" if spec.only_copy else spec.ftype,
        list(reports.values()),
        n_el,
        size,
        plan.fallbacks,
        plan.unmatched_overrides,
        missing,
        will_require_imatrix,
    )


def quantize_on_load(
    gguf_file: Any, quant: MixSpec | str | dict[str, Any], nthread: int | None = None
):
    """A ``load_weights`` transform that re-encodes tensors to the mix ``quant`` while loading.

    ``quant`` is a MixSpec, a base name ('q4_k_m', 'q8_0', 'q5_k'), or the YAML mapping of
    ``mix_from_dict`` with one extra key, ``allow_requantize`` (default true here: asking for a
    mix on load is asking to re-encode already-quantized weights). Returns
    ``transform(name, raw, qtype, shape) -> (raw, qtype)``; the bytes are what
    ``jllama quantize`` (and llama-quantize) would write. ``nthread``: threads per tensor
    (None: the CPUs this process may use), as ``quantize_file``.
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
    threads = default_threads() if not nthread or nthread <= 0 else int(nthread)
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
        return quantize_tensor(raw, qtype, new, shape, nthread=threads), new

    return transform
