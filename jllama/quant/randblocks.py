"""Random quantized blocks: valid ggml bytes of any block type at memory speed.

For speed and memory benchmarks only (``jllama synth --random-blocks``): the values mean nothing.
Every byte of a block is random except its scale fields, which are set to small finite numbers so
that a forward pass stays finite. Codes, packed sub-block scales and grid indices can take any bit
pattern in every type listed here (every index fits its table), so random bytes are a valid block
everywhere except in the f16 (and E8M0) super-block scales: random ones would include infinities,
NaNs and values near 65504.

A scale field is rewritten with two masks on its little-endian word: ``word & keep | set``. For an
f16 scale ``keep`` keeps the 10 mantissa bits and ``set`` gives the exponent ``k`` (and sign), so
the scale lies in ``[2^k, 2^(k+1))``; ``k`` is chosen per type so the weights have a standard
deviation of a few hundredths, like a trained model's. The byte offsets are those of ggml's block
structs (ggml-common.h), which jllama's dequantizers (``jllama.quant.formats``) read; tests check
them against gguf-py's independent dequantizers (setting exponent ``k + 1`` instead must double
every decoded value exactly, which holds only if the fields are the scales and nothing else).
"""

from __future__ import annotations

import numpy as np

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info

T = QType


def _f16(off: int, k: int, negative: bool = False) -> tuple[int, int, int, int]:
    """An f16 scale at byte ``off``, in [2^k, 2^(k+1)) (negated with ``negative``)."""
    return off, 2, 0x03FF, ((k + 15) << 10) | (0x8000 if negative else 0)


# type -> [(byte offset, width, keep mask, set bits)], with the scale exponent k as a parameter so
# the tests can move every scale by one binade. Offsets: ggml-common.h's block_* structs.
def _fields(t: QType, dk: int = 0) -> list[tuple[int, int, int, int]]:
    if t in (T.Q4_0,):  # d, qs[16]
        return [_f16(0, -8 + dk)]
    if t == T.Q4_1:  # d, m, qs[16]; m negative: -m near the mean of d * q
        return [_f16(0, -8 + dk), _f16(2, -5 + dk, True)]
    if t == T.Q5_0:  # d, qh[4], qs[16]
        return [_f16(0, -9 + dk)]
    if t == T.Q5_1:  # d, m, qh[4], qs[16]
        return [_f16(0, -9 + dk), _f16(2, -5 + dk, True)]
    if t in (T.Q8_0, T.IQ4_NL):  # d, qs[32] / qs[16]
        return [_f16(0, -12 + dk)]
    if t == T.Q2_K:  # scales[16], qs[64], d, dmin
        return [_f16(80, -9 + dk), _f16(82, -9 + dk)]
    if t == T.Q3_K:  # hmask[32], qs[64], scales[12], d
        return [_f16(108, -11 + dk)]
    if t == T.Q4_K:  # d, dmin, scales[12], qs[128]
        return [_f16(0, -13 + dk), _f16(2, -10 + dk)]
    if t == T.Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
        return [_f16(0, -14 + dk), _f16(2, -10 + dk)]
    if t == T.Q6_K:  # ql[128], qh[64], scales[16], d
        return [_f16(208, -14 + dk)]
    if t == T.IQ4_XS:  # d, scales_h, scales_l[4], qs[128]
        return [_f16(0, -14 + dk)]
    if t == T.TQ1_0:  # qs[48], qh[4], d
        return [_f16(52, -6 + dk)]
    if t == T.TQ2_0:  # qs[64], d
        return [_f16(64, -6 + dk)]
    if t in (T.Q1_0, T.Q2_0):  # d, qs[16]: values +-d / (-1, 0, 1, 2) * d
        return [_f16(0, -6 + dk)]
    if t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS):  # d first
        return [_f16(0, -12 + dk)]
    if t == T.IQ3_S:
        return [_f16(0, -14 + dk)]
    if t == T.IQ1_S:
        return [_f16(0, -8 + dk)]
    if t == T.IQ1_M:
        # qs[32], qh[16], scales[8]: d's f16 bits are the top nibbles of the four scale words
        # (word 3 holds bits 15..12: sign and the exponent's top 3 bits; word 2 bits 11..8: the
        # exponent's low 2 bits and 2 mantissa bits); the others stay random mantissa
        e = -8 + dk + 15
        return [(54, 2, 0x0FFF, (e >> 2) << 12), (52, 2, 0x3FFF, (e & 3) << 14)]
    if t == T.MXFP4:  # e (E8M0), qs[16]: values kvalue * 2^(e-128); e fixed
        return [(0, 1, 0x00, 120 + dk)]
    if t == T.NVFP4:  # d[4] (UE4M3: exponent bits 6..3, bias 7, halved), qs[32]
        return [(i, 1, 0x07, (1 + dk) << 3) for i in range(4)]
    return []


RANDOM_BLOCK_TYPES = tuple(
    t for t in QType if _fields(t) and t not in (T.F32, T.F16, T.BF16)
)


def fix_scales(blocks: np.ndarray, qtype: int, dk: int = 0) -> np.ndarray:
    """Set the scale fields of uint8 ``blocks`` ``[N, type_size]`` in place (see the module doc);
    ``dk`` moves every scale by that many binades (tests)."""
    t = QType(int(qtype))
    fields = _fields(t, dk)
    if not fields:
        raise QuantError(f"no random-block layout for type {t.name}")
    for off, width, keep, set_ in fields:
        w = blocks[:, off : off + width].view("<u2" if width == 2 else np.uint8)
        w &= keep
        w |= set_
    return blocks


def random_blocks(qtype: int, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` random blocks of ``qtype`` as uint8 ``[n_blocks, type_size]``."""
    ts = qtype_info(int(qtype)).type_size
    n = n_blocks * ts
    # the bit generator's raw words: the fastest random bytes numpy has (releases the GIL)
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
    return fix_scales(raw.reshape(n_blocks, ts), qtype)
