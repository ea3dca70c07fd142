"""Scale-only quantizers Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, Q8_K, byte-exact with llama.cpp.

Each block stores one scale ``d`` (or a super-block scale times small integer sub-block scales)
and signed integer quants; a weight is ``d * q``.  The search for ``d`` follows llama.cpp's
``ggml-quants.c`` step by step, in float32, so the bytes come out identical:

- without an importance vector: the ``quantize_row_<type>_ref`` path (what ``llama-quantize``
  uses when no imatrix is given);
- with one: the ``quantize_row_<type>_impl`` path (weighted scale search).  Q8_0 and Q8_K
  ignore the importance vector, as llama.cpp does.

Writing rules kept on purpose (they decide the bytes):
- every float is a float32 and every operation is done in the C expression's order (no fma, no
  reassociation: numba without ``fastmath``);
- integer -> float conversions are explicit (numba would otherwise promote float32 * int64 to
  float64);
- ``nearest_int`` rounds half to even by adding 1.5 * 2**23, like llama.cpp's magic-number trick;
- f16 conversion is IEEE round-to-nearest-even (``fp32_to_fp16``); ``nearest_int``,
  ``fp32_to_fp16``, ``fp16_to_fp32`` and ``make_qx_quants`` are shared with ``asymmetric``;
- every compiled function has one explicit signature (compiled at import, then cached): left
  to infer, numba compiles one copy per literal argument value (make_qx_quants had six).

The algorithm of every type is described in words in ``formats/<TYPE>.md`` ("## Quantize").
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK, QK_K
from . import split_rows

F32 = np.float32
_JIT = dict(cache=True, error_model="numpy")  # IEEE division: x/0 -> inf, no Python exception

# Kinds understood by the row driver, one per block type.
_Q4_0, _Q5_0, _Q8_0, _Q3_K, _Q6_K, _Q8_K = range(6)


# ---------------------------------------------------------------------------------------------
# Scalar helpers
# ---------------------------------------------------------------------------------------------
@njit("int64(float32)", **_JIT)
def nearest_int(f):
    """Round a float32 (|f| < 2**22) to the nearest integer, ties to even (1.5*2**23 trick)."""
    # NOTE: like llama.cpp we read the integer from the mantissa bits of f + 1.5*2**23 rather
    # than converting; for |f| >= 2**22 this wraps the same way the C does.
    v = f + F32(12582912.0)
    return np.int64(F32(v).view(np.uint32) & 0x7FFFFF) - 0x400000


@njit("int64(float32)", **_JIT)
def fp32_to_fp16(f):
    """IEEE half bits of a float32: round to nearest even, overflow to inf, NaN to 0x7E00
    (what GGML_FP32_TO_FP16 gives)."""
    u = np.int64(F32(f).view(np.uint32))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN
        return sign | 0x7E00
    if a >= 0x477FF000:  # >= 65520 rounds past the largest half (65504)
        return sign | 0x7C00
    if a < 0x38800000:  # below 2**-14: a half subnormal, in units of 2**-24 (exact scaling)
        return sign | nearest_int(abs(f) * F32(16777216.0))
    # rebias the exponent (127 -> 15), round the 13 dropped mantissa bits to even
    return sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13)


@njit("float32(int64)", **_JIT)
def fp16_to_fp32(h):
    """The float32 value of half bits ``h`` (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero / subnormal: m * 2**-24
        v = F32(m) * F32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:  # inf / NaN
        bits = sign | 0x7F800000 | (m << 13)
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return np.uint32(bits).view(np.float32)


# Names the asymmetric module imported first; kept as aliases.
_nearest_int, _fp16_bits, _fp16_value = nearest_int, fp32_to_fp16, fp16_to_fp32


@njit("float32(uint8[::1], int64, float32)", **_JIT)
def put_f16(out, o, f):
    """Store ``f`` as a little-endian half at ``out[o:o+2]``; return the stored half's value."""
    h = fp32_to_fp16(f)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8
    return fp16_to_fp32(h)


# ---------------------------------------------------------------------------------------------
# Scale searches shared by the types (llama.cpp: make_qx_quants, make_q3_quants)
# ---------------------------------------------------------------------------------------------
@njit("float32(float32, int64, int64, float32[::1], boolean)", **_JIT)
def _weight(xi, i, rmse_type, qw, use_qw):
    if use_qw:
        return qw[i]
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return F32(1.0)
    if rmse_type == 3:
        return abs(xi)
    return np.sqrt(abs(xi))


@njit("UniTuple(float32, 2)(float32[::1], int64)", **_JIT)
def _max_abs(x, n):
    """(largest |x[i]| over x[:n], the signed value that has it, the first one on ties)."""
    amax = F32(0.0)
    mx = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return amax, mx


@njit("float32(int64, int64, float32[::1], int64[::1], int64, float32[::1], boolean)", **_JIT)
def make_qx_quants(n, nmax, x, L, rmse_type, qw, use_qw):
    """Best scale for ``x[:n]`` on the integer grid [-nmax, nmax-1]; fills ``L`` with q + nmax.

    rmse_type 0: plain ``-nmax/max`` scale.  Otherwise the error is weighted by ``qw`` (if
    ``use_qw``) or by x*x (1), 1 (2), |x| (3), sqrt|x| (4); the least-squares scale of the
    first rounding is returned at once for a negative rmse_type (averaged with 1/iscale), else
    18 more candidate inverse scales -(nmax + 0.1*is)/max, is = -9..9 (is != 0), are tried and
    the one with the largest (sum w x l)^2 / sum w l^2 wins.
    """
    amax, mx = _max_abs(x, n)
    if amax < F32(1e-15):  # all zero (GROUP_MAX_EPS)
        # NOTE: llama.cpp leaves L = 0 here (not nmax), i.e. quant -nmax; we do the same.
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return F32(1.0) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _weight(x[i], i, rmse_type, qw, use_qw)
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else F32(0.0)
    if return_early:
        return F32(0.5) * (scale + F32(1.0) / iscale) if suml2 > 0 else F32(1.0) / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _weight(x[i], i, rmse_type, qw, use_qw)
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit("float32(int64, int64, float32[::1], int64[::1], boolean)", **_JIT)
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Scale for ``x[:n]`` on [-nmax, nmax-1] (Q3_K without imatrix); fills ``L`` with q + nmax.

    With ``do_rmse`` the first rounding at -nmax/max is refined coordinate-wise (up to 5 passes):
    each quant is moved to the value the least-squares scale of the others asks for, if that
    raises (sum w x l)^2 / sum w l^2 with w = x*x; the least-squares scale is returned.
    """
    amax, mx = _max_abs(x, n)
    if amax < F32(1e-15):
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / mx
    if do_rmse:
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for _ in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fli = F32(L[i])
                slx = sumlx - w * x[i] * fli
                if slx > 0:
                    sl2 = suml2 - w * fli * fli
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fnl = F32(new_l)
                        slx += w * x[i] * fnl
                        sl2 += w * fnl * fnl
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return F32(1.0) / iscale


# ---------------------------------------------------------------------------------------------
# Legacy 32-weight blocks
# ---------------------------------------------------------------------------------------------
@njit("void(float32[::1], float32[::1], boolean, uint8[::1], int64)", **_JIT)
def _q4_0_q5_0_row(x, qw, use_qw, out, nmax):
    """One row of Q4_0 (nmax 8) or Q5_0 (nmax 16).

    Q4_0 block (18 bytes): 0..1 d (f16) | 2..17 qs: byte j = q[j] | q[j+16] << 4
    Q5_0 block (22 bytes): 0..1 d (f16) | 2..5 qh (u32 LE): bit j = bit 4 of q[j]
                           | 6..21 qs: byte j = (q[j] & 15) | (q[j+16] & 15) << 4
    q = L in 0..2*nmax-1 and w = d * (q - nmax).
    """
    n = x.shape[0]
    nb = n // QK
    bsize = 18 if nmax == 8 else 22
    L = np.empty(QK, np.int64)
    weight = np.empty(QK, np.float32)
    sigma2 = F32(0.0)
    if use_qw:
        sum_x2 = F32(0.0)
        for j in range(n):
            sum_x2 += x[j] * x[j]
        sigma2 = sum_x2 / F32(n)
    for ib in range(nb):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * bsize
        if use_qw:
            # importance x sqrt(sigma^2 + x^2), then the weighted 19-candidate scale search
            for j in range(QK):
                weight[j] = qw[ib * QK + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            d = make_qx_quants(QK, nmax, xb, L, 1, weight, True)
            put_f16(out, o, d)
        else:
            # scale from the largest-magnitude value, mapped to -nmax
            amax, mx = _max_abs(xb, QK)
            d = mx / F32(-nmax)
            idv = F32(1.0) / d if d != 0 else F32(0.0)
            put_f16(out, o, d)
            half = F32(nmax) + F32(0.5)
            for j in range(QK):
                # NOTE: truncation of x/d + nmax + 0.5 (C's (int8_t) cast), capped at 2*nmax-1
                L[j] = min(2 * nmax - 1, np.int32(xb[j] * idv + half))
        if nmax == 8:
            for j in range(16):
                out[o + 2 + j] = L[j] | (L[j + 16] << 4)
        else:
            qh = 0
            for j in range(16):
                out[o + 6 + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)
                qh |= ((L[j] >> 4) & 1) << j
                qh |= ((L[j + 16] >> 4) & 1) << (j + 16)
            for k in range(4):
                out[o + 2 + k] = (qh >> (8 * k)) & 0xFF


@njit("void(float32[::1], uint8[::1])", **_JIT)
def _q8_0_row(x, out):
    """One row of Q8_0.  Block (34 bytes): 0..1 d (f16) | 2..33 qs (int8), w = d * q."""
    nb = x.shape[0] // QK
    for ib in range(nb):
        o = ib * 34
        amax = F32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[ib * QK + j]))
        d = amax / F32(127.0)
        idv = F32(1.0) / d if d != 0 else F32(0.0)
        put_f16(out, o, d)
        for j in range(QK):
            v = x[ib * QK + j] * idv
            # roundf: half away from zero (v - trunc(v) is exact).  int32, branch-free: the
            # loop vectorizes (AVX2 has no float -> int64 vector conversion)
            q = np.int32(v)
            r = v - F32(q)
            q += np.int32(r >= F32(0.5)) - np.int32(r <= F32(-0.5))
            out[o + 2 + j] = q & 0xFF


# ---------------------------------------------------------------------------------------------
# k-quants (256-weight super-blocks)
# ---------------------------------------------------------------------------------------------
@njit("void(float32[::1], float32[::1], boolean, uint8[::1])", **_JIT)
def _q3_k_row(x, qw, use_qw, out):
    """One row of Q3_K.  Block (110 bytes):

    0..31   hmask: bit (j // 32) of byte (j % 32) = bit 2 of q[j]
    32..95  qs:    2-bit low parts; byte 32 + 32*h + l holds q[128h + l + 32s] at bits 2s..2s+1
    96..107 scales: 16 six-bit values s+32; low nibbles: byte j (j<8) bits 0..3 / byte j-8 bits
            4..7 (j>=8); high 2 bits: byte 8 + j%4, bits 2*(j//4)..+1
    108..109 d (f16);   w = d * (sc - 32) * (q - 4), q in 0..7
    """
    nb = x.shape[0] // QK_K
    L = np.empty(QK_K, np.int64)
    Ls = np.empty(16, np.int64)
    scales = np.empty(16, np.float32)
    weight = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    for i in range(nb):
        xb = x[i * QK_K:(i + 1) * QK_K]
        o = i * 110
        if use_qw:
            sumx2 = F32(0.0)
            for j in range(QK_K):
                sumx2 += xb[j] * xb[j]
            sigma2 = F32(2.0) * sumx2 / F32(QK_K)
            for j in range(16):
                for l in range(16):
                    v = xb[16 * j + l]
                    weight[l] = qw[QK_K * i + 16 * j + l] * np.sqrt(sigma2 + v * v)
                sumw = F32(0.0)
                for l in range(16):
                    sumw += weight[l]
                sw[j] = sumw
                scales[j] = make_qx_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16],
                                           1, weight, True)
            # the 16 sub-block scales themselves: weighted 6-bit search, weights = sum of weights
            d_block = make_qx_quants(16, 32, scales, Ls, 1, sw, True)
            d = put_f16(out, o + 108, d_block)
        else:
            max_scale = F32(0.0)
            amax = F32(0.0)
            for j in range(16):
                scales[j] = make_q3_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16],
                                           True)
                s = abs(scales[j])
                if s > amax:
                    amax = s
                    max_scale = scales[j]
            if max_scale != 0:
                iscale = F32(-32.0) / max_scale
                for j in range(16):
                    Ls[j] = max(-32, min(31, nearest_int(iscale * scales[j]))) + 32
                d = put_f16(out, o + 108, F32(1.0) / iscale)
            else:
                for j in range(16):
                    Ls[j] = 0
                d = put_f16(out, o + 108, F32(0.0))
        # pack the 6-bit scales (lossless), then requantize with the stored scales
        for k in range(12):
            out[o + 96 + k] = 0
        for j in range(16):
            l = Ls[j]
            if j < 8:
                out[o + 96 + j] = l & 0xF
            else:
                out[o + 96 + j - 8] |= (l & 0xF) << 4
            out[o + 96 + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        for j in range(16):
            dj = d * F32(Ls[j] - 32)
            if dj == 0:
                continue  # keeps the quants of the scale search
            for ii in range(16):
                l = nearest_int(xb[16 * j + ii] / dj)
                L[16 * j + ii] = max(-4, min(3, l)) + 4
        for k in range(32):
            out[o + k] = 0
        for j in range(QK_K):
            if L[j] > 3:
                out[o + j % 32] |= 1 << (j // 32)
                L[j] -= 4
        for h in range(2):
            for l in range(32):
                b = 128 * h + l
                out[o + 32 + 32 * h + l] = (L[b] | (L[b + 32] << 2) | (L[b + 64] << 4)
                                            | (L[b + 96] << 6))


@njit("void(float32[::1], float32[::1], boolean, uint8[::1])", **_JIT)
def _q6_k_row(x, qw, use_qw, out):
    """One row of Q6_K.  Block (210 bytes):

    0..127   ql: low 4 bits; for half h (128 weights): byte 64h + l = q[128h+l] | q[128h+l+64] << 4,
             byte 64h + 32 + l = q[128h+l+32] | q[128h+l+96] << 4   (l < 32)
    128..191 qh: high 2 bits; byte 128 + 32h + l = q[128h+l+32s] >> 4 at bits 2s..2s+1
    192..207 scales: int8 per 16 weights
    208..209 d (f16);   w = d * scale * (q - 32), q in 0..63
    """
    nb = x.shape[0] // QK_K
    L = np.empty(QK_K, np.int64)
    scales = np.empty(16, np.float32)
    sc = np.empty(16, np.int64)
    for i in range(nb):
        xb = x[i * QK_K:(i + 1) * QK_K]
        o = i * 210
        max_scale = F32(0.0)
        max_abs_scale = F32(0.0)
        for ib in range(16):
            # NOTE: llama.cpp passes the raw importance here (no sqrt(sigma^2 + x^2) factor)
            s = make_qx_quants(16, 32, xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1,
                               qw[QK_K * i + 16 * ib:QK_K * i + 16 * ib + 16] if use_qw else qw,
                               use_qw)
            scales[ib] = s
            if abs(s) > max_abs_scale:
                max_abs_scale = abs(s)
                max_scale = s
        if max_abs_scale < F32(1e-15):
            for k in range(210):
                out[o + k] = 0
            continue
        iscale = F32(-128.0) / max_scale
        d = put_f16(out, o + 208, F32(1.0) / iscale)
        for ib in range(16):
            sc[ib] = min(127, nearest_int(iscale * scales[ib]))
            out[o + 192 + ib] = sc[ib] & 0xFF
        for j in range(16):
            dj = d * F32(sc[j])
            if dj == 0:
                continue
            for ii in range(16):
                l = nearest_int(xb[16 * j + ii] / dj)
                L[16 * j + ii] = max(-32, min(31, l)) + 32
        for h in range(2):
            b = 128 * h
            for l in range(32):
                q1 = L[b + l]
                q2 = L[b + l + 32]
                q3 = L[b + l + 64]
                q4 = L[b + l + 96]
                out[o + 64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                out[o + 64 * h + 32 + l] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                out[o + 128 + 32 * h + l] = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4)
                                             | ((q4 >> 4) << 6))


@njit("void(float32[::1], uint8[::1])", **_JIT)
def _q8_k_row(x, out):
    """One row of Q8_K.  Block (292 bytes): 0..3 d (f32) | 4..259 qs (int8)
    | 260..291 bsums (16 x int16 LE, sum of each 16 quants);  w = d * q."""
    nb = x.shape[0] // QK_K
    for i in range(nb):
        xb = x[i * QK_K:(i + 1) * QK_K]
        o = i * 292
        mx = F32(0.0)
        amax = F32(0.0)
        for j in range(QK_K):
            ax = abs(xb[j])
            if ax > amax:
                amax = ax
                mx = xb[j]
        if amax == 0:
            # NOTE: llama.cpp leaves bsums unwritten for an all-zero block; we write zeros.
            for k in range(292):
                out[o + k] = 0
            continue
        iscale = F32(-127.0) / mx
        for j in range(QK_K):
            out[o + 4 + j] = min(127, nearest_int(iscale * xb[j])) & 0xFF
        for j in range(16):
            s = 0
            for ii in range(16):
                q = np.int64(out[o + 4 + 16 * j + ii])
                s += q - 256 if q > 127 else q
            out[o + 260 + 2 * j] = s & 0xFF
            out[o + 261 + 2 * j] = (s >> 8) & 0xFF
        bits = np.int64(F32(F32(1.0) / iscale).view(np.uint32))
        for k in range(4):
            out[o + k] = (bits >> (8 * k)) & 0xFF


# ---------------------------------------------------------------------------------------------
# Driver: one compiled loop over rows for every type, run on row chunks by a thread pool
# ---------------------------------------------------------------------------------------------
# NOTE: threads over a nogil kernel rather than parallel=True/prange: the parfor version of this
# driver took ~7 s of CPU to compile (numba re-optimizes every linked row function inside the
# gufunc), the plain loop ~1.5 s; the run time is the same.
@njit("void(int64, float32[:, ::1], float32[::1], boolean, uint8[:, ::1])", nogil=True,
      **_JIT)
def _quantize_rows(kind, x, qw, use_qw, out):  # x (rows, cols), qw (cols,), out (rows, row_bytes)
    for r in range(x.shape[0]):
        if kind == _Q4_0:
            _q4_0_q5_0_row(x[r], qw, use_qw, out[r], 8)
        elif kind == _Q5_0:
            _q4_0_q5_0_row(x[r], qw, use_qw, out[r], 16)
        elif kind == _Q8_0:
            _q8_0_row(x[r], out[r])
        elif kind == _Q3_K:
            _q3_k_row(x[r], qw, use_qw, out[r])
        elif kind == _Q6_K:
            _q6_k_row(x[r], qw, use_qw, out[r])
        else:
            _q8_k_row(x[r], out[r])


_NO_WEIGHTS = np.zeros(QK_K, np.float32)
_MIN_WEIGHTS_PER_THREAD = 1 << 16  # below this a thread costs more than it saves


def _row_quantizer(kind: int, uses_imatrix: bool, name: str):
    def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
        use_qw = uses_imatrix and imatrix is not None
        qw = imatrix if use_qw else _NO_WEIGHTS
        split_rows(lambda xs, os: _quantize_rows(kind, xs, qw, use_qw, os), x, out,
                   _MIN_WEIGHTS_PER_THREAD)

    quantize_rows.__name__ = quantize_rows.__qualname__ = f"quantize_{name.lower()}"
    quantize_rows.__doc__ = f"Fill ``out`` (rows, row_bytes) with {name} blocks of ``x``."
    return quantize_rows


# name -> (driver kind, uses the importance vector)
_KINDS = {
    "Q4_0": (_Q4_0, True),
    "Q5_0": (_Q5_0, True),
    "Q8_0": (_Q8_0, False),  # NOTE: llama.cpp ignores quant_weights for Q8_0
    "Q3_K": (_Q3_K, True),
    "Q6_K": (_Q6_K, True),
    "Q8_K": (_Q8_K, False),  # activation type: always the plain -127/max scale
}

QUANTIZERS = {name: _row_quantizer(kind, uses, name) for name, (kind, uses) in _KINDS.items()}
