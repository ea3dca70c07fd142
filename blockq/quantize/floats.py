"""Float "quantizers": F32 (copy), F16 (round to nearest even), BF16 (as ggml rounds it)."""
from __future__ import annotations

import numpy as np


def _f32(x, imatrix, out):
    out[:] = x.view(np.uint8)


def _f16(x, imatrix, out):
    out[:] = x.astype(np.float16).view(np.uint8)


def _bf16(x, imatrix, out):
    # Round to nearest even on the upper 16 bits; a NaN stays a quiet NaN (ggml does the same).
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)
    out[:] = r.view(np.uint8)


QUANTIZERS = {"F32": _f32, "F16": _f16, "BF16": _bf16}
