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
import re
import threading
import time
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


# --- bounds: a template is code from the model file; it gets MAX_SECONDS and MAX_CHARS ----------
MAX_CHARS = 1 << 24  # characters of output, of any one string made, and any size argument
MAX_ITEMS = 1 << 20  # elements of a list made by repetition
MAX_SECONDS = 10.0  # wall-clock time of one rendering
MAX_POWER_BITS = 1 << 16  # an integer power beyond this many bits is refused

_budget = threading.local()  # .deadline of the rendering in progress on this thread


def _limit(what: str) -> TemplateError:
    return TemplateError(f"chat template: {what}; a chat prompt never needs that (limits: "
                         f"{MAX_CHARS:,} characters, {MAX_SECONDS:g} s)")


def _tick() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _limit(f"rendering ran longer than {MAX_SECONDS:g} s")


def _check_sizes(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS:
            raise _limit(f"a size of {v:,}")


_WIDTH = re.compile(r"\d{8,}")  # a field width/precision of 8+ digits in a format string


def _check_format(fmt: str) -> None:
    for m in _WIDTH.finditer(fmt):
        if int(m.group()) > MAX_CHARS:
            raise _limit(f"a format width of {int(m.group()):,}")


def _guard_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment markers
    def guarded(*args, **kwargs):
        _tick()
        _check_sizes(args[1:], kwargs)
        if f.__name__ == "do_format":
            _check_format(next((a for a in args if isinstance(a, str)), ""))
        return f(*args, **kwargs)
    return guarded


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    class Env(ImmutableSandboxedEnvironment):
        """The sandbox, plus bounds on time, string and list sizes and integer powers."""
        intercepted_binops = frozenset(["*", "**", "%"])

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and \
                            len(seq) * k > (MAX_CHARS if isinstance(seq, str) else MAX_ITEMS):
                        raise _limit(f"repeating {len(seq):,} items {k:,} times")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right > 0 and \
                    right * abs(left).bit_length() > MAX_POWER_BITS:
                raise _limit(f"an integer power {left} ** {right}")
            elif operator == "%" and isinstance(left, str):
                _check_format(left)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's names)
            _tick()
            _check_sizes(args, kwargs)
            target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            if isinstance(getattr(target, "__self__", None), str) and \
                    getattr(target, "__name__", "") in ("format", "format_map"):
                _check_format(target.__self__)
            out = super().call(__context, __obj, *args, **kwargs)
            if isinstance(out, str) and len(out) > MAX_CHARS:
                raise _limit(f"a string of {len(out):,} characters")
            return out

        def getattr(self, obj, attribute):
            _tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _tick()
            return super().getitem(obj, argument)

    def ticking_range(*args):
        for i in safe_range(*args):
            _tick()
            yield i

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters = {k: _guard_filter(f) for k, f in env.filters.items()}
    env.globals["range"] = ticking_range
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError

    env = _environment()
    env.filters["tojson"] = _guard_filter(_tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise FormatError(f"chat template: line {e.lineno}: {e.message}") from None
    except RecursionError:
        raise FormatError("chat template: nested too deeply to compile") from None


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
    _budget.deadline = time.monotonic() + MAX_SECONDS
    parts, n = [], 0
    try:
        for chunk in compiled.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, **extra):
            n += len(chunk)
            if n > MAX_CHARS:
                raise _limit(f"more than {MAX_CHARS:,} characters of output")
            parts.append(chunk)
            _tick()
    except TemplateError:
        raise
    except SecurityError as e:
        raise FormatError(f"chat template does something unsafe: {e}") from None
    except UndefinedError as e:
        raise BadArgument(f"chat template needs a value the messages lack: {e.message}") from None
    except TypeError as e:  # e.g. '+' of a str and a None content
        raise BadArgument(f"chat template could not render these messages: {e}") from None
    except RecursionError:
        raise _limit("recursion too deep") from None
    except MemoryError:
        raise _limit("it ran out of memory") from None
    except Exception as e:  # 1/0, 10.0 ** 1000, int('x'), a huge int printed...
        raise TemplateError(f"chat template failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        _budget.deadline = None
    return "".join(parts)
