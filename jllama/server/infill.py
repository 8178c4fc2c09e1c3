"""llama-server's ``/infill``: code completion between a prefix and a suffix (fill in the middle).

The request is checked as llama-server's ``post_infill`` handler checks it, and its prompt is
laid out as ``format_prompt_infill`` (server-common.cpp) lays it out, with the GGUF's FIM tokens
(``tokenizer.ggml.fim_*_token_id`` or llama.cpp's fallbacks by token text, found when the vocab
loads)::

    [FIM_REP]myproject\\n [FIM_SEP]filename0\\n chunk0 ... [FIM_SEP]filename\\n    (extra context)
    [BOS] [FIM_PRE]prefix prompt [FIM_SUF]suffix [FIM_MID]

The prefix keeps its last 3/4 of a batch of tokens, the suffix what is left of the last quarter
after the prompt, and the extra context only what the context leaves after a batch and twice the
server's -n (its tail, so the chunks nearest the file win). The answer is the native
``/completion`` result of generating from those tokens.
"""

from __future__ import annotations

from jllama.server import embeddings as emb

# llama-server's separator between extra chunks when the vocab has no FIM_SEP token
_CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"


def unsupported(fim: dict) -> str | None:
    """llama-server's 501 text when the model cannot infill (no FIM PRE/SUF/MID token)."""
    err = ""
    for k, what in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle")):
        if fim.get(k) is None:
            err += f"{what} token is missing. "
    return f"Infill is not supported by this model: {err}" if err else None


def check(body: dict) -> list[dict]:
    """llama-server's checks of the request; returns its ``input_extra`` (default []).

    llama-server answers a bad ``input_extra`` with 400; a ``prompt`` that is not a string and a
    missing ``input_prefix``/``input_suffix`` reach it as exceptions: 500 for the missing fields
    (json ``at()``), and the prompt is tokenized as what it is."""
    extra = body.get("input_extra", [])
    if "input_extra" in body and not isinstance(extra, list):
        raise emb.server_error((400, "invalid_request_error"), '"input_extra" must be an array '
                               'of {"filename": string, "text": string}')
    for chunk in extra:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise emb.server_error((400, "invalid_request_error"), "extra_context chunk must "
                                   'contain a "text" field with a string value')
        if "filename" in chunk and not isinstance(chunk["filename"], str):
            raise emb.server_error((400, "invalid_request_error"), "extra_context chunk's "
                                   '"filename" field must be a string')
    for name in ("input_prefix", "input_suffix"):
        if name not in body:
            raise emb.server_error((500, "server_error"), f"key '{name}' not found")
        v = body[name]
        if not (isinstance(v, str) or (isinstance(v, list) and all(
                isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool))
                for t in v))):
            raise emb.server_error((500, "server_error"), f"'{name}' must be a string or a "
                                   "list of strings and token ids")
    return extra


def _mixed(tk, value) -> list[int]:
    """llama-server's tokenize_mixed without special tokens: a string, or a list of strings
    and token ids."""
    if isinstance(value, str):
        return tk.encode(value, add_special=False, parse_special=False)
    out: list[int] = []
    for p in value:
        out += tk.encode(p, add_special=False, parse_special=False) if isinstance(p, str) else [p]
    return out


def prompt_tokens(tk, fim: dict, prefix, suffix, extra: list[dict], prompt: list[int],
                  n_batch: int, n_predict: int, n_ctx: int, spm: bool) -> list[int]:
    """The infill prompt, as llama-server's format_prompt_infill builds it (see the module
    docstring). ``prompt``: the request's ``prompt`` tokens (written after the prefix);
    ``n_predict``: the server's -n (-1 when unset); ``n_ctx``: a slot's context."""
    def text(s: str) -> list[int]:
        return tk.encode(s, add_special=False, parse_special=False)

    pre, suf = _mixed(tk, prefix), _mixed(tk, suffix)
    extra_toks: list[int] = []
    if fim.get("rep") is not None:
        extra_toks += [fim["rep"], *text("myproject\n")]
    for chunk in extra:
        if fim.get("sep") is not None:
            extra_toks += [fim["sep"], *text(chunk.get("filename", "tmp") + "\n")]
        else:
            extra_toks += text(_CHUNK_SEPARATOR)
        extra_toks += text(chunk["text"])
    if fim.get("sep") is not None:
        extra_toks += [fim["sep"], *text("filename\n")]

    n_prefix = min(len(pre), 3 * (n_batch // 4))
    n_suffix = min(len(suf), max(0, n_batch // 4 - (2 + len(prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_toks))
    pre = [fim["pre"], *pre[len(pre) - n_prefix:], *prompt]
    suf = [fim["suf"], *suf[:n_suffix]]
    first, second = (suf, pre) if spm else (pre, suf)
    if tk.vocab.add_bos and tk.vocab.bos_id is not None:
        first = [tk.vocab.bos_id, *first]
    return [*extra_toks[len(extra_toks) - n_extra:], *first, *second, fim["mid"]]
