"""GGUF reader: faithful parsing, and one-line refusals for malformed files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from jllama.errors import GGUFError
from jllama.gguf.reader import read_gguf


def _write_small(path, n_rows=4, n_cols=64):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("some.floats", [1.5, 2.5])
    w.add_bool("some.flag", True)
    w.add_float64("some.f64", 0.25)
    w.add_int64("some.i64", -7)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((n_rows, n_cols)).astype(np.float32))
    q = gguf.quants.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_what_gguf_py_reads(tmp_path):
    p = _write_small(tmp_path / "ok.gguf")
    g = read_gguf(p)
    ref = gguf.GGUFReader(str(p))
    assert g.version == 3
    assert g.metadata["general.name"] == "tiny"
    assert g.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert g.metadata["some.floats"] == [1.5, 2.5]
    assert g.metadata["some.flag"] is True and g.metadata["some.i64"] == -7
    assert g.metadata["some.f64"] == 0.25
    for t in ref.tensors:
        ours = g.tensors[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert ours.qtype == int(t.tensor_type)
        assert ours.nbytes == t.n_bytes
        assert np.array_equal(np.asarray(ours.data), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_real_model_header(smollm2_path):
    g = read_gguf(smollm2_path)
    assert g.architecture == "llama"
    assert len(g.tensors) == 272
    assert g.tensors["token_embd.weight"].shape == (49152, 576)
    assert g.tensors["token_embd.weight"].type_name == "Q8_0"
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152


def _corrupt(tmp_path, name, fn):
    src = _write_small(tmp_path / "src.gguf")
    data = bytearray(src.read_bytes())
    g = read_gguf(src)
    data = fn(data, g)
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def _tensor_info_pos(data: bytes, name: str) -> int:
    """Offset just after a tensor's name in the tensor-info section."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    return data.rindex(needle) + len(needle)


@pytest.mark.parametrize("case,fn,msg", [
    ("bad_magic", lambda d, g: b"GGUX" + d[4:], "bad magic"),
    ("truncated_header", lambda d, g: d[:30], "truncated"),
    ("empty", lambda d, g: b"", "empty"),
    ("bad_version", lambda d, g: d[:4] + struct.pack("<I", 9) + d[8:], "version 9"),
    ("data_past_eof", lambda d, g: d[: len(d) - 100], "past the end"),
    ("lying_counts", lambda d, g: d[:8] + struct.pack("<Q", 2**40) + d[16:], "impossible"),
])
def test_malformed_is_refused(tmp_path, case, fn, msg):
    p = _corrupt(tmp_path, case + ".gguf", fn)
    with pytest.raises(GGUFError) as e:
        read_gguf(p)
    text = str(e.value)
    assert str(p) in text and msg in text
    assert "\n" not in text


def test_unknown_type_id(tmp_path):
    def fn(d, g):
        pos = _tensor_info_pos(d, "a.weight")
        n_dims = struct.unpack_from("<I", d, pos)[0]
        tpos = pos + 4 + 8 * n_dims
        d[tpos : tpos + 4] = struct.pack("<I", 250)
        return d

    p = _corrupt(tmp_path, "badtype.gguf", fn)
    with pytest.raises(GGUFError, match="unknown ggml type id 250"):
        read_gguf(p)


def test_absurd_dimensions(tmp_path):
    def fn(d, g):
        pos = _tensor_info_pos(d, "a.weight")
        d[pos + 4 : pos + 12] = struct.pack("<Q", 2**63)
        return d

    p = _corrupt(tmp_path, "dims.gguf", fn)
    with pytest.raises(GGUFError, match="absurd dimensions"):
        read_gguf(p)


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="directory"):
        read_gguf(tmp_path)


def test_cli_one_line_error(tmp_path, capsys):
    from jllama.cli.main import main

    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 64)
    assert main(["inspect", str(p)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad magic" in err and "Traceback" not in err


@pytest.mark.parametrize("items", [
    ["", "a", "é", "日本", "", "<0x0A>", "Ġthe", "▁x"],
    [b"\xe2\x82", b"ok", b"\xff\xfe", b"a\xc3", b"\xc3\xa9", b""],  # invalid UTF-8 kept
    ["x\x00y", "z", "\x00", ""],  # NUL inside a string: the one-by-one path
])
def test_string_arrays_read_as_gguf_py_stores_them(tmp_path, items):
    """Every string of an array is its bytes decoded on its own (invalid bytes kept as
    surrogates), whatever its neighbours: the reader decodes the array in one go."""
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_array("tokenizer.ggml.tokens", items)
    w.add_string("general.name", "after")  # the cursor lands after the array
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = gguf.GGUFReader(str(tmp_path / "s.gguf")).fields["tokenizer.ggml.tokens"]
    want = [bytes(ref.parts[i]).decode("utf-8", errors="surrogateescape") for i in ref.data]
    g = read_gguf(tmp_path / "s.gguf")
    assert g.metadata["tokenizer.ggml.tokens"] == want
    assert len(want) == len(items)
    assert g.metadata["general.name"] == "after"
