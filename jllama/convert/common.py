"""What every part of convert-hf shares: its error type and its optional imports."""

from __future__ import annotations

import importlib
from types import ModuleType

from jllama.errors import JllamaError


class ConvertError(JllamaError):
    """The checkpoint cannot be converted (missing file, unknown architecture, bad tensor)."""


def need(module: str) -> ModuleType:
    """An optional dependency of convert-hf, or one clear error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConvertError(f"convert-hf needs the '{module}' package: pip install "
                           f"'jllama[convert]' ({e})") from None


def gguf_py() -> ModuleType:
    """gguf-py: the upstream key names, tensor-name map and metadata heuristics."""
    import gguf

    return gguf
