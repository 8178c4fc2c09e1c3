"""User-facing errors.

Every mistake a user can make (bad file, bad config, bad request) raises a subclass of
``JllamaError``; the CLI prints its message on one line and exits non-zero without a traceback.
Anything else escaping is a bug in jllama and keeps its traceback.
"""

from __future__ import annotations


class JllamaError(Exception):
    """Base of all errors caused by user input rather than by jllama itself."""


class GGUFError(JllamaError):
    """A GGUF file is malformed, truncated, or uses something we cannot read."""


class ConfigError(JllamaError):
    """A run config or a CLI override is invalid."""


class ModelError(JllamaError):
    """The model (architecture, hyperparameters, tensors) is not supported or inconsistent."""


class QuantError(JllamaError):
    """An unknown quantization type or an impossible quantization request."""


class ContextError(JllamaError):
    """A prompt or generation does not fit the context window."""


class PagePoolError(ContextError):
    """The paged KV cache's page pool has no free page for what a slot needs (engine/pages.py):
    a server can free idle slots' pages and try again."""


class ImageError(JllamaError):
    """An image cannot be read (missing, unsupported format, too large) or does not fit."""
