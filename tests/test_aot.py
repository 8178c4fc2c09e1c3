"""The ahead-of-time executable cache (jllama/engine/aot.py): a warm start takes its programs
from disk, computes what the traced programs compute, and never uses an entry whose key does
not match or that it cannot read."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import write_server_model

from jllama.api import Llama
from jllama.engine import aot
from jllama.engine.sampling import SamplingParams

PROMPT = "hello world"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_server_model(tmp_path_factory.mktemp("aot") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path_factory, monkeypatch) -> Path:
    """The compile cache directory, shared by this file's tests (XLA's entries keep the
    compiles short), with no ahead-of-time entries at the start of each."""
    import shutil

    d = tmp_path_factory.getbasetemp() / "aot-xla"
    shutil.rmtree(d / "aot", ignore_errors=True)
    monkeypatch.setenv("JLLAMA_XLA_CACHE", str(d))
    return d


def _run(path: Path, ctx: int = 64, **kw) -> list[int]:
    llm = Llama(path, ctx_size=ctx, **kw)
    return list(llm.engine.generate(llm.tokenize(PROMPT), SamplingParams.greedy(), 6))


@pytest.fixture
def loads(monkeypatch) -> list[bool]:
    """Records each disk lookup: True where an entry was used."""
    seen: list[bool] = []
    real = aot.AotCache.load

    def spy(self, key):
        try:
            out = real(self, key)
        except Exception:
            seen.append(False)
            raise
        seen.append(out is not None)
        return out

    monkeypatch.setattr(aot.AotCache, "load", spy)
    return seen


def test_warm_start_takes_entries_and_same_tokens(model, cache, loads):
    tmp_path = cache
    plain = _run(model, aot_cache=False)
    assert loads == []  # off: never consulted
    cold = _run(model, aot_cache=True)
    entries = sorted(p.name for p in (tmp_path / "aot").iterdir())
    assert len(entries) == 3  # prompt, first sample, decode step
    assert loads == [False] * 3
    loads.clear()
    warm = _run(model, aot_cache=True)
    assert loads == [True] * 3
    assert sorted(p.name for p in (tmp_path / "aot").iterdir()) == entries
    assert cold == plain and warm == plain


def test_other_key_or_damaged_entry_not_used(model, cache, loads):
    tmp_path = cache
    ref = _run(model, aot_cache=True)
    loads.clear()
    # another context size (the same shapes here): another engine key, so other entries
    assert _run(model, ctx=128, aot_cache=True) == ref
    assert loads == [False] * 3
    assert len(list((tmp_path / "aot").iterdir())) == 6
    # damaged entries: read, rejected, compiled again
    for p in (tmp_path / "aot").iterdir():
        p.write_bytes(b"not a pickle")
    loads.clear()
    assert _run(model, aot_cache=True) == ref
    assert loads == [False] * 3


def test_entry_for_another_key_text_is_refused(tmp_path):
    c = aot.AotCache(tmp_path, "base")
    import pickle

    c.dir.mkdir(exist_ok=True)
    # a file at this key's name whose recorded key differs (a hash collision): not used
    c._path("k").write_bytes(pickle.dumps((aot.FORMAT, "other key", b"", None, None)))
    assert c.load("k") is None
    assert c.load("absent") is None


def test_on_by_default_off_by_env(model, cache, monkeypatch):
    """Users get the cache without asking (the suite runs with JLLAMA_AOT_CACHE=0)."""
    monkeypatch.delenv("JLLAMA_AOT_CACHE", raising=False)
    llm = Llama(model, ctx_size=64)
    list(llm.engine.generate(llm.tokenize(PROMPT), SamplingParams.greedy(), 2))
    assert (cache / "aot").is_dir() and any((cache / "aot").iterdir())
    import shutil

    shutil.rmtree(cache / "aot")
    monkeypatch.setenv("JLLAMA_AOT_CACHE", "0")
    llm = Llama(model, ctx_size=64)
    list(llm.engine.generate(llm.tokenize(PROMPT), SamplingParams.greedy(), 2))
    assert not (cache / "aot").exists()


def test_entry_from_a_jax_cache_hit_runs_in_a_later_process(model, tmp_path):
    """An entry written when this cache missed but jax's persistent cache hit (a new jllama
    over an old compile cache) must run in the next process: XLA:CPU executables deserialized
    from jax's cache serialized into entries whose functions were missing ("Function ... not
    found" at the first result)."""
    import os
    import subprocess
    import sys

    # prints the tokens and how many entries were used (a fresh process has registered no
    # kernel yet: an entry must bring what it needs, not fall back to compiling)
    code = ("import sys\nfrom jllama.api import Llama\nfrom jllama.engine import aot\n"
            "from jllama.engine.sampling import SamplingParams\nused = []\nreal = "
            "aot.AotCache.load\naot.AotCache.load = lambda s, k: used.append(real(s, k)) or "
            "used[-1]\nllm = Llama(sys.argv[1], ctx_size=64)\n"
            "print(list(llm.engine.generate(llm.tokenize('hello world'), "
            "SamplingParams.greedy(), 6)), sum(u is not None for u in used))\n")
    outs = []
    # JLLAMA_* variables are part of this cache's key, not of jax's: the first run fills both,
    # the second misses here and hits there, the third loads what the second wrote
    for salt in ("1", "2", "2"):
        env = dict(os.environ, JLLAMA_XLA_CACHE=str(tmp_path), JLLAMA_AOT_CACHE="1",
                   JLLAMA_TEST_AOT_SALT=salt)
        r = subprocess.run([sys.executable, "-c", code, str(model)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "aot").iterdir())) == 6
    toks = [o.rsplit(" ", 1) for o in outs]
    assert toks[0][0] == toks[1][0] == toks[2][0]
    assert [t[1] for t in toks] == ["0", "0", "3"]  # the third process ran all three entries


def test_state_changed_in_place_is_looked_up_again(tmp_path):
    """The signature of a large argument is remembered by identity; a leaf replaced in place
    by one of another shape must not reach the old executable."""
    import jax
    import jax.numpy as jnp

    cache = aot.AotCache(tmp_path, "base")
    f = cache.wrap("f", jax.jit(lambda s, x: sum(jnp.sum(v) for v in s.values()) + x))
    state = {f"w{i}": jnp.ones((2,)) for i in range(20)}  # > 16 leaves: remembered
    assert float(f(state, 1.0)) == 41.0
    state["w0"] = jnp.ones((3,))
    assert float(f(state, 1.0)) == 42.0
    state["w0"] = jnp.ones((2,), jnp.int32)
    assert float(f(state, 1.0)) == 41.0
