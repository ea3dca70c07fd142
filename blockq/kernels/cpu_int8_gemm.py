"""Int8 tiled matmul for prompts: many tokens' 8-bit activations times block-quantized weights.

The decode-path kernels of :mod:`blockq.kernels.cpu_int8` unpack a weight block for one
activation row at a time.  A prompt has n of them, so here each thread first unpacks a tile of
``TILE_ROWS`` weight rows *once* into a plain int8 form that every block type shares, then runs
all tokens over it, four at a time, with one register accumulator per token (as llamafile's
tinyBLAS and ggml's repacked gemm reuse a weight block for several activation rows):

- k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; activations Q8_K).  Per row, per super-block b:
  ``codes``: 256 unsigned codes in weight order; ``scales``: per 32 weights an I16x16 of the
  sub-block scales (lanes 0..7 for the first 16 weights, 8..15 for the second), the weights of
  ``pmaddwd`` after ``pmaddubsw``; ``mins``: per 16 weights the integer that multiplies that
  sub-block's sum of activation codes (Q8_K's bsums); ``d``, ``dm``: the float factors.  Then
      row . token = d * dy * sum(codes * scales * y) - dm * dy * sum(mins * bsums)
  Q2_K / Q4_K / Q5_K: mins are the sub-block mins, dm = dmin; Q3_K / Q6_K: mins are the
  constant offset (4 / 32) times the scale, dm = d.
- IQ4_XS (activations Q8_K), in the AVX-512 VNNI tile only: its grid values + 128 as unsigned
  codes, one scale per 32 weights, the offset 128 as Q6_K's 32 (see ``_un_iq4_xs``).
- legacy 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and IQ4_NL, whose codes are its grid's
  int8 values; activations Q8_1).  Per block:
  ``codes`` 32 unsigned bytes and a float ``d``; Q4_1 / Q5_1: codes q and ``dm`` = the min m
  (added as m * s, Q8_1's f16 block sum, as llama.cpp does); Q4_0 / Q5_0 / Q8_0: ``codes`` hold
  |q - offset| and ``signs`` the signed codes (the sign trick, exact in integers).

All integer parts are exact; results equal ``dequantize(W) @ dequantize(Q8(x))`` up to float32
summation order (``tests/test_int8_gemm.py``, the bound of ``tests/test_int8.py``).  The
activation quantizers are cpu_int8's (ggml's, byte for byte).  The vectors are cpu_int8's
``I8x32`` / ``I16x16`` and cpu_simd's ``I32x8`` / ``F32x8``; import this module only where
:func:`blockq.kernels.cpu_isa.isa` says an int8 variant runs (cpu_int8 refuses otherwise).
"""
from __future__ import annotations

import functools
import os

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import cpu_int8 as k8
from .cpu_int8 import (I8x32, I16x16, Q8_1, Q8K, Q8K_BSUMS, Q8K_QS, _call, _madd, _writer,
                       bits32, compiled, dot_us, dot_usv, izeros, load16, load32, nibbles,
                       pairs_hi, pick, u8x16, i8x16)
from .cpu_int8_iquant import IQ4_NL, IQ4_NL_QS, IQ4_XS, IQ4_XS_QS, _iq4_xs_scales, iq4_values
from .cpu_isa import ENV, host_features, isa
from .cpu_matvec import _function_at
from .cpu_simd import I32x8, f16_to_f32, f32_at, fma, hsum, to_f32, u32_at, zeros
from .cpu_simd16 import (F32x16, I32x16, _V16F32, _V16I32, _fmuladd16, _load16f, _load16i,
                         _ptr, _splat16, zeros16)
from .jitcache import keyed_jit


def _zmm_ok() -> bool:
    """Whether the k-quant tiles run in zmm registers: the host has AVX-512 F and BW, an int8
    variant runs, and no variant other than an AVX-512 one is forced (BLOCKQ_ISA=avx2 keeps
    the 32-byte kernels, so that variant can be timed alone)."""
    forced = os.environ.get(ENV, "").strip().lower()
    f = host_features()
    return isa() != "float" and bool(f.get("avx512f")) and bool(f.get("avx512bw")) and \
        (not forced or forced.startswith("avx512"))


ZMM = _zmm_ok()


def _jit(**options):
    """``njit(cache=True)`` with the int8 variant and the register width in the cache key: the
    tiles' machine code depends on both, their Python source on neither (see
    :func:`blockq.kernels.cpu_int8.variant_jit`)."""
    return keyed_jit((k8.VARIANT, "zmm" if ZMM else "ymm"), **options)


F32 = np.float32
JIT = dict(fastmath=True, cache=True)

TILE_ROWS = 16  # weight rows a thread unpacks at a time (16 x 5632 x 2 bytes = 176 KiB at most)
KQ = 256  # weights per k-quant super-block
LG = 32  # weights per legacy block


# =============================================================================================
# small intrinsics beyond cpu_int8's

store = _writer(lambda context, builder, ty, v: v, "a[r, i:i+32] = the I8x32 / I16x16 v")


@intrinsic
def abs8(typingctx, a):
    """Lane-wise |a| of an I8x32 read as signed bytes (|-128| = 128 as an unsigned byte)."""
    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.abs.v32i8", args[0].type, [args[0], ir.Constant(ir.IntType(1), 0)])
    return I8x32(a), codegen


@intrinsic
def dot_signed(typingctx, a, s, y):
    """``dot_us(a, y with the signs of s)``: a = |s| precomputed, so a signed-weight dot
    costs one ``vpsignb`` per activation row (zero where s is zero)."""
    def codegen(context, builder, signature, args):
        _V16I16 = ir.VectorType(ir.IntType(16), 16)
        sy = _call(builder, "llvm.x86.avx2.psign.b", args[2].type, [args[2], args[1]])
        p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [args[0], sy])
        ones = ir.Constant(_V16I16, [1] * 16)
        return _madd(builder, p, ones)
    return I32x8(a, s, y), codegen


# =============================================================================================
# unpacking tiles: rows r0..r0+m of w into tile rows 0..m-1 (layouts drawn in cpu_int8)

@_jit(**JIT)
def _put_chunk(codes, scales, i, k, q, sc):
    store(codes, i, k, q)
    store(scales, i, k, sc)


@_jit(**JIT)
def _un_low2(w, r0, m, codes, scales, mins, d, dm, q3):
    """Q2_K (q3 False) or Q3_K: 2-bit codes in the same order, Q3_K's third bit from hmask."""
    size = k8.Q3_K if q3 else k8.Q2_K
    o_qs = k8.Q3_K_QS if q3 else k8.Q2_K_QS
    for i in range(m):
        r = r0 + i
        for b in range(d.shape[1]):
            o, ib = b * size, b * KQ
            if q3:
                sc = k8._q3_k_scales(w, r, o + k8.Q3_K_SC)
                mn = sc << 2  # 4 * sc: the offset -4 of every code
                d[i, b] = dm[i, b] = f16_to_f32(w, r, o + k8.Q3_K_D)
            else:
                sm = u8x16(w, r, o + k8.Q2_K_SC)
                sc, mn = sm & 15, sm >> 4
                d[i, b] = f16_to_f32(w, r, o + k8.Q2_K_D)
                dm[i, b] = f16_to_f32(w, r, o + k8.Q2_K_DMIN)
            hm = load32(w, r, o + (k8.Q3_K_HM if q3 else o_qs))  # Q2_K: not used
            for h in range(2):
                qv = load32(w, r, o + o_qs + 32 * h)
                for j in range(4):
                    s = 8 * h + 2 * j
                    q = (qv >> 2 * j) & 3
                    if q3:
                        q = q | (((hm >> (4 * h + j)) & 1) << 2)
                    _put_chunk(codes, scales, i, ib + 128 * h + 32 * j, q, pick(sc, s, s + 1))
            store(mins, i, 32 * b, mn)


@_jit(**JIT)
def _un_q2_k(w, r0, m, codes, scales, mins, d, dm):
    _un_low2(w, r0, m, codes, scales, mins, d, dm, False)


@_jit(**JIT)
def _un_q3_k(w, r0, m, codes, scales, mins, d, dm):
    _un_low2(w, r0, m, codes, scales, mins, d, dm, True)


@_jit(**JIT)
def _un_k4(w, r0, m, codes, scales, mins, d, dm, size, o_sc, o_qs, o_qh):
    """Q4_K (o_qh < 0) or Q5_K."""
    for i in range(m):
        r = r0 + i
        for b in range(d.shape[1]):
            o, ib = b * size, b * KQ
            sm = k8._k4_scales(w, r, o + o_sc)
            qh = load32(w, r, o + (o_qh if o_qh >= 0 else o_qs))
            for j in range(4):
                lo, hi = k8._k4_codes(w, r, o, o_qs, o_qh, qh, j)
                _put_chunk(codes, scales, i, ib + 64 * j, lo, pick(sm, 2 * j, 2 * j))
                _put_chunk(codes, scales, i, ib + 64 * j + 32, hi,
                           pick(sm, 2 * j + 1, 2 * j + 1))
            store(mins, i, 32 * b, pairs_hi(sm))
            d[i, b] = f16_to_f32(w, r, o)
            dm[i, b] = f16_to_f32(w, r, o + 2)


@_jit(**JIT)
def _un_q4_k(w, r0, m, codes, scales, mins, d, dm):
    _un_k4(w, r0, m, codes, scales, mins, d, dm, k8.Q4_K, k8.Q4_K_SC, k8.Q4_K_QS, -1)


@_jit(**JIT)
def _un_q5_k(w, r0, m, codes, scales, mins, d, dm):
    _un_k4(w, r0, m, codes, scales, mins, d, dm, k8.Q5_K, k8.Q5_K_SC, k8.Q5_K_QS, k8.Q5_K_QH)


@_jit(**JIT)
def _un_q6_k(w, r0, m, codes, scales, mins, d, dm):
    for i in range(m):
        r = r0 + i
        for b in range(d.shape[1]):
            o, ib = b * k8.Q6_K, b * KQ
            sc = i8x16(w, r, o + k8.Q6_K_SC)
            for h in range(2):
                ql0 = load32(w, r, o + k8.Q6_K_QL + 64 * h)
                ql1 = load32(w, r, o + k8.Q6_K_QL + 64 * h + 32)
                qh = load32(w, r, o + k8.Q6_K_QH + 32 * h)
                s, k = 8 * h, ib + 128 * h
                _put_chunk(codes, scales, i, k, (ql0 & 15) | ((qh & 3) << 4), pick(sc, s, s + 1))
                _put_chunk(codes, scales, i, k + 32, (ql1 & 15) | ((qh & 12) << 2),
                           pick(sc, s + 2, s + 3))
                _put_chunk(codes, scales, i, k + 64, (ql0 >> 4) | (qh & 48),
                           pick(sc, s + 4, s + 5))
                _put_chunk(codes, scales, i, k + 96, (ql1 >> 4) | ((qh >> 6) << 4),
                           pick(sc, s + 6, s + 7))
            store(mins, i, 32 * b, sc << 5)  # 32 * sc: the offset -32 of every code
            d[i, b] = f16_to_f32(w, r, o + k8.Q6_K_D)
            dm[i, b] = d[i, b]


@_jit(**JIT)
def _un_iq4_xs(w, r0, m, codes, scales, mins, d, dm):
    """IQ4_XS for the AVX-512 VNNI tile only: each weight's grid value (IQ4_NL's 16 int8
    values, looked up with one vpshufb per 32) plus 128 as an unsigned code (1..241; the tile's
    offset 128 takes it back, as Q6_K's 32), one scale per 32 weights (ls - 32), no mins.
    NOTE: never for the vpmaddubsw tiles, whose u8 x s8 pair sums would saturate at int16 on
    codes this large (PROMPT_TYPES lists IQ4_XS only where VNNI512)."""
    for i in range(m):
        r = r0 + i
        for b in range(d.shape[1]):
            o, ib = b * IQ4_XS, b * KQ
            sc = _iq4_xs_scales(w, r, o)
            for h in range(8):
                v = iq4_values(nibbles(w, r, o + IQ4_XS_QS + 16 * h))
                _put_chunk(codes, scales, i, ib + 32 * h, v + 128, pick(sc, h, h))
            store(mins, i, 32 * b, sc & 0)  # the offset tile reads no mins
            d[i, b] = f16_to_f32(w, r, o)
            dm[i, b] = d[i, b]


# legacy: (codes, signs, d, dm) per 32-weight block

@_jit(**JIT)
def _un_legacy(w, r0, m, codes, signs, d, dm, size, o_qs, o_qh, o_m, off):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 (4-bit codes, the fifth bits at o_qh >= 0) or Q8_0 (off < 0:
    int8 codes).  o_m >= 0: codes q and the min m (Q4_1 / Q5_1); otherwise signs = the signed
    codes q - off and codes = their magnitudes."""
    for i in range(m):
        r = r0 + i
        for b in range(d.shape[1]):
            o = b * size
            if off < 0:
                q = load32(w, r, o + o_qs)
            else:
                q = nibbles(w, r, o + o_qs)
                if o_qh >= 0:
                    q = q | (bits32(u32_at(w, r, o + o_qh)) << 4)
            d[i, b] = f16_to_f32(w, r, o)
            if o_m >= 0:
                store(codes, i, LG * b, q)
                dm[i, b] = f16_to_f32(w, r, o + o_m)
            else:
                q = q - max(off, 0)
                store(signs, i, LG * b, q)
                store(codes, i, LG * b, abs8(q))
                dm[i, b] = 0.0


@_jit(**JIT)
def _un_iq4_nl(w, r0, m, codes, signs, d, dm):
    """IQ4_NL: a signed type (as Q8_0) whose codes are its grid's int8 values (one vpshufb
    lookup per 32 indices): signs = the values, codes = their magnitudes (at most 127)."""
    for i in range(m):
        r = r0 + i
        for b in range(d.shape[1]):
            o = b * IQ4_NL
            q = iq4_values(nibbles(w, r, o + IQ4_NL_QS))
            store(signs, i, LG * b, q)
            store(codes, i, LG * b, abs8(q))
            d[i, b] = f16_to_f32(w, r, o)
            dm[i, b] = 0.0


@_jit(**JIT)
def _un_q4_0(w, r0, m, codes, signs, d, dm):
    _un_legacy(w, r0, m, codes, signs, d, dm, k8.Q4_0, k8.Q4_0_QS, -1, -1, 8)


@_jit(**JIT)
def _un_q5_0(w, r0, m, codes, signs, d, dm):
    _un_legacy(w, r0, m, codes, signs, d, dm, k8.Q5_0, k8.Q5_0_QS, k8.Q5_0_QH, -1, 16)


@_jit(**JIT)
def _un_q8_0(w, r0, m, codes, signs, d, dm):
    _un_legacy(w, r0, m, codes, signs, d, dm, k8.Q8_0, k8.Q8_0_QS, -1, -1, -1)


@_jit(**JIT)
def _un_q4_1(w, r0, m, codes, signs, d, dm):
    _un_legacy(w, r0, m, codes, signs, d, dm, k8.Q4_1, k8.Q4_1_QS, -1, k8.Q4_1_M, 0)


@_jit(**JIT)
def _un_q5_1(w, r0, m, codes, signs, d, dm):
    _un_legacy(w, r0, m, codes, signs, d, dm, k8.Q5_1, k8.Q5_1_QS, k8.Q5_1_QH, k8.Q5_1_M, 0)


# =============================================================================================
# the tile products: all tokens over an unpacked tile, four tokens per pass over a row


@_jit(**JIT)
def _store4(out, r, t0, x0, x1, x2, x3):
    """out[t0..t0+3, r] = x0..x3, those tokens that exist (tokens past n were copies)."""
    n = out.shape[0]
    out[t0, r] = x0
    if t0 + 1 < n:
        out[t0 + 1, r] = x1
    if t0 + 2 < n:
        out[t0 + 2, r] = x2
    if t0 + 3 < n:
        out[t0 + 3, r] = x3


@_jit(**JIT)
def _kq_tile(codes, scales, mins, d, dm, m, Y, out, r0):
    """out[:, r0:r0+m] for a k-quant tile; Y (n, Q8_K blocks)."""
    n, nsb = Y.shape[0], d.shape[1]
    for t0 in range(0, n, 4):
        t1, t2, t3 = min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1)
        for i in range(m):
            a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
            for b in range(nsb):
                ib, yo = b * KQ, b * Q8K
                s0, s1, s2, s3 = izeros(), izeros(), izeros(), izeros()
                for c in range(8):
                    q = load32(codes, i, ib + 32 * c)
                    v = load16(scales, i, ib + 32 * c)
                    k = yo + Q8K_QS + 32 * c
                    s0 = s0 + dot_usv(q, load32(Y, t0, k), v)
                    s1 = s1 + dot_usv(q, load32(Y, t1, k), v)
                    s2 = s2 + dot_usv(q, load32(Y, t2, k), v)
                    s3 = s3 + dot_usv(q, load32(Y, t3, k), v)
                mv = load16(mins, i, 32 * b)
                f, g = d[i, b], -dm[i, b]
                y0, y1, y2, y3 = f32_at(Y, t0, yo), f32_at(Y, t1, yo), f32_at(Y, t2, yo), \
                    f32_at(Y, t3, yo)
                a0 = fma(to_f32(s0), f * y0, a0)
                a1 = fma(to_f32(s1), f * y1, a1)
                a2 = fma(to_f32(s2), f * y2, a2)
                a3 = fma(to_f32(s3), f * y3, a3)
                a0 = fma(to_f32(k8.madd16(mv, load16(Y, t0, yo + Q8K_BSUMS))), g * y0, a0)
                a1 = fma(to_f32(k8.madd16(mv, load16(Y, t1, yo + Q8K_BSUMS))), g * y1, a1)
                a2 = fma(to_f32(k8.madd16(mv, load16(Y, t2, yo + Q8K_BSUMS))), g * y2, a2)
                a3 = fma(to_f32(k8.madd16(mv, load16(Y, t3, yo + Q8K_BSUMS))), g * y3, a3)
            _store4(out, r0 + i, t0, hsum(a0), hsum(a1), hsum(a2), hsum(a3))


@_jit(**JIT)
def _lg_signed_tile(codes, signs, d, m, Y, dy, out, r0):
    """out[:, r0:r0+m] for a tile of Q4_0 / Q5_0 / Q8_0 (codes |q|, signs q); Y (n, Q8_1
    blocks), dy (n, blocks) their scales as float32."""
    n, nb = Y.shape[0], d.shape[1]
    for t0 in range(0, n, 4):
        t1, t2, t3 = min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1)
        for i in range(m):
            a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
            for b in range(nb):
                q = load32(codes, i, LG * b)
                s = load32(signs, i, LG * b)
                k = b * Q8_1 + k8.Q8_1_QS
                f = d[i, b]
                a0 = fma(to_f32(dot_signed(q, s, load32(Y, t0, k))), f * dy[t0, b], a0)
                a1 = fma(to_f32(dot_signed(q, s, load32(Y, t1, k))), f * dy[t1, b], a1)
                a2 = fma(to_f32(dot_signed(q, s, load32(Y, t2, k))), f * dy[t2, b], a2)
                a3 = fma(to_f32(dot_signed(q, s, load32(Y, t3, k))), f * dy[t3, b], a3)
            _store4(out, r0 + i, t0, hsum(a0), hsum(a1), hsum(a2), hsum(a3))


@_jit(**JIT)
def _lg_min_tile(codes, d, dm, m, Y, dy, sy, out, r0):
    """out[:, r0:r0+m] for a tile of Q4_1 / Q5_1 (codes q, dm the min); sy (n, blocks) is
    Q8_1's f16 block sum s as float32."""
    n, nb = Y.shape[0], d.shape[1]
    for t0 in range(0, n, 4):
        t1, t2, t3 = min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1)
        for i in range(m):
            a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
            m0, m1, m2, m3 = F32(0), F32(0), F32(0), F32(0)
            for b in range(nb):
                q = load32(codes, i, LG * b)
                k = b * Q8_1 + k8.Q8_1_QS
                f, g = d[i, b], dm[i, b]
                a0 = fma(to_f32(dot_us(q, load32(Y, t0, k))), f * dy[t0, b], a0)
                a1 = fma(to_f32(dot_us(q, load32(Y, t1, k))), f * dy[t1, b], a1)
                a2 = fma(to_f32(dot_us(q, load32(Y, t2, k))), f * dy[t2, b], a2)
                a3 = fma(to_f32(dot_us(q, load32(Y, t3, k))), f * dy[t3, b], a3)
                m0 += g * sy[t0, b]
                m1 += g * sy[t1, b]
                m2 += g * sy[t2, b]
                m3 += g * sy[t3, b]
            _store4(out, r0 + i, t0, hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3)


@_jit(**JIT)
def _q8_1_factors(Y, dy, sy):
    """dy, sy (n, blocks) = the f16 scale d and block sum s of each Q8_1 block of Y, as f32."""
    for t in range(Y.shape[0]):
        for b in range(dy.shape[1]):
            dy[t, b] = f16_to_f32(Y, t, b * Q8_1)
            sy[t, b] = f16_to_f32(Y, t, b * Q8_1 + 2)


# =============================================================================================
# AVX-512 (zmm) k-quant tiles: the same unpacked tile, 64 weights per instruction.  The scales
# of 64 consecutive weights are 64 consecutive bytes of ``scales`` (four I16x16 halves in
# order), so one 64-byte load gives pmaddwd's second operand.



@intrinsic
def dot64_acc(typingctx, acc, q, i, c, y, t, k, sc):
    """acc + pmaddwd(pmaddubsw(q[i, c:c+64], y[t, k:k+64]), sc[i, c:c+64] as 32 int16): zmm."""
    def codegen(context, builder, signature, args):
        at, qt, it, ct, yt, tt, kt, st = signature.args
        acc_v, qa, iv, cv, ya, tv, kv, sa = args
        v64 = ir.VectorType(ir.IntType(8), 64)
        v32 = ir.VectorType(ir.IntType(16), 32)

        def load(ptr, vty):
            return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)
        qv = load(_ptr(context, builder, qt, qa, it, iv, ct, cv), v64)
        yv = load(_ptr(context, builder, yt, ya, tt, tv, kt, kv), v64)
        sv = load(_ptr(context, builder, st, sa, it, iv, ct, cv), v32)
        p = _call(builder, "llvm.x86.avx512.pmaddubs.w.512", v32, [qv, yv])
        return builder.add(acc_v, _call(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [p, sv]))
    return I32x16(acc, q, i, c, y, t, k, sc), codegen


@intrinsic
def fma16(typingctx, acc, s, f):
    """acc + float(s) * f: F32x16 acc, I32x16 s, scalar f."""
    def codegen(context, builder, signature, args):
        fv = context.cast(builder, args[2], signature.args[2], types.float32)
        vec = builder.insert_element(ir.Constant(_V16F32, ir.Undefined), fv,
                                     ir.Constant(ir.IntType(32), 0))
        vec = builder.shuffle_vector(vec, ir.Constant(_V16F32, ir.Undefined),
                                     ir.Constant(_V16I32, [0] * 16))
        x = builder.sitofp(args[1], _V16F32)
        from numba.core import cgutils
        f3 = cgutils.get_or_insert_function(builder.module,
                                            ir.FunctionType(_V16F32, [_V16F32] * 3),
                                            "llvm.fmuladd.v16f32")
        return builder.call(f3, [x, vec, args[0]])
    return F32x16(acc, s, f), codegen


@intrinsic
def hsum16(typingctx, v):
    """The float32 sum of the 16 lanes of an F32x16."""
    def codegen(context, builder, signature, args):
        x, width = args[0], 16
        while width > 1:
            width //= 2
            half = ir.VectorType(ir.IntType(32), width)
            lo = builder.shuffle_vector(x, x, ir.Constant(half, list(range(width))))
            hi = builder.shuffle_vector(x, x, ir.Constant(half, list(range(width, 2 * width))))
            x = builder.fadd(lo, hi)
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))
    return types.float32(v), codegen


@_jit(**JIT)
def _kq_tile_zmm(codes, scales, mins, d, dm, m, Y, out, r0):
    """_kq_tile in zmm registers: 64 weights per pmaddubsw / pmaddwd."""
    n, nsb = Y.shape[0], d.shape[1]
    for t0 in range(0, n, 4):
        t1, t2, t3 = min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1)
        for i in range(m):
            a0, a1, a2, a3 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            c0, c1, c2, c3 = zeros(), zeros(), zeros(), zeros()  # the min terms
            for b in range(nsb):
                ib, yo = b * KQ, b * Q8K
                s0, s1, s2, s3 = zeros16(0), zeros16(0), zeros16(0), zeros16(0)
                for c in range(4):
                    o, k = ib + 64 * c, yo + Q8K_QS + 64 * c
                    s0 = dot64_acc(s0, codes, i, o, Y, t0, k, scales)
                    s1 = dot64_acc(s1, codes, i, o, Y, t1, k, scales)
                    s2 = dot64_acc(s2, codes, i, o, Y, t2, k, scales)
                    s3 = dot64_acc(s3, codes, i, o, Y, t3, k, scales)
                mv = load16(mins, i, 32 * b)
                f, g = d[i, b], -dm[i, b]
                y0, y1, y2, y3 = f32_at(Y, t0, yo), f32_at(Y, t1, yo), f32_at(Y, t2, yo), \
                    f32_at(Y, t3, yo)
                a0 = fma16(a0, s0, f * y0)
                a1 = fma16(a1, s1, f * y1)
                a2 = fma16(a2, s2, f * y2)
                a3 = fma16(a3, s3, f * y3)
                c0 = fma(to_f32(k8.madd16(mv, load16(Y, t0, yo + Q8K_BSUMS))), g * y0, c0)
                c1 = fma(to_f32(k8.madd16(mv, load16(Y, t1, yo + Q8K_BSUMS))), g * y1, c1)
                c2 = fma(to_f32(k8.madd16(mv, load16(Y, t2, yo + Q8K_BSUMS))), g * y2, c2)
                c3 = fma(to_f32(k8.madd16(mv, load16(Y, t3, yo + Q8K_BSUMS))), g * y3, c3)
            _store4(out, r0 + i, t0, hsum16(a0) + hsum(c0), hsum16(a1) + hsum(c1),
                    hsum16(a2) + hsum(c2), hsum16(a3) + hsum(c3))


# =============================================================================================
# AVX-512 VNNI k-quant tiles: one ``vpdpbusd`` per 64 weights, the scales applied once per
# super-block.  Every k-quant's sub-block scales and mins are per 16 weights (Q4_K / Q5_K's 32-
# weight sub-blocks are two such groups with the same scale), and a super-block has 16 groups,
# one per int32 lane of a zmm.  So the tile keeps each super-block's 256 codes in "lane order":
# 64-byte chunk c, lane l (4 bytes) holds weights 16 l + 4 c .. 16 l + 4 c + 3, and the
# activations get the same order once per product.  Four chained vpdpbusd then leave in lane l
# the whole dot of group l, p_l = sum(codes * y) over its 16 weights, and
#     row . token = sum over super-blocks b, lanes l of
#                   (d_b dy_b) * (sc_l p_l)  +  (-dm_b mn_l) * (dy_b bsum_l)
# with S = sc per row (int32), M = -dm mn per row and B = dy bsums per token (float), 16 per
# super-block.  Codes are unsigned (at most 63) and Q8_K's codes within +-127, so every p_l and
# sc_l p_l is exact in int32: one float rounding per lane and super-block for the code part, as
# llama.cpp's dots.  The min part, which does not depend on the codes, is one fma per lane
# (an integer product there cost 11 % of Q4_K's tile time).

VNNI512 = ZMM and k8.VARIANT == "avx512vnni"  # vpdpbusd on zmm registers (AVX-512 VNNI)
VNNI_OFFSET = {"Q3_K": 4, "Q6_K": 32, "IQ4_XS": 128}  # the code offset of the types whose mins
# are it x scale (IQ4_XS: its grid values + 128)
_LANE_ORDER = [16 * (k % 16) // 4 + k // 16 for k in range(64)]  # lane-order u32 k <- natural


@intrinsic
def lane_order(typingctx, dst, i, o, src, j, so):
    """dst[i, o:o+256] = the 256 bytes src[j, so:so+256] in lane order (64 four-byte units
    transposed 16 x 4)."""
    def codegen(context, builder, signature, args):
        dt, it, ot, st, jt, sot = signature.args
        v64 = ir.VectorType(ir.IntType(32), 64)
        src_p = _ptr(context, builder, st, args[3], jt, args[4], sot, args[5])
        v = builder.load(builder.bitcast(src_p, v64.as_pointer()), align=1)
        v = builder.shuffle_vector(v, v, ir.Constant(v64, _LANE_ORDER))
        dst_p = _ptr(context, builder, dt, args[0], it, args[1], ot, args[2])
        builder.store(v, builder.bitcast(dst_p, v64.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(dst, i, o, src, j, so), codegen


@intrinsic
def dpbusd64(typingctx, acc, q, i, o, y, t, k):
    """acc + vpdpbusd(q[i, o:o+64], y[t, k:k+64]): lane l gains the four products of bytes
    4l..4l+3 (q unsigned, y signed)."""
    def codegen(context, builder, signature, args):
        at, qt, it, ot, yt, tt, kt = signature.args
        v64 = ir.VectorType(ir.IntType(8), 64)

        def load(ty, a, rt, r, ct, c):
            ptr = _ptr(context, builder, ty, a, rt, r, ct, c)
            return builder.bitcast(builder.load(builder.bitcast(ptr, v64.as_pointer()), align=1),
                                   _V16I32)
        qv = load(qt, args[1], it, args[2], ot, args[3])
        yv = load(yt, args[4], tt, args[5], kt, args[6])
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [args[0], qv, yv])
    return I32x16(acc, q, i, o, y, t, k), codegen


@intrinsic
def scaled_acc(typingctx, acc, p, s, i, o, f, mn, b, t):
    """acc + float(p * s[i, o:o+16]) * f + mn[i, o:o+16] * b[t, o:o+16]: one super-block of a
    row . token (F32x16 acc, I32x16 p, int32 array s, float32 arrays mn, b, scalar f).  The
    scales multiply the group dots in int32, as llama.cpp's dots do: one rounding per lane."""
    def codegen(context, builder, signature, args):
        act, pt, st, it, ot, ft, mt, bt, tt = signature.args
        acc_v, p_v, s_a, i_v, o_v, f_v, m_a, b_a, t_v = args
        sv = _load16i(context, builder, st, s_a, it, i_v, ot, o_v)
        x = _fmuladd16(builder, builder.sitofp(builder.mul(p_v, sv), _V16F32),
                       _splat16(context, builder, ft, f_v), acc_v)
        mv = _load16f(context, builder, mt, m_a, it, i_v, ot, o_v)
        bv = _load16f(context, builder, bt, b_a, tt, t_v, ot, o_v)
        return _fmuladd16(builder, mv, bv, x)
    return F32x16(acc, p, s, i, o, f, mn, b, t), codegen


@intrinsic
def scaled_acc0(typingctx, acc, p, s, i, o, f):
    """acc + float(p * s[i, o:o+16]) * f: scaled_acc without a min term."""
    def codegen(context, builder, signature, args):
        act, pt, st, it, ot, ft = signature.args
        sv = _load16i(context, builder, st, args[2], it, args[3], ot, args[4])
        return _fmuladd16(builder, builder.sitofp(builder.mul(args[1], sv), _V16F32),
                          _splat16(context, builder, ft, args[5]), args[0])
    return F32x16(acc, p, s, i, o, f), codegen


@intrinsic
def load16i(typingctx, a, t, o):
    """An I32x16 of a[t, o:o+16] (an int32 array)."""
    def codegen(context, builder, signature, args):
        ptr = _ptr(context, builder, signature.args[0], args[0], signature.args[1], args[1],
                   signature.args[2], args[2])
        return builder.load(builder.bitcast(ptr, _V16I32.as_pointer()), align=1)
    return I32x16(a, t, o), codegen


@_jit(**JIT)
def _vnni_weights(codes, scales, mins, dm, m, pc, S, M):
    """An unpacked k-quant tile (the layout of the ``_un_*`` kernels) -> pc its codes in lane
    order, S (m, 16 per super-block, int32) the scale of each 16 weights, M (float) -dm times
    their min (exact: an f16 times a 6-bit integer)."""
    nsb = S.shape[1] // 16
    for i in range(m):
        for b in range(nsb):
            lane_order(pc, i, b * KQ, codes, i, b * KQ)
            for l in range(16):
                S[i, 16 * b + l] = k8.i16_at(scales, i, b * KQ + 16 * l)
                M[i, 16 * b + l] = -dm[i, b] * F32(k8.i16_at(mins, i, 32 * b + 2 * l))


@_jit(**JIT)
def _vnni_acts(Y, off, Yp, dy, B, I):
    """Q8_K rows Y -> Yp their codes in lane order, dy (n, blocks) their scales, B (n, 16 per
    block) dy times each sum of 16 codes, I (int32, as B) = -off * those sums."""
    for t in range(Y.shape[0]):
        for b in range(dy.shape[1]):
            yo = b * Q8K
            lane_order(Yp, t, b * KQ, Y, t, yo + Q8K_QS)
            dy[t, b] = f32_at(Y, t, yo)
            for l in range(16):
                s = k8.i16_at(Y, t, yo + Q8K_BSUMS + 2 * l)
                B[t, 16 * b + l] = dy[t, b] * F32(s)
                I[t, 16 * b + l] = -off * s


@_jit(**JIT)
def _store2x4(out, r0, r1, t0, x00, x01, x02, x03, x10, x11, x12, x13):
    _store4(out, r0, t0, x00, x01, x02, x03)
    if r1 != r0:
        _store4(out, r1, t0, x10, x11, x12, x13)


@_jit(**JIT)
def _kq_tile_vnni(pc, S, M, d, dm, m, Yp, dy, B, I, out, r0, offset):
    """out[:, r0:r0+m] for a tile in lane order: two rows by four tokens per pass, 8 zmm
    accumulators (rows / tokens past the end are repeats, not stored).  offset (Q3_K, Q6_K:
    mins are the code offset times the scale): each group's dot starts at I = -offset * its
    activation sum, exact in int32, and M, B, dm are not read; else the min term M * B."""
    n, nsb = Yp.shape[0], dy.shape[1]
    for t0 in range(0, n, 4):
        t1, t2, t3 = min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1)
        for i in range(0, m, 2):
            j = min(i + 1, m - 1)
            a00, a01, a02, a03 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            a10, a11, a12, a13 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            for b in range(nsb):
                ib, so = b * KQ, 16 * b
                if offset:
                    p00, p01, p02, p03 = load16i(I, t0, so), load16i(I, t1, so), \
                        load16i(I, t2, so), load16i(I, t3, so)
                    p10, p11, p12, p13 = p00, p01, p02, p03
                else:
                    p00, p01, p02, p03 = zeros16(0), zeros16(0), zeros16(0), zeros16(0)
                    p10, p11, p12, p13 = zeros16(0), zeros16(0), zeros16(0), zeros16(0)
                for c in range(4):
                    o = ib + 64 * c
                    p00 = dpbusd64(p00, pc, i, o, Yp, t0, o)
                    p01 = dpbusd64(p01, pc, i, o, Yp, t1, o)
                    p02 = dpbusd64(p02, pc, i, o, Yp, t2, o)
                    p03 = dpbusd64(p03, pc, i, o, Yp, t3, o)
                    p10 = dpbusd64(p10, pc, j, o, Yp, t0, o)
                    p11 = dpbusd64(p11, pc, j, o, Yp, t1, o)
                    p12 = dpbusd64(p12, pc, j, o, Yp, t2, o)
                    p13 = dpbusd64(p13, pc, j, o, Yp, t3, o)
                y0, y1, y2, y3 = dy[t0, b], dy[t1, b], dy[t2, b], dy[t3, b]
                f, h = d[i, b], d[j, b]
                if offset:
                    a00 = scaled_acc0(a00, p00, S, i, so, f * y0)
                    a01 = scaled_acc0(a01, p01, S, i, so, f * y1)
                    a02 = scaled_acc0(a02, p02, S, i, so, f * y2)
                    a03 = scaled_acc0(a03, p03, S, i, so, f * y3)
                    a10 = scaled_acc0(a10, p10, S, j, so, h * y0)
                    a11 = scaled_acc0(a11, p11, S, j, so, h * y1)
                    a12 = scaled_acc0(a12, p12, S, j, so, h * y2)
                    a13 = scaled_acc0(a13, p13, S, j, so, h * y3)
                else:
                    a00 = scaled_acc(a00, p00, S, i, so, f * y0, M, B, t0)
                    a01 = scaled_acc(a01, p01, S, i, so, f * y1, M, B, t1)
                    a02 = scaled_acc(a02, p02, S, i, so, f * y2, M, B, t2)
                    a03 = scaled_acc(a03, p03, S, i, so, f * y3, M, B, t3)
                    a10 = scaled_acc(a10, p10, S, j, so, h * y0, M, B, t0)
                    a11 = scaled_acc(a11, p11, S, j, so, h * y1, M, B, t1)
                    a12 = scaled_acc(a12, p12, S, j, so, h * y2, M, B, t2)
                    a13 = scaled_acc(a13, p13, S, j, so, h * y3, M, B, t3)
            _store2x4(out, r0 + i, r0 + j, t0, hsum16(a00), hsum16(a01), hsum16(a02),
                      hsum16(a03), hsum16(a10), hsum16(a11), hsum16(a12), hsum16(a13))


@_jit(**JIT)
def _kq_tile_vnni_off(pc, S, M, d, dm, m, Yp, dy, B, I, out, r0):
    _kq_tile_vnni(pc, S, M, d, dm, m, Yp, dy, B, I, out, r0, True)


@_jit(**JIT)
def _kq_tile_vnni_min(pc, S, M, d, dm, m, Yp, dy, B, I, out, r0):
    _kq_tile_vnni(pc, S, M, d, dm, m, Yp, dy, B, I, out, r0, False)


# AVX-512 VNNI legacy tiles (Q4_0 / Q5_0 / Q8_0 / Q4_1 / Q5_1): a 64-byte chunk is two 32-weight
# blocks, lanes 0-7 the first and 8-15 the second, in natural order.  The signed types' codes
# become unsigned u = q + offset (8, 16, 128: within 0..255), and each lane's dot starts at
# -offset times its four activations' sum, so one vpdpbusd leaves in lane l the exact int32 part
# of the block's dot that falls in l.  Every lane then takes its block's d_w dy in float (the
# same rounding per 4 weights as the ymm tiles), and Q4_1 / Q5_1 add m s once per block.

VNNI_LG_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q4_1": 0, "Q5_1": 0, "IQ4_NL": 128}


@intrinsic
def lg_acc(typingctx, acc, p, a, i, o, b, t):
    """acc + float(p) * (a[i, o:o+16] * b[t, o:o+16]) (F32x16 acc, I32x16 p, float32 a, b)."""
    def codegen(context, builder, signature, args):
        act, pt, at, it, ot, bt, tt = signature.args
        av = _load16f(context, builder, at, args[2], it, args[3], ot, args[4])
        bv = _load16f(context, builder, bt, args[5], tt, args[6], ot, args[4])
        return _fmuladd16(builder, builder.sitofp(args[1], _V16F32), builder.fmul(av, bv),
                          args[0])
    return F32x16(acc, p, a, i, o, b, t), codegen


@intrinsic
def fma_rows(typingctx, acc, a, i, o, b, t):
    """acc + a[i, o:o+16] * b[t, o:o+16] (F32x16 acc, float32 a, b)."""
    def codegen(context, builder, signature, args):
        act, at, it, ot, bt, tt = signature.args
        av = _load16f(context, builder, at, args[1], it, args[2], ot, args[3])
        bv = _load16f(context, builder, bt, args[4], tt, args[5], ot, args[3])
        return _fmuladd16(builder, av, bv, args[0])
    return F32x16(acc, a, i, o, b, t), codegen


@_jit(**JIT)
def _vnni_lg_weights(codes, signs, d, dm, m, off, U, Dw, Mw):
    """An unpacked legacy tile -> U its unsigned codes (q + off for the signed types, which
    ``signs`` holds, else ``codes``), Dw / Mw each block's d / min repeated over its 8 lanes.
    U, Dw, Mw may be longer than the row (an odd block count): that tail stays zero."""
    nb = d.shape[1]
    for i in range(m):
        for b in range(nb):
            for k in range(LG * b, LG * b + LG):
                U[i, k] = codes[i, k] if off == 0 else \
                    np.uint8((np.int32(signs[i, k]) + off) & 255)
            for l in range(8 * b, 8 * b + 8):
                Dw[i, l] = d[i, b]
                Mw[i, l] = dm[i, b]


@_jit(**JIT)
def _vnni_lg_acts(Y, nb, off, Yq, Dy, I, Sy):
    """Q8_1 rows Y (nb blocks) -> Yq their codes, Dy each block's d over its 8 lanes, I (int32)
    -off * each lane's four codes' sum, Sy the block sum s in each block's first lane; all
    zero past block nb (arrays made with np.zeros)."""
    for t in range(Y.shape[0]):
        for b in range(nb):
            yo = b * Q8_1
            dv, sv = f16_to_f32(Y, t, yo), f16_to_f32(Y, t, yo + 2)
            for l in range(8):
                acc = 0
                for k in range(4):
                    v = np.int32(Y[t, yo + k8.Q8_1_QS + 4 * l + k])
                    Yq[t, LG * b + 4 * l + k] = Y[t, yo + k8.Q8_1_QS + 4 * l + k]
                    acc += v - 256 if v > 127 else v
                I[t, 8 * b + l] = -off * acc
                Dy[t, 8 * b + l] = dv
                Sy[t, 8 * b + l] = sv if l == 0 else F32(0)


@_jit(**JIT)
def _lg_tile_vnni(U, Dw, Mw, m, Yq, Dy, I, Sy, out, r0, has_min):
    """out[:, r0:r0+m] for a legacy tile (U, Dw, Mw from _vnni_lg_weights), two rows by four
    tokens per pass, 8 zmm accumulators; has_min: Q4_1 / Q5_1's m s terms."""
    n, nc = Yq.shape[0], Yq.shape[1] // 64
    for t0 in range(0, n, 4):
        t1, t2, t3 = min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1)
        for i in range(0, m, 2):
            j = min(i + 1, m - 1)
            a00, a01, a02, a03 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            a10, a11, a12, a13 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            for c in range(nc):
                o, so = 64 * c, 16 * c
                s0, s1, s2, s3 = load16i(I, t0, so), load16i(I, t1, so), load16i(I, t2, so), \
                    load16i(I, t3, so)
                a00 = lg_acc(a00, dpbusd64(s0, U, i, o, Yq, t0, o), Dw, i, so, Dy, t0)
                a01 = lg_acc(a01, dpbusd64(s1, U, i, o, Yq, t1, o), Dw, i, so, Dy, t1)
                a02 = lg_acc(a02, dpbusd64(s2, U, i, o, Yq, t2, o), Dw, i, so, Dy, t2)
                a03 = lg_acc(a03, dpbusd64(s3, U, i, o, Yq, t3, o), Dw, i, so, Dy, t3)
                a10 = lg_acc(a10, dpbusd64(s0, U, j, o, Yq, t0, o), Dw, j, so, Dy, t0)
                a11 = lg_acc(a11, dpbusd64(s1, U, j, o, Yq, t1, o), Dw, j, so, Dy, t1)
                a12 = lg_acc(a12, dpbusd64(s2, U, j, o, Yq, t2, o), Dw, j, so, Dy, t2)
                a13 = lg_acc(a13, dpbusd64(s3, U, j, o, Yq, t3, o), Dw, j, so, Dy, t3)
                if has_min:
                    a00 = fma_rows(a00, Mw, i, so, Sy, t0)
                    a01 = fma_rows(a01, Mw, i, so, Sy, t1)
                    a02 = fma_rows(a02, Mw, i, so, Sy, t2)
                    a03 = fma_rows(a03, Mw, i, so, Sy, t3)
                    a10 = fma_rows(a10, Mw, j, so, Sy, t0)
                    a11 = fma_rows(a11, Mw, j, so, Sy, t1)
                    a12 = fma_rows(a12, Mw, j, so, Sy, t2)
                    a13 = fma_rows(a13, Mw, j, so, Sy, t3)
            _store2x4(out, r0 + i, r0 + j, t0, hsum16(a00), hsum16(a01), hsum16(a02),
                      hsum16(a03), hsum16(a10), hsum16(a11), hsum16(a12), hsum16(a13))


@_jit(**JIT)
def _lg_tile_vnni_signed(U, Dw, Mw, m, Yq, Dy, I, Sy, out, r0):
    _lg_tile_vnni(U, Dw, Mw, m, Yq, Dy, I, Sy, out, r0, False)


@_jit(**JIT)
def _lg_tile_vnni_min(U, Dw, Mw, m, Yq, Dy, I, Sy, out, r0):
    _lg_tile_vnni(U, Dw, Mw, m, Yq, Dy, I, Sy, out, r0, True)


# =============================================================================================
# the table and the threaded drivers

# weight type -> (unpacking kernel, family): "kq" k-quant, "signed" / "min" legacy
UNPACK = {
    "Q2_K": (_un_q2_k, "kq"), "Q3_K": (_un_q3_k, "kq"), "Q4_K": (_un_q4_k, "kq"),
    "Q5_K": (_un_q5_k, "kq"), "Q6_K": (_un_q6_k, "kq"),
    "Q4_0": (_un_q4_0, "signed"), "Q5_0": (_un_q5_0, "signed"), "Q8_0": (_un_q8_0, "signed"),
    "Q4_1": (_un_q4_1, "min"), "Q5_1": (_un_q5_1, "min"),
    "IQ4_NL": (_un_iq4_nl, "signed"), "IQ4_XS": (_un_iq4_xs, "kq"),
}

# the types QMatrix.matmul sends here (n >= 4 tokens); the others round their activations and
# take cpu_matvec's float tiles, which measured faster for them
VNNI_ONLY = frozenset({"IQ4_XS"})  # unpacked for the VNNI k-quant tile alone (_un_iq4_xs)
PROMPT_TYPES = frozenset(UNPACK) if VNNI512 else frozenset(UNPACK) - VNNI_ONLY

_W = types.Array(types.uint8, 2, "C", readonly=True)  # weight blocks (rows, row_bytes)
_B = types.Array(types.uint8, 2, "C")  # unpacked bytes / activation blocks
_F = types.Array(types.float32, 2, "C")
KQ_SIG = types.void(_W, types.int64, types.int64, _B, _B, _B, _F, _F)
LG_SIG = types.void(_W, types.int64, types.int64, _B, _B, _F, _F)
_kq_at = _function_at(KQ_SIG)
_quant_at = _function_at(k8.QUANT_SIG)
_lg_at = _function_at(LG_SIG)


@_jit(**JIT)
def _kq_buffers(nsb):
    """A thread's k-quant tile: codes, scales (an I16x16 per 32 weights), mins (an I16x16 per
    super-block), d, dm."""
    return (np.empty((TILE_ROWS, nsb * KQ), np.uint8), np.empty((TILE_ROWS, nsb * KQ), np.uint8),
            np.empty((TILE_ROWS, nsb * 32), np.uint8), np.empty((TILE_ROWS, nsb), F32),
            np.empty((TILE_ROWS, nsb), F32))


@_jit(nogil=True)
def _run_kq(c, un, w, Y, out, n_threads):
    rows, nsb = w.shape[0], Y.shape[1] // Q8K
    r0, r1 = rows * c // n_threads, rows * (c + 1) // n_threads
    codes, scales, mins, d, dm = _kq_buffers(nsb)  # this thread's tile
    for rt in range(r0, r1, TILE_ROWS):
        m = min(TILE_ROWS, r1 - rt)
        _kq_at(un)(w, rt, m, codes, scales, mins, d, dm)
        _kq_tile(codes, scales, mins, d, dm, m, Y, out, rt)


@_jit(nogil=True)
def _run_kq_zmm(c, un, w, Y, out, n_threads):
    """_run_kq with the zmm tile kernel.  NOTE: a function of its own, not a flag: a CPU
    without AVX-512 must never compile the zmm kernel (LLVM aborts), and Numba's cache is per
    function, so the two builds never share an entry."""
    rows, nsb = w.shape[0], Y.shape[1] // Q8K
    r0, r1 = rows * c // n_threads, rows * (c + 1) // n_threads
    codes, scales, mins, d, dm = _kq_buffers(nsb)
    for rt in range(r0, r1, TILE_ROWS):
        m = min(TILE_ROWS, r1 - rt)
        _kq_at(un)(w, rt, m, codes, scales, mins, d, dm)
        _kq_tile_zmm(codes, scales, mins, d, dm, m, Y, out, rt)


# the VNNI tiles are called by address, so a first run compiles only the kinds its file's types
# need (SmolLM2 and Gemma-3's legacy matrices are all signed: the min tile, ~1.5 s of compile
# time, is never built for them)
_I = types.Array(types.int32, 2, "C")
KQ_TILE_SIG = types.void(_B, _I, _F, _F, _F, types.int64, _B, _F, _F, _I, _F, types.int64)
LG_TILE_SIG = types.void(_B, _F, _F, types.int64, _B, _F, _I, _F, _F, types.int64)
_kq_tile_at = _function_at(KQ_TILE_SIG)
_lg_tile_at = _function_at(LG_TILE_SIG)


@_jit(nogil=True)
def _run_kq_vnni(c, un, tile, w, Yp, dy, B, I, out, n_threads):
    """_run_kq with an AVX-512 VNNI tile (a function of its own, as _run_kq_zmm); ``tile`` the
    address of _kq_tile_vnni_off or _min."""
    rows, nsb = w.shape[0], dy.shape[1]
    r0, r1 = rows * c // n_threads, rows * (c + 1) // n_threads
    codes, scales, mins, d, dm = _kq_buffers(nsb)
    pc = np.empty((TILE_ROWS, nsb * KQ), np.uint8)
    S = np.empty((TILE_ROWS, nsb * 16), np.int32)
    M = np.empty((TILE_ROWS, nsb * 16), F32)
    for rt in range(r0, r1, TILE_ROWS):
        m = min(TILE_ROWS, r1 - rt)
        _kq_at(un)(w, rt, m, codes, scales, mins, d, dm)
        _vnni_weights(codes, scales, mins, dm, m, pc, S, M)
        _kq_tile_at(tile)(pc, S, M, d, dm, m, Yp, dy, B, I, out, rt)


@_jit(nogil=True)
def _run_lg(c, un, signed, w, Y, dy, sy, out, n_threads):
    rows, nb = w.shape[0], dy.shape[1]
    r0, r1 = rows * c // n_threads, rows * (c + 1) // n_threads
    codes = np.empty((TILE_ROWS, nb * LG), np.uint8)
    signs = np.empty((TILE_ROWS, nb * LG), np.uint8)
    d = np.empty((TILE_ROWS, nb), F32)
    dm = np.empty((TILE_ROWS, nb), F32)
    for rt in range(r0, r1, TILE_ROWS):
        m = min(TILE_ROWS, r1 - rt)
        _lg_at(un)(w, rt, m, codes, signs, d, dm)
        if signed:
            _lg_signed_tile(codes, signs, d, m, Y, dy, out, rt)
        else:
            _lg_min_tile(codes, d, dm, m, Y, dy, sy, out, rt)


@_jit(nogil=True)
def _run_lg_vnni(c, un, tile, off, w, Yq, Dy, I, Sy, out, nb, n_threads):
    """_run_lg with an AVX-512 VNNI tile (``tile`` the address of _lg_tile_vnni_signed or _min);
    nb blocks per row, Yq (and so the tile) padded to an even count."""
    rows, nbp = w.shape[0], Yq.shape[1] // LG
    r0, r1 = rows * c // n_threads, rows * (c + 1) // n_threads
    codes = np.empty((TILE_ROWS, nb * LG), np.uint8)
    signs = np.empty((TILE_ROWS, nb * LG), np.uint8)
    d = np.empty((TILE_ROWS, nb), F32)
    dm = np.empty((TILE_ROWS, nb), F32)
    U = np.zeros((TILE_ROWS, nbp * LG), np.uint8)
    Dw = np.zeros((TILE_ROWS, nbp * 8), F32)
    Mw = np.zeros((TILE_ROWS, nbp * 8), F32)
    for rt in range(r0, r1, TILE_ROWS):
        m = min(TILE_ROWS, r1 - rt)
        _lg_at(un)(w, rt, m, codes, signs, d, dm)
        _vnni_lg_weights(codes, signs, d, dm, m, off, U, Dw, Mw)
        _lg_tile_at(tile)(U, Dw, Mw, m, Yq, Dy, I, Sy, out, rt)


# each driver computes chunk c of n_threads (a range of rows or tokens): see _run
_C = types.int64
RUN_KQ_SIG = types.void(_C, types.int64, _W, _B, _F, types.int64)
RUN_LG_SIG = types.void(_C, types.int64, types.boolean, _W, _B, _F, _F, _F, types.int64)
RUN_VNNI_SIG = types.void(_C, types.int64, types.int64, _W, _B, _F, _F, _I, _F, types.int64)
RUN_LG_VNNI_SIG = types.void(_C, types.int64, types.int64, types.int64, _W, _B, _F, _I, _F,
                             _F, types.int64, types.int64)


@_jit(nogil=True)
def _quantize_rows(c, quant, X, Y, n_threads):
    """Y = the activation blocks of X, a range of tokens per thread."""
    n = X.shape[0]
    t0, t1 = n * c // n_threads, n * (c + 1) // n_threads
    _quant_at(quant)(X[t0:t1], Y[t0:t1])


QUANT_ROWS_SIG = types.void(_C, types.int64, _F, _B, types.int64)


# NOTE: each driver above computes chunk c of n_threads; with one thread it is called as it
# is, with more through a parfor of its own below.  One thread never compiles those: each
# parfor function costs about 2 s of compile time (its gufunc and scheduler glue), and a first
# run compiled six of them.


def _par_kq(un, w, Y, out, n_threads):
    for c in prange(n_threads):
        _run_kq(c, un, w, Y, out, n_threads)


def _par_kq_zmm(un, w, Y, out, n_threads):
    for c in prange(n_threads):
        _run_kq_zmm(c, un, w, Y, out, n_threads)


def _par_kq_vnni(un, tile, w, Yp, dy, B, I, out, n_threads):
    for c in prange(n_threads):
        _run_kq_vnni(c, un, tile, w, Yp, dy, B, I, out, n_threads)


def _par_lg(un, signed, w, Y, dy, sy, out, n_threads):
    for c in prange(n_threads):
        _run_lg(c, un, signed, w, Y, dy, sy, out, n_threads)


def _par_lg_vnni(un, tile, off, w, Yq, Dy, I, Sy, out, nb, n_threads):
    for c in prange(n_threads):
        _run_lg_vnni(c, un, tile, off, w, Yq, Dy, I, Sy, out, nb, n_threads)


def _par_quantize_rows(quant, X, Y, n_threads):
    for c in prange(n_threads):
        _quantize_rows(c, quant, X, Y, n_threads)


_DRIVERS = {"kq": (_run_kq, _par_kq, RUN_KQ_SIG), "kq_zmm": (_run_kq_zmm, _par_kq_zmm, RUN_KQ_SIG),
            "kq_vnni": (_run_kq_vnni, _par_kq_vnni, RUN_VNNI_SIG),
            "lg": (_run_lg, _par_lg, RUN_LG_SIG),
            "lg_vnni": (_run_lg_vnni, _par_lg_vnni, RUN_LG_VNNI_SIG),
            "quant": (_quantize_rows, _par_quantize_rows, QUANT_ROWS_SIG)}


@functools.cache
def _driver(family: str, parallel: bool):
    chunk, par, sig = _DRIVERS[family]
    if not parallel:
        return compiled(chunk, sig)[0]
    return compiled(_jit(parallel=True)(par), types.void(*sig.args[1:]))[0]


def _run(family: str, n_threads: int, *args) -> None:
    """The driver of ``family`` over n_threads chunks."""
    if n_threads <= 1:
        _driver(family, False)(0, *args, 1)
    else:
        _driver(family, True)(*args, n_threads)


def quantize_activations(name: str, X: np.ndarray, n_threads: int) -> np.ndarray:
    """cpu_int8's activation blocks of X (n, cols) for weight type ``name``, on n_threads."""
    Y = np.empty((X.shape[0], k8.activation_bytes(name, X.shape[1])), np.uint8)
    _run("quant", max(1, min(n_threads, X.shape[0])), k8._addresses(name)[0], X, Y)
    return Y


@functools.cache
def _unpacker(name: str) -> int:
    un, family = UNPACK[name]
    return compiled(un, KQ_SIG if family == "kq" else LG_SIG)[1]


@functools.cache
def _vnni_tile(family: str, variant: bool) -> int:
    """The address of a VNNI tile: "kq" (variant: the offset types Q3_K / Q6_K) or "lg"
    (variant: the types with a min, Q4_1 / Q5_1)."""
    fn = {("kq", True): _kq_tile_vnni_off, ("kq", False): _kq_tile_vnni_min,
          ("lg", True): _lg_tile_vnni_min, ("lg", False): _lg_tile_vnni_signed}[family, variant]
    return compiled(fn, KQ_TILE_SIG if family == "kq" else LG_TILE_SIG)[1]


PARALLEL_MIN_WORK = 1 << 16  # weight-token products below which one thread runs it


def product(name: str, w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """``out = Q8(X) @ W.T`` for a prompt: X float32 (n, cols) C-contiguous, w read-only uint8
    (rows, row_bytes), out float32 (n, rows)."""
    family = UNPACK[name][1]
    if name in VNNI_ONLY and not VNNI512:
        raise ValueError(f"{name} prompt tiles need AVX-512 VNNI (this process runs {k8.VARIANT})")
    rows = w.shape[0]
    n_threads = numba.get_num_threads()
    if n_threads == 1 or rows * X.size < PARALLEL_MIN_WORK:
        n_threads = 1
    Y = quantize_activations(name, X, n_threads)  # (n, activation bytes)
    n_threads = max(1, min(n_threads, -(-rows // TILE_ROWS)))
    if family == "kq" and VNNI512:
        n, nsb = X.shape[0], X.shape[1] // KQ
        off = VNNI_OFFSET.get(name, 0)
        Yp, dy = np.empty((n, nsb * KQ), np.uint8), np.empty((n, nsb), F32)
        B, I = np.empty((n, nsb * 16), F32), np.empty((n, nsb * 16), np.int32)
        _vnni_acts(Y, off, Yp, dy, B, I)
        _run("kq_vnni", n_threads, _unpacker(name), _vnni_tile("kq", off > 0), w, Yp, dy, B, I,
             out)
        return
    if VNNI512:
        n, nb = X.shape[0], X.shape[1] // LG
        nbp, off = nb + (nb & 1), VNNI_LG_OFFSET[name]
        Yq = np.zeros((n, nbp * LG), np.uint8)
        Dy, Sy = np.zeros((n, nbp * 8), F32), np.zeros((n, nbp * 8), F32)
        I = np.zeros((n, nbp * 8), np.int32)
        _vnni_lg_acts(Y, nb, off, Yq, Dy, I, Sy)
        _run("lg_vnni", n_threads, _unpacker(name), _vnni_tile("lg", family == "min"), off, w,
             Yq, Dy, I, Sy, out, nb)
        return
    run = ("kq_zmm" if ZMM else "kq") if family == "kq" else "lg"
    if family == "kq":
        _run(run, n_threads, _unpacker(name), w, Y, out)
        return
    nb = X.shape[1] // LG
    dy = np.empty((X.shape[0], nb), F32)  # (n, blocks)
    sy = np.empty((X.shape[0], nb), F32)
    _q8_1_factors(Y, dy, sy)
    _run(run, n_threads, _unpacker(name), family == "signed", w, Y, dy, sy, out)


__all__ = ["product", "UNPACK", "TILE_ROWS"]
