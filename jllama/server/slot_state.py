"""llama-server's slot actions: ``POST /slots/{id}?action=save|restore|erase`` (server-context.cpp
``post_slots`` and its SLOT_SAVE / SLOT_RESTORE / SLOT_ERASE tasks), with its status codes,
messages and answers.

A saved slot is what the slot holds: its token list (the prompt cache's key) and its KV cache
rows for those tokens, so a restored slot goes on exactly as if it had never left: the next
request sharing its prefix reuses it. The file format is jllama's own (a header naming the
model's cache layout, then the tokens and the raw rows): llama.cpp's state files do not load
here, nor ours in llama-server.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import struct
import time

import jax.numpy as jnp
import numpy as np

from jllama.server.openai_schema import ApiError
from jllama.server.scheduler import slot_index

MAGIC = b"JLSLOT\x00\x01"
FORMAT = 1
_INVALID_FILE = "No available space in KV cache or invalid slot save file"


class SlotFileError(Exception):
    """A file that cannot be restored (llama-server answers 400 'Unable to restore slot: ...')."""


def _error(status: int, message: str) -> ApiError:
    type_ = {400: "invalid_request_error", 501: "not_supported_error"}.get(status,
                                                                          "server_error")
    return ApiError(status, message, code=status, type_=type_)  # type: ignore[arg-type]


# llama.cpp's fs_validate_filename (common.cpp) without subdirectories: what a slot file may be
# called, so that no name reaches outside --slot-save-path
_FORBIDDEN = set(':*?"<>|/\\') | {"\uff0e", "\u2215", "\u2216", "\ufffd", "\ufeff"}


def valid_filename(name: str) -> bool:
    if not name or len(name.encode("utf-8", "surrogatepass")) > 255:
        return False
    for ch in name:
        c = ord(ch)
        if (c <= 0x1F or c == 0x7F or 0x80 <= c <= 0x9F or 0xD800 <= c <= 0xDFFF
                or ch in _FORBIDDEN):
            return False
    if name[0] == " " or name[-1] in " .":
        return False
    return ".." not in name and name != "."


def _model_key(spec) -> dict:
    return {"arch": spec.arch, "n_vocab": int(spec.n_vocab), "n_layer": int(spec.n_layer),
            "n_embd": int(spec.n_embd)}


def save(engine, slot: int, path: str) -> tuple[int, int]:
    """Write the slot's tokens and KV rows to ``path``; returns (tokens, bytes written)."""
    tokens, marks, rows = engine.export_slot(slot)
    header = {"format": FORMAT, "model": _model_key(engine.spec), "n_tokens": len(tokens),
              "marks": marks,
              "layout": [[list(r.shape[:-2]) + [r.shape[-1]], str(r.dtype)] for r in rows]}
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head)
        f.write(np.asarray(tokens, "<i4").tobytes())
        for r in rows:
            f.write(np.ascontiguousarray(r).tobytes())
        n = f.tell()
    return len(tokens), n


def restore(engine, slot: int, path: str, media: bool = True) -> tuple[int, int]:
    """Load a file written by ``save`` (for this model and cache layout) into the slot;
    returns (tokens, bytes read). Raises SlotFileError when it cannot; ``media``: whether the
    server has a projector (llama-server restores an image's cells only then)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise SlotFileError(_INVALID_FILE) from None
    try:
        if data[:8] != MAGIC:
            raise ValueError("magic")
        (hl,) = struct.unpack_from("<I", data, 8)
        header = json.loads(data[12 : 12 + hl])
        if header.get("format") != FORMAT or header.get("model") != _model_key(engine.spec):
            raise ValueError("model")
        layout = [(tuple(s), d) for s, d in header["layout"]]
        if layout != [(tuple(s), d) for s, d in engine.slot_layout()]:
            raise ValueError("layout")
        n = int(header["n_tokens"])
        off = 12 + hl
        tokens = np.frombuffer(data, "<i4", n, off).tolist()
        off += 4 * n
        rows = []
        for shape, dt in layout:
            full = (*shape[:-1], n, shape[-1])
            a = np.frombuffer(data, jnp.dtype(dt), math.prod(full), off).reshape(full)
            off += a.nbytes
            rows.append(a)
        if off != len(data):
            raise ValueError("size")
    except (ValueError, KeyError, TypeError, struct.error):
        raise SlotFileError(_INVALID_FILE) from None
    if n > engine.ctx_size:
        raise SlotFileError("Restored prompt does not fit in the slot context")
    n_vocab = engine.spec.n_vocab
    if any(t >= n_vocab for t in tokens):  # negative ids: an image's cells
        raise SlotFileError("Invalid tokens in slot save file")
    if not media and any(t < 0 for t in tokens):
        raise SlotFileError("Cannot restore media tokens without an mmproj")
    engine.import_slot(slot, tokens, [tuple(m) for m in header.get("marks", [])], rows)
    return n, len(data)


def _slot_id(text: str) -> int:
    """std::stoi as llama-server reads the path's slot id: leading blanks, a sign, digits
    (what follows them is ignored)."""
    m = re.match(r"\s*([+-]?\d+)", text or "")
    if not m or not -(2**31) <= int(m.group(1)) < 2**31:
        raise _error(400, "Invalid slot ID")
    return int(m.group(1))


async def post_slot_action(state, request) -> dict:
    """POST /slots/{id_slot}?action=...: the answer's JSON, or an ApiError."""
    save_dir = state.settings.slot_save_path
    if not save_dir:
        raise _error(501, "This server does not support slots action. Start it with "
                     "`--slot-save-path`")
    id_slot = _slot_id(request.path_params.get("id_slot", ""))
    action = request.query_params.get("action", "")
    if action not in ("save", "restore", "erase"):
        raise _error(400, "Invalid action")
    filename = None
    if action != "erase":
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _error(500, f"[json.exception.parse_error.101] {e}") from None
        if not isinstance(body, dict) or "filename" not in body:
            raise _error(500, "[json.exception.out_of_range.403] key 'filename' not found")
        filename = body["filename"]
        if not isinstance(filename, str):
            raise _error(500, "[json.exception.type_error.302] type must be string")
        if not valid_filename(filename):
            raise _error(400, "Invalid filename")
    sch = state.scheduler
    b = slot_index(id_slot, sch.n_slots)
    eng = sch.engine

    def run(slot: int) -> dict:
        t0 = time.perf_counter()
        if action == "erase":
            n = int(eng.pos[slot])
            eng.rewind(slot, 0)
            return {"id_slot": id_slot, "n_erased": n}
        path = save_dir + filename
        if action == "save":
            try:
                n, size = save(eng, slot, path)
            except OSError:
                raise _error(500, "Unable to save slot") from None
            return {"id_slot": id_slot, "filename": filename, "n_saved": n, "n_written": size,
                    "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}
        try:
            n, size = restore(eng, slot, path, getattr(state.llm, "vision", None) is not None)
        except SlotFileError as e:
            eng.rewind(slot, 0)  # llama-server clears the slot on a failed restore
            raise _error(400, f"Unable to restore slot: {e}") from None
        return {"id_slot": id_slot, "filename": filename, "n_restored": n, "n_read": size,
                "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}

    return await asyncio.wrap_future(sch.on_slot(b, run))
