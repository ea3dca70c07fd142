"""Chat prompts: render a conversation through the model's Jinja chat template.

The template comes from the file's ``tokenizer.chat_template``; it is rendered the way Hugging
Face ``apply_chat_template`` renders it (sandboxed Jinja, ``trim_blocks`` + ``lstrip_blocks``,
``{% break %}``/``{% continue %}``, ``raise_exception``, a ``tojson`` that keeps non-ASCII).
Files without a template get ChatML (``<|im_start|>role ... <|im_end|>``).

    text = render_chat(tok.chat_template, [{"role": "user", "content": "Hi"}],
                       bos_token=tok.token_text(tok.bos_id), eos_token=tok.token_text(tok.eos_id))
    ids = tok.encode(text, add_special=True, parse_special=True)
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

from .errors import BadArgument, FormatError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(BadArgument):
    """The template refused the conversation through ``raise_exception`` (e.g. roles order)."""


def _raise_exception(message: str):
    raise TemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # NOTE: like transformers: no HTML escaping, non-ASCII kept (Jinja's own tojson escapes)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise FormatError(f"chat template: line {e.lineno}: {e.message}") from None


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise BadArgument(f"messages must be a list of {{'role', 'content'}} dicts, "
                          f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise BadArgument(f"messages[{i}] = {m!r}: each message needs a 'role' string "
                              "(and usually a 'content')")
        out.append(dict(m))
    return out


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                **extra: Any) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    ``template=None`` (or empty) uses ChatML.  ``add_generation_prompt`` ends the text with
    the opening of an assistant turn.  ``extra`` keyword arguments (``tools=...``, ...) reach
    the template as variables.  Tokenize the result with ``parse_special=True``.
    """
    from jinja2.exceptions import SecurityError, UndefinedError

    msgs = _check_messages(messages)
    compiled = _compile(template or CHATML_TEMPLATE)
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except SecurityError as e:
        raise FormatError(f"chat template does something unsafe: {e}") from None
    except UndefinedError as e:
        raise BadArgument(f"chat template needs a value the messages lack: {e.message}") from None
    except TypeError as e:  # e.g. '+' of a str and a None content
        raise BadArgument(f"chat template could not render these messages: {e}") from None
