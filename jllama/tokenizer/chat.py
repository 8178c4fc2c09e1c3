"""Chat templates rendered the way Hugging Face transformers (and llama-cpp-python) do.

Templates in GGUF (``tokenizer.chat_template``) are written for transformers' Jinja setup:
a sandboxed immutable environment with trim_blocks/lstrip_blocks, ``raise_exception``,
``strftime_now`` and a ``tojson`` filter that keeps non-ASCII characters. Matching that setup
is what makes the rendered prompt, and so the token ids, the same as other runtimes.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jllama.errors import JllamaError
from jllama.tokenizer.chat_builtin import detect, is_builtin, render_builtin

# Used only when a caller explicitly asks for a fallback (a model without a template).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(JllamaError):
    """A chat template is missing, does not compile, or fails while rendering."""


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # a filter's lazy result (``tools | map(attribute='function') | tojson``, llama.cpp's
    # DeepSeek R1 template) is a list to llama.cpp's Jinja engine
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys, default=list)


def _safe(x: Any) -> Any:
    # without autoescaping ``|safe`` must not make a Markup: Markup + str would HTML-escape
    # the str (functionary v3.1's "'"|safe + description), which llama.cpp never does
    return x


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _lenient_undefined() -> type:
    import jinja2

    class LenientUndefined(jinja2.Undefined):
        """An undefined value joins text as nothing, as in llama.cpp's Jinja engine
        (firefunction v2's ``suffix + "\\n" + functions``)."""

        def __add__(self, other: Any) -> Any:
            return other

        __radd__ = __add__

    return LenientUndefined


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"],
                                        undefined=_lenient_undefined())
    env.filters["tojson"] = _tojson
    env.filters["safe"] = _safe
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


def check_template(template: str) -> None:
    """Raise ChatTemplateError when ``template`` does not compile."""
    _compile(template)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                tools: list | None = None, bos_token: str = "", eos_token: str = "",
                jinja: bool = True, **extra: Any) -> str:
    """Render ``messages`` with a model's chat template into the prompt string.

    ``template``: Jinja source, or the name of one of llama.cpp's built-in templates
    (chat_builtin.BUILTIN_TEMPLATES), rendered as llama_chat_apply_template renders it.
    ``jinja=False`` (llama.cpp's --no-jinja): the built-in template llama.cpp detects from
    the source renders it (chat_builtin.detect), as llama_chat_apply_template does.
    Raises ``ChatTemplateError`` (a ``JllamaError``) when there is no template or it fails;
    pass ``CHATML_TEMPLATE`` explicitly to fall back to ChatML.
    """
    if not template:
        raise ChatTemplateError("the model has no chat template (tokenizer.chat_template)")
    if not jinja:
        name = detect(template)
        if name is None:  # llama.cpp's words (common_chat_templates_apply_legacy)
            raise ChatTemplateError("this custom template is not supported, try using --jinja")
        return render_builtin(name, messages, add_generation_prompt)
    if is_builtin(template):  # a llama.cpp built-in name (--chat-template llama3, ...)
        return render_builtin(template, messages, add_generation_prompt)
    compiled = _compile(template)
    if tools is not None:  # no tools: undefined to the template, as llama.cpp renders it
        extra["tools"] = tools
    try:
        return compiled.render(messages=messages, bos_token=bos_token,
                               eos_token=eos_token, add_generation_prompt=add_generation_prompt,
                               **extra)
    except Exception as e:  # template bugs and raise_exception() are user-facing errors
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
