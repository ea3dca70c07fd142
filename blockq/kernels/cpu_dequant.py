"""Numba CPU kernels: dequantize whole blocks in parallel, bit-exact with the numpy reference.

Every quantized kernel has the same simple signature, so each compiles once (and is cached on
disk by ``cache=True``; only the types a program touches are compiled):

    kernel(x, y)
      x   uint8   (n_blocks, type_size)   the blocks
      y   float32 (n_blocks, block_size)  filled in place

F16 and BF16 have flat kernels ``f16/bf16(x: uint16 (n,), y: float32 (n,))``; F32 is a numpy
copy.  :func:`dequantize_into` always hands kernels a read-only ``x`` (one specialization for
arrays and memory maps alike).  Arithmetic follows llama.cpp's ``dequantize_row_*`` order in
float32 (no fastmath, so LLVM does not fuse multiply-adds); :mod:`blockq.dequantize` draws the
layouts.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..types import qtype, register

F32 = np.float32


def _int_to_width(builder, value, from_bits, to_bits):
    if from_bits > to_bits:
        return builder.trunc(value, ir.IntType(to_bits))
    if from_bits < to_bits:
        return builder.zext(value, ir.IntType(to_bits))
    return value


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """Low 16 bits of an integer, read as f16 -> float32 (one ``vcvtph2ps`` with F16C)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = _int_to_width(builder, args[0], h.bitwidth, 16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def _u32_as_f32(typingctx, u):
    """Low 32 bits of an integer, reinterpreted as float32."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_int_to_width(builder, args[0], u.bitwidth, 32), ir.FloatType())
    return types.float32(u), codegen


@njit(inline="always")
def _f16(h):
    """f16 bits (uint16) -> f32, exactly as numpy converts.

    NOTE: the hardware conversion quiets signalling NaNs; numpy (our reference) keeps the payload
    as is, so NaNs are rebuilt by hand: sign | all-ones exponent | mantissa << 13.
    """
    v = _f16_bits_to_f32(h)
    if v != v:
        u = np.uint32(h)
        v = _u32_as_f32(((u & np.uint32(0x8000)) << np.uint32(16)) | np.uint32(0x7F800000)
                        | ((u & np.uint32(0x3FF)) << np.uint32(13)))
    return v


@njit(inline="always")
def _half(x, b, off):
    """The little-endian f16 at byte ``off`` of block ``b``, as f32."""
    return _f16(np.uint16(x[b, off]) | (np.uint16(x[b, off + 1]) << np.uint16(8)))


@njit(inline="always")
def _scale_min_k4(x, b, base, s):
    """Q4_K/Q5_K: the 6-bit (scale, min) of sub-block ``s`` from the 12 bytes at ``base``."""
    if s < 4:
        return np.int64(x[b, base + s]) & 63, np.int64(x[b, base + s + 4]) & 63
    lo = np.int64(x[b, base + s + 4])
    return ((lo & 15) | ((np.int64(x[b, base + s - 4]) >> 6) << 4),
            (lo >> 4) | ((np.int64(x[b, base + s]) >> 6) << 4))


@njit(cache=True, parallel=True)
def f16(x, y):
    # x: uint16 (n,) f16 bit patterns -> y: float32 (n,)
    for i in prange(x.shape[0]):
        y[i] = _f16(x[i])


@njit(cache=True, parallel=True)
def bf16(x, y):
    # x: uint16 (n,) bf16 bit patterns = the upper half of an f32 -> y: float32 (n,)
    for i in prange(x.shape[0]):
        y[i] = _u32_as_f32(np.uint32(x[i]) << np.uint32(16))


# NOTE: inner loops take their trip counts from ``y.shape`` (16 / 32, known only at run time)
# rather than from literals: LLVM fully unrolls constant short loops before its loop vectorizer
# runs, and Numba leaves the SLP vectorizer off, so literal trip counts end up scalar (~3x slower).

# --- legacy: 32 weights per block ---------------------------------------------------------------

@njit(cache=True, parallel=True)
def q4_0(x, y):
    # byte 0..1: d | 2..17: qs (weight j: low nibble of qs[j], weight j+16: high nibble)
    h = y.shape[1] // 2  # 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        for j in range(h):
            y[b, j] = F32(np.int32(x[b, 2 + j] & 15) - 8) * d
        for j in range(h):
            y[b, h + j] = F32(np.int32(x[b, 2 + j] >> 4) - 8) * d


@njit(cache=True, parallel=True)
def q4_1(x, y):
    # byte 0..1: d | 2..3: m | 4..19: qs (nibbles as Q4_0)
    h = y.shape[1] // 2  # 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        m = _half(x, b, 2)
        for j in range(h):
            y[b, j] = F32(x[b, 4 + j] & 15) * d + m
        for j in range(h):
            y[b, h + j] = F32(x[b, 4 + j] >> 4) * d + m


@njit(inline="always")
def _qh32(x, b, off):
    """Q5_0/Q5_1: the 4 bytes at ``off`` as a little-endian u32 (bit i = 5th bit of weight i)."""
    return (np.uint32(x[b, off]) | (np.uint32(x[b, off + 1]) << np.uint32(8))
            | (np.uint32(x[b, off + 2]) << np.uint32(16))
            | (np.uint32(x[b, off + 3]) << np.uint32(24)))


@njit(cache=True, parallel=True)
def q5_0(x, y):
    # byte 0..1: d | 2..5: qh (u32, bit i = 5th bit of weight i) | 6..21: qs (as Q4_0)
    h = y.shape[1] // 2  # 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        qh = _qh32(x, b, 2)
        for j in range(h):
            hi = ((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4)
            y[b, j] = F32(np.int32((x[b, 6 + j] & 15) | hi) - 16) * d
        for j in range(h):
            hi = ((qh >> np.uint32(h + j)) & np.uint32(1)) << np.uint32(4)
            y[b, h + j] = F32(np.int32((x[b, 6 + j] >> 4) | hi) - 16) * d


@njit(cache=True, parallel=True)
def q5_1(x, y):
    # byte 0..1: d | 2..3: m | 4..7: qh (as Q5_0) | 8..23: qs (as Q4_0)
    h = y.shape[1] // 2  # 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        m = _half(x, b, 2)
        qh = _qh32(x, b, 4)
        for j in range(h):
            hi = ((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4)
            y[b, j] = F32((x[b, 8 + j] & 15) | hi) * d + m
        for j in range(h):
            hi = ((qh >> np.uint32(h + j)) & np.uint32(1)) << np.uint32(4)
            y[b, h + j] = F32((x[b, 8 + j] >> 4) | hi) * d + m


@njit(cache=True, parallel=True)
def q8_0(x, y):
    # byte 0..1: d | 2..33: qs (int8)
    n = y.shape[1]  # 32
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        for j in range(n):
            y[b, j] = F32(np.int8(x[b, 2 + j])) * d


# --- k-quants: 256 weights per super-block ------------------------------------------------------

@njit(cache=True, parallel=True)
def q2_k(x, y):
    # byte 0..15: scales (lo nibble scale, hi nibble min) | 16..79: qs | 80..81: d | 82..83: dmin
    # sub-block s = 8h + 2j + k holds weights 16s..16s+15 = bits 2j of qs[32h + 16k + l]
    n = y.shape[1] // 16  # 16 sub-blocks of 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 80)
        dmin = _half(x, b, 82)
        for s in range(16):
            sc = x[b, s]
            dl = d * F32(sc & 15)
            ml = dmin * F32(sc >> 4)
            src = 16 + 32 * (s // 8) + 16 * (s % 2)
            shift = np.uint8(2 * ((s // 2) % 4))
            for l in range(n):
                y[b, 16 * s + l] = dl * F32((x[b, src + l] >> shift) & np.uint8(3)) - ml


@njit(cache=True, parallel=True)
def q3_k(x, y):
    # byte 0..31: hmask | 32..95: qs | 96..107: 16 x 6-bit scales | 108..109: d
    # sub-block s = 8h + 2j + k: low bits = bits 2j of qs[32h + 16k + l],
    # high bit = bit 4h + j of hmask[16k + l] (clear means -4)
    n = y.shape[1] // 16  # 16 sub-blocks of 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 108)
        for s in range(16):
            lo = (np.int32(x[b, 96 + s % 8]) >> (4 * (s // 8))) & 15
            hi = (np.int32(x[b, 104 + s % 4]) >> (2 * (s // 4))) & 3
            dl = d * F32((lo | (hi << 4)) - 32)
            h, j, k = s // 8, (s // 2) % 4, s % 2
            src = 32 + 32 * h + 16 * k
            shift = np.uint8(2 * j)
            bit = np.uint8(4 * h + j)
            for l in range(n):
                q = np.int32((x[b, src + l] >> shift) & np.uint8(3))
                hb = np.int32((x[b, 16 * k + l] >> bit) & np.uint8(1))
                y[b, 16 * s + l] = dl * F32(q - 4 + 4 * hb)


@njit(cache=True, parallel=True)
def q4_k(x, y):
    # byte 0..1: d | 2..3: dmin | 4..15: scales/mins | 16..143: qs
    # weights 64j..64j+31: low nibbles of qs[32j..], 64j+32..64j+63: high nibbles
    n = y.shape[1] // 8  # 8 sub-blocks of 32
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        dmin = _half(x, b, 2)
        for j in range(4):
            sc1, m1 = _scale_min_k4(x, b, 4, 2 * j)
            sc2, m2 = _scale_min_k4(x, b, 4, 2 * j + 1)
            d1, dm1 = d * F32(sc1), dmin * F32(m1)
            d2, dm2 = d * F32(sc2), dmin * F32(m2)
            for l in range(n):
                y[b, 64 * j + l] = d1 * F32(x[b, 16 + 32 * j + l] & 15) - dm1
            for l in range(n):
                y[b, 64 * j + 32 + l] = d2 * F32(x[b, 16 + 32 * j + l] >> 4) - dm2


@njit(cache=True, parallel=True)
def q5_k(x, y):
    # byte 0..1: d | 2..3: dmin | 4..15: scales/mins | 16..47: qh | 48..175: qs
    # as Q4_K, plus 5th bit = bit 2j (low nibbles) / 2j+1 (high nibbles) of qh[l]
    n = y.shape[1] // 8  # 8 sub-blocks of 32
    for b in prange(x.shape[0]):
        d = _half(x, b, 0)
        dmin = _half(x, b, 2)
        for j in range(4):
            sc1, m1 = _scale_min_k4(x, b, 4, 2 * j)
            sc2, m2 = _scale_min_k4(x, b, 4, 2 * j + 1)
            d1, dm1 = d * F32(sc1), dmin * F32(m1)
            d2, dm2 = d * F32(sc2), dmin * F32(m2)
            s1, s2 = np.uint8(2 * j), np.uint8(2 * j + 1)
            for l in range(n):
                hi = ((x[b, 16 + l] >> s1) & np.uint8(1)) << np.uint8(4)
                y[b, 64 * j + l] = d1 * F32((x[b, 48 + 32 * j + l] & 15) | hi) - dm1
            for l in range(n):
                hi = ((x[b, 16 + l] >> s2) & np.uint8(1)) << np.uint8(4)
                y[b, 64 * j + 32 + l] = d2 * F32((x[b, 48 + 32 * j + l] >> 4) | hi) - dm2


@njit(cache=True, parallel=True)
def q6_k(x, y):
    # byte 0..127: ql | 128..191: qh | 192..207: scales (int8) | 208..209: d
    # weight 128h + 32c + l: nibble c//2 of ql[64h + 32(c%2) + l], bits 2c of qh[32h + l]
    n = y.shape[1] // 16  # 16 sub-blocks of 16
    for b in prange(x.shape[0]):
        d = _half(x, b, 208)
        for s in range(16):
            dl = d * F32(np.int8(x[b, 192 + s]))
            h, c, half = s // 8, (s // 2) % 4, 16 * (s % 2)
            src = 64 * h + 32 * (c % 2) + half
            srch = 128 + 32 * h + half
            nib = np.uint8(4 * (c // 2))
            sh = np.uint8(2 * c)
            for l in range(n):
                lo = (x[b, src + l] >> nib) & np.uint8(15)
                hi = (x[b, srch + l] >> sh) & np.uint8(3)
                y[b, 16 * s + l] = dl * F32(np.int32(lo | (hi << np.uint8(4))) - 32)


@njit(cache=True, parallel=True)
def q8_k(x, y):
    # byte 0..3: d (f32) | 4..259: qs (int8) | 260..291: bsums (unused here)
    n = y.shape[1]  # 256
    for b in prange(x.shape[0]):
        d = _u32_as_f32(np.uint32(x[b, 0]) | (np.uint32(x[b, 1]) << np.uint32(8))
                        | (np.uint32(x[b, 2]) << np.uint32(16))
                        | (np.uint32(x[b, 3]) << np.uint32(24)))
        for j in range(n):
            y[b, j] = F32(np.int8(x[b, 4 + j])) * d


def _f32(x, y):
    np.copyto(y, x.view(F32))


def _flat16(kernel):
    def run(x, y):  # float types: the kernels take flat (n,) uint16 bits and (n,) float32
        kernel(x.view(np.uint16).reshape(-1), y.reshape(-1))
    return run


KERNELS = {"F32": _f32, "F16": _flat16(f16), "BF16": _flat16(bf16),
           "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0,
           "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k, "Q8_K": q8_k}
for _name, _kernel in KERNELS.items():
    register(_name, "dequantize", _kernel)


# Below this many weights per thread, waking more threads costs more than it saves (and far more
# on a busy machine, where a sleeping OpenMP worker can wait a whole scheduler slice, ~20 ms).
WEIGHTS_PER_THREAD = 1 << 21


def dequantize_into(blocks: np.ndarray, name: str, out: np.ndarray) -> None:
    """Dequantize uint8 ``(n_blocks, type_size)`` into float32 ``(n_blocks, block_size)``.

    Both arrays must be C-contiguous (callers validate; :func:`blockq.dequantize` does).
    """
    kernel = qtype(name).impl("dequantize")
    # Kernels always see a read-only input, so writable arrays and read-only memory maps share
    # one compiled specialization instead of two.
    x = blocks.view()
    x.flags.writeable = False
    n_threads = max(1, min(numba.get_num_threads(), out.size // WEIGHTS_PER_THREAD))
    saved = numba.get_num_threads()
    numba.set_num_threads(n_threads)
    try:
        kernel(x, out)
    finally:
        numba.set_num_threads(saved)
