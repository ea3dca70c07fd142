"""llama.cpp's CPU k-quant matmul (Q2_K..Q6_K x Q8_K, x86 AVX2), reproduced bit for bit in numpy.

The companion of :mod:`blockq.kernels.cpu_q8` for k-quant weights in an ordinary (not repacked)
buffer.  ``ggml_compute_forward_mul_mat`` quantizes each activation row to Q8_K
(``quantize_row_q8_K``: the scalar reference on x86; llamafile's tinyBLAS takes no k-quant), then
takes one of two kernels, both reproduced here:

- n < 8 activation rows: the type's ``ggml_vec_dot_q{2..6}_K_q8_K`` (AVX2 branch of
  ``ggml-cpu/arch/x86/quants.c``), once per output;
- n >= 8: ``ggml_compute_forward_mul_mat_tiled`` (``ggml-cpu/tiled``, AVX2 microtile), unless
  ``GGML_CPU_TILED_MM=0`` is set.

Both share the integer part, exact: the weight's code (as the kernel feeds it to ``maddubs``)
times its sub-block scale times the Q8_K code.  They differ in how the integers become floats.

vec_dot, per super-block ``b`` in order:

- integer lanes: 8 int32 lanes, lane ``k`` holding the positions ``p`` with
  ``(p % 32) // 4 == k`` (``maddubs`` + ``madd`` split each 32-byte load into 8 runs of 4), then
  converted to float (rounding: Q6_K lanes can pass 2^24);
- ``acc = fma(f32(d_a * d_w), lanes, acc)`` (8 float lanes);
- the mins (``-dmin * min * sum(q8)``), type by type (``_Kind.mins``):
    Q2_K  ``acc = fma(-d_a * dmin_w, lanes2, acc)`` *before* the fma above; lane k =
          m[2k] * bsum[2k] + m[2k+1] * bsum[2k+1] (sub-blocks of 16)
    Q4_K  a separate 4-lane ``acc_m = fma(-d_a * dmin_w, lanes4, acc_m)``, lane k =
          m[2k] * s32[2k] + m[2k+1] * s32[2k+1] (s32: Q8_K sums of 32), folded at the end as
          ``(m0 + m2) + (m1 + m3)``
    Q5_K  one float ``summs = fma(-d_a * dmin_w, sum_k m[k] * s32[k], summs)`` (GCC contracts
          ``summs += dmin * int``: ``vfmadd231ss`` in the shipped libggml-cpu.so)
    Q6_K  codes 0..63; the int lanes lose ``32 * (sc[2k] * bsum[2k] + sc[2k+1] * bsum[2k+1])``
          before the conversion
    Q3_K  none (codes signed: low 2 bits, minus 4 where the hmask bit is clear)
- result ``hsum8(acc)`` (+ the Q4_K / Q5_K min accumulator).

tiled, per output and super-block in order: one int ``s1`` (all 256 products, scaled) and
``s2 = sum min * bsum``; ``res = f32(d_w * f32(s1))``, ``res = fma(-dmin_w, f32(s2), res)``,
``out = fma(res, d_a, out)``.  No lanes, no horizontal sum, and d_a applied last.

The integers come from float32 matmuls over runs of at most 32 products, exact while every
partial sum stays below 2^24 (``_Kind.split`` halves the run for Q6_K, |scale * code| <= 8064).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..dequantize import quant_ints, unpack_q3k_scales, unpack_scale_min_k4
from ..errors import UnsupportedModel
from ..types import QK_K, qtype as _lookup
from .cpu_q8 import activations, fma32, hsum8

F32 = np.float32
F64 = np.float64
N_LANES = 8  # float / int32 lanes of a 256-bit register
N_CHUNKS = QK_K // 32  # 32-byte loads per super-block


# ---------------------------------------------------------------------------------------------
# activations -> Q8_K


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_row_q8_K_ref`` over rows: x (n, k) float32 -> codes (n, k/256, 256) int8,
    d (n, k/256) float32, bsums (n, k/256, 16) int16 (sums of each 16 codes).

    Block (292 bytes): d f32 | qs[256] int8 | bsums[16] int16;  value = d * q.
    ``iscale = -127 / x[argmax |x|]`` (signed: the first largest magnitude),
    ``q = min(127, nearest_int(iscale * x))``, ``d = 1 / iscale``.

    NOTE: not ``blockq.quantize(x, "Q8_K")``: that one refuses NaN / inf, while activations
    must come out as ggml's C makes them of anything (a NaN block differs otherwise).
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # as C: inf, NaN bits
        return _quantize_q8_k(np.ascontiguousarray(x, F32))


def _quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k = x.shape
    b = x.reshape(n, k // QK_K, QK_K)
    first = np.abs(b).argmax(-1)[..., None]  # NOTE: ggml keeps the first max on ties (ax > amax)
    mx = np.take_along_axis(b, first, -1)[..., 0]  # (n, nb)
    zero = mx == 0
    iscale = np.where(zero, F32(0), F32(-127) / np.where(zero, F32(1), mx)).astype(F32)
    # NOTE: nearest_int is ggml's float trick (add 1.5 * 2^23, read the mantissa), reproduced as
    # such so that huge products wrap the same way.
    v = ((b * iscale[..., None]).astype(F32) + F32(12582912.0)).astype(F32)
    qi = (v.view(np.uint32) & np.uint32(0x7FFFFF)).astype(np.int32) - 0x400000
    q = np.minimum(qi, 127).astype(np.int8)  # int -> int8 wraps as the C store does
    # NOTE: an all-zero block keeps d = 0 and codes 0; ggml leaves its bsums unwritten, we write 0
    # (they only ever meet d = 0 there).
    bsums = q.reshape(n, -1, 16, 16).sum(-1, dtype=np.int32).astype(np.int16)
    d = np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), iscale)).astype(F32)
    return q, d, bsums


# ---------------------------------------------------------------------------------------------
# weight decoders: super-blocks -> (scale * code per position, d, dmin, min coefficients)
#
# Every decoder returns, for blocks (rows, nb):
#   w     int16 (rows, nb, 256): sub-block scale * code, positions in value order
#   d     float32 (rows, nb), dmin float32 (rows, nb) or None
#   mc    (rows, nb, 2L) coefficients of the min lanes (see _Kind.mins) or None


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(F32)


def _codes(blk, t: str) -> np.ndarray:
    """``t`` records (rows, nb) -> the codes its formula multiplies, (rows, nb, 256) int16 in
    value order (:func:`blockq.dequantize.quant_ints`)."""
    r, nb = blk.shape
    return quant_ints(blk, t).reshape(r, nb, QK_K)


def _decode_q2_k(blk, t):
    """| scales[16]: low nibble scale, high nibble min (sub-blocks of 16) | qs[64] | d | dmin |"""
    sc = blk["scales"]
    w = _codes(blk, t) * np.repeat(sc & 15, 16, -1)
    return w, _f16(blk["d"]), _f16(blk["dmin"]), (sc >> 4).astype(np.int16)


def _decode_q3_k(blk, t):
    """| hmask[32] | qs[64] | scales[12]: 16 six-bit scales, minus 32 | d |; codes -4..3"""
    scales = unpack_q3k_scales(blk["scales"]).astype(np.int16)
    return _codes(blk, t) * np.repeat(scales, 16, -1), _f16(blk["d"]), None, None


def _decode_q4_k(blk, t):
    """| d | dmin | scales[12] (6-bit scales and mins of sub-blocks of 32) | qs[128] |;
    Q5_K adds qh[32], the codes' fifth bits."""
    s, m = (a.astype(np.int16) for a in unpack_scale_min_k4(blk["scales"]))
    return _codes(blk, t) * np.repeat(s, 32, -1), _f16(blk["d"]), _f16(blk["dmin"]), m


def _decode_q6_k(blk, t):
    """| ql[128] | qh[64] | scales[16] int8 (sub-blocks of 16) | d |; code 0..63: the dot
    subtracts 32 through the Q8_K sums (the "int" mins)."""
    code = _codes(blk, t) + 32
    sc = blk["scales"].astype(np.int16)
    return code * np.repeat(sc, 16, -1), _f16(blk["d"]), None, sc


# ---------------------------------------------------------------------------------------------
# the type table


@dataclass(frozen=True)
class _Kind:
    decode: Callable
    split: int  # runs per lane and super-block for the exact float32 matmul (32 // split long)
    mins: str  # vec_dot's use of the min coefficients: "acc8" | "acc4" | "scalar" | "int" | ""
    sums: int  # Q8_K sums the min coefficients pair with: 16 (bsums) or 8 (sums of 32)


# NOTE: Q6_K's |scale * code| <= 128 * 63: 32 products of up to 8064 * 127 could pass 2^24.
_KINDS = {
    "Q2_K": _Kind(_decode_q2_k, 1, "acc8", 16),
    "Q3_K": _Kind(_decode_q3_k, 1, "", 16),
    "Q4_K": _Kind(_decode_q4_k, 1, "acc4", 8),
    "Q5_K": _Kind(_decode_q4_k, 1, "scalar", 8),
    "Q6_K": _Kind(_decode_q6_k, 2, "int", 16),
}
TYPES = tuple(_KINDS)
# ggml_compute_forward_mul_mat hands k-quants to ggml-cpu/tiled from this many activation rows
# on (ggml_tiled_min_batch; unless GGML_CPU_TILED_MM=0), below it to the vec_dot kernels
TILED_MIN_BATCH = 8


def _to_lane_runs(v: np.ndarray, split: int) -> np.ndarray:
    """(m, nb, 256) -> (nb * 8 lanes * split, m, 32 // split): position 32c + 4k + t goes to
    lane k, run c // (8 / split), element (c % (8 / split), t)."""
    m, nb, _ = v.shape
    v = v.reshape(m, nb, split, N_CHUNKS // split, N_LANES, 4)  # (m, b, h, c, k, t)
    v = v.transpose(1, 4, 2, 0, 3, 5)  # (b, k, h, m, c, t)
    return v.reshape(nb * N_LANES * split, m, 32 // split)


class KQuantDot:
    """A Q2_K..Q6_K matrix (a ``QMatrix``) multiplied as llama.cpp's CPU mul_mat does:
    ``dot(x)`` with x (n, cols) float32 -> (n, rows) float32, the kernel chosen by n as ggml does.

    Weights are decoded once into float32 ``scale * code`` (4 bytes a weight: a comparison tool).
    """

    def __init__(self, weight):
        t = str(weight.qtype)
        if t not in _KINDS:
            raise UnsupportedModel(f"KQuantDot reproduces llama.cpp's {list(TYPES)} dots; "
                                   f"got a {t} matrix {weight.shape}")
        rows, cols = weight.shape
        kind = self.kind = _KINDS[t]
        blk = np.asarray(weight.data).view(_lookup(t).dtype).reshape(rows, cols // QK_K)
        w, d, dmin, mc = kind.decode(blk, t)
        self.w = np.ascontiguousarray(
            _to_lane_runs(w, kind.split).transpose(0, 2, 1)).astype(F32)  # (G, 32/split, rows)
        self.d = np.ascontiguousarray(d.T)  # (nb, rows)
        self.dmin = None if dmin is None else np.ascontiguousarray(dmin.T)  # (nb, rows)
        if mc is None:
            self.mc = None
        else:  # (nb, L, 2, rows): lane k pairs coefficients 2k, 2k + 1
            nb = cols // QK_K
            self.mc = np.ascontiguousarray(
                mc.reshape(rows, nb, -1, 2).transpose(1, 2, 3, 0)).astype(F64)
        self.qtype, self.shape = t, (rows, cols)

    def _min_lanes(self, bsums: np.ndarray) -> np.ndarray:
        """(n, nb, 16) Q8_K sums -> (nb, L, n, rows) exact integer lanes of min * sum pairs."""
        n, nb, _ = bsums.shape
        s = bsums.astype(F64)
        if self.kind.sums == 8:  # _mm_hadd_epi16: sums of 32
            s = s[..., 0::2] + s[..., 1::2]
        s = s.reshape(n, nb, -1, 2).transpose(1, 2, 0, 3)  # (nb, L, n, 2)
        return np.matmul(s, self.mc)  # (nb, L, 2, rows) -> (nb, L, n, rows)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (n, rows)
        x = activations(x, self.qtype, self.shape)
        rows, cols = self.shape
        n, nb, kind = x.shape[0], cols // QK_K, self.kind
        q, da, bsums = quantize_q8_k(x)
        a = _to_lane_runs(q.astype(F32), kind.split)  # (G, n, 32/split)
        runs = np.matmul(a, self.w)  # (G, n, rows), exact integers
        lanes = runs.reshape(nb, N_LANES, kind.split, n, rows)
        lanes = lanes[:, :, 0].astype(F64) if kind.split == 1 else lanes.astype(F64).sum(2)
        mins = None if self.mc is None else self._min_lanes(bsums)  # (nb, L, n, rows)
        if kind.mins == "int":  # Q6_K: codes 0..63 less 32 * scale * bsum, in the int lanes
            lanes -= 32 * mins
            mins = None
        if n >= TILED_MIN_BATCH:
            return self._tiled(lanes, mins, da)
        return self._vec_dot(lanes, mins, da)

    def _vec_dot(self, lanes, mins, da) -> np.ndarray:
        """``ggml_vec_dot_qX_K_q8_K``: 8 float lanes per output, fma per super-block."""
        nb, _, n, rows = lanes.shape
        kind = self.kind
        lanes = lanes.astype(F32)  # NOTE: _mm256_cvtepi32_ps rounds Q6_K lanes above 2^24
        acc = np.zeros((N_LANES, n, rows), F32)
        acc_m = np.zeros((4, n, rows), F32)
        summs = np.zeros((n, rows), F32)
        for b in range(nb):
            if mins is not None:
                dmin = -(da[:, b, None] * self.dmin[b]).astype(F32)  # (n, rows)
                if kind.mins == "acc8":  # Q2_K: before the scales' fma
                    acc = fma32(dmin, mins[b].astype(F32), acc)
                elif kind.mins == "acc4":  # Q4_K: its own 4 lanes
                    acc_m = fma32(dmin, mins[b].astype(F32), acc_m)
                else:  # Q5_K: one float, the lanes added as integers first
                    summs = fma32(dmin, mins[b].sum(0).astype(F32), summs)
            d = (da[:, b, None] * self.d[b]).astype(F32)  # (n, rows)
            acc = fma32(d, lanes[b], acc)
        out = hsum8(np.moveaxis(acc, 0, -1)).astype(F32)
        if kind.mins == "acc4":
            summs = ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3])).astype(F32)
        return (out + summs).astype(F32) if kind.mins in ("acc4", "scalar") else out

    def _tiled(self, lanes, mins, da) -> np.ndarray:
        """``ggml-cpu/tiled`` (AVX2 microtile), taken by mul_mat for n >= 8: per output and
        super-block one exact int ``s1`` (and ``s2 = sum min * bsum``), then
        ``res = f32(d_w * f32(s1))``, ``res = fma(-dmin_w, f32(s2), res)``,
        ``out = fma(res, d_a, out)`` over the super-blocks in order.  No lanes, no hsum."""
        s1 = lanes.sum(1).astype(F32)  # (nb, n, rows); NOTE: cvtepi32_ps rounds above 2^24
        s2 = None if mins is None else mins.sum(1).astype(F32)
        nb, n, rows = s1.shape
        out = np.zeros((n, rows), F32)
        for b in range(nb):
            res = (self.d[b] * s1[b]).astype(F32)  # (n, rows)
            if s2 is not None:
                res = fma32(-self.dmin[b], s2[b], res)
            out = fma32(res, da[:, b, None], out)
        return out
