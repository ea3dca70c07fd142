"""Numba CPU products with block-quantized weights, decoded on the fly: ``QMatrix``.

A :class:`QMatrix` holds a weight matrix as the GGUF file's own bytes (zero-copy when the file is
mmapped) and multiplies without ever materializing it in float32.  Where the CPU has them
(:mod:`blockq.kernels.cpu_isa`) and ``QMatrix.int8`` is on (the default), products round their
input to llama.cpp's 8-bit activation blocks first: fewer than 4 tokens go through the integer
dot kernels of :mod:`blockq.kernels.cpu_int8`, more through the float tiles below fed with the
rounded activations (the same numerics).  Otherwise, the float kernels of this module:

- ``matvec(x)`` (decoding one token) streams each row's blocks once, decodes them in 8-lane
  registers (:mod:`blockq.kernels.cpu_simd`) and multiplies-accumulates in float32.
- ``matmul(X)`` (a prompt of n tokens) has each thread decode 16 rows at a time into a small
  float32 tile (bit-exact, as ``take_rows``) and multiply the tile by X with a register-blocked
  kernel (2 rows x 4 tokens of 8-lane accumulators).  At n = 128 each decoded weight feeds 256
  flops, so decoding costs a few percent.  Handing tiles to BLAS instead was measured and
  dropped: numpy's OpenBLAS threads and Numba's OpenMP threads spin-wait for each other when
  calls alternate (on 2 cores a 1 ms product took 8-20 ms), and single-threaded BLAS on a tile
  was no faster than this kernel.  Fewer than 4 tokens run as matvecs.
- ``take_rows(ids)`` decodes whole rows (embedding lookup), bit-exact with gguf-py.

How a block's dot product is computed: ``w = d * q + m`` (or ``d * (q - z)``) is folded as
``d * sum(q * x) + m * sum(x)``: the integer codes ``q`` are converted to float and dotted with x,
one multiply by the block (or sub-block) scale follows, and ``m * sum(x)`` uses per-block sums of
x computed once per call.  Results match ``dequantize(W) @ x`` to float32 rounding
(``tests/test_matvec.py`` states the bound).

Kernels are serial over a range of rows; one parallel driver per job (matvec, decode, matmul)
takes a type's kernel as a first-class function and splits rows over Numba's threads, so the
parallel machinery compiles once, not once per type.  Each type's kernels compile on first use
and are cached on disk (``cache=True``).  Each kernel draws its block layout beside the code;
:mod:`blockq.types` is the table of sizes.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import BadArgument
from ..types import QType, qtype as _lookup, register
from .cpu_isa import isa
from .cpu_simd import (bf16_at, f16_to_f32, f32_at, fma, halves, hsum, lane, lane_bits, load_bf16,
                       load_f16, load_f32, load_i8, load_u8, store_f32, to_f32, u32_at, zeros)

F32 = np.float32
JIT = dict(fastmath=True, cache=True)  # kernels (serial, over a range of rows) and their helpers

# F16/BF16 matmul: numpy decodes this many bytes of float32 rows at a time for BLAS
TILE_BYTES = 16 << 20


# =============================================================================================
# shared pieces


@njit(**JIT)
def _sums(x, n):
    """Sums of consecutive groups of n (16 or 32) entries of x: ``sum(x)`` per (sub-)block."""
    g = x.size // n
    s = np.empty(g, F32)  # (cols // n,)
    for i in range(g):
        v = load_f32(x, i * n) + load_f32(x, i * n + 8)
        if n == 32:
            v = v + load_f32(x, i * n + 16) + load_f32(x, i * n + 24)
        s[i] = hsum(v)
    return s


@njit(**JIT)
def _dot32(q0, q1, q2, q3, x, i):
    """sum(q * x[i:i + 32]) for 32 weights given as four F32x8 in order."""
    t0 = fma(q1, load_f32(x, i + 8), q0 * load_f32(x, i))
    t1 = fma(q3, load_f32(x, i + 24), q2 * load_f32(x, i + 16))
    return t0 + t1


@njit(**JIT)
def _dot16(q0, q1, x, i):
    """sum(q * x[i:i + 16]) for 16 weights given as two F32x8 in order."""
    return fma(q1, load_f32(x, i + 8), q0 * load_f32(x, i))


@njit(**JIT)
def _byte(w, r, o):
    """Byte o of row r as int64 (Numba would type uint8 >> int as uint64, which mixes badly)."""
    return np.int64(w[r, o])


@njit(**JIT)
def _nibbles(w, r, o):
    """16 bytes of 4-bit codes at byte o, legacy order: low nibbles are weights 0..15, high 16..31.

    Returns the codes of weights 0-7, 8-15, 16-23, 24-31 as four I32x8.
    """
    a = load_u8(w, r, o)
    b = load_u8(w, r, o + 8)
    return a & 15, b & 15, a >> 4, b >> 4


@njit(**JIT)
def _fifth_bits(w, r, o):
    """The 32 high (fifth) bits of a Q5_0/Q5_1 block at byte o, each as 0 or 16 (I32x8 x4)."""
    qh = u32_at(w, r, o)  # bit j is weight j's fifth bit
    lo, hi = qh << 4, qh >> 12  # bits 0..15 and 16..31 of qh, moved up to start at bit 4
    return (lane_bits(lo, 0, 16), lane_bits(lo, 8, 16), lane_bits(hi, 0, 16),
            lane_bits(hi, 8, 16))


# =============================================================================================
# legacy 32-weight blocks


# ---- Q4_0: w = d * (q - 8) ------------------------------------------------------------------
# block, 18 bytes: 0..1 d (f16) | 2..17 qs: byte j = weight j (low nibble), weight j+16 (high)

@njit(**JIT)
def _q4_0_codes(w, r, o):
    a, b, c, e = _nibbles(w, r, o + 2)
    return to_f32(a - 8), to_f32(b - 8), to_f32(c - 8), to_f32(e - 8)


@njit(**JIT)
def _mv_q4_0(w, x, out, r0, r1):
    nb = x.size // 32
    for r in range(r0, r1):
        acc = zeros()
        for b in range(nb):
            o = 18 * b
            q0, q1, q2, q3 = _q4_0_codes(w, r, o)
            acc = fma(_dot32(q0, q1, q2, q3, x, 32 * b), f16_to_f32(w, r, o), acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _dq_q4_0(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = 18 * b
            d = f16_to_f32(w, r, o)
            q0, q1, q2, q3 = _q4_0_codes(w, r, o)
            store_f32(out, i, 32 * b, q0 * d)
            store_f32(out, i, 32 * b + 8, q1 * d)
            store_f32(out, i, 32 * b + 16, q2 * d)
            store_f32(out, i, 32 * b + 24, q3 * d)


# ---- Q4_1: w = d * q + m --------------------------------------------------------------------
# block, 20 bytes: 0..1 d (f16) | 2..3 m (f16) | 4..19 qs (as Q4_0)

@njit(**JIT)
def _q4_1_codes(w, r, o):
    a, b, c, e = _nibbles(w, r, o + 4)
    return to_f32(a), to_f32(b), to_f32(c), to_f32(e)


@njit(**JIT)
def _mv_q4_1(w, x, out, r0, r1):
    nb = x.size // 32
    xs = _sums(x, 32)  # (nb,)
    for r in range(r0, r1):
        acc = zeros()
        acc_m = F32(0)
        for b in range(nb):
            o = 20 * b
            q0, q1, q2, q3 = _q4_1_codes(w, r, o)
            acc = fma(_dot32(q0, q1, q2, q3, x, 32 * b), f16_to_f32(w, r, o), acc)
            acc_m += f16_to_f32(w, r, o + 2) * xs[b]
        out[r] = hsum(acc) + acc_m


@njit(**JIT)
def _dq_q4_1(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = 20 * b
            d = f16_to_f32(w, r, o)
            m = f16_to_f32(w, r, o + 2)
            q0, q1, q2, q3 = _q4_1_codes(w, r, o)
            store_f32(out, i, 32 * b, fma(q0, d, m))
            store_f32(out, i, 32 * b + 8, fma(q1, d, m))
            store_f32(out, i, 32 * b + 16, fma(q2, d, m))
            store_f32(out, i, 32 * b + 24, fma(q3, d, m))


# ---- Q5_0: w = d * (q - 16) -----------------------------------------------------------------
# block, 22 bytes: 0..1 d (f16) | 2..5 qh (u32 LE; bit j = fifth bit of weight j)
#                  | 6..21 qs (low four bits, as Q4_0)

@njit(**JIT)
def _q5_0_codes(w, r, o):
    a, b, c, e = _nibbles(w, r, o + 6)
    ha, hb, hc, he = _fifth_bits(w, r, o + 2)
    return (to_f32((a | ha) - 16), to_f32((b | hb) - 16), to_f32((c | hc) - 16),
            to_f32((e | he) - 16))


@njit(**JIT)
def _mv_q5_0(w, x, out, r0, r1):
    nb = x.size // 32
    for r in range(r0, r1):
        acc = zeros()
        for b in range(nb):
            o = 22 * b
            q0, q1, q2, q3 = _q5_0_codes(w, r, o)
            acc = fma(_dot32(q0, q1, q2, q3, x, 32 * b), f16_to_f32(w, r, o), acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _dq_q5_0(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = 22 * b
            d = f16_to_f32(w, r, o)
            q0, q1, q2, q3 = _q5_0_codes(w, r, o)
            store_f32(out, i, 32 * b, q0 * d)
            store_f32(out, i, 32 * b + 8, q1 * d)
            store_f32(out, i, 32 * b + 16, q2 * d)
            store_f32(out, i, 32 * b + 24, q3 * d)


# ---- Q5_1: w = d * q + m --------------------------------------------------------------------
# block, 24 bytes: 0..1 d (f16) | 2..3 m (f16) | 4..7 qh (as Q5_0) | 8..23 qs (as Q4_0)

@njit(**JIT)
def _q5_1_codes(w, r, o):
    a, b, c, e = _nibbles(w, r, o + 8)
    ha, hb, hc, he = _fifth_bits(w, r, o + 4)
    return to_f32(a | ha), to_f32(b | hb), to_f32(c | hc), to_f32(e | he)


@njit(**JIT)
def _mv_q5_1(w, x, out, r0, r1):
    nb = x.size // 32
    xs = _sums(x, 32)  # (nb,)
    for r in range(r0, r1):
        acc = zeros()
        acc_m = F32(0)
        for b in range(nb):
            o = 24 * b
            q0, q1, q2, q3 = _q5_1_codes(w, r, o)
            acc = fma(_dot32(q0, q1, q2, q3, x, 32 * b), f16_to_f32(w, r, o), acc)
            acc_m += f16_to_f32(w, r, o + 2) * xs[b]
        out[r] = hsum(acc) + acc_m


@njit(**JIT)
def _dq_q5_1(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = 24 * b
            d = f16_to_f32(w, r, o)
            m = f16_to_f32(w, r, o + 2)
            q0, q1, q2, q3 = _q5_1_codes(w, r, o)
            store_f32(out, i, 32 * b, fma(q0, d, m))
            store_f32(out, i, 32 * b + 8, fma(q1, d, m))
            store_f32(out, i, 32 * b + 16, fma(q2, d, m))
            store_f32(out, i, 32 * b + 24, fma(q3, d, m))


# ---- Q8_0: w = d * q ------------------------------------------------------------------------
# block, 34 bytes: 0..1 d (f16) | 2..33 qs (int8, weight j = byte j)

@njit(**JIT)
def _q8_0_codes(w, r, o):
    return (to_f32(load_i8(w, r, o + 2)), to_f32(load_i8(w, r, o + 10)),
            to_f32(load_i8(w, r, o + 18)), to_f32(load_i8(w, r, o + 26)))


@njit(**JIT)
def _mv_q8_0(w, x, out, r0, r1):
    nb = x.size // 32
    for r in range(r0, r1):
        acc = zeros()
        for b in range(nb):
            o = 34 * b
            q0, q1, q2, q3 = _q8_0_codes(w, r, o)
            acc = fma(_dot32(q0, q1, q2, q3, x, 32 * b), f16_to_f32(w, r, o), acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _dq_q8_0(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = 34 * b
            d = f16_to_f32(w, r, o)
            q0, q1, q2, q3 = _q8_0_codes(w, r, o)
            store_f32(out, i, 32 * b, q0 * d)
            store_f32(out, i, 32 * b + 8, q1 * d)
            store_f32(out, i, 32 * b + 16, q2 * d)
            store_f32(out, i, 32 * b + 24, q3 * d)


# =============================================================================================
# k-quants: 256-weight super-blocks


# ---- Q2_K: w = d * sc * q - dmin * m, 16 sub-blocks of 16 ----------------------------------
# super-block, 84 bytes: 0..15 scales (byte s: sc = low nibble, m = high nibble of sub-block s)
#   | 16..79 qs: 2-bit codes; in half h (weights 128h..128h+127), qs[32h + l] holds, at bits
#     2j..2j+1, weight 128h + 32j + l (l < 32)  | 80..81 d (f16) | 82..83 dmin (f16)
# Sub-block s = 8h + 2j + (l >= 16).

@njit(**JIT)
def _q2_k_codes(qv, j):
    """Codes of weights 32j .. 32j+31 of a half, from its 32 code bytes (four I32x8)."""
    s = 2 * j
    return (to_f32((qv[0] >> s) & 3), to_f32((qv[1] >> s) & 3), to_f32((qv[2] >> s) & 3),
            to_f32((qv[3] >> s) & 3))


@njit(**JIT)
def _mv_q2_k(w, x, out, r0, r1):
    nsb = x.size // 256
    xs = _sums(x, 16)  # (cols // 16,)
    for r in range(r0, r1):
        acc = zeros()
        acc_m = F32(0)
        for sb in range(nsb):
            o = 84 * sb
            d = f16_to_f32(w, r, o + 80)
            dmin = f16_to_f32(w, r, o + 82)
            mins = F32(0)
            for h in range(2):
                qo = o + 16 + 32 * h
                qv = (load_u8(w, r, qo), load_u8(w, r, qo + 8), load_u8(w, r, qo + 16),
                      load_u8(w, r, qo + 24))
                for j in range(4):
                    s = 8 * h + 2 * j
                    q0, q1, q2, q3 = _q2_k_codes(qv, j)
                    xi = 256 * sb + 128 * h + 32 * j
                    sc0 = _byte(w, r, o + s)
                    sc1 = _byte(w, r, o + s + 1)
                    acc = fma(_dot16(q0, q1, x, xi), d * F32(sc0 & 15), acc)
                    acc = fma(_dot16(q2, q3, x, xi + 16), d * F32(sc1 & 15), acc)
                    mins += F32(sc0 >> 4) * xs[16 * sb + s] + F32(sc1 >> 4) * xs[16 * sb + s + 1]
            acc_m += dmin * mins
        out[r] = hsum(acc) - acc_m


@njit(**JIT)
def _dq_q2_k(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = 84 * sb
            d = f16_to_f32(w, r, o + 80)
            dmin = f16_to_f32(w, r, o + 82)
            for h in range(2):
                qo = o + 16 + 32 * h
                qv = (load_u8(w, r, qo), load_u8(w, r, qo + 8), load_u8(w, r, qo + 16),
                      load_u8(w, r, qo + 24))
                for j in range(4):
                    s = 8 * h + 2 * j
                    q0, q1, q2, q3 = _q2_k_codes(qv, j)
                    yi = 256 * sb + 128 * h + 32 * j
                    sc0 = _byte(w, r, o + s)
                    sc1 = _byte(w, r, o + s + 1)
                    dl0, ml0 = d * F32(sc0 & 15), dmin * F32(sc0 >> 4)
                    dl1, ml1 = d * F32(sc1 & 15), dmin * F32(sc1 >> 4)
                    store_f32(out, i, yi, q0 * dl0 - ml0)
                    store_f32(out, i, yi + 8, q1 * dl0 - ml0)
                    store_f32(out, i, yi + 16, q2 * dl1 - ml1)
                    store_f32(out, i, yi + 24, q3 * dl1 - ml1)


# ---- Q3_K: w = d * (sc - 32) * (q - 4 * (1 - hbit)), 16 sub-blocks of 16 -------------------
# super-block, 110 bytes: 0..31 hmask: bit 4h+j of hmask[l] = high bit of weight 128h + 32j + l
#   | 32..95 qs: low 2 bits, laid out as Q2_K's | 96..107 scales: 16 six-bit codes,
#     byte k (k < 8): sub-block k (low nibble), k + 8 (high nibble) = low 4 bits;
#     byte 8 + i: bits 2t..2t+1 = high 2 bits of sub-block 4t + i | 108..109 d (f16)

@njit(**JIT)
def _q3_k_scale(w, r, o, k):
    """Signed scale of sub-block k; o = byte offset of the 12 scale bytes."""
    if k < 8:
        low = _byte(w, r, o + k) & 15
    else:
        low = _byte(w, r, o + k - 8) >> 4
    high = (_byte(w, r, o + 8 + (k & 3)) >> (2 * (k >> 2))) & 3
    return F32((low | (high << 4)) - 32)


@njit(**JIT)
def _q3_k_codes(qv, hv, h, j):
    """Signed codes of weights 32j .. 32j+31 of half h (four F32x8)."""
    s = 2 * j
    b = 4 * h + j
    return (to_f32((((qv[0] >> s) & 3) | (((hv[0] >> b) & 1) << 2)) - 4),
            to_f32((((qv[1] >> s) & 3) | (((hv[1] >> b) & 1) << 2)) - 4),
            to_f32((((qv[2] >> s) & 3) | (((hv[2] >> b) & 1) << 2)) - 4),
            to_f32((((qv[3] >> s) & 3) | (((hv[3] >> b) & 1) << 2)) - 4))


@njit(**JIT)
def _mv_q3_k(w, x, out, r0, r1):
    nsb = x.size // 256
    for r in range(r0, r1):
        acc = zeros()
        for sb in range(nsb):
            o = 110 * sb
            d = f16_to_f32(w, r, o + 108)
            hv = (load_u8(w, r, o), load_u8(w, r, o + 8), load_u8(w, r, o + 16),
                  load_u8(w, r, o + 24))
            for h in range(2):
                qo = o + 32 + 32 * h
                qv = (load_u8(w, r, qo), load_u8(w, r, qo + 8), load_u8(w, r, qo + 16),
                      load_u8(w, r, qo + 24))
                for j in range(4):
                    s = 8 * h + 2 * j
                    q0, q1, q2, q3 = _q3_k_codes(qv, hv, h, j)
                    xi = 256 * sb + 128 * h + 32 * j
                    acc = fma(_dot16(q0, q1, x, xi), d * _q3_k_scale(w, r, o + 96, s), acc)
                    acc = fma(_dot16(q2, q3, x, xi + 16), d * _q3_k_scale(w, r, o + 96, s + 1),
                              acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _dq_q3_k(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = 110 * sb
            d = f16_to_f32(w, r, o + 108)
            hv = (load_u8(w, r, o), load_u8(w, r, o + 8), load_u8(w, r, o + 16),
                  load_u8(w, r, o + 24))
            for h in range(2):
                qo = o + 32 + 32 * h
                qv = (load_u8(w, r, qo), load_u8(w, r, qo + 8), load_u8(w, r, qo + 16),
                      load_u8(w, r, qo + 24))
                for j in range(4):
                    s = 8 * h + 2 * j
                    q0, q1, q2, q3 = _q3_k_codes(qv, hv, h, j)
                    yi = 256 * sb + 128 * h + 32 * j
                    dl0 = d * _q3_k_scale(w, r, o + 96, s)
                    dl1 = d * _q3_k_scale(w, r, o + 96, s + 1)
                    store_f32(out, i, yi, q0 * dl0)
                    store_f32(out, i, yi + 8, q1 * dl0)
                    store_f32(out, i, yi + 16, q2 * dl1)
                    store_f32(out, i, yi + 24, q3 * dl1)


# ---- Q4_K / Q5_K: w = d * sc * q - dmin * m, 8 sub-blocks of 32 -----------------------------
# Six-bit scale and min codes of sub-block j, packed in 12 bytes s[0..11] (bytes 4..15 of the
# super-block, after d and dmin):
#   j < 4:  sc = s[j] & 63,                               m = s[j + 4] & 63
#   j >= 4: sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4,  m = (s[j + 4] >> 4) | (s[j] >> 6) << 4

@njit(**JIT)
def _k4_scales(w, r, o):
    """(d * sc, dmin * m) of the 8 sub-blocks of the super-block at byte o, as two F32x8."""
    a = load_u8(w, r, o + 4)  # lane j: s[j]
    b = load_u8(w, r, o + 8)  # lane j: s[j + 4]
    c = load_u8(w, r, o)  # lane j >= 4: s[j - 4]
    sc = halves(a & 63, (b & 15) | ((c >> 6) << 4))
    m = halves(b & 63, (b >> 4) | ((a >> 6) << 4))
    return to_f32(sc) * f16_to_f32(w, r, o), to_f32(m) * f16_to_f32(w, r, o + 2)


# Q4_K super-block, 144 bytes: 0..1 d (f16) | 2..3 dmin (f16) | 4..15 scales (above)
#   | 16..143 qs: chunk c (weights 64c..64c+63) is qs[32c..32c+31]; byte l holds weight 64c + l
#     (low nibble, sub-block 2c) and 64c + 32 + l (high nibble, sub-block 2c + 1)

@njit(**JIT)
def _q4_k_codes(w, r, qo):
    """Codes of one 64-weight chunk whose 32 code bytes start at qo: (low 32, high 32)."""
    a0, a1 = load_u8(w, r, qo), load_u8(w, r, qo + 8)
    a2, a3 = load_u8(w, r, qo + 16), load_u8(w, r, qo + 24)
    return ((to_f32(a0 & 15), to_f32(a1 & 15), to_f32(a2 & 15), to_f32(a3 & 15)),
            (to_f32(a0 >> 4), to_f32(a1 >> 4), to_f32(a2 >> 4), to_f32(a3 >> 4)))


@njit(**JIT)
def _mv_q4_k(w, x, out, r0, r1):
    nsb = x.size // 256
    xs = _sums(x, 32)  # (cols // 32,)
    for r in range(r0, r1):
        acc = zeros()
        acc_m = zeros()
        for sb in range(nsb):
            o = 144 * sb
            dl, ml = _k4_scales(w, r, o)
            acc_m = fma(ml, load_f32(xs, 8 * sb), acc_m)
            for c in range(4):
                lo, hi = _q4_k_codes(w, r, o + 16 + 32 * c)
                xi = 256 * sb + 64 * c
                acc = fma(_dot32(lo[0], lo[1], lo[2], lo[3], x, xi), lane(dl, 2 * c), acc)
                acc = fma(_dot32(hi[0], hi[1], hi[2], hi[3], x, xi + 32), lane(dl, 2 * c + 1),
                          acc)
        out[r] = hsum(acc) - hsum(acc_m)


@njit(**JIT)
def _dq_q4_k(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = 144 * sb
            dl, ml = _k4_scales(w, r, o)
            for c in range(4):
                lo, hi = _q4_k_codes(w, r, o + 16 + 32 * c)
                yi = 256 * sb + 64 * c
                dl0, ml0 = lane(dl, 2 * c), lane(ml, 2 * c)
                dl1, ml1 = lane(dl, 2 * c + 1), lane(ml, 2 * c + 1)
                for k in range(4):
                    store_f32(out, i, yi + 8 * k, lo[k] * dl0 - ml0)
                    store_f32(out, i, yi + 32 + 8 * k, hi[k] * dl1 - ml1)


# Q5_K super-block, 176 bytes: 0..1 d | 2..3 dmin | 4..15 scales (as Q4_K)
#   | 16..47 qh: bit 2c of qh[l] = fifth bit of weight 64c + l, bit 2c + 1 that of 64c + 32 + l
#   | 48..175 qs (low four bits, as Q4_K)

@njit(**JIT)
def _q5_k_codes(w, r, qo, hv, c):
    """Codes of chunk c (code bytes at qo, high-bit vectors hv): (low 32, high 32)."""
    a0, a1 = load_u8(w, r, qo), load_u8(w, r, qo + 8)
    a2, a3 = load_u8(w, r, qo + 16), load_u8(w, r, qo + 24)
    s0 = 2 * c
    s1 = 2 * c + 1
    return ((to_f32((a0 & 15) | (((hv[0] >> s0) & 1) << 4)),
             to_f32((a1 & 15) | (((hv[1] >> s0) & 1) << 4)),
             to_f32((a2 & 15) | (((hv[2] >> s0) & 1) << 4)),
             to_f32((a3 & 15) | (((hv[3] >> s0) & 1) << 4))),
            (to_f32((a0 >> 4) | (((hv[0] >> s1) & 1) << 4)),
             to_f32((a1 >> 4) | (((hv[1] >> s1) & 1) << 4)),
             to_f32((a2 >> 4) | (((hv[2] >> s1) & 1) << 4)),
             to_f32((a3 >> 4) | (((hv[3] >> s1) & 1) << 4))))


@njit(**JIT)
def _mv_q5_k(w, x, out, r0, r1):
    nsb = x.size // 256
    xs = _sums(x, 32)  # (cols // 32,)
    for r in range(r0, r1):
        acc = zeros()
        acc_m = zeros()
        for sb in range(nsb):
            o = 176 * sb
            dl, ml = _k4_scales(w, r, o)
            acc_m = fma(ml, load_f32(xs, 8 * sb), acc_m)
            hv = (load_u8(w, r, o + 16), load_u8(w, r, o + 24), load_u8(w, r, o + 32),
                  load_u8(w, r, o + 40))
            for c in range(4):
                lo, hi = _q5_k_codes(w, r, o + 48 + 32 * c, hv, c)
                xi = 256 * sb + 64 * c
                acc = fma(_dot32(lo[0], lo[1], lo[2], lo[3], x, xi), lane(dl, 2 * c), acc)
                acc = fma(_dot32(hi[0], hi[1], hi[2], hi[3], x, xi + 32), lane(dl, 2 * c + 1),
                          acc)
        out[r] = hsum(acc) - hsum(acc_m)


@njit(**JIT)
def _dq_q5_k(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = 176 * sb
            dl, ml = _k4_scales(w, r, o)
            hv = (load_u8(w, r, o + 16), load_u8(w, r, o + 24), load_u8(w, r, o + 32),
                  load_u8(w, r, o + 40))
            for c in range(4):
                lo, hi = _q5_k_codes(w, r, o + 48 + 32 * c, hv, c)
                yi = 256 * sb + 64 * c
                dl0, ml0 = lane(dl, 2 * c), lane(ml, 2 * c)
                dl1, ml1 = lane(dl, 2 * c + 1), lane(ml, 2 * c + 1)
                for k in range(4):
                    store_f32(out, i, yi + 8 * k, lo[k] * dl0 - ml0)
                    store_f32(out, i, yi + 32 + 8 * k, hi[k] * dl1 - ml1)


# ---- Q6_K: w = d * sc * (q - 32), 16 sub-blocks of 16 ---------------------------------------
# super-block, 210 bytes: 0..127 ql | 128..191 qh | 192..207 scales (int8) | 208..209 d (f16)
# In half h (weights 128h..128h+127) with a = ql[64h + l], b = ql[64h + 32 + l],
# e = qh[32h + l] (l < 32), the 6-bit codes are
#   weight 128h + l      = a & 15 | (e & 3) << 4          sub-block 8h + l // 16
#   weight 128h + 32 + l = b & 15 | (e >> 2 & 3) << 4     sub-block 8h + l // 16 + 2
#   weight 128h + 64 + l = a >> 4 | (e >> 4 & 3) << 4     sub-block 8h + l // 16 + 4
#   weight 128h + 96 + l = b >> 4 | (e >> 6) << 4         sub-block 8h + l // 16 + 6

@njit(**JIT)
def _q6_k_codes(w, r, o, h, g, z):
    """Codes minus z of the four weight groups fed by lanes l = 8g..8g+7 of half h (F32x8 x4)."""
    a = load_u8(w, r, o + 64 * h + 8 * g)
    b = load_u8(w, r, o + 64 * h + 32 + 8 * g)
    e = load_u8(w, r, o + 128 + 32 * h + 8 * g)
    # the high pairs of e, moved to bits 4..5 with one shift and one mask each
    return (to_f32(((a & 15) | ((e << 4) & 48)) - z),
            to_f32(((b & 15) | ((e << 2) & 48)) - z),
            to_f32(((a >> 4) | (e & 48)) - z),
            to_f32(((b >> 4) | ((e >> 2) & 48)) - z))


@njit(**JIT)
def _q6_k_scales(w, r, o, h):
    """d * sc of sub-blocks 8h..8h+7 of the super-block at byte o (F32x8)."""
    return to_f32(load_i8(w, r, o + 192 + 8 * h)) * f16_to_f32(w, r, o + 208)


@njit(**JIT)
def _mv_q6_k(w, x, out, r0, r1):
    # sum(d sc (q - 32) x) = sum(d sc q x) - 32 sum(d sc sum16(x)): codes stay unsigned here
    nsb = x.size // 256
    xs = _sums(x, 16)  # (cols // 16,)
    for r in range(r0, r1):
        acc = zeros()
        acc_z = zeros()
        for sb in range(nsb):
            o = 210 * sb
            for h in range(2):
                dl = _q6_k_scales(w, r, o, h)
                acc_z = fma(dl, load_f32(xs, 16 * sb + 8 * h), acc_z)
                xi = 256 * sb + 128 * h
                for p in range(2):  # lanes 16p..16p+15 share a scale within each weight group
                    a0, b0, c0, e0 = _q6_k_codes(w, r, o, h, 2 * p, 0)
                    a1, b1, c1, e1 = _q6_k_codes(w, r, o, h, 2 * p + 1, 0)
                    xl = xi + 16 * p
                    acc = fma(_dot16(a0, a1, x, xl), lane(dl, p), acc)
                    acc = fma(_dot16(b0, b1, x, xl + 32), lane(dl, p + 2), acc)
                    acc = fma(_dot16(c0, c1, x, xl + 64), lane(dl, p + 4), acc)
                    acc = fma(_dot16(e0, e1, x, xl + 96), lane(dl, p + 6), acc)
        out[r] = hsum(acc) - F32(32) * hsum(acc_z)


@njit(**JIT)
def _dq_q6_k(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = 210 * sb
            for h in range(2):
                dl = _q6_k_scales(w, r, o, h)
                for g in range(4):
                    a, b, c, e = _q6_k_codes(w, r, o, h, g, 32)
                    yi = 256 * sb + 128 * h + 8 * g
                    p = g // 2
                    store_f32(out, i, yi, a * lane(dl, p))
                    store_f32(out, i, yi + 32, b * lane(dl, p + 2))
                    store_f32(out, i, yi + 64, c * lane(dl, p + 4))
                    store_f32(out, i, yi + 96, e * lane(dl, p + 6))


# ---- Q8_K: w = d * q ------------------------------------------------------------------------
# super-block, 292 bytes: 0..3 d (f32) | 4..259 qs (int8) | 260..291 bsums (int16, unused here)

@njit(**JIT)
def _mv_q8_k(w, x, out, r0, r1):
    nsb = x.size // 256
    for r in range(r0, r1):
        acc = zeros()
        for sb in range(nsb):
            o = 292 * sb
            t0 = zeros()
            t1 = zeros()
            for k in range(0, 256, 16):
                t0 = fma(to_f32(load_i8(w, r, o + 4 + k)), load_f32(x, 256 * sb + k), t0)
                t1 = fma(to_f32(load_i8(w, r, o + 12 + k)), load_f32(x, 256 * sb + k + 8), t1)
            acc = fma(t0 + t1, f32_at(w, r, o), acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _dq_q8_k(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = 292 * sb
            d = f32_at(w, r, o)
            for k in range(0, 256, 8):
                store_f32(out, i, 256 * sb + k, to_f32(load_i8(w, r, o + 4 + k)) * d)


# =============================================================================================
# float rows: F16 and BF16 (F32 goes straight to BLAS)


@njit(**JIT)
def _mv_f16(w, x, out, r0, r1):
    n = x.size
    n8 = n - n % 8
    for r in range(r0, r1):
        acc = zeros()
        for k in range(0, n8, 8):
            acc = fma(load_f16(w, r, 2 * k), load_f32(x, k), acc)
        s = hsum(acc)
        for k in range(n8, n):
            s += f16_to_f32(w, r, 2 * k) * x[k]
        out[r] = s


@njit(**JIT)
def _mv_bf16(w, x, out, r0, r1):
    n = x.size
    n8 = n - n % 8
    for r in range(r0, r1):
        acc = zeros()
        for k in range(0, n8, 8):
            acc = fma(load_bf16(w, r, 2 * k), load_f32(x, k), acc)
        s = hsum(acc)
        for k in range(n8, n):
            s += bf16_at(w, r, 2 * k) * x[k]
        out[r] = s


# name -> (matvec kernel, decode-rows kernel); kernels take a range of rows (or of row ids) so
# that one parallel driver per job serves every type.  F32's matvec is BLAS; float rows decode
# with numpy (``_decode_floats``).
KERNELS = {
    "F32": (None, None),
    "F16": (_mv_f16, None),
    "BF16": (_mv_bf16, None),
    "Q4_0": (_mv_q4_0, _dq_q4_0),
    "Q4_1": (_mv_q4_1, _dq_q4_1),
    "Q5_0": (_mv_q5_0, _dq_q5_0),
    "Q5_1": (_mv_q5_1, _dq_q5_1),
    "Q8_0": (_mv_q8_0, _dq_q8_0),
    "Q2_K": (_mv_q2_k, _dq_q2_k),
    "Q3_K": (_mv_q3_k, _dq_q3_k),
    "Q4_K": (_mv_q4_k, _dq_q4_k),
    "Q5_K": (_mv_q5_k, _dq_q5_k),
    "Q6_K": (_mv_q6_k, _dq_q6_k),
    "Q8_K": (_mv_q8_k, _dq_q8_k),
}
for _name, _pair in KERNELS.items():
    register(_name, "matvec", _pair)


def _decode_floats(name, w, ids, out):
    """Rows ``ids`` of an F32 / F16 / BF16 matrix into float32 ``out`` (numpy does it well)."""
    rows = w[ids]  # (len(ids), row_bytes)
    if name == "F32":
        out[:] = rows.view(F32)
    elif name == "F16":
        out[:] = rows.view(np.float16)
    else:  # BF16: the upper half of a float32
        np.left_shift(rows.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


# =============================================================================================
# the prompt path: decoded tiles times X, in registers

GEMM_KC = 512  # columns per pass: a 16-row tile and 4 tokens of X, 40 KiB, stay in L1/L2
TILE_ROWS = 16  # rows decoded at a time by each thread (16 x 5632 floats = 352 KiB at most)


@njit(**JIT)
def _gemm_tile(wt, X, out, r_out):
    """``out[:, r_out:r_out + m] = X @ wt.T`` for a decoded tile wt (m, cols), X (n, cols).

    Dot-product form with a 2-row x 4-token register block (8 F32x8 accumulators), columns in
    passes of GEMM_KC so that both operands of a pass come from L1; cols must be a multiple of 8.
    """
    m, cols = wt.shape
    n = X.shape[0]
    n4 = n - n % 4
    m2 = m - m % 2
    for t in range(n):
        for r in range(m):
            out[t, r_out + r] = 0.0
    for k0 in range(0, cols, GEMM_KC):
        k1 = min(cols, k0 + GEMM_KC)
        for t in range(0, n4, 4):
            for r in range(0, m2, 2):
                a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
                b0, b1, b2, b3 = zeros(), zeros(), zeros(), zeros()
                for k in range(k0, k1, 8):
                    w0 = load_f32(wt[r], k)
                    w1 = load_f32(wt[r + 1], k)
                    x0 = load_f32(X[t], k)
                    x1 = load_f32(X[t + 1], k)
                    x2 = load_f32(X[t + 2], k)
                    x3 = load_f32(X[t + 3], k)
                    a0, a1 = fma(w0, x0, a0), fma(w0, x1, a1)
                    a2, a3 = fma(w0, x2, a2), fma(w0, x3, a3)
                    b0, b1 = fma(w1, x0, b0), fma(w1, x1, b1)
                    b2, b3 = fma(w1, x2, b2), fma(w1, x3, b3)
                ro = r_out + r
                out[t, ro] += hsum(a0)
                out[t + 1, ro] += hsum(a1)
                out[t + 2, ro] += hsum(a2)
                out[t + 3, ro] += hsum(a3)
                out[t, ro + 1] += hsum(b0)
                out[t + 1, ro + 1] += hsum(b1)
                out[t + 2, ro + 1] += hsum(b2)
                out[t + 3, ro + 1] += hsum(b3)
        # the edges: a last odd row for every token, the last n % 4 tokens for every row
        for t in range(n):
            for r in range(m2 if t < n4 else 0, m):
                a = zeros()
                for k in range(k0, k1, 8):
                    a = fma(load_f32(wt[r], k), load_f32(X[t], k), a)
                out[t, r_out + r] += hsum(a)


# =============================================================================================
# running kernels on all threads

_W = types.Array(types.uint8, 2, "C", readonly=True)  # the blocks, (rows, row_bytes)
_V = types.Array(types.float32, 1, "C")
_M = types.Array(types.float32, 2, "C")
_IDS = types.Array(types.int64, 1, "C")
MATVEC_SIG = types.void(_W, _V, _V, types.int64, types.int64)  # (w, x, out, r0, r1)
DECODE_SIG = types.void(_W, _IDS, _M)  # (w, ids, out): out[i] = row ids[i]

# Below this many weights a product runs on the calling thread: starting the thread pool costs
# more than it saves.
PARALLEL_MIN_WEIGHTS = 1 << 16
# matmul with fewer tokens runs matvec per token: decoding into tiles does not pay off
MATMUL_MIN_TOKENS = 4


def _function_at(sig):
    """An intrinsic turning the address of a compiled kernel (int64) into a callable value.

    NOTE: passing a dispatcher (or a first-class-function wrapper) to a jitted driver costs
    20-50 us of Python per call to convert; an address is a plain integer.  The value built here
    is what Numba itself makes of a dispatcher: a FunctionType whose ``jit_addr`` is the native
    entry point (``_kernel`` takes it from the compile result), called with Numba's convention.
    """
    ftype = types.FunctionType(sig)

    @intrinsic
    def function_at(typingctx, addr):
        def codegen(context, builder, signature, args):
            fn = cgutils.create_struct_proxy(ftype)(context, builder)
            null = context.get_constant_null(types.voidptr)
            fn.c_addr = null
            fn.py_addr = null
            fn.jit_addr = builder.inttoptr(args[0], context.get_value_type(types.voidptr))
            return fn._getvalue()
        return ftype(types.int64), codegen
    return function_at


_matvec_at = _function_at(MATVEC_SIG)
_decode_at = _function_at(DECODE_SIG)


def _run_matvec(addr, w, x, out, n):
    rows = w.shape[0]
    for c in prange(n):
        _matvec_at(addr)(w, x, out, rows * c // n, rows * (c + 1) // n)


def _run_decode(addr, w, ids, out, n):
    m = ids.size
    for c in prange(n):
        i0, i1 = m * c // n, m * (c + 1) // n
        _decode_at(addr)(w, ids[i0:i1], out[i0:i1])


def _run_matmul(addr, w, X, out, n):
    rows, cols = w.shape[0], X.shape[1]
    for c in prange(n):
        tile = np.empty((TILE_ROWS, cols), F32)  # (TILE_ROWS, cols), this thread's
        ids = np.empty(TILE_ROWS, np.int64)
        for r0 in range(rows * c // n, rows * (c + 1) // n, TILE_ROWS):
            m = min(TILE_ROWS, rows * (c + 1) // n - r0)
            for i in range(m):
                ids[i] = r0 + i
            _decode_at(addr)(w, ids[:m], tile[:m])
            _gemm_tile(tile[:m], X, out, r0)


@functools.cache
def _driver(job: str):
    """The parallel driver of a job, compiled once for every type: it takes the address of the
    type's kernel and gives each thread a range of rows."""
    py, args = {"matvec": (_run_matvec, (_W, _V, _V)), "decode": (_run_decode, (_W, _IDS, _M)),
                "matmul": (_run_matmul, (_W, _M, _M))}[job]
    return njit(types.void(types.int64, *args, types.int64), parallel=True, cache=True)(py)


@functools.cache
def _kernel(name: str, job: str):
    """The type's kernel for a job ("matvec" or "decode"), compiled or loaded from Numba's cache
    on first use: (dispatcher, for calls from Python; native entry address, for the drivers)."""
    fn = _lookup(name).impl("matvec")[0 if job == "matvec" else 1]
    sig = MATVEC_SIG if job == "matvec" else DECODE_SIG
    fn.compile(sig)
    cres = fn.overloads[sig.args]
    return fn, cres.library.get_pointer_to_function(cres.fndesc.mangled_name)


def _threads(work: int) -> int:
    return 1 if work < PARALLEL_MIN_WEIGHTS else numba.get_num_threads()


def matvec_into(name: str, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """``out = W @ x`` for a quantized (or F16/BF16) matrix; arrays as ``MATVEC_SIG`` says.

    A type registered with a decode kernel only (no fused matvec) runs as a one-token matmul:
    rows decoded into tiles, then dotted with x."""
    if _lookup(name).impl("matvec")[0] is None:
        matmul_into(name, w, x[None, :], out[None, :])
        return
    fn, ptr = _kernel(name, "matvec")
    n = _threads(w.shape[0] * x.size)
    if n == 1:
        fn(w, x, out, 0, w.shape[0])
    else:
        _driver("matvec")(ptr, w, x, out, n)


def decode_into(name: str, w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """``out = dequantize(W)[ids]``, bit-exact with :mod:`gguf.quants`."""
    if _lookup(name).impl("matvec")[1] is None:
        _decode_floats(name, w, ids, out)
        return
    fn, ptr = _kernel(name, "decode")
    n = _threads(out.size)
    if n == 1:
        fn(w, ids, out)
    else:
        _driver("decode")(ptr, w, ids, out, n)


def matmul_into(name: str, w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """``out = X @ dequantize(W).T`` for a quantized matrix: X (n, cols), out (n, rows)."""
    _, ptr = _kernel(name, "decode")
    rows = w.shape[0]
    n = min(_threads(rows * X.size), max(1, rows // TILE_ROWS))
    _driver("matmul")(ptr, w, X, out, n)


# =============================================================================================
# the matrix


@functools.cache
def int8_kernels():
    """:mod:`blockq.kernels.cpu_int8` where this process runs an int8 variant
    (:func:`blockq.kernels.cpu_isa.isa`), else None: the float kernels above serve."""
    if isa() == "float":
        return None
    from . import cpu_int8
    return cpu_int8


def matvec_many(mats: "list[QMatrix]", x: np.ndarray) -> "tuple[np.ndarray, ...] | None":
    """``W_i @ x`` (each (1, rows_i)) for two or three matrices of one input x (cols,) in one
    int8 kernel call, its activation blocks made once (decoding: q, k, v; gate, up); None where
    that cannot be done (float numerics, types whose activation blocks differ), and the caller
    takes them one by one."""
    # NOTE: what is fixed for these matrices is prepared once and kept on the first of them,
    # keyed by all of them (alive as long as it is) and by their int8 switches
    key = (tuple(id(m) for m in mats), tuple(m.int8 for m in mats))
    run = mats[0]._shared.get(key, False)
    if run is False:
        k8 = int8_kernels()
        run = None
        if k8 is not None and all(key[1]) and len({m.shape[1] for m in mats}) == 1 and \
                k8.can_share_input([m.qtype for m in mats]):
            run = k8.prepare_products([m.qtype for m in mats], [m.data for m in mats],
                                      mats[0].shape[1])
        mats[0]._shared[key] = run
    if run is None:
        return None
    x = mats[0]._vector(x)  # (cols,)
    outs = tuple(np.empty((1, m.shape[0]), F32) for m in mats)  # (1, rows_i) each
    run(x[None], outs)
    return outs


@functools.cache
def int8_gemm():
    """:mod:`blockq.kernels.cpu_int8_gemm` (the int8 tiled prompt matmul) where this process
    runs an int8 variant, else None."""
    if int8_kernels() is None:
        return None
    from . import cpu_int8_gemm
    return cpu_int8_gemm


def _readonly(a: np.ndarray) -> np.ndarray:
    # NOTE: kernels always see read-only arrays so that Numba compiles (and caches) one
    # specialization per type, whether the bytes come from a read-only mmap or from memory.
    v = a.view()
    v.flags.writeable = False
    return v


class QMatrix:
    """A (rows, cols) weight matrix kept in its block-quantized bytes; rows are output features.

    ``data``: the tensor's bytes, uint8 ``(rows, row_bytes)`` or any C-contiguous array holding
    exactly ``rows * row_bytes`` bytes (a GGUF mmap view is used as is, without copying).
    """

    def __init__(self, qtype: "str | int | QType", data: np.ndarray, shape: tuple[int, int]):
        t = _lookup(qtype)
        t.impl("matvec")  # refuses a type without CPU kernels, naming those with them
        if len(shape) != 2 or min(shape) < 1:
            raise BadArgument(f"QMatrix shape must be (rows, cols) >= 1, got {tuple(shape)}")
        rows, cols = int(shape[0]), int(shape[1])
        row_bytes = t.row_bytes(cols)
        a = np.asarray(data)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)  # a copy: only strided views get here
        a = a.reshape(-1).view(np.uint8)
        if a.size != rows * row_bytes:
            raise BadArgument(
                f"{t.name} matrix of shape ({rows}, {cols}) needs {rows * row_bytes} bytes "
                f"({row_bytes} per row), got {a.size}")
        self.qtype: str = t.name
        self.shape: tuple[int, int] = (rows, cols)
        self.data = _readonly(a.reshape(rows, row_bytes))  # (rows, row_bytes) uint8
        self._f32 = self.data.view(F32) if t.name == "F32" else None  # (rows, cols)
        # True: products quantize their input to 8 bits and dot integer codes, as llama.cpp
        # (blockq.kernels.cpu_int8); False: float32 activations times decoded weights.
        self.int8: bool = False
        self.set_int8(True)
        self._shared: dict = {}  # matvec_many's prepared calls with this matrix first

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def set_int8(self, on: bool) -> None:
        """Use the int8 kernels (where this CPU and type have them) or the float ones."""
        k8 = int8_kernels()
        self.int8 = bool(on) and k8 is not None and self.qtype in k8.KERNELS

    def __repr__(self) -> str:
        return f"QMatrix({self.qtype}, shape={self.shape}, {self.nbytes} bytes)"

    # -- checks ---------------------------------------------------------------------------

    def _vector(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape != (self.shape[1],):
            raise BadArgument(f"matvec of a {self.shape} {self.qtype} matrix needs x of shape "
                              f"({self.shape[1]},), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=F32)
        return x if x.flags.writeable else x.copy()

    # -- products -------------------------------------------------------------------------

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``W @ x``: x float32 (cols,) -> (rows,) float32."""
        x = self._vector(x)  # (cols,)
        if self._f32 is not None:
            return self._f32 @ x
        if self.int8:
            out = np.empty((1, self.shape[0]), F32)  # (1, rows)
            int8_kernels().product(self.qtype, self.data, x[None], out)
            return out[0]
        out = np.empty(self.shape[0], F32)  # (rows,)
        matvec_into(self.qtype, self.data, x, out)
        return out

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """``X @ W.T``: X float32 (n, cols) -> (n, rows) float32 (the prompt path)."""
        X = np.asarray(X)
        rows, cols = self.shape
        if X.ndim != 2 or X.shape[1] != cols:
            raise BadArgument(f"matmul of a {self.shape} {self.qtype} matrix needs X of shape "
                              f"(n, {cols}), got {X.shape}")
        if X.shape[0] == 1:
            return self.matvec(X[0])[None, :]
        X = np.ascontiguousarray(X, dtype=F32)  # (n, cols)
        if self._f32 is not None:
            return X @ self._f32.T
        if self.int8 and X.shape[0] < MATMUL_MIN_TOKENS:
            out = np.empty((X.shape[0], rows), F32)  # (n, rows)
            int8_kernels().product(self.qtype, self.data, X, out)
            return out
        if self.int8 and self.qtype in int8_gemm().PROMPT_TYPES:
            out = np.empty((X.shape[0], rows), F32)  # (n, rows)
            int8_gemm().product(self.qtype, self.data, X, out)
            return out
        if self.int8:
            # NOTE: the int8 numerics (dequantized weights . dequantized 8-bit activations), with
            # the activations rounded to their 8-bit blocks and the product taken by the float
            # tile kernel below, for the types whose int8 tiles (cpu_int8_gemm) measured slower.
            X = int8_kernels().round_trip(self.qtype, X)  # (n, cols)
        if X.shape[0] < MATMUL_MIN_TOKENS:
            return np.stack([self.matvec(x) for x in X])
        if _lookup(self.qtype).impl("matvec")[1] is None:  # F16 / BF16 rows: numpy decodes tiles for BLAS
            out_t = np.empty((rows, X.shape[0]), F32)  # (rows, n)
            step = max(1, TILE_BYTES // (4 * cols))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                t = np.empty((r1 - r0, cols), F32)  # (step, cols)
                _decode_floats(self.qtype, self.data, np.arange(r0, r1), t)
                np.matmul(t, X.T, out=out_t[r0:r1])
            return np.ascontiguousarray(out_t.T)  # (n, rows)
        X = X if X.flags.writeable else X.copy()
        out = np.empty((X.shape[0], rows), F32)  # (n, rows)
        matmul_into(self.qtype, self.data, X, out)
        return out

    def take_rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows ``W[ids]`` -> (len(ids), cols) float32 (embedding lookup)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise BadArgument(f"take_rows needs a 1-D integer array of row ids, got "
                              f"{ids.dtype} of shape {ids.shape}")
        rows = self.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            bad = ids[(ids < 0) | (ids >= rows)][0]
            raise BadArgument(f"row id {int(bad)} is out of range for a matrix of {rows} rows")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.size, self.shape[1]), F32)  # (len(ids), cols)
        if ids.size:
            decode_into(self.qtype, self.data, ids, out)
        return out
