"""Quantizers of the ternary types TQ1_0 and TQ2_0 (BitNet b1.58), byte-exact with llama.cpp.

``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref``: the scale is the block's largest
magnitude ``d``; each weight becomes ``lroundf(x / d)`` in -1..1 (half away from zero), stored
as 0..2.  TQ2_0 packs 2 bits per trit; TQ1_0 packs 5 trits into a byte as a base-3 fraction
(``ceil(v * 256 / 243)``, so that the decoder reads trit k as ``((b * 3**k) mod 256) * 3 >> 8``),
4 trits (times 3) into each of the last 4 bytes.  The importance vector is ignored, as in
llama.cpp.  Layouts: ``formats/TQ1_0.md``, ``formats/TQ2_0.md``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK_K
from . import split_rows
from .symmetric import put_f16

F32 = np.float32
_JIT = dict(cache=True, error_model="numpy")


@njit("int64(float32)", **_JIT)
def _trit(v):
    """lroundf(v) + 1 for v in -1..1: 0, 1 or 2 (halves away from zero, exactly: v in float64)."""
    a = np.floor(np.float64(abs(v)) + 0.5)
    return np.int64(-a if v < 0 else a) + 1


@njit("float32(float32[::1])", **_JIT)
def _absmax(x):
    amax = F32(0.0)
    for j in range(x.size):
        amax = max(amax, abs(x[j]))
    return amax


@njit("void(float32[::1], uint8[::1])", **_JIT)
def _tq1_0_row(x, out):
    # block, 54 bytes: 0..47 qs (5 trits each, first trit most significant) | 48..51 qh (4
    # trits each) | 52..53 d.  Byte m of qs[0..31] takes weights m, m+32, ..., m+128; byte m of
    # qs[32..47] weights 160 + m + 16n; qh[m] weights 240 + m + 4n.
    for b in range(x.size // QK_K):
        xb = x[b * QK_K:(b + 1) * QK_K]
        o = 54 * b
        d = _absmax(xb)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        put_f16(out, o + 52, d)
        for m in range(32):
            q = 0
            for n in range(5):
                q = q * 3 + _trit(xb[m + 32 * n] * idd)
            out[o + m] = (q * 256 + 242) // 243
        for m in range(16):
            q = 0
            for n in range(5):
                q = q * 3 + _trit(xb[160 + m + 16 * n] * idd)
            out[o + 32 + m] = (q * 256 + 242) // 243
        for m in range(4):
            q = 0
            for n in range(4):
                q = q * 3 + _trit(xb[240 + m + 4 * n] * idd)
            out[o + 48 + m] = (q * 3 * 256 + 242) // 243  # NOTE: times 3, a 5th trit of 0


@njit("void(float32[::1], uint8[::1])", **_JIT)
def _tq2_0_row(x, out):
    # block, 66 bytes: 0..63 qs, weight 128h + 32n + m at bits 2n..2n+1 of qs[32h + m] | 64..65 d
    for b in range(x.size // QK_K):
        xb = x[b * QK_K:(b + 1) * QK_K]
        o = 66 * b
        d = _absmax(xb)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        put_f16(out, o + 64, d)
        for h in range(2):
            for m in range(32):
                q = 0
                for n in range(4):
                    q |= _trit(xb[128 * h + 32 * n + m] * idd) << (2 * n)
                out[o + 32 * h + m] = q


@njit("void(boolean, float32[:, ::1], uint8[:, ::1])", nogil=True, **_JIT)
def _quantize_rows(tq1, x, out):  # x (rows, cols), out (rows, row_bytes)
    for r in range(x.shape[0]):
        if tq1:
            _tq1_0_row(x[r], out[r])
        else:
            _tq2_0_row(x[r], out[r])


def _row_quantizer(tq1: bool, name: str):
    def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
        # NOTE: llama.cpp ignores quant_weights for the ternary types
        split_rows(lambda xs, os: _quantize_rows(tq1, xs, os), x, out, 1 << 16)

    quantize_rows.__name__ = quantize_rows.__qualname__ = f"quantize_{name.lower()}"
    quantize_rows.__doc__ = f"Fill ``out`` (rows, row_bytes) with {name} blocks of ``x``."
    return quantize_rows


QUANTIZERS = {"TQ1_0": _row_quantizer(True, "TQ1_0"), "TQ2_0": _row_quantizer(False, "TQ2_0")}
