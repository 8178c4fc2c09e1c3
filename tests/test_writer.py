"""GGUF writer: byte-identical re-writes, typed metadata (checked with gguf-py's reader), and
no partial file on failure."""

from __future__ import annotations

import errno
import filecmp
import os
import stat

import gguf
import numpy as np
import pytest

from jllama.errors import GGUFError, JllamaError
from jllama.gguf.constants import QType, ValueType
from jllama.gguf.reader import read_gguf
from jllama.gguf.writer import TensorSpec, write_gguf


def _specs(g):
    return [TensorSpec(t.name, t.shape, t.qtype, lambda t=t: t.data) for t in g.tensors.values()]


def test_rewrite_of_real_model_is_byte_identical(smollm2_path, tmp_path) -> None:
    g = read_gguf(smollm2_path)
    out = tmp_path / "copy.gguf"
    size = write_gguf(out, g.metadata, _specs(g), g.metadata_types)
    assert size == os.path.getsize(out) == os.path.getsize(smollm2_path)
    assert filecmp.cmp(smollm2_path, out, shallow=False)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.gguf"]  # no temp file left


def test_metadata_types_and_tensors_read_back_by_gguf_py(tmp_path) -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, size=(4, 2 * 18), dtype=np.uint8)  # 4 rows of Q4_0 x 64
    e = rng.standard_normal(7).astype(np.float32)
    meta = {
        "general.architecture": "llama",
        "general.alignment": 64,
        "a.u8": 7,
        "a.i16": -3,
        "a.f64": 0.1,
        "a.bool": True,
        "a.strs": ["x", "ü", ""],
        "a.f32s": [1.5, -2.0],
        "new.int": 5,
        "new.float": 0.25,
    }
    types = {
        "general.architecture": (ValueType.STRING, None),
        "general.alignment": (ValueType.UINT32, None),
        "a.u8": (ValueType.UINT8, None),
        "a.i16": (ValueType.INT16, None),
        "a.f64": (ValueType.FLOAT64, None),
        "a.bool": (ValueType.BOOL, None),
        "a.strs": (ValueType.ARRAY, ValueType.STRING),
        "a.f32s": (ValueType.ARRAY, ValueType.FLOAT32),
    }
    tensors = [
        TensorSpec("w", (4, 64), int(QType.Q4_0), lambda: w),
        TensorSpec("e", (7,), int(QType.F32), lambda: e.view(np.uint8)),
    ]
    out = tmp_path / "t.gguf"
    write_gguf(out, meta, tensors, types)

    r = gguf.GGUFReader(out)
    fields = {f.name: f for f in r.fields.values()}
    want = {**{k: v[0] for k, v in types.items()}}
    want |= {"new.int": ValueType.UINT32, "new.float": ValueType.FLOAT32}
    for key, vt in want.items():
        assert fields[key].types[0] == vt, key
    assert fields["a.strs"].contents() == ["x", "ü", ""]
    assert fields["a.i16"].contents() == -3
    assert r.alignment == 64
    rt = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(np.asarray(rt["w"].data).reshape(4, -1), w)
    np.testing.assert_array_equal(np.asarray(rt["e"].data), e)
    assert rt["w"].tensor_type == QType.Q4_0 and list(rt["w"].shape) == [64, 4]

    ours = read_gguf(out)
    assert ours.metadata == meta
    assert ours.data_offset % 64 == 0


def test_read_only_directory_leaves_nothing(tmp_path, monkeypatch) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root ignores permission bits: make the create fail as it would
        import tempfile

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(GGUFError, match="cannot write .*Permission denied"):
            write_gguf(d / "x.gguf", {"a": 1}, [])
        assert list(d.iterdir()) == []
    finally:
        d.chmod(stat.S_IRWXU)


def test_disk_full_leaves_nothing(tmp_path) -> None:
    def full() -> np.ndarray:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(GGUFError, match="No space left"):
        write_gguf(tmp_path / "x.gguf", {"a": 1}, [TensorSpec("a", (4,), int(QType.F32), full)])
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(JllamaError, match="cannot write"):
        write_gguf(tmp_path / "nope" / "x.gguf", {"a": 1}, [])


def test_failure_midway_leaves_no_partial_file(tmp_path) -> None:
    def boom() -> np.ndarray:
        raise RuntimeError("converter failed")

    ok = np.zeros(4, np.float32).view(np.uint8)
    tensors = [
        TensorSpec("a", (4,), int(QType.F32), lambda: ok),
        TensorSpec("b", (4,), int(QType.F32), boom),
    ]
    out = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError, match="converter failed"):
        write_gguf(out, {"k": "v"}, tensors)
    assert list(tmp_path.iterdir()) == []
    # an existing file at the target is left untouched
    out.write_bytes(b"old")
    with pytest.raises(GGUFError, match="got 8 bytes"):
        write_gguf(out, {}, [TensorSpec("a", (4,), int(QType.F32), lambda: ok[:8])])
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
