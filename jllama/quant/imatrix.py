"""Importance matrices: llama-imatrix's files (GGUF and the legacy ``.dat``), the collection rule,
and the per-column weights llama-quantize derives from them.

An entry per matmul weight holds ``sums`` (the running sum, over every token that went through
the weight, of each input column's squared activation; one row of columns per expert for MoE
tensors) and ``counts`` (how many tokens were summed, per expert). llama-quantize gives the
quantizers ``sums / count`` (1 where an expert never saw a token).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from jllama.errors import QuantError
from jllama.gguf.constants import QType, ValueType
from jllama.gguf.writer import TensorSpec, write_gguf

F32 = np.float32
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat * n_cols]: expert e's columns at [e*n_cols, (e+1)*n_cols)
    counts: np.ndarray  # int64 [n_mat]: tokens summed (legacy files: [ncall])

    @property
    def n_mat(self) -> int:
        return int(self.counts.shape[0])


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: sums are per-call means times ncall
    has_metadata: bool = True


# ----------------------------------------------------------------------------- reading


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """A GGUF imatrix, or else a legacy ``.dat`` one (as llama.cpp's common_imatrix_load)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantError(f"cannot read imatrix {path}: {e.strerror or e}") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: str) -> Imatrix:
    from jllama.gguf.reader import read_gguf

    g = read_gguf(path)
    if not g.tensors:
        raise QuantError(f"no data in imatrix file {path}")
    md = g.metadata
    ds = md.get(KV_DATASETS)
    datasets = [str(s) for s in ds] if isinstance(ds, list) else []
    out = Imatrix(
        datasets=datasets,
        chunk_count=int(md.get(KV_CHUNK_COUNT, 0)),
        chunk_size=int(md.get(KV_CHUNK_SIZE, 0)),
        has_metadata=all(k in md for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE)),
    )
    pairs: dict[str, list] = {}
    for name, t in g.tensors.items():
        for i, suffix in enumerate((SUMS_SUFFIX, COUNTS_SUFFIX)):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[i] = t
    for name in sorted(pairs):
        s, c = pairs[name]
        if s is None or c is None:
            raise QuantError(f"{path}: mismatched sums and counts for {name}")
        if s.qtype != int(QType.F32) or c.qtype != int(QType.F32):
            raise QuantError(f"{path}: sums and counts for {name} must be F32")
        sums = np.frombuffer(np.asarray(s.data).tobytes(), "<f4").astype(F32)
        cf = np.frombuffer(np.asarray(c.data).tobytes(), "<f4").astype(np.float64)
        counts = np.trunc(cf + np.copysign(0.5, cf)).astype(np.int64)  # lround
        if counts.size == 0 or sums.size % counts.size:
            raise QuantError(f"{path}: {name} has {sums.size} sums for {counts.size} counts")
        out.entries[name] = ImatrixEntry(sums, counts)
    return out


def _read_legacy(path: str) -> Imatrix:
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(buf):
            raise QuantError(f"{path}: not an imatrix file (truncated reading {what})")
        v = struct.unpack_from(fmt, buf, pos)
        pos += n
        return v

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1:
        raise QuantError(f"no data in imatrix file {path}")
    out = Imatrix(legacy=True, has_metadata=False)
    for i in range(n_entries):
        (ln,) = take("<i", f"entry {i + 1}'s name length")
        if ln < 0 or pos + ln > len(buf):
            raise QuantError(f"{path}: failed reading name for entry {i + 1}")
        name = buf[pos : pos + ln].split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii", f"entry {i + 1}'s sizes")
        if nval < 1:
            raise QuantError(f"{path}: failed reading number of values for entry {i}")
        if pos + 4 * nval > len(buf):
            raise QuantError(f"{path}: failed reading data for entry {i}")
        sums = np.frombuffer(buf, "<f4", nval, pos).astype(F32)
        pos += 4 * nval
        out.entries[name] = ImatrixEntry(sums, np.array([ncall], np.int64))
    if pos < len(buf):  # the chunk count and dataset name are optional
        if pos + 4 <= len(buf):
            (out.chunk_count,) = take("<i", "the chunk count")
            if pos + 4 <= len(buf):
                (ln,) = take("<i", "the dataset name length")
                if ln > 0 and pos + ln <= len(buf):
                    out.datasets.append(buf[pos : pos + ln].split(b"\0", 1)[0].decode())
    return out


# ----------------------------------------------------------------------------- writing


def _sorted_names(names) -> list[str]:
    return sorted(names, key=lambda s: s.encode())  # std::sort on std::string: byte order


def write_imatrix_gguf(path: str | os.PathLike[str], im: Imatrix) -> int:
    """llama-imatrix's GGUF output (``save_imatrix``): raw sums and counts per entry."""
    md = {
        "general.type": "imatrix",
        KV_DATASETS: list(im.datasets),
        KV_CHUNK_COUNT: int(im.chunk_count),
        KV_CHUNK_SIZE: int(im.chunk_size),
    }
    types = {
        KV_DATASETS: (ValueType.ARRAY, ValueType.STRING),
        KV_CHUNK_COUNT: (ValueType.UINT32, None),
        KV_CHUNK_SIZE: (ValueType.UINT32, None),
    }
    specs = []
    for name in _sorted_names(im.entries):
        e = im.entries[name]
        nmat = e.n_mat
        if e.sums.size == 0 or nmat == 0:
            continue
        ncol = e.sums.size // nmat
        # ggml drops trailing dimensions of 1 from what it writes
        s_shape = (nmat, ncol) if nmat > 1 else (ncol,)
        c_shape = (nmat, 1) if nmat > 1 else (1,)
        sums = np.ascontiguousarray(e.sums, "<f4")
        counts = e.counts.astype("<f4")
        specs.append(
            TensorSpec(name + SUMS_SUFFIX, s_shape, int(QType.F32), lambda a=sums: a.view(np.uint8))
        )
        specs.append(
            TensorSpec(
                name + COUNTS_SUFFIX, c_shape, int(QType.F32), lambda a=counts: a.view(np.uint8)
            )
        )
    return write_gguf(path, md, specs, types)


def legacy_values(e: ImatrixEntry, chunk_size: int) -> tuple[int, np.ndarray]:
    """(ncall, values) as ``save_imatrix_legacy`` stores an entry: per-token means times the
    number of chunks (rounded up), 1 for experts that saw no token."""
    ncall = int((int(e.counts.max()) + chunk_size - 1) // chunk_size)
    per = e.sums.size // e.n_mat
    count = np.repeat(e.counts.astype(F32), per)
    empty = count == 0
    value = np.where(empty, F32(1), e.sums)
    count = np.where(empty, F32(1), count)
    return ncall, ((value / count).astype(F32) * F32(ncall)).astype(F32)


def write_imatrix_dat(path: str | os.PathLike[str], im: Imatrix) -> list[str]:
    """llama-imatrix's legacy output (``--output-format dat``). Entries with no data at all are
    left out (returned, for the warning)."""
    if im.chunk_size <= 0:
        raise QuantError("writing a .dat imatrix needs the chunk size (the -c it was made with)")
    skipped = [n for n, e in im.entries.items() if e.n_mat == 0 or not e.counts.any()]
    names = _sorted_names(n for n in im.entries if n not in skipped)
    parts = [struct.pack("<i", len(names))]
    for name in names:
        ncall, vals = legacy_values(im.entries[name], im.chunk_size)
        b = name.encode()
        parts += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.size)]
        parts.append(np.ascontiguousarray(vals, "<f4").tobytes())
    parts.append(struct.pack("<i", int(im.chunk_count)))
    ds = im.datasets[-1].encode() if im.datasets else b""
    parts += [struct.pack("<i", len(ds)), ds]
    tmp = os.fspath(path) + ".partial"
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
        os.replace(tmp, path)
    except OSError as e:
        raise QuantError(f"cannot write {path}: {e.strerror or e}") from None
    return skipped


def write_imatrix(path: str | os.PathLike[str], im: Imatrix, fmt: str = "gguf") -> None:
    if fmt == "dat":
        write_imatrix_dat(path, im)
    elif fmt == "gguf":
        write_imatrix_gguf(path, im)
    else:
        raise QuantError(f"unknown imatrix output format '{fmt}' (gguf or dat)")


# ----------------------------------------------------------------------------- merging


def merge_into(acc: Imatrix, other: Imatrix, chunk_size: int) -> None:
    """Add ``other`` to ``acc`` as ``llama-imatrix --in-file`` does (``chunk_size`` = this run's
    -c: a legacy file's means are scaled back to sums with it)."""
    for name, e in other.entries.items():
        a = acc.entries.get(name)
        if other.legacy:
            if a is None:
                a = acc.entries[name] = ImatrixEntry(
                    np.zeros(e.sums.size, F32), np.zeros(1, np.int64)
                )
            a.sums = (a.sums + e.sums * F32(chunk_size)).astype(F32)
            a.counts = a.counts + int(e.counts[0]) * chunk_size
            continue
        if a is None:
            a = acc.entries[name] = ImatrixEntry(
                np.zeros(e.sums.size, F32), np.zeros(e.n_mat, np.int64)
            )
        elif a.sums.size != e.sums.size:
            raise QuantError(f"mismatched sums size for {name}: {e.sums.size} != {a.sums.size}")
        if a.n_mat == 1 and e.n_mat > 1:
            a.counts = np.full(e.n_mat, a.counts[0], np.int64)
        elif a.n_mat != e.n_mat:
            raise QuantError(f"mismatched counts size for {name}: {e.n_mat} != {a.n_mat}")
        a.sums = (a.sums + e.sums).astype(F32)
        a.counts = a.counts + e.counts
    acc.datasets += other.datasets
    acc.chunk_size = chunk_size
    mx = max((int(e.counts.max()) for e in acc.entries.values() if e.n_mat), default=0)
    acc.chunk_count = mx // chunk_size if chunk_size > 0 else 0


# ----------------------------------------------------------------------------- collecting


class ImatrixCollector:
    """llama-imatrix's ``collect_imatrix``: for each weight, the running f32 sum of squared input
    activations per column (token after token, as ggml's loop adds them) and the token counts."""

    def __init__(self, chunk_size: int, base: Imatrix | None = None):
        self.chunk_size = int(chunk_size)
        self.im = base if base is not None else Imatrix()
        self.im.chunk_size = self.chunk_size

    def _entry(self, name: str, ncol: int, n_mat: int) -> ImatrixEntry:
        e = self.im.entries.get(name)
        if e is None:
            e = self.im.entries[name] = ImatrixEntry(
                np.zeros(ncol * n_mat, F32), np.zeros(n_mat, np.int64)
            )
        elif e.sums.size != ncol * n_mat:
            raise QuantError(f"inconsistent size for {name} ({e.sums.size} vs {ncol * n_mat})")
        return e

    @staticmethod
    def _accumulate(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
        sq = np.asarray(x, F32) ** 2
        return np.cumsum(np.concatenate([acc[None], sq]), axis=0, dtype=F32)[-1]

    def add_dense(self, name: str, x: np.ndarray) -> None:
        """``x [tokens, n_cols]``: the activations that entered the weight ``name``."""
        x = np.asarray(x, F32).reshape(-1, np.shape(x)[-1])
        e = self._entry(name, x.shape[1], 1)
        if e.n_mat > 1 and (e.counts == e.counts[0]).all():
            e.counts = e.counts[:1].copy()  # one count per dense tensor
        e.sums = self._accumulate(e.sums, x)
        e.counts = e.counts + x.shape[0]
        self._note_chunks(e)

    def add_experts(self, name: str, x: np.ndarray, ids: np.ndarray, n_expert: int) -> None:
        """MoE: ``x [tokens, n_used or 1, n_cols]`` entering the experts ``ids [tokens, n_used]``
        (ggml's mul_mat_id: one row per (token, slot), sums and counts per expert)."""
        x = np.asarray(x, F32)
        ids = np.asarray(ids).astype(np.int64)
        T, U = ids.shape
        ncol = x.shape[-1]
        x = x.reshape(T, -1, ncol)
        e = self._entry(name, ncol, n_expert)
        if e.n_mat == 1 and n_expert > 1:
            e.counts = np.full(n_expert, e.counts[0], np.int64)
        sums = e.sums.reshape(n_expert, ncol).copy()
        # ggml walks the slots outermost, tokens inside: keep that order per expert
        for ex in np.unique(ids):
            rows = [x[t, u % x.shape[1]] for u in range(U) for t in range(T) if ids[t, u] == ex]
            sums[ex] = self._accumulate(sums[ex], np.stack(rows))
            e.counts[ex] += len(rows)
        if not np.isfinite(sums).all():
            raise QuantError(f"non-finite values detected in {name}")
        e.sums = sums.reshape(-1)
        self._note_chunks(e)

    def _note_chunks(self, e: ImatrixEntry) -> None:
        if self.chunk_size > 0:
            self.im.chunk_count = max(self.im.chunk_count, int(e.counts.max()) // self.chunk_size)


# ----------------------------------------------------------------------------- llama-quantize


def quantize_weights(im: Imatrix, path: str = "") -> dict[str, np.ndarray]:
    """Name -> float32 column weights, as llama-quantize's ``load_imatrix`` turns a file into
    what the quantizers get (MoE tensors: ``n_expert * n_cols`` values, expert after expert)."""
    if not im.legacy and not im.has_metadata:
        raise QuantError(f"missing imatrix metadata in file {path}")
    out: dict[str, np.ndarray] = {}
    for name, e in im.entries.items():
        if not im.legacy:
            per = e.sums.size // e.n_mat
            c = np.repeat(e.counts.astype(F32), per)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = np.where(c > 0, e.sums / np.where(c > 0, c, F32(1)), F32(1)).astype(F32)
        else:
            ncall = int(e.counts[0]) if e.n_mat else 0
            out[name] = (e.sums / F32(ncall)).astype(F32) if ncall > 0 else e.sums.copy()
    return out


def select_weights(
    weights: dict[str, np.ndarray], include: list[str] = (), exclude: list[str] = ()
) -> dict[str, np.ndarray]:
    """``--exclude-weights`` then ``--include-weights``: substrings of the entry names."""
    out = {n: w for n, w in weights.items() if not any(s in n for s in exclude)}
    if include:
        out = {n: w for n, w in out.items() if any(s in n for s in include)}
    return out


@dataclass
class QuantImatrix:
    """What ``llama-quantize --imatrix F`` takes from the file."""

    weights: dict[str, np.ndarray]  # after --include/--exclude-weights
    file: str  # as given on the command line (it is written into the model's metadata)
    datasets: list[str]
    chunk_count: int
    n_loaded: int  # entries in the file


def load_for_quantize(
    path: str | os.PathLike[str], include: list[str] = (), exclude: list[str] = ()
) -> QuantImatrix:
    im = read_imatrix(path)
    w = quantize_weights(im, os.fspath(path))
    return QuantImatrix(
        select_weights(w, include, exclude), os.fspath(path), im.datasets, im.chunk_count, len(w)
    )


def quantize_metadata(qi: QuantImatrix) -> list[tuple[str, object, ValueType]]:
    """The keys llama-quantize adds to the model (``quantize.imatrix.*``), in its order; its
    string overrides hold at most 127 bytes."""

    def s127(v: str) -> str:
        return v.encode()[:127].decode("utf-8", "ignore")

    out: list[tuple[str, object, ValueType]] = [
        ("quantize.imatrix.file", s127(qi.file), ValueType.STRING)
    ]
    if qi.datasets:
        out.append(("quantize.imatrix.dataset", s127(qi.datasets[0]), ValueType.STRING))
    out.append(("quantize.imatrix.entries_count", len(qi.weights), ValueType.UINT32))
    if qi.chunk_count > 0:
        out.append(("quantize.imatrix.chunks_count", qi.chunk_count, ValueType.UINT32))
    return out
