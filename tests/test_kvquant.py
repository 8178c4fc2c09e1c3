"""Quantized KV cache writes are the bytes ggml-cpu writes into a cache of that type: its
``from_float`` (``ggml_cpy`` f32 -> block type) is the x86 ``quantize_row_q8_0`` for q8_0 and
the reference quantizers ``quantize_row_*_ref`` for q4_0, q4_1, iq4_nl, q5_0 and q5_1 (the
oracle's libggml, called through ctypes)."""

from __future__ import annotations

import ctypes

import jax
import numpy as np
import pytest
from llamacpp_oracle import ggml_libs

from jllama.gguf.constants import qtype_info
from jllama.models import kvquant


def _rows(n: int = 1024) -> np.ndarray:
    """K/V-like rows plus the edge cases of the scale and code choices."""
    rng = np.random.default_rng(5)
    rows = [
        rng.standard_normal(n),
        rng.standard_normal(n) * 40.0,  # large keys (no qk-norm)
        rng.standard_t(2, n) * 0.5,  # outliers
        np.abs(rng.standard_normal(n)),  # all positive
        -np.abs(rng.standard_normal(n)),  # all negative
        np.zeros(n),  # d = 0
        np.full(n, 0.75),  # constant: max == min
        np.round(rng.standard_normal(n) * 4) / 4,  # ties in the rounding
        rng.uniform(-1, 1, n) * np.repeat(rng.uniform(0, 10, n // 32), 32),  # block contrasts
        rng.standard_normal(n) * 1e-3,
    ]
    return np.stack(rows).astype(np.float32)


def _ggml(name: str, x: np.ndarray) -> np.ndarray:
    base, cpu = ggml_libs()
    lib, fn = (cpu, "quantize_row_q8_0") if name == "q8_0" else (base, f"quantize_row_{name}_ref")
    f = getattr(lib, fn)
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    info = qtype_info(kvquant.QUANT_KV[name])
    out = np.zeros((x.shape[0], x.shape[1] // 32 * info.type_size), np.uint8)
    for r in range(x.shape[0]):  # row by row: the same blocks either way
        xr = np.ascontiguousarray(x[r])
        f(xr.ctypes.data, out[r].ctypes.data, xr.size)
    return out


@pytest.mark.parametrize("name", sorted(kvquant.QUANT_KV))
def test_cache_write_bytes_equal_ggml(name: str) -> None:
    x = _rows()
    ours = np.asarray(jax.jit(kvquant.quantize, static_argnums=1)(x, name))
    ref = _ggml(name, x)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    info = qtype_info(kvquant.QUANT_KV[name])
    ours, ref = ours.reshape(-1, info.type_size), ref.reshape(-1, info.type_size)
    if name == "iq4_nl":  # a block below GROUP_MAX_EPS: d = 0, and ggml leaves its codes as
        # whatever its stack array held (the previous block's, or garbage): compare d only
        zero = np.abs(x.reshape(-1, 32)).max(axis=1) < 1e-15
        assert zero.any() and (ours[zero, :2] == 0).all() and (ref[zero, :2] == 0).all()
        ours, ref = ours[~zero], ref[~zero]
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{name}: {bad.size} of {ours.shape[0]} blocks differ"


@pytest.mark.parametrize("name", sorted(kvquant.QUANT_KV))
def test_cache_rows_round_trip(name: str) -> None:
    """Dequantized cache rows are the values ggml decodes from the same bytes, near x."""
    from llamacpp_oracle import ggml_to_float

    x = _rows()[:5]
    rows = jax.jit(kvquant.quantize, static_argnums=1)(x, name)
    got = np.asarray(kvquant.dequantize(rows, name, x.shape[-1]))
    np.testing.assert_array_equal(got, ggml_to_float(np.asarray(rows), kvquant.QUANT_KV[name],
                                                     x.shape[-1]))
    err = np.abs(got - x).max(axis=-1) / np.abs(x).max(axis=-1)
    assert (err < (0.01 if name == "q8_0" else 0.15)).all(), err
