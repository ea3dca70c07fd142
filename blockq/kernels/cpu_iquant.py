"""Numba CPU kernels of the non-linear, ternary and i-quant types, bit-exact with the reference.

IQ4_NL, IQ4_XS, MXFP4, TQ1_0, TQ2_0, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and IQ1_M:
each has one serial kernel that decodes whole rows, with the signature of
:mod:`blockq.kernels.cpu_matvec`'s decode kernels,

    _dq_<type>(w, ids, out)
      w    uint8   (rows, row_bytes)   the blocks of a matrix (read-only)
      ids  int64   (m,)                rows to decode
      out  float32 (m, cols)           filled in place

It serves both backends: ``QMatrix`` (registered as (matvec kernel, decode kernel); types
without a fused matvec run products as decoded tiles times x) and ``dequantize`` (the blocks
seen as rows of one block each, run on all threads by cpu_matvec's parallel decode driver).

IQ4_NL, IQ4_XS and MXFP4 also have fused 8-lane matvec kernels and vector decoders: a 4-bit code
becomes its table value with :func:`lut16` (two ``vpermps`` and a blend with AVX2, a chain of
15 compare-and-selects elsewhere), then the block is dotted as cpu_matvec's legacy types are.  Block sizes come from
:mod:`blockq.types`; :mod:`blockq.dequantize` draws each layout.  Arithmetic is llama.cpp's
``dequantize_row_*`` order in float32 (no fastmath): ``scale * value``, one rounding per weight.

The integer types (I8..I64) and F64 convert with numpy.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils
from numba.extending import intrinsic

from .. import codebooks
from ..types import BY_NAME, register
from .cpu_dequant import _f16, _half, _u32_as_f32
from .cpu_matvec import JIT, _dot32
from .cpu_simd import F32x8, f16_to_f32, fma, hsum, lane, load_u8, store_f32, zeros

F32 = np.float32
KSIGNS = codebooks.KSIGNS
G_IQ2_XXS = codebooks.grid("IQ2_XXS").astype(np.float32)  # (256, 8)
G_IQ2_XS = codebooks.grid("IQ2_XS").astype(np.float32)  # (512, 8)
G_IQ2_S = codebooks.grid("IQ2_S").astype(np.float32)  # (1024, 8)
G_IQ3_XXS = codebooks.grid("IQ3_XXS").astype(np.float32)  # (256, 4)
G_IQ3_S = codebooks.grid("IQ3_S").astype(np.float32)  # (512, 4)
G_IQ1_S = codebooks.grid("IQ1_S").astype(np.float32)  # (2048, 8)
DELTA = F32(0.125)  # IQ1_S / IQ1_M shift of the ternary grid


def _ts(name: str) -> int:
    return BY_NAME[name].type_size


TS_IQ4_NL, TS_IQ4_XS, TS_MXFP4 = _ts("IQ4_NL"), _ts("IQ4_XS"), _ts("MXFP4")
TS_TQ1_0, TS_TQ2_0 = _ts("TQ1_0"), _ts("TQ2_0")
TS_IQ2_XXS, TS_IQ2_XS, TS_IQ2_S = _ts("IQ2_XXS"), _ts("IQ2_XS"), _ts("IQ2_S")
TS_IQ3_XXS, TS_IQ3_S, TS_IQ1_S, TS_IQ1_M = _ts("IQ3_XXS"), _ts("IQ3_S"), _ts("IQ1_S"), _ts("IQ1_M")


@njit(inline="always")
def _u16(w, r, o):
    return np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8)


@njit(inline="always")
def _u32(w, r, o):
    return _u16(w, r, o) | (_u16(w, r, o + 2) << 16)


@njit(inline="always")
def _signed(v, sign_bits, j):
    """v, negated when bit j of the sign byte is set."""
    return -v if (sign_bits >> j) & 1 else v


@njit(inline="always")
def _half_scale(d, s, factor):
    # d * (0.5 + s) * factor, in llama.cpp's order
    return (d * (F32(0.5) + F32(s))) * factor


# --- ternary ----------------------------------------------------------------------------------

@njit(inline="always")
def _trit(byte, pow3):
    # trit of weight: ((byte * 3**k mod 256) * 3) >> 8, in 0..2, meaning -1..1
    return F32((((np.int64(byte) * pow3) & 255) * 3 >> 8) - 1)


@njit(cache=True)
def _dq_tq1_0(w, ids, out):
    # block, 54 bytes: 0..47 qs (5 trits each) | 48..51 qh (4 trits each) | 52..53 d
    # weight 32n + m: trit n of qs[m] (m < 32); 160 + 16n + m: trit n of qs[32 + m];
    # 240 + 4n + m: trit n of qh[m]
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_TQ1_0):
            o, y = b * TS_TQ1_0, b * 256
            d = _half(w, r, o + 52)
            p = 1
            for n in range(5):
                for m in range(32):
                    out[i, y + 32 * n + m] = _trit(w[r, o + m], p) * d
                for m in range(16):
                    out[i, y + 160 + 16 * n + m] = _trit(w[r, o + 32 + m], p) * d
                if n < 4:
                    for m in range(4):
                        out[i, y + 240 + 4 * n + m] = _trit(w[r, o + 48 + m], p) * d
                p *= 3


@njit(cache=True)
def _dq_tq2_0(w, ids, out):
    # block, 66 bytes: 0..63 qs, weight 128h + 32l + m = bits 2l..2l+1 of qs[32h + m] | 64..65 d
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_TQ2_0):
            o, y = b * TS_TQ2_0, b * 256
            d = _half(w, r, o + 64)
            for h in range(2):
                for m in range(32):
                    q = np.int64(w[r, o + 32 * h + m])
                    for l in range(4):
                        out[i, y + 128 * h + 32 * l + m] = F32(((q >> (2 * l)) & 3) - 1) * d


# --- i-quants ---------------------------------------------------------------------------------

@njit(cache=True)
def _dq_iq2_xxs(w, ids, out):
    # block, 66 bytes: 0..1 d | per sub-block s (32 weights) 8 bytes at 2 + 8s: bytes 0..3 grid
    # indices of its 4 groups of 8, u32 at 4..7: 4 x 7-bit sign codes, bits 28..31 scale
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ2_XXS):
            o, y = b * TS_IQ2_XXS, b * 256
            d = _half(w, r, o)
            for s in range(8):
                q = o + 2 + 8 * s
                aux = _u32(w, r, q + 4)
                db = _half_scale(d, aux >> 28, F32(0.25))
                for l in range(4):
                    g = w[r, q + l]
                    sg = KSIGNS[(aux >> (7 * l)) & 127]
                    for j in range(8):
                        out[i, y + 32 * s + 8 * l + j] = _signed(db * G_IQ2_XXS[g, j], sg, j)


@njit(cache=True)
def _dq_iq2_xs(w, ids, out):
    # block, 74 bytes: 0..1 d | 2..65 32 u16 (bits 0..8 grid index, 9..15 sign code) |
    # 66..73 scales, a nibble per 16 weights
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ2_XS):
            o, y = b * TS_IQ2_XS, b * 256
            d = _half(w, r, o)
            for s in range(8):
                sc = np.int64(w[r, o + 66 + s])
                for l in range(4):
                    db = _half_scale(d, (sc >> (4 * (l // 2))) & 15, F32(0.25))
                    q = _u16(w, r, o + 2 + 2 * (4 * s + l))
                    sg = KSIGNS[q >> 9]
                    for j in range(8):
                        out[i, y + 32 * s + 8 * l + j] = _signed(db * G_IQ2_XS[q & 511, j], sg, j)


@njit(cache=True)
def _dq_iq2_s(w, ids, out):
    # block, 82 bytes: 0..1 d | 2..33 qs (index bits 0..7) | 34..65 signs (a byte per group) |
    # 66..73 qh (index bits 8..9, 2 per group) | 74..81 scales, a nibble per 16 weights
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ2_S):
            o, y = b * TS_IQ2_S, b * 256
            d = _half(w, r, o)
            for s in range(8):
                sc = np.int64(w[r, o + 74 + s])
                qh = np.int64(w[r, o + 66 + s])
                for l in range(4):
                    db = _half_scale(d, (sc >> (4 * (l // 2))) & 15, F32(0.25))
                    g = np.int64(w[r, o + 2 + 4 * s + l]) | (((qh >> (2 * l)) & 3) << 8)
                    sg = w[r, o + 34 + 4 * s + l]
                    for j in range(8):
                        out[i, y + 32 * s + 8 * l + j] = _signed(db * G_IQ2_S[g, j], sg, j)


@njit(cache=True)
def _dq_iq3_xxs(w, ids, out):
    # block, 98 bytes: 0..1 d | 2..65 qs, a grid index per 4 weights | 66..97 8 u32, sub-block s:
    # 4 x 7-bit sign codes (8 weights each), bits 28..31 scale
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ3_XXS):
            o, y = b * TS_IQ3_XXS, b * 256
            d = _half(w, r, o)
            for s in range(8):
                aux = _u32(w, r, o + 66 + 4 * s)
                db = _half_scale(d, aux >> 28, F32(0.5))
                for l in range(4):
                    sg = KSIGNS[(aux >> (7 * l)) & 127]
                    g1 = w[r, o + 2 + 8 * s + 2 * l]
                    g2 = w[r, o + 3 + 8 * s + 2 * l]
                    for j in range(4):
                        k = y + 32 * s + 8 * l + j
                        out[i, k] = _signed(db * G_IQ3_XXS[g1, j], sg, j)
                        out[i, k + 4] = _signed(db * G_IQ3_XXS[g2, j], sg, j + 4)


@njit(cache=True)
def _dq_iq3_s(w, ids, out):
    # block, 110 bytes: 0..1 d | 2..65 qs (index bits 0..7, a group of 4 each) | 66..73 qh
    # (bit k of byte s: index bit 8 of group 8s + k) | 74..105 signs, a byte per 8 weights |
    # 106..109 scales, a nibble per 32 weights:  w = d * (1 + 2 s) * grid * sign
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ3_S):
            o, y = b * TS_IQ3_S, b * 256
            d = _half(w, r, o)
            for s in range(8):
                sc = (np.int64(w[r, o + 106 + s // 2]) >> (4 * (s % 2))) & 15
                db = d * F32(1 + 2 * sc)
                qh = np.int64(w[r, o + 66 + s])
                for k in range(8):
                    g = np.int64(w[r, o + 2 + 8 * s + k]) | (((qh >> k) & 1) << 8)
                    sg = w[r, o + 74 + 4 * s + k // 2]
                    for j in range(4):
                        out[i, y + 32 * s + 4 * k + j] = _signed(db * G_IQ3_S[g, j], sg,
                                                                 4 * (k % 2) + j)


@njit(cache=True)
def _dq_iq1_s(w, ids, out):
    # block, 50 bytes: 0..1 d | 2..33 qs (index bits 0..7) | 34..49 8 u16, sub-block s: bits
    # 3l..3l+2 index bits 8..10 of group l, 12..14 scale, 15 sign of delta
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ1_S):
            o, y = b * TS_IQ1_S, b * 256
            d = _half(w, r, o)
            for s in range(8):
                qh = _u16(w, r, o + 34 + 2 * s)
                dl = d * F32(2 * ((qh >> 12) & 7) + 1)
                delta = -DELTA if qh & 0x8000 else DELTA
                for l in range(4):
                    g = np.int64(w[r, o + 2 + 4 * s + l]) | (((qh >> (3 * l)) & 7) << 8)
                    for j in range(8):
                        out[i, y + 32 * s + 8 * l + j] = dl * (G_IQ1_S[g, j] + delta)


@njit(cache=True)
def _dq_iq1_m(w, ids, out):
    # block, 56 bytes: 0..31 qs (index bits 0..7) | 32..47 qh, a nibble per group (index bits
    # 8..10, sign of delta) | 48..55 4 u16: 3-bit scales per 16 weights, top nibbles = d (f16)
    for i in range(ids.size):
        r = ids[i]
        for b in range(w.shape[1] // TS_IQ1_M):
            o, y = b * TS_IQ1_M, b * 256
            sc0, sc1 = _u16(w, r, o + 48), _u16(w, r, o + 50)
            sc2, sc3 = _u16(w, r, o + 52), _u16(w, r, o + 54)
            d = _f16(np.uint16((sc0 >> 12) | ((sc1 >> 8) & 0xF0) | ((sc2 >> 4) & 0xF00)
                               | (sc3 & 0xF000)))
            for s in range(8):
                scw = _u16(w, r, o + 48 + 2 * (s // 2))
                for l in range(4):
                    ls = (scw >> (6 * (s % 2) + 3 * (l // 2))) & 7
                    dl = d * F32(2 * ls + 1)
                    nib = (np.int64(w[r, o + 32 + 2 * s + l // 2]) >> (4 * (l % 2))) & 15
                    g = np.int64(w[r, o + 4 * s + l]) | ((nib & 7) << 8)
                    delta = -DELTA if nib & 8 else DELTA
                    for j in range(8):
                        out[i, y + 32 * s + 8 * l + j] = dl * (G_IQ1_S[g, j] + delta)


# --- fused 4-bit non-linear products -----------------------------------------------------------

def _has_avx2() -> bool:
    import platform

    from llvmlite import binding as llvm
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except RuntimeError:
        return False


_HW_PERMUTE = _has_avx2()  # read when a kernel using lut16 compiles
_VI32 = ir.VectorType(ir.IntType(32), 8)
_VF32 = ir.VectorType(ir.FloatType(), 8)


def _lut16(values):
    """An intrinsic ``f(q)``: I32x8 codes 0..15 -> F32x8 of ``values[q]`` (a constant table)."""
    vals = [float(v) for v in values]

    @intrinsic
    def lut16(typingctx, q):
        def codegen(context, builder, signature, args):
            codes = args[0]
            if _HW_PERMUTE:
                perm = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(_VF32, [_VF32, _VI32]),
                    "llvm.x86.avx2.permps")
                lo = builder.call(perm, [ir.Constant(_VF32, vals[:8]), codes])
                hi = builder.call(perm, [ir.Constant(_VF32, vals[8:]), codes])
                upper = builder.icmp_unsigned(">", codes, ir.Constant(_VI32, [7] * 8))
                return builder.select(upper, hi, lo)
            out = ir.Constant(_VF32, [vals[0]] * 8)
            for k in range(1, 16):
                hit = builder.icmp_unsigned("==", codes, ir.Constant(_VI32, [k] * 8))
                out = builder.select(hit, ir.Constant(_VF32, [vals[k]] * 8), out)
            return out
        return F32x8(q), codegen
    return lut16


lut_iq4 = _lut16(codebooks.IQ4_NL)
lut_fp4 = _lut16(codebooks.MXFP4)


@njit(inline="always")
def _iq4_values(w, r, o):
    """The 32 table values of 16 code bytes at o (nibbles as Q4_0), as four F32x8 in order."""
    a, b = load_u8(w, r, o), load_u8(w, r, o + 8)
    return lut_iq4(a & 15), lut_iq4(b & 15), lut_iq4(a >> 4), lut_iq4(b >> 4)


@njit(inline="always")
def _fp4_values(w, r, o):
    a, b = load_u8(w, r, o), load_u8(w, r, o + 8)
    return lut_fp4(a & 15), lut_fp4(b & 15), lut_fp4(a >> 4), lut_fp4(b >> 4)


@njit(inline="always")
def _iq4_xs_scale(w, r, o, s):
    # six-bit scale of sub-block s, minus 32: low nibble from scales_l, 2 bits from scales_h
    ls = ((np.int64(w[r, o + 4 + s // 2]) >> (4 * (s % 2))) & 15) | (
        ((_u16(w, r, o + 2) >> (2 * s)) & 3) << 4)
    return F32(ls - 32)


@njit(inline="always")
def _e8m0_half(w, r, o):
    e = np.uint32(w[r, o])
    return _u32_as_f32(np.uint32(0x00200000) << e if e < 2 else (e - np.uint32(1))
                       << np.uint32(23))


@njit(**JIT)
def _mv_iq4_nl(w, x, out, r0, r1):
    for r in range(r0, r1):
        acc = zeros()
        for b in range(x.size // 32):
            o = TS_IQ4_NL * b
            v0, v1, v2, v3 = _iq4_values(w, r, o + 2)
            acc = fma(_dot32(v0, v1, v2, v3, x, 32 * b), f16_to_f32(w, r, o), acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _mv_iq4_xs(w, x, out, r0, r1):
    for r in range(r0, r1):
        acc = zeros()
        for sb in range(x.size // 256):
            o = TS_IQ4_XS * sb
            d = f16_to_f32(w, r, o)
            for s in range(8):
                v0, v1, v2, v3 = _iq4_values(w, r, o + 8 + 16 * s)
                acc = fma(_dot32(v0, v1, v2, v3, x, 256 * sb + 32 * s),
                          d * _iq4_xs_scale(w, r, o, s), acc)
        out[r] = hsum(acc)


@njit(**JIT)
def _mv_mxfp4(w, x, out, r0, r1):
    for r in range(r0, r1):
        acc = zeros()
        for b in range(x.size // 32):
            o = TS_MXFP4 * b
            v0, v1, v2, v3 = _fp4_values(w, r, o + 1)
            acc = fma(_dot32(v0, v1, v2, v3, x, 32 * b), _e8m0_half(w, r, o), acc)
        out[r] = hsum(acc)


# vector decoders (bit-exact: one float32 product per weight, no fastmath)

@njit(cache=True)
def _dq_iq4_nl_v(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = TS_IQ4_NL * b
            d = f16_to_f32(w, r, o)
            v = _iq4_values(w, r, o + 2)
            for k in range(4):
                store_f32(out, i, 32 * b + 8 * k, v[k] * d)


@njit(cache=True)
def _dq_iq4_xs_v(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for sb in range(out.shape[1] // 256):
            o = TS_IQ4_XS * sb
            d = f16_to_f32(w, r, o)
            for s in range(8):
                dl = d * _iq4_xs_scale(w, r, o, s)
                v = _iq4_values(w, r, o + 8 + 16 * s)
                for k in range(4):
                    store_f32(out, i, 256 * sb + 32 * s + 8 * k, v[k] * dl)


@njit(cache=True)
def _dq_mxfp4_v(w, ids, out):
    for i in range(ids.size):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            o = TS_MXFP4 * b
            d = _e8m0_half(w, r, o)
            v = _fp4_values(w, r, o + 1)
            for k in range(4):
                store_f32(out, i, 32 * b + 8 * k, v[k] * d)


FUSED = {"IQ4_NL": _mv_iq4_nl, "IQ4_XS": _mv_iq4_xs, "MXFP4": _mv_mxfp4}

DECODERS = {
    "IQ4_NL": _dq_iq4_nl_v, "IQ4_XS": _dq_iq4_xs_v, "MXFP4": _dq_mxfp4_v,
    "TQ1_0": _dq_tq1_0, "TQ2_0": _dq_tq2_0,
    "IQ2_XXS": _dq_iq2_xxs, "IQ2_XS": _dq_iq2_xs, "IQ2_S": _dq_iq2_s,
    "IQ3_XXS": _dq_iq3_xxs, "IQ3_S": _dq_iq3_s, "IQ1_S": _dq_iq1_s, "IQ1_M": _dq_iq1_m,
}


def _dequantize_all(name: str, x: np.ndarray, y: np.ndarray) -> None:
    """Every block of x (n_blocks, type_size) into y (n_blocks, block_size), on all threads:
    each block is a row of one block for the parallel decode driver."""
    from .cpu_matvec import decode_into

    decode_into(name, x, np.arange(x.shape[0], dtype=np.int64), y)


def _integers(x: np.ndarray, y: np.ndarray, dtype: np.dtype) -> None:
    with np.errstate(over="ignore"):  # F64 beyond float32's range becomes inf, as astype does
        np.copyto(y, x.view(dtype), casting="unsafe")  # -> float32, rounded to nearest


for _name, _kernel in DECODERS.items():
    register(_name, "dequantize", functools.partial(_dequantize_all, _name))
    register(_name, "matvec", (FUSED.get(_name), _kernel))
for _name in ("I8", "I16", "I32", "I64", "F64"):
    register(_name, "dequantize", functools.partial(_integers, dtype=BY_NAME[_name].dtype[0]))
