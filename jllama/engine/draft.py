"""Speculative decoding settings (import-light: the config layer reads them without JAX)."""

from __future__ import annotations

import dataclasses

from jllama.errors import ConfigError


@dataclasses.dataclass
class DraftConfig:
    """Speculative decoding (llama.cpp's --model-draft / --draft-max / --draft-min / --draft-p-min).

    ``kind``: "model" (a small draft model, ``model`` set), "ngram" (prompt lookup: proposals
    copied from earlier text, no second model), or null (off)."""

    kind: str | None = None
    model: str | None = None
    n: int = 16  # max tokens drafted per step (--draft-n / --draft-max)
    n_min: int = 0  # fewer drafted tokens than this: plain decode (--draft-min)
    p_min: float = 0.75  # stop drafting when the draft's top probability falls below (--draft-min-p)
    ngram: int = 3  # n-gram size matched for prompt lookup


def parse_draft(draft: DraftConfig | dict) -> DraftConfig:
    """A DraftConfig from a config section or dict (names unknown keys); the caller loads
    the draft model when ``kind`` is "model" and passes it to ``Speculative``."""
    if isinstance(draft, dict):
        names = {f.name for f in dataclasses.fields(DraftConfig)}
        bad = sorted(set(draft) - names)
        if bad:
            raise ConfigError(f"unknown draft settings {bad}; known: {sorted(names)}")
        draft = DraftConfig(**draft)
    if draft.kind is None and draft.model:
        draft = dataclasses.replace(draft, kind="model")
    if draft.kind == "model" and not draft.model:
        raise ConfigError("'draft.kind' is model but 'draft.model' is not set")
    return draft
