"""Typed, range-checked reads of model hyper-parameters (GGUF metadata, HF ``config.json``).

The runtime and the converter read every size, count and constant through :class:`Fields`,
so a wrong value type, a zero or negative size, a NaN epsilon or an absurd layer count becomes
one :class:`FormatError` line naming the file, the key, the value and what would be right,
before anything is allocated from it::

    f = Fields(metadata, "model.gguf")
    n_layer = f.integer("llama.block_count", hi=MAX_LAYERS)
    eps = f.number("llama.attention.layer_norm_rms_epsilon", 1e-5, lo=0.0, lo_open=True, hi=1.0)

The caps are far above any published model and far below what would exhaust a machine.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadArgument, FormatError

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
MAX_DIM = 1 << 20  # embedding, feed-forward and head sizes
MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 24  # 16 Mi tokens (the longest published context is 10 M)
MAX_VOCAB = 1 << 24
MAX_JSON_BYTES = 100 << 20

_MISSING = object()


def show(value: Any, limit: int = 60) -> str:
    """``repr`` of a value, cut to ``limit`` characters for a one-line message."""
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.size <= 8 else f"array[{value.size}]"
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return "an array"
    return {bool: "a boolean", str: "a string", dict: "an object", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float, np.number)) else
        type(value).__name__)


def _range(lo, hi, lo_open=False) -> str:
    fmt = (lambda v: f"{v:,}") if isinstance(lo, int) and not isinstance(lo, bool) else str
    left = f"({fmt(lo)}" if lo_open else f"[{fmt(lo)}"
    return f"{left}, {fmt(hi)}]" if hi != math.inf else f"{left}, inf)"


def check_int(value: Any, what: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    """``value`` as an int in [lo, hi], or a FormatError naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FormatError(f"{what} = {show(value)} is {_kind(value)}; it must be an integer "
                          f"in {_range(lo, hi)}")
    v = int(value)
    if not lo <= v <= hi:
        raise FormatError(f"{what} = {v:,} is out of range; it must be an integer in "
                          f"{_range(lo, hi)}")
    return v


def check_number(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf,
                 lo_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (``(lo, hi]`` with ``lo_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise FormatError(f"{what} = {show(value)} is {_kind(value)}; it must be a number "
                          f"in {_range(lo, hi, lo_open)}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise FormatError(f"{what} = {show(v)} is out of range; it must be a finite number in "
                          f"{_range(lo, hi, lo_open)}")
    return v


class Fields:
    """Typed reads of one mapping; every error names ``where`` and the key.

    With ``arch``, keys may be templates (``"{arch}.block_count"``).  Calling the object is
    ``get``: the raw value.
    """

    def __init__(self, mapping: Mapping, where: str, arch: str | None = None):
        if not isinstance(mapping, Mapping):
            raise FormatError(f"{where}: the top level is {_kind(mapping)}; it must be an object")
        self.mapping = mapping
        self.where = where
        self.arch = arch

    def key(self, key: str) -> str:
        return key.format(arch=self.arch) if self.arch is not None else key

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value (None and absent alike give ``default``)."""
        key = self.key(key)
        v = self.mapping.get(key) if key in self.mapping else None
        return default if v is None else v

    __call__ = get

    def _value(self, key: str, default: Any):
        v = self.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                raise FormatError(f"{self.what(key)} is missing")
            return default
        return v

    def what(self, key: str) -> str:
        return f"{self.where}: {self.key(key)}"

    def integer(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = MAX_DIM) -> int:
        v = self._value(key, default)
        return v if v is default else check_int(v, self.what(key), lo, hi)

    def number(self, key: str, default: Any = _MISSING, lo: float = -math.inf,
               hi: float = math.inf, lo_open: bool = False) -> float:
        v = self._value(key, default)
        return v if v is default else check_number(v, self.what(key), lo, hi, lo_open)

    def text(self, key: str, default: Any = _MISSING) -> str:
        v = self._value(key, default)
        if v is not default and not isinstance(v, str):
            raise FormatError(f"{self.what(key)} = {show(v)} is {_kind(v)}; it must be a string")
        return v

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        v = self._value(key, default)
        if v is not default and not isinstance(v, (bool, np.bool_)):
            raise FormatError(f"{self.what(key)} = {show(v)} is {_kind(v)}; it must be a "
                              "boolean")
        return v if v is default else bool(v)

    def obj(self, key: str, default: Any = _MISSING) -> Mapping:
        v = self._value(key, default)
        if v is not default and not isinstance(v, Mapping):
            raise FormatError(f"{self.what(key)} = {show(v)} is {_kind(v)}; it must be an "
                              "object (or absent)")
        return v

    def strings(self, key: str, default: Any = _MISSING, min_len: int = 0) -> list[str]:
        """An array of strings (the reader gives STRING arrays as a list of str)."""
        v = self._value(key, default)
        if v is default:
            return v
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            got = f"an array of {v.dtype} numbers" if isinstance(v, np.ndarray) else _kind(v)
            raise FormatError(f"{self.what(key)} = {show(v)} is {got}; it must be an array "
                              "of strings")
        if len(v) < min_len:
            raise FormatError(f"{self.what(key)} has {len(v)} entries; it needs at least "
                              f"{min_len}")
        return list(v)

    def integers(self, key: str, default: Any = _MISSING, lo: int = 1,
                 hi: int = MAX_DIM) -> int | list[int]:
        """An integer, or an array of them (per-layer values): the array as a list."""
        v = self._value(key, default)
        if v is default or not isinstance(v, (list, tuple, np.ndarray)):
            return self.integer(key, default, lo, hi)
        if len(v) == 0:
            raise FormatError(f"{self.what(key)} is an empty array; it needs one value per "
                              "layer")
        return [check_int(x, f"{self.what(key)}[{i}]", lo, hi) for i, x in enumerate(v)]


def check_chunks(n_chunks) -> None:
    """``--chunks``: -1 (or None) for all, else at least 1."""
    if n_chunks is not None and (n_chunks == 0 or n_chunks < -1):
        raise BadArgument(f"chunks {n_chunks}: use -1 for all the text gives, or 1 or more")


def same_vocabulary(a: Mapping, b: Mapping, what: str) -> None:
    """Refuse two models whose token lists (``tokenizer.ggml.tokens``) differ in any string."""
    ta, tb = a.get("tokenizer.ggml.tokens"), b.get("tokenizer.ggml.tokens")
    if ta is None or tb is None:
        return
    if len(ta) != len(tb):
        raise BadArgument(f"{what}: the vocabularies differ ({len(ta):,} vs {len(tb):,} tokens)")
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y:
            raise BadArgument(f"{what}: the vocabularies differ at token {i} ({show(x)} vs "
                              f"{show(y)}); the models must share one vocabulary")


def clean_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD: undecodable bytes of a command-line
    argument, stdin or file (``surrogateescape``) as invalid UTF-8 is, others one for one."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    text = "".join("\ufffd" if 0xD800 <= ord(c) < 0xDC80 or 0xDD00 <= ord(c) <= 0xDFFF else c
                   for c in text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parse_json(raw: bytes, where: str) -> Any:
    """JSON text -> Python value; undecodable, malformed or too deeply nested -> FormatError."""
    if len(raw) > MAX_JSON_BYTES:
        raise FormatError(f"{where}: {len(raw):,} bytes of JSON is more than the "
                          f"{MAX_JSON_BYTES:,} blockq reads")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None


def load_json_object(path: Path, what: str) -> dict:
    """A JSON file whose top level must be an object (config.json, tokenizer.json...)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise FormatError(f"{path}: {size:,} bytes is too large for {what}")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{path.parent}: no {path.name} ({what})") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder, expected {what}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what} ({e.strerror})") from None
    value = parse_json(raw, str(path))
    if not isinstance(value, dict):
        raise FormatError(f"{path}: the top level is {_kind(value)}; {what} must be a JSON "
                          "object")
    return value


def nonfinite_blocks(blocks, t) -> np.ndarray:
    """Flat indices of the blocks of type ``t`` (a QType) whose stored floats (scales, mins,
    F16/F32/BF16 values) are NaN or inf.  ``blocks``: the encoded bytes, any shape."""
    raw = np.ascontiguousarray(np.asarray(blocks, dtype=np.uint8).reshape(-1))
    if not t.decodable or raw.size % t.type_size:
        return np.zeros(0, np.int64)
    rec = raw.view(t.dtype)
    n = rec.shape[0]
    bad = np.zeros(n, bool)
    for name, dt, _count in t.fields:
        v = rec[name].reshape(n, -1)
        if t.name == "BF16":  # the upper half of a float32: exponent bits all ones
            bad |= ((v & 0x7F80) == 0x7F80).any(axis=1)
        elif np.dtype(dt).kind == "f":
            bad |= ~np.isfinite(v).all(axis=1)
    return np.flatnonzero(bad)


def check_encoded(out: np.ndarray, t, x: np.ndarray) -> None:
    """Refuse quantized rows ``out`` (rows, row_bytes) whose blocks hold NaN/inf scales or
    values: names the row, the block, its columns and its largest weight."""
    bad = nonfinite_blocks(out, t)
    if bad.size == 0:
        return
    per_row = x.shape[1] // t.block_size
    r, b = divmod(int(bad[0]), per_row)
    c0, c1 = b * t.block_size, (b + 1) * t.block_size
    big = float(np.abs(x[r, c0:c1]).max())
    why = f"it overflows {t.name}" if not t.is_quantized else "its f16 scale overflows"
    raise BadArgument(f"{bad.size} {t.name} block(s) would hold NaN/inf (first: row {r}, block "
                      f"{b}, columns {c0}..{c1 - 1}, largest |weight| {big:.4g}): {why} (max "
                      "65504); these weights are too large for this type (damaged checkpoint? "
                      "keep the tensor in F32)")
