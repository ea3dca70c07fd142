"""llama.cpp's CPU dot for the legacy 4/5-bit weights Q4_0, Q5_0, Q5_1 (numerics="llama").

Same contract as :class:`blockq.kernels.cpu_q8.Q8Dot`: float32 activations (n, cols) in,
(n, rows) float32 out, bit-identical to ggml's CPU backend (x86, AVX2 + FMA build).

Which code runs in ggml (``ggml_compute_forward_mul_mat``, weights in an ordinary CPU buffer):

- the activations are first quantized to the weight type's ``vec_dot_type`` (Q8_0 for Q4_0 and
  Q5_0, Q8_1 for Q5_1) with the AVX2 row quantizer (:func:`cpu_q8.quantize_q8`);
- n >= 2 activation rows, Q4_0 / Q5_0 (and Q8_0): ``llamafile_sgemm`` takes the product
  (``tinyBLAS_Q0_AVX``: tiles of up to 4 weight rows x 4 activation rows, split over threads by
  tile).  It refuses n == 1 ("only enable sgemm for prompt processing") and has no Q5_1 case;
- otherwise (n == 1, or Q5_1 always) ``ggml_vec_dot_q4_0_q8_0`` / ``_q5_0_q8_0`` /
  ``_q5_1_q8_1``, one output at a time.

Both paths compute every output the same way, so one emulation serves all n: per 32-block, the
8 float lanes of ``maddubs`` + ``madd`` (each the exact integer sum of 4 adjacent code products)
are accumulated as ``acc = fma(d_w * d_a, lanes, acc)`` over the blocks in order, and the
output is ``hsum8(acc)`` (tinyBLAS's ``hsum`` adds the lanes in the same tree as
``hsum_float_8``).  The tile shape only decides which outputs are computed together, never
the order within one.  Q5_1 adds ``summs = fma(m_w, s_a, summs)`` (``summs += m * s``,
contracted by GCC) after the 8-lane sum.  No ``maddubs`` pair sum can saturate here
(|code| <= 31 against |activation| <= 127).
"""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedModel
from ..types import qtype as _lookup
from .cpu_q8 import F32, QK, activations, fma32, hsum8, quantize_q8


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs[16] -> 32 values: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """qh[4] as one little-endian u32 -> 32 bits: bit j is value j's bit 4 (0 or 16 added)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _codes_q4_0(b):  # | d f16 | qs[16] |                      w = d * (q - 8)
    return _nibbles(b["qs"]).astype(np.int16) - 8


def _codes_q5_0(b):  # | d f16 | qh[4] | qs[16] |              w = d * (q - 16)
    return (_nibbles(b["qs"]) | (_fifth_bits(b["qh"]) << 4)).astype(np.int16) - 16


def _codes_q5_1(b):  # | d f16 | m f16 | qh[4] | qs[16] |      w = d * q + m
    return (_nibbles(b["qs"]) | (_fifth_bits(b["qh"]) << 4)).astype(np.int16)


# weight type -> (code decoder (blocks) -> (..., 32) ints, the ggml vec_dot_type of its activations)
LEGACY = {
    "Q4_0": (_codes_q4_0, "Q8_0"),
    "Q5_0": (_codes_q5_0, "Q8_0"),
    "Q5_1": (_codes_q5_1, "Q8_1"),
}


class LegacyDot:
    """A Q4_0, Q5_0 or Q5_1 matrix (a ``QMatrix``) multiplied the way llama.cpp's CPU does.

    Codes are decoded once to float64 (16x the Q4_0 bytes): this is a comparison tool."""

    def __init__(self, weight):
        t = str(weight.qtype)
        if t not in LEGACY:
            raise UnsupportedModel(f"LegacyDot reproduces {sorted(LEGACY)} weight dots; "
                                   f"got a {t} matrix {weight.shape}")
        decode, self.vec_dot_type = LEGACY[t]
        rows, cols = weight.shape
        nb = cols // QK
        blocks = np.asarray(weight.data).view(_lookup(t).dtype).reshape(rows, nb)
        codes = decode(blocks).astype(np.float64)  # (rows, nb, 32)
        # lanes of 4 adjacent values, batched by (block, lane): (nb * 8, rows, 4)
        self.codes = np.ascontiguousarray(codes.reshape(rows, nb * 8, 4).transpose(1, 0, 2))
        self.d = np.ascontiguousarray(blocks["d"].astype(F32).T)  # (nb, rows)
        self.m = np.ascontiguousarray(blocks["m"].astype(F32).T) if t == "Q5_1" else None
        self.qtype, self.shape = t, (rows, cols)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (n, rows)
        x = activations(x, self.qtype, self.shape)
        rows, cols = self.shape
        with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN propagate as in ggml
            return self._dot(x)

    def _dot(self, x: np.ndarray) -> np.ndarray:
        rows, cols = self.shape
        n, nb = x.shape[0], cols // QK
        q, d, s = quantize_q8(x)  # (n, nb, 32), (n, nb), (n, nb)
        qa = q.astype(np.float64).reshape(n, nb * 8, 4).transpose(1, 2, 0)  # (nb * 8, 4, n)
        # exact: integer sums of 4 products, |sum| < 2^16
        lanes = np.matmul(self.codes, qa).reshape(nb, 8, rows, n)
        acc = np.zeros((8, rows, n), F32)
        for ib in range(nb):
            dd = (self.d[ib][:, None] * d[:, ib][None, :]).astype(F32)  # (rows, n)
            acc = fma32(dd, lanes[ib], acc)
        out = hsum8(np.moveaxis(acc, 0, -1)).astype(F32)  # (rows, n)
        if self.m is not None:
            summs = np.zeros((rows, n), F32)
            for ib in range(nb):  # NOTE: GCC contracts ggml's summs += m * s into an fma
                summs = fma32(self.m[ib][:, None], s[:, ib][None, :], summs)
            out = (out + summs).astype(F32)
        return np.ascontiguousarray(out.T)
