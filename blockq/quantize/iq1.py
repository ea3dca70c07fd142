"""Quantizers of the 1-bit i-quants IQ1_S and IQ1_M, byte-exact with llama.cpp.

``quantize_iq1_s`` / ``quantize_iq1_m`` in ggml-quants.c.  Each group of 8 weights is a point of
the 2048-point ternary codebook (values -1, 0, 1), moved by a per-sub-block shift of +-1/8 (IQ1_S:
one shift per 32 weights; IQ1_M: one per group of 8).  Per sub-block the exact weighted
least-squares split is searched: the weights sorted, prefix sums of w x and w, and every pair of
boundaries (i1, i2) tried, which puts the lowest i1 weights at -1, the next at 0 and the rest at
+1, for each shift.  A group whose ternary pattern is not in the codebook is replaced by the
nearest of its neighbours (three distance shells, :func:`.iquant.neighbours`), and the scale is
refitted.  Sub-block scales are stored as 3-bit odd multiples of ``d = max_scale / 15``.  Float32
throughout in the C order, no fma (see :mod:`.symmetric`).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK_K
from .iquant import lattice_quantizer, sum_squares
from .symmetric import fp32_to_fp16, nearest_int

F32 = np.float32
_JIT = dict(cache=True, error_model="numpy")
DELTA = 0.125  # IQ1S_DELTA = IQ1M_DELTA: the shift
X_P = np.array([-1 + DELTA, DELTA, 1 + DELTA], F32)  # ternary values shifted up
X_M = np.array([-1 - DELTA, -DELTA, 1 - DELTA], F32)  # ... and down
GROUP_MAX_EPS_IQ1_S = F32(1e-12)
GROUP_MAX_EPS_IQ1_M = F32(1e-7)
FLT_MAX = F32(3.4028234663852886e38)


@njit("void(float32[::1], boolean, float32[::1], float32, float32[::1])", **_JIT)
def _weights(qw, use_qw, xb, sigma2, weight):
    """llama.cpp's IQ1 weights: qw sqrt(sigma2 + x^2) with importance vectors, else x^2."""
    for i in range(xb.size):
        weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i]) if use_qw else xb[i] * xb[i]


@njit("void(float32[::1], int64[::1])", **_JIT)
def _sort_order(xb, idx):
    """idx = the order of xb ascending, equal values in index order (glibc's qsort of llama.cpp's
    (value, index) pairs is a stable merge sort for arrays this small)."""
    n = xb.size
    for j in range(n):
        idx[j] = j
    for j in range(1, n):
        i, v = idx[j], xb[idx[j]]
        k = j - 1
        while k >= 0 and xb[idx[k]] > v:
            idx[k + 1] = idx[k]
            k -= 1
        idx[k + 1] = i


@njit("int64(uint16[::1], int64, int8[:, ::1], float32[::1], float32[::1], float32, float32[::1])",
      **_JIT)
def _best_neighbour2(table, off, grid, xb, weight, scale, xx):
    """llama.cpp's iq1_find_best_neighbour2: of the neighbour list at ``table[off]`` the codebook
    point minimising sum w (scale xx[l] - x)^2 (first on ties)."""
    # NOTE: llama.cpp falls back to the whole codebook when no neighbour scores below FLT_MAX;
    # with finite weights the first neighbour always does, so the fallback is left out
    best_d2, best = FLT_MAX, -1
    for j in range(1, np.int64(table[off]) + 1):
        g = np.int64(table[off + j])
        d2 = F32(0.0)
        for i in range(8):
            diff = scale * xx[(grid[g, i] - 1) // 2] - xb[i]
            d2 += weight[i] * diff * diff
        if d2 < best_d2:
            best_d2, best = d2, g
    return best


@njit("UniTuple(int64, 3)(float32[::1], float32[::1], int64[::1], float32[:, ::1], "
      "float32[:, ::1], float32[::1])", **_JIT)
def _best_split_s(xb, weight, idx, sums, unused, scale):
    """IQ1_S's exhaustive split search over the sorted sub-block of 32 (one shift for all):
    returns (i1, i2, signs) of the best fit, signs 0 (+1/8) or 3 (-1/8), and its scale in
    ``scale[0]``; i1 = -1 if no split fits."""
    bs = xb.size
    sumx, sumw = sums[0], sums[1]
    for j in range(bs):
        i = idx[j]
        sumx[j + 1] = sumx[j] + weight[i] * xb[i]
        sumw[j + 1] = sumw[j] + weight[i]
    best, besti1, besti2, best_k = -FLT_MAX, -1, -1, 0
    for i1 in range(bs + 1):
        for i2 in range(i1, bs + 1):
            for k in (0, 3):
                xx = X_P if k == 0 else X_M
                sumqx = ((sumx[i1] - sumx[0]) * xx[0] + (sumx[i2] - sumx[i1]) * xx[1]
                         + (sumx[bs] - sumx[i2]) * xx[2])
                sumq2 = ((sumw[i1] - sumw[0]) * xx[0] * xx[0]
                         + (sumw[i2] - sumw[i1]) * xx[1] * xx[1]
                         + (sumw[bs] - sumw[i2]) * xx[2] * xx[2])
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale[0] = sumqx / sumq2
                    best = scale[0] * sumqx
                    besti1, besti2, best_k = i1, i2, k
    return besti1, besti2, best_k


@njit("UniTuple(int64, 3)(float32[::1], float32[::1], int64[::1], float32[:, ::1], "
      "float32[:, ::1], float32[::1])", **_JIT)
def _best_split_m(xb, weight, idx, px, pw, scale):
    """IQ1_M's split search over the sorted sub-block of 16, each half (group) with its own
    shift: returns (i1, i2, signs), signs 0..3 = (+,+), (+,-), (-,+), (-,-) for the two groups,
    and the scale in ``scale[0]``; i1 = -1 if no split fits."""
    bs = xb.size
    # prefix sums per half (each half has its own shift); with v0 - v1 = v1 - v2 = -1 a split's
    # sums are T v2 - P[i1] - P[i2]
    for j in range(bs):
        i = idx[j]
        h = 0 if i < bs // 2 else 1
        px[h, j + 1] = px[h, j] + weight[i] * xb[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + weight[i]
        pw[1 - h, j + 1] = pw[1 - h, j]
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    sumqx, sumq2 = np.empty(4, F32), np.empty(4, F32)
    best, besti1, besti2, best_k = -FLT_MAX, -1, -1, 0
    for i1 in range(bs + 1):
        for i2 in range(i1, bs + 1):
            sx0, sx1 = px[0, i1] + px[0, i2], px[1, i1] + px[1, i2]
            qxp0, qxm0 = px[0, bs] * p2 - sx0, px[0, bs] * m2 - sx0
            qxp1, qxm1 = px[1, bs] * p2 - sx1, px[1, bs] * m2 - sx1
            q2p0 = pw[0, bs] * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
            q2m0 = pw[0, bs] * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
            q2p1 = pw[1, bs] * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
            q2m1 = pw[1, bs] * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
            sumqx[0], sumq2[0] = qxp0 + qxp1, q2p0 + q2p1
            sumqx[1], sumq2[1] = qxp0 + qxm1, q2p0 + q2m1
            sumqx[2], sumq2[2] = qxm0 + qxp1, q2m0 + q2p1
            sumqx[3], sumq2[3] = qxm0 + qxm1, q2m0 + q2m1
            for k in range(4):
                if sumq2[k] > 0 and sumqx[k] * sumqx[k] > best * sumq2[k]:
                    scale[0] = sumqx[k] / sumq2[k]
                    best = scale[0] * sumqx[k]
                    besti1, besti2, best_k = i1, i2, k
    return besti1, besti2, best_k


@njit("int64(int64, int64)", **_JIT)
def _minus(signs, g):
    """1 if group g is shifted by -1/8 under sign choice ``signs`` (bit 1: even groups, bit 0:
    odd groups; IQ1_S uses 0 or 3, the same shift for all), else 0: its row of VALUES."""
    return (signs >> (1 - g % 2)) & 1


@njit("float32(float32[::1], float32[::1], int8[::1], int64, int64[::1], int8[:, ::1], "
      "int32[::1], uint16[::1], float32, float32[:, ::1])", **_JIT)
def _codes(xb, weight, L, signs, index, grid, kmap, table, scale, values):
    """index = the codebook point of each group of 8 levels L (0..2), the best neighbour for
    one off the codebook; then, if any was, the refitted least-squares scale (else ``scale``)."""
    all_on_grid = True
    for k in range(xb.size // 8):
        u = 0
        for j in range(8):
            u |= np.int64(L[8 * k + j]) << (2 * j)
        index[k] = kmap[u]
        if index[k] < 0:
            all_on_grid = False
            index[k] = _best_neighbour2(table, -index[k] - 1, grid, xb[8 * k:8 * k + 8],
                                        weight[8 * k:8 * k + 8], scale, values[_minus(signs, k)])
    if all_on_grid:
        return scale
    sumqx, sumq2 = F32(0.0), F32(0.0)
    for k in range(xb.size // 8):
        xx = values[_minus(signs, k)]
        for j in range(8):
            w, q = weight[8 * k + j], xx[(grid[index[k], j] - 1) // 2]
            sumqx += w * q * xb[8 * k + j]
            sumq2 += w * q * q
    return sumqx / sumq2 if sumqx > 0 and sumq2 > 0 else scale


@njit("void(float32[::1], float32[::1], boolean, uint8[::1], int8[:, ::1], int32[::1], "
      "uint16[::1], boolean)", **_JIT)
def _iq1_row(x, qw, use_qw, out, grid, kmap, table, is_m):
    # IQ1_S, 50 bytes: 0..1 d | 2..33 grid index bits 0..7 per group of 8 | 34..49 u16 per
    #   sub-block of 32: index bits 8..10 of its 4 groups (3 each) | 3-bit scale << 12 | shift
    #   sign << 15 (set: -1/8).  Needs the importance vector (llama.cpp asserts it).
    # IQ1_M, 56 bytes: 0..31 grid index bits 0..7 per group of 8 | 32..47 per sub-block of 16:
    #   low nibble group 0, high nibble group 1, each index bits 8..10 | shift bit (set: -1/8) |
    #   48..55 4 x u16: 3-bit scales of 4 sub-blocks in bits 0..11, bits 12..15 one nibble of
    #   the f16 d (u16 0 holds its lowest nibble)
    bs, ts = (16, 56) if is_m else (32, 50)
    weight = np.empty(bs, F32)
    idx = np.empty(bs, np.int64)
    p1, p2 = np.zeros((2, bs + 1), F32), np.zeros((2, bs + 1), F32)  # prefix sums
    L = np.zeros(bs, np.int8)
    index = np.zeros(bs // 8, np.int64)
    scales = np.zeros(QK_K // bs, F32)
    signs = np.zeros(QK_K // bs, np.int64)
    found = np.zeros(1, F32)
    values = np.stack((X_P, X_M))  # (2, 3): up, down
    for b in range(x.size // QK_K):
        o = ts * b
        out[o:o + ts] = 0
        xs = x[b * QK_K:(b + 1) * QK_K]
        sigma2 = F32(2.0) * sum_squares(xs) / F32(QK_K)
        max_scale = F32(0.0)
        for ib in range(QK_K // bs):
            xb = xs[ib * bs:(ib + 1) * bs]
            _weights(qw[b * QK_K + ib * bs:], use_qw, xb, sigma2, weight)
            scales[ib], signs[ib] = 0, 0
            mx = np.abs(xb).max()
            if mx < (GROUP_MAX_EPS_IQ1_M if is_m else GROUP_MAX_EPS_IQ1_S):
                continue
            _sort_order(xb, idx)
            found[0] = mx
            if is_m:
                i1, i2, k = _best_split_m(xb, weight, idx, p1, p2, found)
            else:
                i1, i2, k = _best_split_s(xb, weight, idx, p1, p2, found)
            if i1 < 0:
                continue
            scale = found[0]
            for j in range(bs):
                L[idx[j]] = 0 if j < i1 else (1 if j < i2 else 2)
            if scale < 0:
                for j in range(bs):
                    L[j] = 2 - L[j]
                scale, k = -scale, 3 - k
            scale = _codes(xb, weight, L, k, index, grid, kmap, table, scale, values)
            if is_m:
                out[o + 2 * ib], out[o + 2 * ib + 1] = index[0] & 255, index[1] & 255
                out[o + 32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            else:
                h = 0
                for g in range(bs // 8):
                    out[o + 2 + 4 * ib + g] = index[g] & 255
                    h |= (index[g] >> 8) << (3 * g)
                out[o + 34 + 2 * ib], out[o + 35 + 2 * ib] = h & 255, h >> 8
            scales[ib], signs[ib] = scale, k
            max_scale = max(max_scale, scale)
        if max_scale == 0:
            continue
        d = max_scale / F32(15.0)
        idd = F32(1.0) / d
        if not is_m:
            hd = fp32_to_fp16(d * F32(1.125))
            out[o], out[o + 1] = hd & 0xFF, hd >> 8
            for ib in range(QK_K // bs):
                l = max(0, min(7, nearest_int(F32(0.5) * (idd * scales[ib] - F32(1.0)))))
                out[o + 35 + 2 * ib] |= (l | (8 if signs[ib] == 3 else 0)) << 4  # bits 12..15
            continue
        # NOTE: as llama.cpp, IQ1_M refits d over the whole block with the stored codes and
        # 3-bit scales; an empty sub-block takes part with codeword 0 at scale 1
        sc = np.zeros(4, np.int64)
        sqx, sq2 = F32(0.0), F32(0.0)
        for ib in range(QK_K // bs):
            l = max(0, min(7, nearest_int(F32(0.5) * (idd * scales[ib] - F32(1.0)))))
            sc[ib // 4] |= l << (3 * (ib % 4))
            out[o + 32 + ib] |= ((signs[ib] & 1) << 7) | ((signs[ib] >> 1) << 3)
            xb = xs[ib * bs:(ib + 1) * bs]
            _weights(qw[b * QK_K + ib * bs:], use_qw, xb, sigma2, weight)
            for g in range(2):
                xx = values[_minus(signs[ib], g)]
                c = np.int64(out[o + 2 * ib + g]) + ((np.int64(out[o + 32 + ib]) << (8 - 4 * g))
                                                     & 0x700)
                for j in range(8):
                    w, q = weight[8 * g + j], xx[(grid[c, j] - 1) // 2] * F32(2 * l + 1)
                    sqx += w * q * xb[8 * g + j]
                    sq2 += w * q * q
        if sq2 > 0:
            d = sqx / sq2
        hd = fp32_to_fp16(d * F32(1.1125))
        for m in range(4):  # nibble m of d into bits 12..15 of u16 m
            v = sc[m] | (((hd >> (4 * m)) & 0xF) << 12)
            out[o + 48 + 2 * m], out[o + 49 + 2 * m] = v & 255, v >> 8


@njit("void(float32[:, ::1], float32[::1], boolean, uint8[:, ::1], int8[:, ::1], int32[::1], "
      "uint16[::1], boolean)", nogil=True, **_JIT)
def _quantize_rows(x, qw, use_qw, out, grid, kmap, table, is_m):
    for r in range(x.shape[0]):
        _iq1_row(x[r], qw, use_qw, out[r], grid, kmap, table, is_m)


# IQ1_M shares IQ1_S's codebook and neighbour lists
QUANTIZERS = {"IQ1_S": lattice_quantizer("IQ1_S", _quantize_rows, 3, False),
              "IQ1_M": lattice_quantizer("IQ1_M", _quantize_rows, 3, True, codebook="IQ1_S")}
