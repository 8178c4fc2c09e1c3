"""The XLA:CPU quantized matmul against gguf-py's numpy dequantize + a float64 dot.

Weights are random GGUF blocks (random bytes, with the f16 scale fields replaced by finite
values), so every code, scale and bit position is exercised, not just what a quantizer emits.
"""

from __future__ import annotations

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllama.gguf.constants import QType, qtype_info
from jllama.kernels import cpu_ffi, cpu_repack, xla_cpu
from jllama.kernels import dispatch as qtensor
from jllama.kernels.dispatch import PALLAS_MAX_ROWS, prepare, qmatmul, repack_i8, select_kernel
from jllama.quant.qtensor import QTensor
from jllama.quant.testing import F16_FIELDS, random_blocks

TYPES = [q for q in F16_FIELDS if int(q) in cpu_ffi.QTYPES]  # those with f32 C++ kernels
XLA_TYPES = [q for q in TYPES if cpu_repack.supported(q)]


PATHS = ["ffi", "xla-i8", "xla-gguf"]


def require_ffi() -> None:
    if os.environ.get("JLLAMA_NO_FFI", "") not in ("", "0"):
        pytest.skip("JLLAMA_NO_FFI is set: the C++ kernels are off by request")
    assert cpu_ffi.available(), "C++ CPU kernels failed to build (see the log warning)"


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """Which CPU implementation runs: the C++ kernels, or the pure-XLA path on either layout."""
    if request.param == "ffi":
        require_ffi()
    else:
        monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    return request.param


def weight(raw: np.ndarray, qtype: QType, path: str) -> QTensor:
    n_in = raw.shape[1] // qtype_info(int(qtype)).type_size * qtype_info(int(qtype)).block_size
    qt = QTensor(jnp.asarray(raw), int(qtype), (raw.shape[0], n_in))
    return repack_i8(qt) if path == "xla-i8" else qt


def oracle(x: np.ndarray, raw: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """(x @ W.T in float64, the same with |x| and |W| for a tolerance scale)."""
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    x = x.astype(np.float64)
    return x @ w.T, np.abs(x) @ np.abs(w).T


def assert_close(got, want, scale) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("qtype", XLA_TYPES, ids=lambda q: q.name)
def test_repack_matches_gguf_dequantize(qtype):
    row_len = 512
    raw = random_blocks(qtype, 5, row_len, seed=1)
    want = gguf.quants.dequantize(raw, qtype)
    lay = cpu_repack.LAYOUTS[int(qtype)]
    r = cpu_repack.repack(np, raw, qtype, row_len)
    np.testing.assert_array_equal(cpu_repack.dequantize_repacked(np, r, lay.group), want)
    rj = cpu_repack.repack(jnp, jnp.asarray(raw), qtype, row_len)
    got = np.asarray(cpu_repack.dequantize_repacked(jnp, rj, lay.group))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_qmatmul_matches_oracle(qtype, path):
    # 1000 rows: not a multiple of the tile; row_len 512 has two K-quant superblocks.
    n_out, row_len = 1000, 512
    raw = random_blocks(qtype, n_out, row_len, seed=2)
    qt = weight(raw, qtype, path)
    rng = np.random.default_rng(3)
    # matvec, batched decode, GEMM (the in-graph GGUF path shares the tiling; keep it short)
    leads = [(3,), (40,)] if path == "xla-gguf" else [(1,), (3,), (2, 5, 1), (40,)]
    for lead in leads:
        x = rng.standard_normal((*lead, row_len)).astype(np.float32)
        want, scale = oracle(x.reshape(-1, row_len), raw, qtype)
        got = jax.jit(lambda a, w: qmatmul(a, w))(jnp.asarray(x), qt)  # fresh trace per path
        assert got.shape == (*lead, n_out)
        assert_close(np.asarray(got).reshape(-1, n_out), want, scale)


@pytest.mark.parametrize("n_out", [8, 100, 1200])
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("path", ["ffi", "xla-i8"])  # overrides the fixture: the paths that tile
def test_tiling_edges(monkeypatch, path, n_out, m):
    """Tiny tiles force the scan + remainder paths (single tile, exact multiple, tail); the C++
    matvec splits rows into chunks across threads (one chunk, several, a partial last one)."""
    if path == "ffi":
        require_ffi()
    else:
        monkeypatch.setattr(cpu_ffi, "available", lambda: False)
    monkeypatch.setattr(xla_cpu, "_MATVEC_TILE_ELEMS", 64 * 256)
    monkeypatch.setattr(xla_cpu, "_GEMM_TILE_ELEMS", 16 * 256)
    qtype, row_len = QType.Q4_K, 256
    raw = random_blocks(qtype, n_out, row_len, seed=n_out)
    qt = weight(raw, qtype, path)
    x = np.random.default_rng(m).standard_normal((m, row_len)).astype(np.float32)
    want, scale = oracle(x, raw, qtype)
    # under jit, as the model runs it (eagerly the tile scan compiled anew per call); a fresh
    # trace, which reads the patched tile sizes
    got = jax.jit(lambda a, w: xla_cpu.qmatmul(a, w))(jnp.asarray(x), qt)
    assert_close(got, want, scale)


def test_i8_dequantize_and_take_rows():
    qtype, n_out, row_len = QType.Q5_K, 40, 256
    raw = random_blocks(qtype, n_out, row_len, seed=4)
    qt = repack_i8(QTensor(jnp.asarray(raw), int(qtype), (n_out, row_len)))
    w = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_allclose(np.asarray(qtensor.dequantize(qt)), w, rtol=1e-6, atol=1e-7)
    ids = jnp.asarray([[3, 0], [39, 3]])
    np.testing.assert_allclose(
        np.asarray(qtensor.take_rows(qt, ids)), w[np.asarray(ids)], rtol=1e-6, atol=1e-7
    )
    assert qt.nbytes == n_out * row_len + 2 * 4 * n_out * row_len // 32


def test_prepare_picks_the_layout_the_cpu_kernel_reads(path):
    f = QTensor(jnp.zeros((4, 32), jnp.float32), int(QType.F32), (4, 32))
    assert prepare(f, "cpu") is f
    raw = random_blocks(QType.Q8_0, 4, 64)
    q = QTensor(jnp.asarray(raw), int(QType.Q8_0), (4, 64))
    on_gpu = prepare(q, "gpu")  # the Pallas planes; dequantize/take_rows still read them
    assert on_gpu.layout == "pallas"
    np.testing.assert_array_equal(
        np.asarray(qtensor.take_rows(on_gpu, jnp.asarray([2, 0]))),
        gguf.quants.dequantize(raw, QType.Q8_0)[[2, 0]],
    )
    assert prepare(q, "cpu").layout == ("gguf" if path == "ffi" else "i8")


def test_ffi_dequant_rows_is_exact():
    require_ffi()
    for qtype in TYPES:
        raw = random_blocks(qtype, 7, 256, seed=5)
        got = np.asarray(cpu_ffi.dequant_rows(jnp.asarray(raw), int(qtype), 256))
        np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))


def test_select_kernel_cpu_uses_tiled_path_for_supported_types():
    for qtype in TYPES:
        assert select_kernel(int(qtype), "cpu") is not None
    raw = random_blocks(QType.Q8_0, 24, 64)
    qt = prepare(QTensor(jnp.asarray(raw), int(QType.Q8_0), (24, 64)), "cpu")
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    want, scale = oracle(x, raw, QType.Q8_0)
    assert_close(select_kernel(int(QType.Q8_0), "cpu")(jnp.asarray(x), qt), want, scale)


def test_vmap_over_activations(path):
    raw = random_blocks(QType.Q4_1, 50, 64, seed=6)
    qt = weight(raw, QType.Q4_1, path)
    x = np.random.default_rng(6).standard_normal((3, 2, 64)).astype(np.float32)
    got = jax.vmap(lambda a: qmatmul(a, qt))(jnp.asarray(x))
    want, scale = oracle(x.reshape(-1, 64), raw, QType.Q4_1)
    assert_close(np.asarray(got).reshape(-1, 50), want, scale)


def test_gpu_backends_route_to_pallas(monkeypatch):
    """select_kernel's wiring only (no GPU here): Pallas gets its own layouts, others fall back."""
    from jllama.kernels import pallas_qmatmul as pq

    calls = []
    monkeypatch.setattr(pq, "pallas_qmatmul", lambda x, qt: calls.append(qt.layout) or x[..., :1])
    raw = random_blocks(QType.Q8_0, 4, 64)
    q = QTensor(jnp.asarray(raw), int(QType.Q8_0), (4, 64))
    kernel = select_kernel(int(QType.Q8_0), "gpu")
    x = jnp.ones((2, 64), jnp.float32)
    kernel(x, prepare(q, "gpu"))
    kernel(x, q)
    assert calls == ["pallas", "gguf"]
    want, scale = oracle(np.ones((2, 64), np.float32), raw, QType.Q8_0)
    assert_close(kernel(x, repack_i8(q)), want, scale)  # a CPU layout: reference path
    assert calls == ["pallas", "gguf"]
    # a prefill-sized batch dequantizes and uses the vendor GEMM (measured faster on a GPU)
    xs = np.ones((PALLAS_MAX_ROWS + 1, 64), np.float32)
    want, scale = oracle(xs, raw, QType.Q8_0)
    assert_close(kernel(jnp.asarray(xs), prepare(q, "gpu")), want, scale)
    assert calls == ["pallas", "gguf"]


def test_ffi_build_failure_means_xla_path(monkeypatch, tmp_path):
    """No working compiler: ``available()`` says False (with a warning) instead of raising."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("JLLAMA_CACHE", str(tmp_path))
    monkeypatch.delenv("JLLAMA_NO_FFI", raising=False)
    assert cpu_ffi.available.__wrapped__() is False


def test_ffi_build_covers_every_source(monkeypatch, tmp_path):
    """Every ``cpu/*.cc`` is a unit of the build (with its flags), and the library's cache key
    changes with any source or header."""
    import shutil

    assert set(cpu_ffi.UNITS) == {p.name for p in cpu_ffi.CPU_DIR.glob("*.cc")}
    assert cpu_ffi.UNITS["attention.cc"] == cpu_ffi.ATTENTION_FLAGS  # strict FP flags
    copy = tmp_path / "cpu"
    shutil.copytree(cpu_ffi.CPU_DIR, copy)
    monkeypatch.setattr(cpu_ffi, "CPU_DIR", copy)
    keys = {cpu_ffi._key()}
    for name in ("f16.h", "threadpool.h", "gemm.cc"):
        with open(copy / name, "a") as f:
            f.write("\n")
        keys.add(cpu_ffi._key())
    assert len(keys) == 4


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q5_1], ids=lambda q: q.name)
def test_matvec_with_given_block_sums(qtype):
    """The C++ matvec fed explicit per-32 sums for the min term: equal to the float64 product
    of the dequantized weights with x plus ``m_w * (s - sum(x))`` per block (what ggml's Q8_1
    dot computes when its stored block sum ``s`` differs from the values' sum)."""
    require_ffi()
    rows, n_in = 37, 576
    raw = random_blocks(qtype, rows, n_in, seed=4)
    qt = weight(raw, qtype, "ffi")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    delta = rng.uniform(-0.05, 0.05, (3, n_in // 32)).astype(np.float32)
    xs = x.reshape(3, -1, 32).sum(-1) + delta
    got = xla_cpu.ffi_matvec_xs(jnp.asarray(x), qt, jnp.asarray(xs))
    want, scale = oracle(x, raw, qtype)
    mins = raw.reshape(rows, n_in // 32, -1)[:, :, 2:4].copy().view(np.float16)[..., 0]
    want = want + delta.astype(np.float64) @ mins.astype(np.float64).T
    assert_close(got, want, scale)
    assert xla_cpu.ffi_matvec_ok(jnp.asarray(x), qt)
