"""The block-type table: the single source of truth for every other module.

Each type is a run of fixed-size blocks; a block holds ``block_size`` weights in ``type_size``
bytes.  ``fields`` lists the block's fields in byte order as ``(name, numpy dtype, count)``; the
byte size of a block is derived from it (``tests/test_types.py`` checks the table against it), and
``QType.dtype`` gives the numpy structured dtype that views raw bytes as blocks.

Ids are GGML's (``enum ggml_type``), so files flow both ways with llama.cpp.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BadArgument

QK_K = 256  # weights per k-quant super-block
QK = 32  # weights per legacy block

Field = tuple[str, str, int]  # (name, numpy dtype string, element count)


@dataclass(frozen=True)
class QType:
    id: int  # GGML type id
    name: str  # GGML type name, e.g. "Q4_K"
    block_size: int  # weights per block
    type_size: int  # bytes per block
    fields: tuple[Field, ...]  # byte layout of one block, in order
    description: str = ""
    dtype: np.dtype = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dt = np.dtype([(n, t, (c,)) if c > 1 else (n, t) for n, t, c in self.fields])
        object.__setattr__(self, "dtype", dt)

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of ``n_cols`` weights; the row length must be whole blocks."""
        if n_cols % self.block_size:
            raise BadArgument(
                f"{self.name} needs rows whose length is a multiple of {self.block_size}, "
                f"got a row of {n_cols}")
        return n_cols // self.block_size * self.type_size


_TYPES = (
    QType(0, "F32", 1, 4, (("f", "<f4", 1),), "32-bit IEEE float"),
    QType(1, "F16", 1, 2, (("f", "<f2", 1),), "16-bit IEEE half"),
    QType(2, "Q4_0", QK, 2 + QK // 2, (("d", "<f2", 1), ("qs", "u1", QK // 2)),
          "4-bit, scale only: w = d * (q - 8)"),
    QType(3, "Q4_1", QK, 2 + 2 + QK // 2,
          (("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", QK // 2)),
          "4-bit, scale and min: w = d * q + m"),
    QType(6, "Q5_0", QK, 2 + 4 + QK // 2,
          (("d", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", QK // 2)),
          "5-bit, scale only: w = d * (q - 16)"),
    QType(7, "Q5_1", QK, 2 + 2 + 4 + QK // 2,
          (("d", "<f2", 1), ("m", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", QK // 2)),
          "5-bit, scale and min: w = d * q + m"),
    QType(8, "Q8_0", QK, 2 + QK, (("d", "<f2", 1), ("qs", "i1", QK)),
          "8-bit, scale only: w = d * q"),
    QType(10, "Q2_K", QK_K, QK_K // 16 + QK_K // 4 + 2 + 2,
          (("scales", "u1", QK_K // 16), ("qs", "u1", QK_K // 4), ("d", "<f2", 1),
           ("dmin", "<f2", 1)),
          "2-bit k-quant: 16 sub-blocks of 16, 4-bit scales and mins"),
    QType(11, "Q3_K", QK_K, QK_K // 8 + QK_K // 4 + 12 + 2,
          (("hmask", "u1", QK_K // 8), ("qs", "u1", QK_K // 4), ("scales", "u1", 12),
           ("d", "<f2", 1)),
          "3-bit k-quant: 16 sub-blocks of 16, 6-bit signed scales"),
    QType(12, "Q4_K", QK_K, 2 + 2 + 12 + QK_K // 2,
          (("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)),
          "4-bit k-quant: 8 sub-blocks of 32, 6-bit scales and mins"),
    QType(13, "Q5_K", QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2,
          (("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12), ("qh", "u1", QK_K // 8),
           ("qs", "u1", QK_K // 2)),
          "5-bit k-quant: 8 sub-blocks of 32, 6-bit scales and mins"),
    QType(14, "Q6_K", QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,
          (("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16),
           ("d", "<f2", 1)),
          "6-bit k-quant: 16 sub-blocks of 16, 8-bit signed scales"),
    QType(15, "Q8_K", QK_K, 4 + QK_K + 2 * QK_K // 16,
          (("d", "<f4", 1), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)),
          "8-bit activations for k-quant dot products: f32 scale, sums of 16"),
    QType(30, "BF16", 1, 2, (("f", "<u2", 1),), "bfloat16 (upper half of an f32)"),
)

BY_NAME: dict[str, QType] = {t.name: t for t in _TYPES}
BY_ID: dict[int, QType] = {t.id: t for t in _TYPES}
ALL: tuple[QType, ...] = _TYPES


def qtype(q: "str | int | QType") -> QType:
    """Look a block type up by name ("Q4_K", case-insensitive), GGML id (12) or QType."""
    if isinstance(q, QType):
        return q
    if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
        t = BY_ID.get(int(q))
        if t is None:
            raise BadArgument(f"unknown GGML type id {int(q)}; known: "
                              + ", ".join(f"{t.name}={t.id}" for t in _TYPES))
        return t
    if isinstance(q, str):
        t = BY_NAME.get(q.upper())
        if t is None:
            raise BadArgument(f"unknown block type {q!r}; known: " + ", ".join(BY_NAME))
        return t
    raise BadArgument(f"block type must be a name or a GGML id, got {type(q).__name__}")
