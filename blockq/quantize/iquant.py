"""Quantizers of the i-quants IQ3_S, IQ3_XXS (codebooks of groups of 4) and IQ2_XXS (groups of
8), byte-exact with llama.cpp.

``quantize_iq3_s`` / ``quantize_iq3_xxs`` in ggml-quants.c (IQ3_XXS's differences are listed
in ``_iq3_row``).  Each group of 4 magnitudes is a point of the 8^4 lattice
of odd values 1..15; only the 512 points of the codebook can be stored.  A point off the
codebook is replaced by the best of its *neighbours*: the codebook points in the three nearest
distance shells around it (``neighbours``, built once as llama.cpp's ``iq3xs_init_impl`` does).
Per sub-block of 32: signs split off, 19 candidate scales tried (each magnitude rounded to the
lattice, mapped to the codebook), the weighted least-squares scale of the best kept and, when a
group was off the codebook, refitted once; the 8 sub-block scales are then stored as 4-bit
odd multiples of ``d = max_scale / 31`` (the f16 ``d`` is stored times 1.033, as llama.cpp
does).  Float32 throughout in the C order, no fma (see :mod:`.symmetric`).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from .. import codebooks
from ..types import QK_K, qtype
from . import split_rows
from .asymmetric import make_qp_quants
from .symmetric import fp32_to_fp16, nearest_int

F32 = np.float32
_JIT = dict(cache=True, error_model="numpy")
KMAX = 8  # lattice values 2l + 1, l = 0..7
BLOCK = 32  # weights per sub-block scale


@functools.cache
def neighbours(name: str = "IQ3_S", nwant: int = 3):
    """(grid int8 (n, group), kmap int32, table uint16) for a codebook of groups of 4 (IQ3_*: 3
    bits per coordinate, 4096 lattice points) or 8 (IQ2_*, IQ1_*: 2 bits, 43692 points, as
    llama.cpp sizes its map): ``kmap[u]`` is the codebook index of lattice point u or
    ``-(offset + 1)``; at ``table[offset]`` the count of its neighbours (the codebook points in
    the ``nwant`` nearest distance shells), then their indices, nearest first (ties by index),
    as llama.cpp's ``iq2xs_init_impl`` / ``iq3xs_init_impl`` list them."""
    # the codebook on the lattice 2l + 1, as llama.cpp's quantizer sees it (IQ3_S stores these
    # values; IQ3_XXS stores 4, 12, ..., 52, 62, IQ2_* 8, 25, 43 and IQ1_* -1, 0, 1 for l = 0,
    # 1, 2...)
    values = codebooks.grid(name)  # (n, group)
    grid = (2 * np.searchsorted(np.unique(values), values) + 1).astype(np.int8)
    n, group = grid.shape
    bits, size = (3, 4096) if group == 4 else (2, 43692)
    shifts = bits * np.arange(group)
    kmap = np.full(size, -1, np.int64)
    kmap[(((grid.astype(np.int64) - 1) // 2) << shifts).sum(axis=1)] = np.arange(n)
    g = grid.astype(np.int32)
    pieces, at = [], 0
    for chunk in np.array_split(np.flatnonzero(kmap < 0), max(1, size // 2048)):
        lat = (2 * ((chunk[:, None] >> shifts) & (2 ** bits - 1)) + 1).astype(np.int32)
        dot = (lat.astype(F32) @ g.T.astype(F32)).astype(np.int32)  # exact: small integers
        d2 = (g * g).sum(1) + (lat * lat).sum(1)[:, None] - 2 * dot  # (chunk, n)
        shell = d2.min(axis=1, keepdims=True)
        for _ in range(nwant - 1):  # the next distance up, per lattice point
            shell = np.where(d2 > shell, d2, np.iinfo(np.int32).max).min(axis=1, keepdims=True)
        rows, cols = np.nonzero(d2 <= shell)  # row-major: codebook index ascending per row
        order = np.lexsort((cols, d2[rows, cols], rows))
        count = np.bincount(rows, minlength=chunk.size)  # (chunk,)
        starts = np.cumsum(count + 1) - (count + 1)  # where each list begins, its count first
        piece = np.empty(int((count + 1).sum()), np.int64)
        is_count = np.zeros(piece.size, np.bool_)
        is_count[starts] = True
        piece[starts] = count
        piece[~is_count] = cols[order]
        kmap[chunk] = -(at + starts + 1)
        pieces.append(piece)
        at += piece.size
    return grid, kmap.astype(np.int32), np.concatenate(pieces).astype(np.uint16)


@njit("int64(uint16[::1], int64, int8[:, ::1], float32[::1], float32[::1], float32, int8[::1])",
      **_JIT)
def _best_neighbour(table, off, grid, xval, weight, scale, L):
    """llama.cpp's iq3/iq2_find_best_neighbour over the neighbour list at ``table[off]``: the
    codebook point minimising sum w (scale q - x)^2 (first on ties); fills L[0..group-1]."""
    best_d2, best = F32(np.inf), -1
    for j in range(1, np.int64(table[off]) + 1):
        g = np.int64(table[off + j])
        d2 = F32(0.0)
        for i in range(grid.shape[1]):
            diff = scale * F32(grid[g, i]) - xval[i]
            d2 += weight[i] * diff * diff
        if d2 < best_d2:
            best_d2, best = d2, g
    for i in range(grid.shape[1]):
        L[i] = (grid[best, i] - 1) // 2
    return best


@njit("float32(float32[::1])", **_JIT)
def sum_squares(xs):
    """sum x^2 in float32, in index order (the sigma2 of llama.cpp's i-quant weights)."""
    s = F32(0.0)
    for i in range(xs.size):
        s += xs[i] * xs[i]
    return s


@njit("void(float32[::1], float32[::1], float32[::1], int64[::1], boolean)", **_JIT)
def _split_signs(xb, weight, xval, signs, parity):
    """xval = |xb| and one sign byte per 8 (bit set: negative).  With ``parity`` (IQ3_XXS,
    IQ2_*: 7-bit codes of even parity) a group with an odd number of negative weights gives
    back the sign of its least important one (smallest w x^2), whose magnitude turns negative;
    the codes keep 7 bits."""
    for k in range(xb.size // 8):
        s, nflip = 0, 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= 0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                s |= 1 << i
                nflip += 1
        if parity and nflip % 2:
            imin = 0
            mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < mn:
                    mn, imin = ax, i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if parity else s


@njit("UniTuple(float32, 2)(float32[::1], float32[::1], int8[::1])", **_JIT)
def _fit(weight, xval, L):
    """(sum w x q, sum w q^2) for lattice levels L (q = 2 L + 1): the least-squares terms."""
    sumqx, sumq2 = F32(0.0), F32(0.0)
    for i in range(L.size):
        w, q = weight[i], F32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit("int64(float32[::1], int8[::1], float32, int64, int64)", **_JIT)
def _round_group(xval, Lg, idd, kmax, bits):
    """Lg = each magnitude of the group rounded to the lattice 2 l + 1 at 1 / ``idd``, clamped to
    0..kmax-1; returns the lattice point's key (``bits`` per coordinate)."""
    u = 0
    for i in range(Lg.size):
        Lg[i] = max(0, min(kmax - 1, nearest_int(F32(0.5) * (idd * xval[i] - F32(1.0)))))
        u |= np.int64(Lg[i]) << (bits * i)
    return u


@njit("float32(float32[::1], float32[::1], float32[::1], int8[::1], int8[::1], boolean[::1], "
      "boolean[::1], int8[:, ::1], int32[::1], uint16[::1], int64, float32, float32, int64, "
      "float32, float32)", **_JIT)
def _try_scales(xval, weight, waux, L, Laux, on_grid, on_grid_aux, grid, kmap, table, kmax,
                top, step, ntry, top_value, scale):
    """The scale search of llama.cpp's i-quant sub-blocks: for itry in -ntry..ntry, round every
    group at scale top_value / (2 kmax - 1 + itry step), replace a point off the codebook by
    its best neighbour, and keep the levels (L, on_grid) of the best least-squares fit.  Returns
    that fit's scale (``scale`` if no try beats a zero fit)."""
    group = grid.shape[1]
    bits = 3 if group == 4 else 2
    best = F32(0.0)
    for itry in range(-ntry, ntry + 1):
        idd = (top + F32(itry) * step) / top_value
        this_scale = F32(1.0) / idd
        for k in range(xval.size // group):
            a, b = group * k, group * (k + 1)
            u = _round_group(xval[a:b], Laux[a:b], idd, kmax, bits)
            on_grid_aux[k] = kmap[u] >= 0
            if kmap[u] < 0:
                _best_neighbour(table, -kmap[u] - 1, grid, xval[a:b], waux[a:b], this_scale,
                                Laux[a:b])
        sumqx, sumq2 = _fit(weight, xval, Laux)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[:] = on_grid_aux
    return scale


@njit("float32(float32[::1], float32[::1], float32[::1], int8[::1], boolean[::1], boolean, "
      "int8[:, ::1], int32[::1], uint16[::1], int64, float32)", **_JIT)
def _refit(xval, weight, waux, L, on_grid, skip_on_grid, grid, kmap, table, kmax, scale):
    """Round the groups again at the found scale (with ``skip_on_grid`` only those that were
    off the codebook), map them to the codebook, and return the least-squares scale of the
    result (``scale`` if that fit is empty)."""
    group = grid.shape[1]
    bits = 3 if group == 4 else 2
    idd = F32(1.0) / scale
    for k in range(xval.size // group):
        if skip_on_grid and on_grid[k]:
            continue
        a, b = group * k, group * (k + 1)
        u = _round_group(xval[a:b], L[a:b], idd, kmax, bits)
        if kmap[u] < 0:
            _best_neighbour(table, -kmap[u] - 1, grid, xval[a:b], waux[a:b], scale, L[a:b])
    sumqx, sumq2 = _fit(weight, xval, L)
    return sumqx / sumq2 if sumq2 > 0 else scale


GROUP_MAX_EPS_IQ3_XXS = F32(1e-8)  # below this largest magnitude an IQ3_XXS sub-block is 0


@njit("void(float32[::1], float32[::1], boolean, uint8[::1], int8[:, ::1], int32[::1], "
      "uint16[::1], boolean)", **_JIT)
def _iq3_row(x, qw, use_qw, out, grid, kmap, table, xxs):
    # IQ3_S, 110 bytes: 0..1 d | 2..65 qs | 66..73 qh | 74..105 signs | 106..109 scales
    # IQ3_XXS, 98 bytes: 0..1 d | 2..65 qs | 66..97 per sub-block: 4 x 7-bit signs, scale << 28
    # NOTE: IQ3_XXS differs from IQ3_S (as in llama.cpp): even sign parity per 8 (the least
    # important weight of an odd group keeps its sign and gets a negative magnitude), a 1e-8
    # threshold for empty sub-blocks, 31 candidate scales, refits of off-grid groups only,
    # 4-bit scales per 32 and the d fudge factor 1.0125 instead of 1.033.
    ts = 98 if xxs else 110
    weight = np.empty(BLOCK, F32)
    waux = np.empty(BLOCK, F32)
    xval = np.empty(BLOCK, F32)
    L = np.zeros(BLOCK, np.int8)
    Laux = np.zeros(BLOCK, np.int8)
    on_grid = np.zeros(BLOCK // 4, np.bool_)
    on_grid_aux = np.zeros(BLOCK // 4, np.bool_)
    signs = np.zeros(BLOCK // 8, np.int64)
    scales = np.zeros(QK_K // BLOCK, F32)
    for b in range(x.size // QK_K):
        o = ts * b
        out[o:o + ts] = 0
        xs = x[b * QK_K:(b + 1) * QK_K]
        sumx2 = sum_squares(xs)
        sigma2 = F32(2.0) * sumx2 / F32(QK_K)
        qs_at, signs_at = o + 2, o + 74
        max_scale = F32(0.0)
        for ib in range(QK_K // BLOCK):
            xb = xs[ib * BLOCK:(ib + 1) * BLOCK]
            for i in range(BLOCK):
                weight[i] = (qw[b * QK_K + ib * BLOCK + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                             if use_qw else xb[i] * xb[i])
                waux[i] = np.sqrt(weight[i])
            _split_signs(xb, weight, xval, signs, xxs)
            mx = xval[0]
            for i in range(1, BLOCK):
                mx = max(mx, xval[i])
            L[:] = 0
            if (mx < GROUP_MAX_EPS_IQ3_XXS) if xxs else (mx == 0):
                # NOTE: as llama.cpp, an all-zero IQ3_S sub-block does not advance the qs /
                # signs write positions, so the next sub-block's groups land in its place
                scales[ib] = 0
                continue
            on_grid[:] = xxs
            scale = _try_scales(xval, weight, waux, L, Laux, on_grid, on_grid_aux, grid, kmap,
                                table, KMAX, F32(2 * KMAX - 1), F32(0.2), 15 if xxs else 9, mx,
                                mx / F32(2 * KMAX - 1))
            if not on_grid.all() and scale > 0:
                scale = _refit(xval, weight, waux, L, on_grid, xxs, grid, kmap, table, KMAX,
                               scale)
            if scale < 0:  # llama.cpp's guard; a positive-magnitude fit never gets here
                scale = -scale
                for k in range(BLOCK // 8):
                    signs[k] = ~signs[k] & (127 if xxs else 255)
            for k in range(BLOCK // 4):
                u = 0
                for i in range(4):
                    u |= np.int64(L[4 * k + i]) << (3 * i)
                g = np.int64(kmap[u])
                if xxs:
                    out[o + 2 + 8 * ib + k] = g
                    continue
                out[qs_at + k] = g & 255
                j = ib * (BLOCK // 4) + k
                out[o + 66 + j // 8] |= (g >> 8) << (j % 8)
            if xxs:
                packed = (np.int64(signs[0]) | (np.int64(signs[1]) << 7)
                          | (np.int64(signs[2]) << 14) | (np.int64(signs[3]) << 21))
                for m in range(4):
                    out[o + 66 + 4 * ib + m] = (packed >> (8 * m)) & 255
            else:
                qs_at += BLOCK // 4
                for k in range(BLOCK // 8):
                    out[signs_at + k] = signs[k]
                signs_at += BLOCK // 8
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == 0:
            out[o:o + ts] = 0
            continue
        d = max_scale / F32(31.0)
        h = fp32_to_fp16(d * (F32(1.0125) if xxs else F32(1.033)))
        out[o], out[o + 1] = h & 0xFF, h >> 8
        idd = F32(1.0) / d
        for ib in range(QK_K // BLOCK):
            l = max(0, min(15, nearest_int(F32(0.5) * (idd * scales[ib] - F32(1.0)))))
            if xxs:
                out[o + 66 + 4 * ib + 3] |= l << 4  # bits 28..31 of the sub-block's u32
            elif ib % 2 == 0:
                out[o + 106 + ib // 2] = l
            else:
                out[o + 106 + ib // 2] |= l << 4


GROUP_MAX_EPS = F32(1e-15)


@njit("void(float32[::1], float32[::1], uint8[::1], int8[:, ::1], int32[::1], uint16[::1])",
      **_JIT)
def _iq2_xxs_row(x, qw, out, grid, kmap, table):
    # block, 66 bytes: 0..1 d | per sub-block s, at 2 + 8s: u32 of 4 grid indices, u32 of 4 x
    # 7-bit sign codes | 4-bit scale << 28.  Needs the importance vector (llama.cpp asserts it).
    kmaxq = 3
    weight = np.empty(BLOCK, F32)
    waux = np.empty(BLOCK, F32)
    xval = np.empty(BLOCK, F32)
    L = np.zeros(BLOCK, np.uint8)
    Laux = np.zeros(BLOCK, np.int8)
    Lg = np.zeros(BLOCK, np.int8)
    on_grid = np.zeros(BLOCK // 8, np.bool_)
    on_grid_aux = np.zeros(BLOCK // 8, np.bool_)
    signs = np.zeros(4, np.int64)
    scales = np.zeros(QK_K // BLOCK, F32)
    for b in range(x.size // QK_K):
        o = 66 * b
        out[o:o + 66] = 0
        xs = x[b * QK_K:(b + 1) * QK_K]
        sumx2 = sum_squares(xs)
        sigma2 = sumx2 / F32(QK_K)
        max_scale = F32(0.0)
        for ib in range(QK_K // BLOCK):
            xb = xs[ib * BLOCK:(ib + 1) * BLOCK]
            for i in range(BLOCK):
                weight[i] = qw[b * QK_K + ib * BLOCK + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                waux[i] = np.sqrt(weight[i])
            _split_signs(xb, weight, xval, signs, True)
            mx = xval[0]
            for i in range(1, BLOCK):
                mx = max(mx, xval[i])
            if mx < GROUP_MAX_EPS:
                scales[ib] = 0
                continue
            scale = make_qp_quants(kmaxq + 1, xval, L, weight)
            eff_max = scale * F32(kmaxq)
            if eff_max <= 0:
                scales[ib] = 0
                continue
            for i in range(BLOCK):
                Lg[i] = np.int8(L[i])
            scale = _try_scales(xval, weight, waux, Lg, Laux, on_grid, on_grid_aux, grid, kmap,
                                table, kmaxq, F32(2 * kmaxq - 1), F32(0.1), 6, eff_max, scale)
            if scale > 0:
                scale = _refit(xval, weight, waux, Lg, on_grid, False, grid, kmap, table, kmaxq,
                               scale)
            if scale < 0:  # llama.cpp's guard
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            packed = 0
            for k in range(4):
                u = 0
                for i in range(8):
                    u |= np.int64(Lg[8 * k + i]) << (2 * i)
                out[o + 2 + 8 * ib + k] = kmap[u]
                packed |= signs[k] << (7 * k)
            for m in range(4):
                out[o + 6 + 8 * ib + m] = (packed >> (8 * m)) & 255
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == 0:
            out[o:o + 66] = 0
            continue
        d = max_scale / F32(31.0)
        h = fp32_to_fp16(d)
        out[o], out[o + 1] = h & 0xFF, h >> 8
        idd = F32(1.0) / d
        for ib in range(QK_K // BLOCK):
            l = max(0, min(15, nearest_int(F32(0.5) * (idd * scales[ib] - F32(1.0)))))
            out[o + 9 + 8 * ib] |= l << 4  # bits 28..31 of the sub-block's sign word


@njit("void(float32[:, ::1], float32[::1], uint8[:, ::1], int8[:, ::1], int32[::1], uint16[::1])",
      nogil=True, **_JIT)
def _quantize_rows_iq2_xxs(x, qw, out, grid, kmap, table):
    for r in range(x.shape[0]):
        _iq2_xxs_row(x[r], qw, out[r], grid, kmap, table)


def quantize_iq2_xxs(x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
    """Fill ``out`` (rows, row_bytes) with IQ2_XXS blocks of ``x``; ``imatrix`` is required
    (``quantize`` refuses None for a type that ``needs_imatrix``)."""
    grid, kmap, table = neighbours("IQ2_XXS", 2)
    split_rows(lambda xs, os: _quantize_rows_iq2_xxs(xs, imatrix, os, grid, kmap, table), x,
               out, 1 << 14)


GROUP_MAX_EPS_IQ2_S = F32(1e-8)
SUB = 16  # IQ2_XS, IQ2_S: weights per sub-block scale (two groups of 8)


@njit("void(float32[::1], float32[::1], boolean, uint8[::1], int8[:, ::1], int32[::1], "
      "uint16[::1], boolean)", **_JIT)
def _iq2_xs_s_row(x, qw, use_qw, out, grid, kmap, table, is_s):
    # IQ2_XS, 74 bytes: 0..1 d | 2..65 u16 per group of 8: grid index (9 bits) | 7-bit signs
    #   << 9 | 66..73 4-bit scales per 16
    # IQ2_S, 82 bytes: 0..1 d | 2..33 grid index low 8 bits | 34..65 8-bit signs per group |
    #   66..73 index bits 8..9, 2 per group | 74..81 4-bit scales per 16
    # NOTE: IQ2_S differs from IQ2_XS (as in llama.cpp): sigma2 = 2 sum x^2 / 256, a weight
    # 0.25 sigma2 + x^2 without importance vectors, explicit signs (no parity), a 1e-8 threshold
    # for empty sub-blocks, neighbours from the nearest shell only, the d fudge factor 0.9875,
    # and an all-zero block keeps the codes written before its scales were found zero.
    kmaxq = 3
    ts = 82 if is_s else 74
    weight = np.empty(SUB, F32)
    waux = np.empty(SUB, F32)
    xval = np.empty(SUB, F32)
    L = np.zeros(SUB, np.int8)
    Laux = np.zeros(SUB, np.int8)
    on_grid = np.zeros(2, np.bool_)
    on_grid_aux = np.zeros(2, np.bool_)
    signs = np.zeros(2, np.int64)
    scales = np.zeros(QK_K // SUB, F32)
    for b in range(x.size // QK_K):
        o = ts * b
        out[o:o + ts] = 0
        xs = x[b * QK_K:(b + 1) * QK_K]
        sumx2 = sum_squares(xs)
        sigma2 = (F32(2.0) * sumx2 if is_s else sumx2) / F32(QK_K)
        max_scale = F32(0.0)
        for ib in range(QK_K // SUB):
            xb = xs[ib * SUB:(ib + 1) * SUB]
            for i in range(SUB):
                weight[i] = (qw[b * QK_K + ib * SUB + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                             if use_qw else F32(0.25) * sigma2 + xb[i] * xb[i])
                waux[i] = np.sqrt(weight[i])
            _split_signs(xb, weight, xval, signs, not is_s)
            mx = xval[0]
            for i in range(1, SUB):
                mx = max(mx, xval[i])
            L[:] = 0
            if mx < (GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS):
                scales[ib] = 0
                continue
            on_grid[:] = True
            scale = _try_scales(xval, weight, waux, L, Laux, on_grid, on_grid_aux, grid, kmap,
                                table, kmaxq, F32(2 * kmaxq - 1), F32(0.1), 9, mx,
                                mx / F32(2 * kmaxq - 1))
            if not on_grid.all() and scale > 0:
                scale = _refit(xval, weight, waux, L, on_grid, True, grid, kmap, table, kmaxq,
                               scale)
            if scale < 0:  # llama.cpp's guard
                scale = -scale
                for k in range(2):
                    signs[k] = ~signs[k] & (255 if is_s else 127)
            for k in range(2):
                u = 0
                for i in range(8):
                    u |= np.int64(L[8 * k + i]) << (2 * i)
                g = np.int64(kmap[u])
                j = 2 * ib + k
                if is_s:
                    out[o + 2 + j] = g & 255
                    out[o + 66 + j // 4] |= (g >> 8) << (2 * (j % 4))
                    out[o + 34 + j] = signs[k]
                else:
                    v = g | (signs[k] << 9)
                    out[o + 2 + 2 * j], out[o + 3 + 2 * j] = v & 255, v >> 8
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == 0:
            if not is_s:
                out[o + 2:o + 66] = 0
            continue
        d = max_scale / F32(31.0)
        h = fp32_to_fp16(d * F32(0.9875) if is_s else d)
        out[o], out[o + 1] = h & 0xFF, h >> 8
        idd = F32(1.0) / d
        sc = o + (74 if is_s else 66)
        for ib in range(QK_K // SUB):
            l = max(0, min(15, nearest_int(F32(0.5) * (idd * scales[ib] - F32(1.0)))))
            if ib % 2 == 0:
                out[sc + ib // 2] = l
            else:
                out[sc + ib // 2] |= l << 4


@njit("void(float32[:, ::1], float32[::1], boolean, uint8[:, ::1], int8[:, ::1], int32[::1], "
      "uint16[::1], boolean)", nogil=True, **_JIT)
def _quantize_rows_iq2_xs_s(x, qw, use_qw, out, grid, kmap, table, is_s):
    for r in range(x.shape[0]):
        _iq2_xs_s_row(x[r], qw, use_qw, out[r], grid, kmap, table, is_s)


@njit("void(float32[:, ::1], float32[::1], boolean, uint8[:, ::1], int8[:, ::1], int32[::1], "
      "uint16[::1], boolean)", nogil=True, **_JIT)
def _quantize_rows(x, qw, use_qw, out, grid, kmap, table, xxs):
    for r in range(x.shape[0]):
        _iq3_row(x[r], qw, use_qw, out[r], grid, kmap, table, xxs)


def lattice_quantizer(name: str, rows, nwant: int, flag: bool, codebook: str | None = None):
    """The row quantizer ``fn(x, imatrix, out)`` of type ``name`` over the row kernel ``rows(x,
    qw, use_qw, out, grid, kmap, table, flag)``, with the neighbour tables of ``codebook``
    (default: the type's own) at ``nwant`` shells."""
    needs = qtype(name).needs_imatrix

    def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
        grid, kmap, table = neighbours(codebook or name, nwant)
        use_qw = imatrix is not None
        qw = imatrix if use_qw else np.zeros(x.shape[1], F32)
        split_rows(lambda xs, os: rows(xs, qw, use_qw, os, grid, kmap, table, flag), x, out,
                   1 << 14)

    quantize_rows.__name__ = quantize_rows.__qualname__ = f"quantize_{name.lower()}"
    quantize_rows.__doc__ = (f"Fill ``out`` (rows, row_bytes) with {name} blocks of ``x``"
                             + ("; ``imatrix`` is required." if needs else "."))
    return quantize_rows


# NOTE: llama.cpp's neighbour lists keep 2 distance shells for the 256-point IQ3_XXS codebook,
# 3 for the 512-point IQ3_S one; 2 for IQ2_XXS's 256 and IQ2_XS's 512 points, 1 for IQ2_S's 1024
QUANTIZERS = {"IQ3_XXS": lattice_quantizer("IQ3_XXS", _quantize_rows, 2, True),
              "IQ3_S": lattice_quantizer("IQ3_S", _quantize_rows, 3, False),
              "IQ2_XXS": quantize_iq2_xxs,
              "IQ2_XS": lattice_quantizer("IQ2_XS", _quantize_rows_iq2_xs_s, 2, False),
              "IQ2_S": lattice_quantizer("IQ2_S", _quantize_rows_iq2_xs_s, 1, True)}
