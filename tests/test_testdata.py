"""Where test data comes from (testdata.py) and registry.fetch_files, without the network."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import testdata

from jllama import registry
from jllama.errors import JllamaError


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    monkeypatch.setenv("JLLAMA_SHARED_DATA", str(shared))
    monkeypatch.setenv("JLLAMA_CACHE", str(cache))
    return shared, cache


def test_vendored_copy_unpacks_once_and_verifies(dirs):
    _, cache = dirs
    p = testdata._vendored(testdata.WIKI_TEST)
    assert p == cache / "testdata" / testdata.WIKI_TEST
    assert hashlib.sha256(p.read_bytes()).hexdigest() == testdata.SHA256[testdata.WIKI_TEST]
    mtime = p.stat().st_mtime_ns
    assert testdata._vendored(testdata.WIKI_TEST).stat().st_mtime_ns == mtime
    p.write_bytes(b"damaged")  # a damaged cache copy is unpacked again
    assert testdata._vendored(testdata.WIKI_TEST).stat().st_size == 1_290_590


def test_shared_copy_wins_and_is_checked(dirs):
    shared, cache = dirs
    src = testdata._vendored(testdata.OPENAI_SPEC)
    (shared / "openai").mkdir(parents=True)
    shutil.copy(src, shared / testdata.OPENAI_SPEC)
    assert testdata._vendored(testdata.OPENAI_SPEC) == shared / testdata.OPENAI_SPEC
    (shared / testdata.OPENAI_SPEC).write_text("openapi: 3.1.0\n")
    with pytest.raises(testdata.DataError, match="sha256"):
        testdata._vendored(testdata.OPENAI_SPEC)


FILES = {"pkg/a.txt": b"alpha\n", "pkg/sub/b.bin": bytes(range(256))}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _fake_download(archive_bytes: bytes, name: str, calls: list):
    def dl(specs, dest, what, sdist=False):
        calls.append((tuple(specs), sdist))
        (dest / name).write_bytes(archive_bytes)

    return dl


def _sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for inner, data in {**FILES, "pkg/other": b"x"}.items():
            info = tarfile.TarInfo(f"pkg-1.0/{inner}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for inner, data in FILES.items():
            z.writestr(inner, data)
    return buf.getvalue()


@pytest.mark.parametrize("sdist", [True, False], ids=["sdist", "wheel"])
def test_fetch_files(tmp_path, monkeypatch, sdist):
    calls: list = []
    archive = _sdist() if sdist else _wheel()
    name = "pkg-1.0.tar.gz" if sdist else "pkg-1.0-py3-none-any.whl"
    monkeypatch.setattr(registry, "_pip_download", _fake_download(archive, name, calls))
    want = {inner: _sha(data) for inner, data in FILES.items()}
    out = registry.fetch_files("pkg==1.0", want, tmp_path / "d", sdist=sdist, quiet=True)
    assert {k: v.read_bytes() for k, v in out.items()} == FILES
    assert out["pkg/sub/b.bin"] == tmp_path / "d" / "b.bin"
    assert calls == [(("pkg==1.0",), sdist)]
    registry.fetch_files("pkg==1.0", want, tmp_path / "d", sdist=sdist, quiet=True)
    assert len(calls) == 1  # cached and verified: no second download
    bad = {**want, "pkg/a.txt": _sha(b"other")}
    with pytest.raises(JllamaError, match="sha256 mismatch"):
        registry.fetch_files("pkg==1.0", bad, tmp_path / "e", sdist=sdist, quiet=True)
    with pytest.raises(JllamaError, match="not in its"):
        registry.fetch_files("pkg==1.0", {"pkg/missing": "0" * 64}, tmp_path / "f", sdist=sdist,
                             quiet=True)
    assert not any(p.is_file() for p in (tmp_path / "e").rglob("*"))  # nothing half-cached
    assert not any(p.is_file() for p in (tmp_path / "f").rglob("*"))


def test_vocab_files_listed_for_every_vocab():
    for name in testdata.VOCABS:
        for ext in ("", ".inp", ".out"):
            assert f"ggml-vocab-{name}.gguf{ext}" in testdata.VOCAB_SHA256
    assert len(testdata.VOCAB_SHA256) == 3 * len(testdata.VOCABS)
    assert Path(testdata.VENDORED / "openai" / "LICENSE").is_file()
