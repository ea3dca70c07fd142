"""CUDA source of blockq's GPU kernels, assembled from the .cu/.cuh files beside this module.

The type list the kernels are instantiated for (macro ``BQ_TYPES``) is generated from
``blockq.types`` so the block-type table stays the single source of truth.  Float types are
walked as pseudo-blocks of 8 weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import codebooks
from ..types import ALL, QType, register

_HERE = Path(__file__).parent
_TABLES_AT = "// ---- non-linear, ternary and i-quant types ----"  # tables go right before this
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


def _table(ctype: str, name: str, a) -> str:
    a = np.asarray(a)
    dims = "".join(f"[{n}]" for n in a.shape)
    rows = a.reshape(-1, a.shape[-1])
    body = ",\n".join("{" + ",".join(str(int(v)) for v in r) + "}" if a.ndim > 1 else
                      ",".join(str(int(v)) for v in r) for r in rows)
    return f"BQ_TABLE {ctype} {name}{dims} = {{\n{body}}};\n"


def tables_source() -> str:
    """The value tables of the non-linear types, from blockq.codebooks (placed before the
    decoders that read them): __device__ arrays under nvcc, plain arrays on the host."""
    out = ["#ifdef __CUDACC__\n#define BQ_TABLE __device__ static const\n#else\n"
           "#define BQ_TABLE static const\n#endif\n",
           _table("int8_t", "bq_kv_iq4nl", codebooks.IQ4_NL),
           _table("int8_t", "bq_kv_mxfp4", codebooks.MXFP4),
           _table("uint8_t", "bq_ksigns", codebooks.KSIGNS)]
    for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S"):
        out.append(_table("int8_t", f"bq_grid_{name.lower()}", codebooks.grid(name)))
    return "".join(out)


def decoders_source() -> str:
    """blocks.cuh plus its tables and the type list: enough for a host C++ compiler (tests) or
    nvcc."""
    head, _, tail = (_HERE / "blocks.cuh").read_text().partition(_TABLES_AT)
    return head + tables_source() + _TABLES_AT + tail + "\n" + types_macro()


def kernels_source() -> str:
    """The whole CUDA translation unit for CuPy's RawModule (or nvcc)."""
    return decoders_source() + "\n" + (_HERE / "kernels.cu").read_text()
