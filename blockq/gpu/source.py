"""CUDA source of blockq's GPU kernels, assembled from the .cu/.cuh files beside this module.

The type list the kernels are instantiated for (macro ``BQ_TYPES``) is generated from
``blockq.types`` so the block-type table stays the single source of truth.  Float types are
walked as pseudo-blocks of 8 weights.
"""
from __future__ import annotations

from pathlib import Path

from ..types import ALL, QType, register

_HERE = Path(__file__).parent
# the types with a decoder in blocks.cuh: every type of the table that does not lack "gpu"
GPU_TYPES: tuple[QType, ...] = tuple(t for t in ALL if t.has("gpu"))


def kernel_suffix(t: QType) -> str:
    """Name suffix of a type's kernels: ``matvec_q4_k``, ``dequant_bf16``..."""
    return t.name.lower()


for _t in GPU_TYPES:
    register(_t, "gpu", kernel_suffix(_t))


def block_geometry(t: QType) -> tuple[int, int]:
    """(weights per block, bytes per block) as the kernels walk the row."""
    if t.is_quantized:
        return t.block_size, t.type_size
    return 8, 8 * t.type_size


def types_macro() -> str:
    items = " ".join(f"X({kernel_suffix(t)}, {block_geometry(t)[0]}, {block_geometry(t)[1]})"
                     for t in GPU_TYPES)
    return f"#define BQ_TYPES(X) {items}\n"


def decoders_source() -> str:
    """blocks.cuh plus the type list: enough for a host C++ compiler (tests) or nvcc."""
    return (_HERE / "blocks.cuh").read_text() + "\n" + types_macro()


def kernels_source() -> str:
    """The whole CUDA translation unit for CuPy's RawModule (or nvcc)."""
    return decoders_source() + "\n" + (_HERE / "kernels.cu").read_text()
