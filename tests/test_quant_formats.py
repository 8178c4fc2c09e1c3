"""Dequantizers (numpy and jax) are bit-exact with gguf-py's reference ``gguf.quants``."""

from __future__ import annotations

import gguf.quants
import jax
import numpy as np
import pytest
from llamacpp_oracle import ggml_to_float

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info
from jllama.quant.formats import dequantize_jax, dequantize_np

# Every type gguf-py can decode that we support (Q8_K has no gguf-py decoder: tested below).
GGUF_PY_TYPES = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "IQ3_XXS", "IQ3_S",
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


GGML_DEQUANT_TYPES = [
    "TQ1_0", "TQ2_0", "Q1_0", "Q2_0", "MXFP4", "NVFP4", "IQ3_XXS", "IQ3_S",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
]  # fmt: skip


@pytest.mark.parametrize("name", GGML_DEQUANT_TYPES)
def test_dequantize_bit_exact_vs_ggml(name: str) -> None:
    """Random blocks (every code, finite scales) decoded by ggml's C ``dequantize_row_*``."""
    from jllama.quant.testing import random_blocks

    qt = int(QType[name])
    row = 1024
    if name.startswith("IQ1") or name.startswith("IQ2"):
        data = _random_rows(qt, (6,), row, seed=5)
    else:
        data = random_blocks(QType[name], 6, row, seed=3)
    if name == "MXFP4":  # exponents whose scale is an f32 denormal, or whose products overflow
        data[0, 0 : 17 * 6 : 17] = [0, 1, 2, 3, 254, 255]
    if name == "NVFP4":  # zero, NaN (0x7F), subnormal, largest scales, top bit set
        data[0, :36] = [0x00, 0x7F, 0x01, 0x07] + list(range(32))
        data[0, 36:72] = [0x7E, 0xFF, 0x80, 0x87] + list(range(255, 223, -1))
    ref = ggml_to_float(data, qt, row)
    with np.errstate(all="ignore"):
        got_np = dequantize_np(data, qt, row)
    got_jax = np.asarray(jax.jit(dequantize_jax, static_argnums=(1, 2))(data, qt, row))
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


# ----------------------------------------------------------------------------- quantizers


def _ggml_base():
    """ggml's own C quantizers, from the oracle's shared library (llama-cpp-python)."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def _ggml_quantize(x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """What llama-quantize writes: ``ggml_quantize_chunk(type, ..., imatrix or NULL)``."""
    lib = _ggml_base()
    x = np.ascontiguousarray(x, np.float32)
    info = qtype_info(qtype)
    out = np.zeros((x.shape[0], x.shape[1] // info.block_size * info.type_size), np.uint8)
    if info.name == "Q8_K":  # not a storage type: only its row reference exists
        lib.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    else:
        lib.ggml_quantize_init(qtype)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
        qwp = None if qw is None else qw.ctypes.data
        lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, *x.shape, qwp)
    return out


def _hard_rows(n: int = 1024) -> np.ndarray:
    """Rows that exercise the edge cases of the scale searches."""
    rng = np.random.default_rng(7)
    rows = [
        rng.standard_normal(n) * 0.02,  # typical weight scale
        rng.standard_normal(n) * 3.0,
        rng.standard_t(2, n) * 0.05,  # heavy tails / outliers
        np.abs(rng.standard_normal(n)),  # all positive (min clamps to 0)
        -np.abs(rng.standard_normal(n)),  # all negative
        np.zeros(n),  # all-zero blocks
        np.full(n, 0.75),  # constant blocks
        rng.standard_normal(n) * 1e-20,  # below GROUP_MAX_EPS
        np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)),  # mostly zero
        np.round(rng.standard_normal(n) * 4) / 4,  # exact ties for the rounding
        rng.uniform(-1, 1, n) * np.repeat(rng.uniform(0, 10, n // 16), 16),  # block contrasts
    ]
    return np.stack(rows).astype(np.float32)


QUANT_TYPES = [
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q8_K",
    "TQ1_0", "TQ2_0", "Q1_0", "Q2_0", "MXFP4", "NVFP4", "IQ3_XXS", "IQ3_S",
]  # fmt: skip


def _compare_with_ggml(x: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> None:
    from jllama.quant.quantizers import quantize_np

    qt = int(QType[name])
    info = qtype_info(qt)
    ours = quantize_np(x, qt, imatrix)
    ref = _ggml_quantize(x, qt, imatrix)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    differ = (ours.reshape(-1, info.type_size) != ref.reshape(-1, info.type_size)).any(axis=1)
    if differ.any():
        # Not byte-identical: then at least no worse, block by block, than ggml.
        blocks = x.reshape(-1, info.block_size)
        if name == "Q8_K":
            pytest.fail(f"Q8_K differs from ggml in {differ.sum()} blocks")
        e_ours = (dequantize_np(ours, qt, x.shape[1]).reshape(blocks.shape) - blocks) ** 2
        e_ref = (dequantize_np(ref, qt, x.shape[1]).reshape(blocks.shape) - blocks) ** 2
        worse = e_ours.mean(axis=1)[differ] > e_ref.mean(axis=1)[differ] * (1 + 1e-6)
        assert not worse.any(), f"{name}: {differ.sum()} blocks differ, {worse.sum()} worse"
        pytest.fail(f"{name}: {differ.sum()}/{differ.size} blocks differ from ggml (none worse)")


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_quantize_bytes_equal_ggml(name: str) -> None:
    _compare_with_ggml(_hard_rows(), name)


@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0", "Q1_0", "Q2_0", "MXFP4", "NVFP4", "IQ3_XXS",
                                  "IQ3_S"])
def test_quantize_with_imatrix_bytes_equal_ggml(name: str) -> None:
    """With an importance matrix (IQ3 weighs by it; TQ/Q1_0/Q2_0/MXFP4/NVFP4 ignore it, as ggml
    does)."""
    rng = np.random.default_rng(11)
    x = _hard_rows()
    imatrix = (rng.gamma(0.5, 2.0, x.shape[1]) * np.repeat([1.0, 0.0, 50.0, 1e-3], 256))
    _compare_with_ggml(x, name, imatrix.astype(np.float32))


def test_nvfp4_scale_rounding_equal_ggml() -> None:
    """NVFP4's UE4M3 scale (ggml_fp32_to_ue4m3 of amax / 6) over every binade it covers and
    beyond: subnormal codes and their rounding, the round-up carry into the next exponent,
    the saturation at 448 and from 2^8 up, amax at the exact rounding points and a neighbour
    of each; each 16-value sub-block its own amax."""
    rng = np.random.default_rng(5)
    n_sub = 4096
    amax = np.concatenate([
        np.exp2(rng.uniform(-16, 12, n_sub // 2)),
        # 6 * (a UE4M3 midpoint or a subnormal step's half), and the f32 neighbours
        6 * np.exp2(rng.integers(-12, 10, n_sub // 4)) * (1 + (2 * rng.integers(0, 8, n_sub // 4) + 1) / 16),
        6 * (rng.integers(0, 16, n_sub // 4) + 0.5) / 512,
    ]).astype(np.float32)  # fmt: skip
    amax[n_sub // 2 :: 3] = np.nextafter(amax[n_sub // 2 :: 3], np.float32(np.inf))
    amax[n_sub // 2 + 1 :: 3] = np.nextafter(amax[n_sub // 2 + 1 :: 3], np.float32(0))
    x = rng.uniform(-1, 1, (n_sub, 16)).astype(np.float32) * amax[:, None]
    sign = np.where(rng.random(n_sub) < 0.5, 1, -1)
    x[np.arange(n_sub), rng.integers(0, 16, n_sub)] = amax * sign
    _compare_with_ggml(x.reshape(64, -1), "NVFP4")


def test_quantize_real_weights_equal_ggml(smollm2_path) -> None:
    """SmolLM2's ffn_down (1536 columns, so K-quants apply) in every type."""
    from jllama.gguf.reader import read_gguf

    t = read_gguf(smollm2_path).tensors["blk.0.ffn_down.weight"]
    x = dequantize_np(np.asarray(t.data).reshape(t.shape[0], -1), t.qtype, t.shape[-1])[:96]
    for name in QUANT_TYPES:
        _compare_with_ggml(x, name)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_round_trip_like_gguf_py(name: str) -> None:
    from jllama.quant.quantizers import quantize_np

    x = _hard_rows(64)
    ours = quantize_np(x, int(QType[name]))
    ref = np.ascontiguousarray(gguf.quants.quantize(x, QType[name])).view(np.uint8)
    np.testing.assert_array_equal(ours, ref.reshape(ours.shape))


def test_quantize_refuses_bad_rows() -> None:
    from jllama.quant.quantizers import quantize_np

    with pytest.raises(QuantError, match="multiple of Q4_K's 256"):
        quantize_np(np.zeros((2, 576), np.float32), int(QType.Q4_K))
    with pytest.raises(QuantError, match="not supported"):
        quantize_np(np.zeros((2, 256), np.float32), int(QType.IQ2_XXS))


def test_rounding_ties_equal_ggml() -> None:
    """Values that scale to (just off) k + 1/2: roundf and nearest_int must break ties as C."""
    rng = np.random.default_rng(3)
    rows = []
    for k in range(64):
        amax = np.float32(rng.uniform(0.01, 2))
        inv = np.float32(1) / (amax / np.float32(127))
        xs = ((rng.integers(-126, 126, 255) + 0.5).astype(np.float32) / inv).astype(np.float32)
        if k % 2:
            xs = np.nextafter(xs, np.float32(9 * rng.choice([-1, 1])), dtype=np.float32)
        rows.append(np.concatenate([[amax], xs]))
    x = np.stack(rows).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"):
        _compare_with_ggml(x, name)


def test_quantize_dequantized_k_quants_equal_ggml(gemma3_path) -> None:
    """Requantizing (Gemma 3's Q4_K/Q6_K weights decoded to f32), the case llama-quantize
    --allow-requantize runs: decoded values sit on a grid, which makes rounding ties common."""
    from jllama.gguf.reader import read_gguf

    g = read_gguf(gemma3_path)
    for tname in ("blk.5.ffn_down.weight", "blk.11.attn_output.weight"):
        t = g.tensors[tname]
        raw = np.asarray(t.data).reshape(t.shape[0], -1)
        x = dequantize_np(raw, t.qtype, t.shape[-1])
        for name in ("Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"):
            if t.shape[-1] % qtype_info(name).block_size == 0:
                _compare_with_ggml(x, name)
