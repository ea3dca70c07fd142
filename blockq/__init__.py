"""blockq: GGUF k-quant block quantization, container, and runtime in Python.

Public API:

- ``quantize(x, qtype, imatrix=None)`` -> uint8 (rows, bytes_per_row)
- ``dequantize(data, qtype, shape)`` -> float32 array of ``shape``
- ``read_gguf(path)`` / ``write_gguf(path, metadata, tensors)``
- ``load(path=None, n_ctx=..., gpu_layers=..., threads=...)`` -> ``LLM`` (generate, chat,
  OpenAI-shaped completions, tokenize); ``ChatSession(llm)`` (see :mod:`blockq.api`)
- errors: ``BlockqError``, ``FormatError``, ``BadArgument``, ``UnsupportedModel``, ``FileError``
"""
from __future__ import annotations

import importlib

from .errors import BadArgument, BlockqError, FileError, FormatError, UnsupportedModel
from .kernels import jitcache as _jitcache  # noqa: F401  (Numba's disk cache, made race-safe)
from .types import QK_K, QType, qtype

# NOTE: the functions share their names with the modules that define them; importing them
# eagerly binds the attribute to the function once and for all (a lazy binding would be
# overwritten by the submodule the first time anything imported ``blockq.dequantize``).
from .dequantize import dequantize  # noqa: E402
from .quantize import quantize  # noqa: E402

__version__ = "0.1.0"

# imported on first use
_LAZY = {
    "read_gguf": ("blockq.gguf.reader", "read_gguf"),
    "write_gguf": ("blockq.gguf.writer", "write_gguf"),
    "load": ("blockq.api", "load"),
    "LLM": ("blockq.api", "LLM"),
    "ChatSession": ("blockq.api", "ChatSession"),
}

__all__ = ["BadArgument", "BlockqError", "FileError", "FormatError", "QK_K", "QType", "UnsupportedModel",
           "dequantize", "qtype", "quantize", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blockq' has no attribute {name!r}")
