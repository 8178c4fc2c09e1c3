"""Dequantizers (numpy and jax) are bit-exact with gguf-py's reference ``gguf.quants``."""

from __future__ import annotations

import gguf.quants
import jax
import numpy as np
import pytest

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info
from jllama.quant.formats import dequantize_jax, dequantize_np

# Every type gguf-py can decode that we support (Q8_K has no gguf-py decoder: tested below).
GGUF_PY_TYPES = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS",
]  # fmt: skip


def _random_rows(qtype: int, shape: tuple[int, ...], row: int, seed: int = 0) -> np.ndarray:
    info = qtype_info(qtype)
    rb = row // info.block_size * info.type_size
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, rb), dtype=np.uint8)


def _assert_bit_equal(got: np.ndarray, ref: np.ndarray) -> None:
    # Random bytes make some f16 scales inf/nan; those positions need only agree on being
    # non-finite (NaN payloads are not meaningful).
    fin = np.isfinite(ref)
    assert fin.mean() > 0.5
    np.testing.assert_array_equal(np.isfinite(got), fin)
    np.testing.assert_array_equal(got.view(np.uint32)[fin], ref.view(np.uint32)[fin])


@pytest.mark.parametrize("name", GGUF_PY_TYPES)
def test_dequantize_bit_exact_vs_gguf_py(name: str) -> None:
    qt = int(QType[name])
    row = 512
    data = _random_rows(qt, (3, 4), row)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(data.reshape(12, -1), QType[name]).reshape(3, 4, row)
        got_np = dequantize_np(data, qt, row)
    got_jax = np.asarray(jax.jit(dequantize_jax, static_argnums=(1, 2))(data, qt, row))
    assert got_np.shape == got_jax.shape == (3, 4, row)
    assert got_np.dtype == got_jax.dtype == np.float32
    _assert_bit_equal(got_np, ref)
    _assert_bit_equal(got_jax, ref)


def test_q8_k_is_d_times_q() -> None:
    # Q8_K = f32 d, 256 int8, 16 int16 block sums (unused by dequantization).
    rng = np.random.default_rng(1)
    d = rng.standard_normal(5).astype(np.float32)
    q = rng.integers(-128, 128, size=(5, 256), dtype=np.int8)
    raw = np.concatenate(
        [d.view(np.uint8).reshape(5, 4), q.view(np.uint8), np.zeros((5, 32), np.uint8)], axis=1
    ).reshape(1, -1)
    want = (q.astype(np.float32) * d[:, None]).reshape(1, -1)
    np.testing.assert_array_equal(dequantize_np(raw, int(QType.Q8_K), 5 * 256), want)
    np.testing.assert_array_equal(np.asarray(dequantize_jax(raw, int(QType.Q8_K), 1280)), want)


def test_wrong_row_bytes_is_refused() -> None:
    with pytest.raises(QuantError, match="needs 36 bytes"):
        dequantize_np(np.zeros((2, 35), np.uint8), int(QType.Q4_0), 64)
    with pytest.raises(QuantError, match="multiple"):
        dequantize_np(np.zeros((2, 18), np.uint8), int(QType.Q4_0), 33)
