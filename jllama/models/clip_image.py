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
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}


def _sinc(v: float) -> float:
    if v == 0.0:
        return 1.0
    pv = v * 3.141592653589793
    return math.sin(pv) / pv  # libm's sin, as the C code calls (numpy's may be a SIMD one)


def _filter(algo: str, x: np.ndarray) -> np.ndarray:
    if algo == "lanczos":  # a = 3, on [-3, 3) as the C code tests it (not symmetric at 3)
        return np.array([_sinc(float(v)) * _sinc(float(v) / 3.0) if -3.0 <= v < 3.0 else 0.0
                         for v in x], np.float64)
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
    # int32 as the C accumulators: any partial sum stays under 255 * sum|w| * 2**22 < 2**31
    s = np.moveaxis(src, axis, 0).astype(np.int32)  # [in, other, 3]
    # kernel tap by kernel tap over all outputs (integer sums: the order does not matter);
    # taps past an output's count have weight 0
    out = np.full((out_size,) + s.shape[1:], 1 << (PRECISION_BITS - 1), np.int32)
    last = s.shape[0] - 1
    for j in range(ksize):
        wj = np.where(j < bounds[:, 1], k[:, j], 0).astype(np.int32)
        if wj.any():
            t = s[np.minimum(bounds[:, 0] + j, last)]
            t *= wj[:, None, None]
            out += t
    out >>= PRECISION_BITS
    out = np.clip(out, 0, 255).astype(np.uint8)
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


def idefics3_tiles(img: np.ndarray, tile: int, longest_edge: int, algo: str = "lanczos"
                   ) -> tuple[np.ndarray, list[np.ndarray], int, int]:
    """``mtmd_image_preprocessor_idefics3`` (with a preprocessor longest edge): resize so the
    longer side is ``longest_edge`` (the other side truncated, then made even), resize again
    up to whole tiles, cut ``tile``-square tiles row by row, and shrink the refined image to
    one tile for the global view. Returns (overview, tiles, grid_x, grid_y), uint8."""
    h0, w0 = img.shape[:2]
    aspect = w0 / h0  # a C double
    if w0 >= h0:
        rw, rh = longest_edge, int(longest_edge / aspect)
        rh += rh % 2
    else:
        rw, rh = int(longest_edge * aspect), longest_edge
        rw += rw % 2
    if rw <= 0 or rh <= 0:
        raise ImageError(f"image of {w0}x{h0} pixels is too narrow to resize to a longest "
                         f"side of {longest_edge}")
    gx, gy = -(-rw // tile), -(-rh // tile)
    resized = resize(img, rw, rh, algo, pad="none")
    refined = resize(resized, gx * tile, gy * tile, algo, pad="none")
    overview = resize(refined, tile, tile, algo, pad="none")
    tiles = [refined[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile].copy()
             for y in range(gy) for x in range(gx)]
    return overview, tiles, gx, gy


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """``clip_image_f32::from_u8`` then ``normalize``: f32 [H, W, 3]."""
    x = img.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- LLaVA-1.6
def llava_next_best_resolution(width: int, height: int,
                               candidates) -> tuple[int, int]:
    """``select_best_resolution`` (mtmd-image.cpp): the (width, height) candidate keeping the
    most of the image's pixels once the image is fitted into it (f32 scale, truncated sizes),
    ties going to the least wasted area, then to the first listed."""
    best, max_eff, min_wasted = (0, 0), 0, np.iinfo(np.int32).max
    for cw, ch in candidates:
        scale = min(np.float32(cw) / np.float32(width), np.float32(ch) / np.float32(height))
        tw, th = int(np.float32(width) * scale), int(np.float32(height) * scale)
        eff = min(tw * th, width * height)
        wasted = cw * ch - eff
        if eff > max_eff or (eff == max_eff and wasted < min_wasted):
            best, max_eff, min_wasted = (cw, ch), eff, wasted
    return best


def llava_next_tiles(img: np.ndarray, size: int, candidates) -> list[np.ndarray]:
    """libmtmd 0c1e570's llava-uhd preprocessor with grid pinpoints (LLaVA-1.6): an image
    larger than ``size`` on either side is resized into the best pinpoint resolution
    (bicubic, aspect kept, padded black: clip.cpp sets llava's grey pad colour for the
    refined image only when there are no pinpoints) and cut into ``size``-square tiles,
    row-major; the overview is the whole image stretched to ``size`` x ``size`` (bicubic, no
    padding). Returns the tiles, then the overview (libmtmd's chunk order for mlp)."""
    h, w = img.shape[:2]
    overview = resize(img, size, size, "bicubic", "none")
    if w <= size and h <= size:
        return [overview]
    cw, ch = llava_next_best_resolution(w, h, candidates)
    refined = resize(img, cw, ch, "bicubic", "ceil", (0, 0, 0))
    tiles = [refined[y:y + size, x:x + size].copy()
             for y in range(0, ch, size) for x in range(0, cw, size)]
    return tiles + [overview]


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
