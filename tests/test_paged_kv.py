"""The paged KV cache (engine/pages.py, models/cache.py PagedKVCache) forced on the CPU gives the
dense cache's greedy tokens and logits: a tiny GQA llama and a tiny Gemma 3 (sliding-window and
global layers), two slots of different lengths decoding in one batch, a slot reset and reused
while the other keeps its pages, and the page pool's bookkeeping (pages follow the live tokens,
exhaustion is one clear error).

DeepSeek2's latent cache (one latent "head" and its rope part, as two pools under one table)
goes through the same engine path. "xla" (the dense attention over gathered pages) must give
the dense cache's bits; "interpret" (the ragged paged Pallas kernel, interpreted) computes in
f32 where the CPU's exact attention rounds as ggml does, so both sides of that comparison run
the numerics a GPU/TPU does (no llama.cpp roundings, f32 cache), held to a tight tolerance
and the same greedy tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tinymodels import dense_hparams, dense_tensors, write_gguf, write_tiny_llama

from jllama.engine.sampling import BatchSampling, SamplingParams
from jllama.errors import ConfigError, PagePoolError

LLAMA = dict(n_layer=3, n_embd=64, n_ff=128, n_head=8, n_head_kv=2, head_dim=16)  # GQA 4:1
GEMMA = dict(n_layer=7, n_embd=64, n_ff=128, n_head=4, n_head_kv=1, head_dim=32)
CTX = 64


def _build(path):
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    return build_model(read_gguf(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build(write_tiny_llama(tmp_path_factory.mktemp("llama") / "l.gguf", 11, **LLAMA))


@pytest.fixture(scope="module")
def deepseek2(tmp_path_factory):
    import tinymodels_moe

    return _build(tinymodels_moe.write_deepseek2(tmp_path_factory.mktemp("ds") / "d.gguf"))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import gguf

    tensors = dense_tensors(3, n_vocab=300, qk_norm=True, post_norms=True, tied=True,
                            embd_std=0.05, **GEMMA)
    hp = dense_hparams(**GEMMA, **{"attention.sliding_window": 8, "rope.freq_base": 1e6})
    path = write_gguf(tmp_path_factory.mktemp("gemma") / "g.gguf", "gemma3", hp, tensors,
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    return _build(path)


def _engine(model, **kw):
    from jllama.engine.engine import Engine

    spec, m = model
    return Engine(spec, m, ctx_size=CTX, n_slots=2, **kw)


def _decode(eng, toks, active, n):
    """n greedy batched steps; per step the drawn tokens and the logits of both rows."""
    sp = BatchSampling.stack([SamplingParams.greedy()] * 2)
    keys = np.zeros((2, 2), np.uint32)
    out = []
    for i in range(n):
        nxt, logits = eng.step(toks, active, sp, keys, np.full(2, i, np.int32))
        out.append((nxt.copy(), np.asarray(logits, np.float32)))
        toks = np.where(active, nxt, 0).astype(np.int32)
    return out, toks


def _scenario(eng, chunk: bool):
    """Two prompts of different lengths (one page and part of a third), decoding together;
    slot 0 reset and reused by a new prompt while slot 1 goes on; then (``chunk``) a device
    loop of 8 steps. Returns every logit row and token, and the slots' lengths. (Prompt
    lengths in two prefill buckets and one step program: each compile costs seconds.)"""
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(1, 300, n).tolist() for n in (11, 37, 13))
    trace = [np.asarray(eng.prefill(a, slot=0)), np.asarray(eng.prefill(b, slot=1))]
    both = np.array([True, True])
    toks = np.array([int(np.argmax(trace[0])), int(np.argmax(trace[1]))], np.int32)
    steps, toks = _decode(eng, toks, both, 6)
    trace += [x for s in steps for x in s]
    eng.reset(0)
    trace.append(np.asarray(eng.prefill(c, slot=0)))
    toks[0] = int(np.argmax(trace[-1]))
    steps, toks = _decode(eng, toks, both, 4)
    trace += [x for s in steps for x in s]
    if chunk:
        sp = BatchSampling.stack([SamplingParams.greedy()] * 2)
        out = eng.decode_chunk(toks, both, sp, np.zeros((2, 2), np.uint32),
                               np.zeros(2, np.int32), np.full(2, 8, np.int32), [], 8)
        trace.append(np.asarray(out))
    return trace, eng.pos.copy()


_DENSE: dict = {}


def _smooth(model):
    """Numerics without llama.cpp's roundings and with an f32 cache: what a GPU/TPU computes,
    where a small difference in attention stays small (ggml's Q8 activation rounding would
    turn a last-bit difference into a whole quantization step)."""
    from jllama.numerics import DEFAULT

    num = getattr(model[1], "numerics", DEFAULT)
    return dataclasses.replace(num, match_llamacpp=False, cache_type_k="f32",
                               cache_type_v="f32")


def _dense_trace(which, model, chunk, smooth):
    """The dense engine's run of the scenario, once per model and test session."""
    key = (which, chunk, smooth)
    if key not in _DENSE:
        kw = {"numerics": _smooth(model)} if smooth else {}
        _DENSE[key] = _scenario(_engine(model, paged=False, **kw), chunk)
    return _DENSE[key]


# the device loop (page reservation for a chunk, trimmed after) once: it is engine logic
@pytest.mark.slow  # an engine compiles its prompt, step and loop programs (seconds each)
@pytest.mark.parametrize("which,impl,chunk", [("llama", "xla", True),
                                              ("llama", "interpret", False),
                                              ("gemma", "xla", False),
                                              ("gemma", "interpret", False),
                                              ("deepseek2", "xla", False)])
def test_paged_matches_dense(which, impl, chunk, request):
    """(DeepSeek2's latent cache in pages: its blocks gather their layer, whatever ``impl``.)"""
    model = request.getfixturevalue(which)
    smooth = impl == "interpret"  # the kernel's f32 math is not ggml's: compare off the CPU's
    dense, dpos = _dense_trace(which, model, chunk, smooth)
    kw = {"numerics": _smooth(model)} if smooth else {}
    eng = _engine(model, paged=True, paged_impl=impl, page_size=16, **kw)
    assert eng.cache.paged
    paged, ppos = _scenario(eng, chunk)
    np.testing.assert_array_equal(ppos, dpos)
    assert len(paged) == len(dense)
    worst = 0.0
    for got, want in zip(paged, dense, strict=True):
        if got.dtype.kind in "iu":  # drawn tokens: the same greedy choices
            np.testing.assert_array_equal(got, want)
            continue
        worst = max(worst, float(np.abs(got - want).max()))
        if impl == "xla":  # the dense attention itself, over gathered pages: same bits
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    print(f"\n{which} {impl}: max|Δlogit| {worst:.2e}")
    # pages follow the live tokens: each slot owns ceil(len / 16)
    pg = eng.pages
    assert [len(o) for o in pg.owned] == [-(-int(p) // 16) for p in ppos]
    assert pg.used + len(pg.free) == pg.n_pages - 1


def test_pages_follow_tokens_and_exhaust(llama):
    eng = _engine(llama, paged=True, page_size=16, kv_pages=1 + 4)  # 4 pages: 64 tokens
    assert eng.cache.k[0].shape[2] == 5
    eng.prefill(list(range(1, 30)), slot=0)  # 29 tokens: 2 pages
    assert len(eng.pages.owned[0]) == 2 and len(eng.pages.free) == 2
    eng.prefill(list(range(1, 20)), slot=1)  # 19 tokens: 2 pages
    with pytest.raises(PagePoolError, match="KV page pool exhausted"):
        eng.prefill(list(range(1, 10)), slot=0)  # a third page for slot 0: none left
    # refused before any work: the slot is as it was (a server may free pages and retry)
    assert eng.pos[0] == 29 and len(eng.tokens[0]) == 29 and len(eng.pages.owned[0]) == 2
    eng.rewind(1, 5)  # slot 1 shrinks to one page
    assert len(eng.pages.owned[1]) == 1 and len(eng.pages.free) == 1
    eng.reset(0)
    assert eng.pages.owned[0] == [] and len(eng.pages.free) == 3
    assert (eng.pages.table[0] == 0).all()


def test_export_import_slot_round_trip(llama):
    """Prompt-cache rows out of the paged cache are the dense cache's; put back into another
    slot's pages they continue the same."""
    dense = _engine(llama, paged=False)
    paged = _engine(llama, paged=True, page_size=16)
    prompt = np.random.default_rng(2).integers(1, 300, 21).tolist()
    for e in (dense, paged):
        e.prefill(prompt, slot=0)
    assert paged.slot_layout() == dense.slot_layout()
    toks, marks, rows = paged.export_slot(0)
    _, _, drows = dense.export_slot(0)
    for r, d in zip(rows, drows, strict=True):
        np.testing.assert_array_equal(r, d)
    paged.import_slot(1, toks, marks, rows)
    a = np.asarray(paged.prefill([7], slot=0))
    b = np.asarray(paged.prefill([7], slot=1))
    np.testing.assert_array_equal(a, b)


def test_config_errors(llama):
    with pytest.raises(ConfigError, match="power of two"):
        _engine(llama, paged=True, page_size=12)
    with pytest.raises(ConfigError, match="below the kernel's 16"):
        _engine(llama, paged=True, page_size=8, paged_impl="pallas")
    eng = _engine(llama)  # the default everywhere (opt-in until run on a device): dense
    assert not eng.cache.paged and eng.pages is None


def test_scheduler_frees_idle_slots_when_the_pool_is_full(monkeypatch):
    """A full pool first empties idle slots' prompt caches (their pages back), then the request
    goes on; only when nothing idle holds pages does that one request fail (the server's side,
    with a stand-in engine whose "pool" holds 40 tokens over all slots)."""
    from test_server_units import FakeDecoder, FakeEngine, FakeTok, V, _run

    import jllama.tokenizer as jt
    from jllama.server.scheduler import Scheduler

    class PoolEngine(FakeEngine):
        CAP = 40
        refused = 0

        def _check(self, slot, n):
            if int(self.pos.sum()) - int(self.pos[slot]) + n > self.CAP:
                self.refused += 1
                raise PagePoolError("KV page pool exhausted (stand-in)")

        def reserve(self, slot, n):
            self._check(slot, n)

        def prefill(self, toks, slot):
            self._check(slot, int(self.pos[slot]) + len(toks))
            return super().prefill(toks, slot)

    import types

    monkeypatch.setattr(jt, "StreamDecoder", FakeDecoder, raising=False)
    eng = PoolEngine(2, ctx_size=64)
    llm = types.SimpleNamespace(engine=eng, tokenizer=FakeTok(),
                                spec=types.SimpleNamespace(n_vocab=V))
    sch = Scheduler(llm, max_queue=4)
    sch.start()
    try:
        _, _, done, box = _run(sch, list(range(5, 35)), 5, seed=1)  # 30 + 5 tokens, then idle
        assert done.wait(30) and box["ev"].kind != "error"
        held = [int(p) for p in eng.pos]
        assert sorted(held) == [0, 34]  # the last token drawn is not fed
        _, out, done, box = _run(sch, [40 + i for i in range(20)], 4, seed=2)  # 20 + 4 more
        assert done.wait(30) and box["ev"].kind != "error", box["ev"]
        assert len(out) == 4
        assert sorted(int(p) for p in eng.pos) == [0, 23]  # the idle slot gave its pages
        assert eng.refused == 1  # (it went to the other slot: refused once, then it fitted)
        _, _, done, box = _run(sch, list(range(5, 50)), 2, seed=3)  # 45 tokens: never fits
        assert done.wait(30) and box["ev"].kind == "error"
    finally:
        sch.stop()


def test_cli_and_config_flags(tmp_path, capsys):
    """``--kv-paged`` / ``--kv-pages`` (run, serve, bench) and ``runtime.kv_paged`` /
    ``runtime.kv_pages`` reach the engine: the same greedy text as the dense cache, and a pool
    too small for the run fails with one line and exit code 1."""
    from jllama.cli.main import build_parser, main
    from jllama.cli.serve import _overrides
    from jllama.config import load_config

    tiny = write_tiny_llama(tmp_path / "t.gguf", 11, **LLAMA)
    base = ["generate", "-m", str(tiny), "-p", "hello", "-n", "6", "--temp", "0", "-c", "64"]
    assert main(base) == 0
    dense = capsys.readouterr().out
    assert main([*base, "--kv-paged"]) == 0
    assert capsys.readouterr().out == dense
    # 2 pages: page 0 is scratch, one page of 16 tokens for the prompt and 40 more tokens
    assert main([*base[:5], "-n", "40", "--temp", "0", "--kv-paged", "--kv-pages", "2"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "KV page pool exhausted" in err[0], err
    args = build_parser().parse_args(["serve", "-m", "m.gguf", "--kv-paged", "--kv-pages", "9"])
    rt = load_config(None, _overrides(args)).runtime
    assert rt.kv_paged is True and rt.kv_pages == 9
    args = build_parser().parse_args(["bench", "-m", "m.gguf", "--kv-paged"])
    assert args.kv_paged is True
    assert load_config(None).runtime.kv_paged is False
    with pytest.raises(ConfigError, match="'runtime.kv_pages' must be at least 2"):
        load_config(None, ["runtime.kv_pages=1"])
