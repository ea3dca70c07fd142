"""One module per model architecture: its tensor table, its metadata reader and its block,
written once over :mod:`blockq.ops`.  ``general.architecture`` picks the entry below; adding
an architecture is its module plus one line here.
"""
from __future__ import annotations

from ..errors import UnsupportedModel
from .base import Architecture, Block, Linear, RMSNorm  # noqa: F401
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .llama import LLAMA, QWEN2
from .phi3 import PHI3
from .qwen3 import QWEN3

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3)}


def architecture(name, what: str = "") -> Architecture:
    """The record for ``general.architecture`` = ``name``, or one clear UnsupportedModel."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise UnsupportedModel(f"{what + ': ' if what else ''}architecture {name!r} is not "
                               f"supported yet (supported: {', '.join(ARCHITECTURES)})")
    return arch
