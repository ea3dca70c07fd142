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


# What the refused architectures people meet most are, to say so in the refusal (names as
# llama.cpp's llama-arch.cpp spells them)
REFUSED_KINDS = {
    "a mixture-of-experts model": ("qwen2moe", "qwen3moe", "phimoe", "olmoe", "dbrx", "grok",
                                   "arctic", "deepseek", "deepseek2", "granitemoe", "llama4",
                                   "gpt-oss", "glm4moe", "ernie4_5-moe", "bailingmoe"),
    "a recurrent model": ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba",
                          "falcon-h1", "lfm2", "nemotron_h", "granitehybrid", "qwen3next"),
    "a multimodal projector": ("clip", "mllama"),
}


def architecture(name, what: str = "") -> Architecture:
    """The record for ``general.architecture`` = ``name``, or one clear UnsupportedModel."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        kind = next((f" ({k})" for k, names in REFUSED_KINDS.items() if name in names), "")
        raise UnsupportedModel(f"{what + ': ' if what else ''}architecture {name!r}{kind} is "
                               f"not supported yet (supported: {', '.join(ARCHITECTURES)})")
    return arch
