"""Image preprocessing as libmtmd does it (tools/mtmd/mtmd-image.cpp, clip-impl.h), in numpy.

An image is ``uint8 [height, width, 3]`` RGB. libmtmd resizes with its port of Pillow's
separable resampler (``img_tool::resize_pillow``: weights rounded to 22-bit fixed point, a
horizontal pass to uint8, then a vertical pass to uint8), optionally preserving the aspect ratio
and padding (``PAD_CEIL``: the scaled size rounded up, centred on the pad colour), then converts
to f32 as ``u8 / 255.0f`` and normalises per channel as ``(x - mean) / std`` in f32.
"""

from __future__ import annotations

import math

import numpy as np

from jllama.errors import ImageError, ModelError

PRECISION_BITS = 32 - 8 - 2
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(algo: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if algo == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's bicubic (ggml and PyTorch use -0.75)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _weights(in_size: int, out_size: int, algo: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(bounds [out, 2] = (first input, count), fixed-point weights [out, ksize], ksize)."""
    scale = filterscale = in_size / out_size
    filterscale = max(filterscale, 1.0)
    support = _SUPPORT[algo] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    pre = np.zeros((out_size, ksize), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = _filter(algo, (np.arange(xmax) + xmin - center + 0.5) * ss)
        # sequential sum, as the C loop adds them
        ww = 0.0
        for v in w:
            ww += float(v)
        if ww != 0.0:
            w = w / ww
        pre[xx, :xmax] = w
        bounds[xx] = (xmin, xmax)
    fxp = math.ldexp(1.0, PRECISION_BITS)
    scaled = pre * fxp + np.where(pre < 0, -0.5, 0.5)
    return bounds, np.trunc(scaled).astype(np.int64), ksize


def _pass(src: np.ndarray, out_size: int, algo: str, axis: int) -> np.ndarray:
    """One resampling pass along ``axis`` (1: horizontal, 0: vertical) of uint8 [H, W, 3]."""
    bounds, k, ksize = _weights(src.shape[axis], out_size, algo)
    s = np.moveaxis(src.astype(np.int64), axis, 0)  # [in, other, 3]
    out = np.empty((out_size,) + s.shape[1:], np.int64)
    for o in range(out_size):
        lo, cnt = bounds[o]
        acc = np.full(s.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
        acc = acc + np.tensordot(k[o, :cnt], s[lo:lo + cnt], axes=(0, 0))
        out[o] = acc
    # int32 accumulators in C: the sums stay far inside int32 for uint8 inputs
    out = np.clip(out >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_pillow(img: np.ndarray, width: int, height: int, algo: str) -> np.ndarray:
    """``img_tool::resize_pillow``: horizontal pass (if the width changes), then vertical."""
    if algo not in _SUPPORT:
        raise ModelError(f"unsupported resize algorithm '{algo}'")
    out = img
    if width != img.shape[1]:
        out = _pass(out, width, algo, 1)
    if height != img.shape[0]:
        out = _pass(out, height, algo, 0)
    return out


def resize(img: np.ndarray, width: int, height: int, algo: str, pad: str = "ceil",
           pad_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """``img_tool::resize``: a direct resize (``pad="none"``) or aspect-preserving with padding."""
    h0, w0 = img.shape[:2]
    if (w0, h0) == (width, height):
        return img.copy()
    if pad == "none":
        return resize_pillow(img, width, height, algo)
    scale = min(np.float32(width) / np.float32(w0), np.float32(height) / np.float32(h0))
    rnd = (lambda v: int(np.round(v))) if pad == "nearest" else (lambda v: int(np.ceil(v)))
    nw = min(rnd(np.float32(w0) * scale), width)
    nh = min(rnd(np.float32(h0) * scale), height)
    small = resize_pillow(img, nw, nh, algo)
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.asarray(pad_color, np.uint8)
    if pad == "nearest":
        ox, oy = int(np.round((width - nw) / np.float32(2))), int(np.round((height - nh) / np.float32(2)))
    else:
        ox, oy = (width - nw) // 2, (height - nh) // 2
    out[oy:oy + nh, ox:ox + nw] = small
    return out


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """``clip_image_f32::from_u8`` then ``normalize``: f32 [H, W, 3]."""
    x = img.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preserved_ratio_size(width: int, height: int, align: int, min_pixels: int,
                         max_pixels: int) -> tuple[int, int]:
    """``img_tool::calc_size_preserved_ratio`` (transformers' smart_resize as libmtmd computes
    it, in f32): (width, height) rounded to multiples of ``align``, scaled down to at most
    ``max_pixels`` or up to at least ``min_pixels`` keeping the aspect ratio."""
    f32 = np.float32
    fa = f32(align)

    def by(x, how) -> int:  # x / align rounded as std::round (half away from zero) / ceil / floor
        q = float(f32(x) / fa)
        r = math.floor(q + 0.5) if how == "round" else (math.ceil(q) if how == "ceil"
                                                         else math.floor(q))
        return int(r) * align

    w_bar = max(align, by(width, "round"))
    h_bar = max(align, by(height, "round"))
    if max_pixels > 0 and h_bar * w_bar > max_pixels:
        beta = f32(np.sqrt(f32(height) * f32(width) / f32(max_pixels)))
        h_bar = max(align, by(f32(height) / beta, "floor"))
        w_bar = max(align, by(f32(width) / beta, "floor"))
    elif min_pixels > 0 and h_bar * w_bar < min_pixels:
        beta = f32(np.sqrt(f32(min_pixels) / (f32(height) * f32(width))))
        h_bar = by(f32(height) * beta, "ceil")
        w_bar = by(f32(width) * beta, "ceil")
    return w_bar, h_bar


MAX_PIXELS = 1 << 26  # refuse decompression bombs before decoding (64 Mpixel)


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """An encoded image (PNG, JPEG, BMP, GIF, TGA, PNM, ...) -> uint8 RGB [H, W, 3].

    libmtmd decodes with stb_image, asking for 3 channels: grey is replicated, alpha dropped
    (not composited). Pillow's ``convert("RGB")`` does the same, and lossless formats decode
    to the same pixels; baseline JPEG may differ by a level in some pixels (stb_image's IDCT
    is its own)."""
    import io

    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency of the vision extra
        raise ImageError("reading images needs Pillow: pip install 'jllama[vision]'") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{source}: image of {w}x{h} pixels is too large "
                                 f"(at most {MAX_PIXELS} pixels)")
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                # stb_image keeps the high byte of 16-bit samples; Pillow would clip them
                raise ImageError(f"{source}: 16-bit and float images are not supported")
            rgb = im.convert("RGB")
            return np.asarray(rgb, np.uint8).copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{source}: image is too large ({e})") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{source}: not an image jllama can read (unsupported or corrupt "
                         f"format: {e.__class__.__name__})") from None


def load_image(path) -> np.ndarray:
    """An image file -> uint8 RGB [H, W, 3]; ImageError when missing or unreadable."""
    import os

    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"{p}: cannot read image ({e.strerror or e})") from None
    return decode_image(data, p)
