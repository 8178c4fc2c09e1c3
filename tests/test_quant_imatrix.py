"""Quantizing with an importance matrix: byte for byte ggml's ``ggml_quantize_chunk(type, ...,
imatrix)`` (what llama-quantize --imatrix writes)."""

from __future__ import annotations

import numpy as np
import pytest
from llamacpp_oracle import ggml_quantize

from jllama.gguf.constants import QType, qtype_info
from jllama.quant.formats import dequantize_np
from jllama.quant.quantizers import quantize_np

WEIGHTED_TYPES = [
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS",
]  # fmt: skip


def _rows(n: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(7)
    rows = [
        rng.standard_normal(n) * 0.02,
        rng.standard_t(2, n) * 0.05,  # heavy tails
        np.abs(rng.standard_normal(n)),  # all positive
        -np.abs(rng.standard_normal(n)),  # all negative
        np.zeros(n),
        np.full(n, 0.75),
        rng.standard_normal(n) * 1e-20,  # below GROUP_MAX_EPS
        np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)),
        np.round(rng.standard_normal(n) * 4) / 4,  # ties
        rng.uniform(-1, 1, n) * np.repeat(rng.uniform(0, 10, n // 16), 16),
    ]
    rows += list(rng.standard_t(3, (22, n)) * rng.uniform(1e-3, 1, (22, 1)))
    return np.stack(rows).astype(np.float32)


def _imatrices(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    skewed = rng.gamma(0.3, 1.0, n) * 50  # a few dominant columns, like real activations
    holes = rng.gamma(2.0, 1.0, n)
    holes[::7] = 0  # columns never activated
    return [skewed.astype(np.float32), holes.astype(np.float32), np.ones(n, np.float32)]


def _assert_same(ours: np.ndarray, ref: np.ndarray, qt: int) -> None:
    bs = qtype_info(qt).type_size
    differ = (ours.reshape(-1, bs) != ref.reshape(-1, bs)).any(axis=1)
    assert ours.shape == ref.shape and not differ.any(), f"{differ.sum()}/{differ.size} blocks"


@pytest.mark.parametrize("name", WEIGHTED_TYPES)
def test_weighted_quantize_equals_ggml(name: str) -> None:
    qt = int(QType[name])
    x = _rows()
    for qw in _imatrices(x.shape[1]):
        _assert_same(quantize_np(x, qt, qw), ggml_quantize(x, qt, qw), qt)


def test_weighted_real_weights_equal_ggml(smollm2_path) -> None:
    """SmolLM2's ffn_down rows with a skewed imatrix, every weighted type."""
    from jllama.gguf.reader import read_gguf

    t = read_gguf(smollm2_path).tensors["blk.0.ffn_down.weight"]
    x = dequantize_np(np.asarray(t.data).reshape(t.shape[0], -1), t.qtype, t.shape[-1])[:48]
    qw = _imatrices(x.shape[1])[0]
    for name in WEIGHTED_TYPES:
        qt = int(QType[name])
        _assert_same(quantize_np(x, qt, qw), ggml_quantize(x, qt, qw), qt)


def test_imatrix_changes_the_result() -> None:
    """The imatrix is really used (ggml ignores it only for Q8_0)."""
    x = _rows()
    qw = _imatrices(x.shape[1])[0]
    for name in WEIGHTED_TYPES:
        qt = int(QType[name])
        same = np.array_equal(quantize_np(x, qt, qw), quantize_np(x, qt))
        assert same == (name == "Q8_0"), name
