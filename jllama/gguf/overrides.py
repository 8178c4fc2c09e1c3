"""GGUF metadata overrides: llama.cpp's ``--override-kv KEY=TYPE:VALUE`` (llama-cpp-python's
``Llama(kv_overrides={key: value})``), applied to a file's metadata before anything reads it.

llama.cpp keeps the overrides beside the file and consults them whenever the loader reads a
key (llama-model-loader.cpp ``get_key``): an override of the expected kind replaces the file's
value (or supplies a missing key); one of another kind is ignored with a warning. Here the
expected kind is the kind of the value the file stores, which is the kind the loader reads.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from jllama.errors import ConfigError
from jllama.gguf.constants import ValueType
from jllama.gguf.reader import GGUFFile

_INT_TYPES = {ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32,
              ValueType.INT32, ValueType.UINT64, ValueType.INT64}
_MAX_KEY = 127  # llama_model_kv_override.key is char[128], as its val_str


def parse_kv_override(text: str) -> tuple[str, bool | int | float | str]:
    """``KEY=TYPE:VALUE`` (TYPE int, float, bool or str) as common/common.cpp's
    ``string_parse_kv_override`` reads it, except that a number must be one (llama.cpp's atol /
    atof would read 'x' as 0)."""
    key, eq, rest = text.partition("=")
    if not eq or not key or len(key) > _MAX_KEY:
        raise ConfigError(f"--override-kv {text!r}: malformed, expected KEY=TYPE:VALUE "
                          "(TYPE int, float, bool or str)")
    kind, colon, val = rest.partition(":")
    if not colon or kind not in ("int", "float", "bool", "str"):
        raise ConfigError(f"--override-kv {text!r}: invalid type, expected int, float, bool or "
                          "str before ':'")
    try:
        if kind == "int":
            return key, int(val)
        if kind == "float":
            return key, float(val)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise ConfigError(f"--override-kv {text!r}: {val!r} is not {what}") from None
    if kind == "bool":
        if val not in ("true", "false"):
            raise ConfigError(f"--override-kv {text!r}: invalid boolean, expected true or false")
        return key, val == "true"
    if len(val) > _MAX_KEY:
        raise ConfigError(f"--override-kv {text!r}: a string value cannot exceed 127 characters")
    return key, val


def parse_kv_overrides(items: list[str]) -> dict[str, bool | int | float | str]:
    """Each flag value may hold several comma-separated overrides (llama.cpp's parse_csv_row);
    a later override of the same key wins."""
    out: dict[str, bool | int | float | str] = {}
    for item in items:
        for part in item.split(","):
            k, v = parse_kv_override(part)
            out[k] = v
    return out


def _kind(vt: ValueType) -> type | None:
    if vt in _INT_TYPES:
        return int
    if vt in (ValueType.FLOAT32, ValueType.FLOAT64):
        return float
    if vt == ValueType.BOOL:
        return bool
    if vt == ValueType.STRING:
        return str
    return None  # arrays: llama.cpp's overrides cannot replace them


def _value_kind(v: Any) -> type:
    if isinstance(v, bool):
        return bool
    if isinstance(v, int):
        return int
    if isinstance(v, float):
        return float
    if isinstance(v, str):
        return str
    raise ConfigError(f"kv override value {v!r}: expected a bool, int, float or str")


_NEW_TYPE = {int: ValueType.INT64, float: ValueType.FLOAT32, bool: ValueType.BOOL,
             str: ValueType.STRING}


def apply_kv_overrides(g: GGUFFile, overrides: dict[str, Any] | None) -> GGUFFile:
    """``g`` with its metadata overridden (a new header; the tensors are shared)."""
    if not overrides:
        return g
    meta, types = dict(g.metadata), dict(g.metadata_types)
    for key, v in overrides.items():
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
            raise ConfigError(f"kv override key {key!r}: expected a name of 1 to 127 characters")
        kind = _value_kind(v)
        if key in types:
            want = _kind(types[key][0])
            if want is not kind:
                print(f"jllama: warning: bad metadata override type for key '{key}', expected "
                      f"{want.__name__ if want else 'an array'} but got {kind.__name__}; "
                      "keeping the file's value", file=sys.stderr)
                continue
            vt = types[key]
        else:
            vt = (_NEW_TYPE[kind], None)
        # the loader stores a float override in a C float (every float hparam is one)
        meta[key] = float(np.float32(v)) if kind is float else v
        types[key] = vt
    return dataclasses.replace(g, metadata=meta, metadata_types=types)
