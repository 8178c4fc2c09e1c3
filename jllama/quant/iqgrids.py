"""The i-quants' lattice tables (ggml's iq2xxs_grid, iq2xs_grid, iq2s_grid, iq1s_grid, ksigns).

gguf-py carries them packed (``gguf.quants.<TYPE>.grid_hex``); they are unpacked once here, as
the byte values ggml's ``uint64`` grid entries hold, so that the dequantizers (formats.py) and
the quantizers' searches (iq2.py) share one copy and never a pasted table.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def grid(name: str) -> np.ndarray:
    """``[n_points, 8]`` grid of ggml type ``name`` (IQ2_XXS, IQ2_XS, IQ2_S: uint8 magnitudes;
    IQ1_S/IQ1_M: int8 in {-1, 0, 1})."""
    import gguf.quants

    cls = getattr(gguf.quants, name)
    cls.init_grid()
    g = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)
    out = g.astype(np.int8 if name in ("IQ1_S", "IQ1_M") else np.uint8)
    out.setflags(write=False)
    return out


@functools.cache
def ksigns() -> np.ndarray:
    """ggml's ksigns_iq2xs: 7 sign bits + the parity bit that makes an even count, ``[128]``."""
    import gguf.quants

    k = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8).copy()
    k.setflags(write=False)
    return k
