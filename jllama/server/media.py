"""Where a request's images come from, as llama-server's ``handle_media`` reads them
(tools/server/server-common.cpp): a ``data:`` URI (image/video/audio, base64), a ``file://``
path under the ``--media-path`` directory, an ``http(s)://`` URL, or bare base64.

One difference, on purpose: llama-server downloads every http(s) URL it is sent; jllama
fetches them only when the server was started with ``--allow-remote-media`` (a server that
reaches out to any address a client names is a request-forgery risk), with llama-server's
limits (10 MB, 10 s, a 2xx status). ``file://`` paths obey llama-server's
``fs_validate_filename(path, allow_subdirs=true)``: no ``..``, no control or reserved
characters, at most 255 bytes.
"""

from __future__ import annotations

import base64
import binascii
import os

from jllama.server.openai_schema import bad

REMOTE_MAX_BYTES = 10 * 1024 * 1024  # llama-server's common_remote_params for images
REMOTE_TIMEOUT_S = 10.0
_RESERVED = set(':*?"<>|') | {"\uff0e", "\u2215", "\u2216", "\ufffd", "\ufeff"}


def media_marker() -> str:
    """llama-server's get_media_marker: ``LLAMA_MEDIA_MARKER`` when set, else
    ``<__media_`` + 32 random letters and digits + ``__>``, fixed for the process. A random
    marker keeps text that happens to contain ``<__media__>`` from taking an image's place;
    clients of /completion read it from /props (``media_marker``)."""
    env = os.environ.get("LLAMA_MEDIA_MARKER")
    if env:
        return env
    import secrets
    import string

    abc = string.digits + string.ascii_uppercase + string.ascii_lowercase
    return "<__media_" + "".join(secrets.choice(abc) for _ in range(32)) + "__>"


def valid_relative_path(p: str) -> bool:
    """llama-server's fs_validate_filename with subdirectories allowed."""
    if not p or len(p.encode("utf-8", "surrogatepass")) > 255:
        return False
    for ch in p:
        c = ord(ch)
        if c <= 0x1F or c == 0x7F or 0x80 <= c <= 0x9F or 0xD800 <= c <= 0xDFFF or ch in _RESERVED:
            return False
    return not (p[0] == " " or p[-1] in " ." or ".." in p or p == ".")


def b64(param: str, data: str) -> bytes:
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(param, "the image is not valid base64", "invalid_image") from None
    if not out:
        raise bad(param, "the image data is empty", "invalid_image")
    return out


def media_bytes(param: str, url: str, media_path: str | None = None,
                allow_remote: bool = False) -> bytes:
    """The bytes an image URL names; ApiError(400) with one clear line otherwise."""
    if url.startswith("http"):
        if not allow_remote:
            raise bad(param, "remote image URLs are not fetched unless the server was started "
                      "with --allow-remote-media; send a data URL (data:image/png;base64,...)",
                      "unsupported_content")
        return _fetch(param, url)
    if url.startswith("file://"):
        if not media_path:
            raise bad(param, "file:// URLs are not allowed unless --media-path is specified",
                      "unsupported_content")
        rel = url[len("file://"):]
        if not valid_relative_path(rel):
            raise bad(param, f"file path is not allowed: {rel}", "invalid_image")
        full = os.path.join(media_path, rel.lstrip("/"))
        try:
            with open(full, "rb") as f:
                return f.read()
        except OSError:
            raise bad(param, f"file does not exist or cannot be opened: {rel}",
                      "invalid_image") from None
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or "," in data:
            raise bad(param, "invalid uri-encoded base64 value", "invalid_image")
        if not head.startswith(("data:image/", "data:video/", "data:audio/")):
            raise bad(param, f"invalid uri format: {head} (an image needs data:image/...)",
                      "invalid_image")
        if not head.endswith("base64"):
            raise bad(param, "the data URI must be base64 encoded", "invalid_image")
        return b64(param, data)
    return b64(param, url)


def _fetch(param: str, url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as r:  # noqa: S310
            data = r.read(REMOTE_MAX_BYTES + 1)
            status = r.status
    except urllib.error.HTTPError as e:
        raise bad(param, f"failed to download image ({url}: HTTP {e.code})",
                  "invalid_image") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad(param, f"failed to download image ({url}: {getattr(e, 'reason', e)})",
                  "invalid_image") from None
    if not 200 <= status < 300:
        raise bad(param, f"failed to download image ({url}: HTTP {status})", "invalid_image")
    if len(data) > REMOTE_MAX_BYTES:
        raise bad(param, f"failed to download image ({url}: larger than "
                  f"{REMOTE_MAX_BYTES // (1024 * 1024)} MB)", "invalid_image")
    return data
