"""Scale-and-min quantizers (w = d * q - m): Q4_1, Q5_1 (blocks of 32), Q2_K, Q4_K, Q5_K (256).

Byte-compatible with llama.cpp's ``ggml-quants.c``:

- without an importance vector llama.cpp uses the ``quantize_row_*_ref`` routines: Q4_1/Q5_1
  take the block's min and max; the k-quants search each sub-block's (scale, min) with
  :func:`make_qkx2_quants`, then quantize the sub-block scales and mins linearly against the
  largest of them;
- with one it uses ``quantize_row_*_impl``: errors are weighted by ``imatrix[col] *
  sqrt(sigma2 + x**2)``, the search is :func:`make_qkx3_quants`, and the k-quants pick the
  sub-block scales and mins with :func:`make_qp_quants`, weighted by each sub-block's weight sum.

Writing rules kept on purpose (they decide the bytes):
- every float is a float32 and every operation is done in the C expression's order (no fma, no
  reassociation: numba without ``fastmath``); each lane of a batched loop accumulates in the
  C's order;
- an int entering float arithmetic is converted with ``F()`` first, as C converts it to
  ``float`` (numba would otherwise promote float32 * int64 to float64);
- ``nearest_int`` rounds half to even like ggml's magic-number trick; f16 is IEEE
  round-to-nearest-even (both shared with :mod:`blockq.quantize.symmetric`).

The algorithm of every type is described in words in ``formats/<TYPE>.md`` ("## Quantize").
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..types import QK, QK_K
from . import split_rows
from .symmetric import put_f16  # (y, off, f): store f as f16 at y[off:off+2], return its value
from .symmetric import nearest_int

F = np.float32
_JIT = dict(cache=True, error_model="numpy")  # IEEE division: masked lanes may divide by 0

_I0 = np.int32(0)
_CHUNK = 4096  # weights per batch of sub-blocks searched together (a few tens of KiB of scratch)


@njit("void(f4[::1], int64, f4[:, ::1])", **_JIT)
def _transpose_in(x, n, X):
    """X[i, j] = x[j * n + i]: sub-blocks of ``n`` weights of the 1-D ``x`` as lanes."""
    for j in range(X.shape[1]):
        for i in range(n):
            X[i, j] = x[j * n + i]


# ---------------------------------------------------------------- search routines
#
# The (scale, min) search runs on many sub-blocks at once, one sub-block per lane: X, W and L
# are (n, lanes) with X[i, j] = weight i of sub-block j.  Every lane follows ggml's scalar loop
# exactly (its sums accumulate in the same order); the lanes only let the compiler use SIMD.


_WS_ROWS = 18  # per-lane scratch rows of make_qkx2_quants


@njit("void(int64, f4[:, ::1], f4[:, ::1], f4[:, ::1], f4[:, ::1], f4[:, ::1], f4, f4, int64, "
      "boolean)", **_JIT)
def make_qkx2_quants(nmax, X, W, L, Laux, ws, rmin, rdelta, nstep, use_mad):
    """Search each lane's (scale, min) so that x ~ scale * L + min, L in 0..nmax, min <= 0.

    Per lane (sub-block): start from the grid through min(x) (clipped to <= 0) and max(x), then
    try ``nstep + 1`` grids ``iscale = (nmax + rmin + rdelta * is) / (max - min)`` measured from
    the current best min; for each, fit scale and min by weighted least squares on the rounded
    levels (min forced to 0 if it comes out positive) and keep it if its weighted error
    (squared, or absolute with ``use_mad``) is lower.

    X, W: (n, lanes) float32 weights and their error weights.  Fills L (n, lanes) float32 with the
    levels, ``ws[0]`` with the scales and ``ws[1]`` with -min (>= 0, stored as a positive offset).
    Laux (n, lanes) and ``ws[2:_WS_ROWS]`` are scratch.
    """
    n, nl = X.shape
    scale, the_min, mn, mx, sum_w, sum_x = ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]
    iscale, best, sum_l, sum_l2, sum_xl = ws[6], ws[7], ws[8], ws[9], ws[10]
    t_scale, t_min, err, ok, live = ws[11], ws[12], ws[13], ws[14], ws[15]
    # the best levels are round(best_iscale * (x - best_from)), recomputed once at the end
    best_iscale, best_from = ws[16], ws[17]
    fmax = F(nmax)
    imax = np.int32(nmax)  # NOTE: int32 levels: int64 -> float does not vectorize on AVX2
    for j in range(nl):
        mn[j] = X[0, j]
        mx[j] = X[0, j]
        sum_w[j] = W[0, j]
        sum_x[j] = W[0, j] * X[0, j]
    for i in range(1, n):
        for j in range(nl):
            xv = X[i, j]
            mn[j] = xv if xv < mn[j] else mn[j]
            mx[j] = xv if xv > mx[j] else mx[j]
            sum_w[j] += W[i, j]
            sum_x[j] += W[i, j] * xv
    for j in range(nl):
        mn[j] = F(0) if mn[j] > F(0) else mn[j]
        live[j] = F(1) if mx[j] > mn[j] else F(0)  # max == min: all levels 0, scale 0
        iscale[j] = fmax / (mx[j] - mn[j])
        scale[j] = F(1) / iscale[j]
        best[j] = F(0)
        best_iscale[j] = iscale[j]
        best_from[j] = mn[j]
    for i in range(n):
        for j in range(nl):
            fl = F(max(_I0, min(imax, np.int32(nearest_int(iscale[j] * (X[i, j] - mn[j]))))))
            diff = scale[j] * fl + mn[j] - X[i, j]
            best[j] += W[i, j] * (abs(diff) if use_mad else diff * diff)
    for is_ in range(nstep + 1 if nstep >= 1 else 0):
        step = rmin + rdelta * F(is_) + fmax
        for j in range(nl):
            # NOTE: measured from the best min so far, as ggml does (it reuses the variable)
            iscale[j] = step / (mx[j] - mn[j])
            sum_l[j] = F(0)
            sum_l2[j] = F(0)
            sum_xl[j] = F(0)
            err[j] = F(0)
        for i in range(n):
            for j in range(nl):
                xv = X[i, j]
                fl = F(max(_I0, min(imax, np.int32(nearest_int(iscale[j] * (xv - mn[j]))))))
                Laux[i, j] = fl
                wl = W[i, j] * fl
                sum_l[j] += wl
                sum_l2[j] += wl * fl
                sum_xl[j] += wl * xv
        for j in range(nl):
            D = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
            a = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / D
            b = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / D
            t_scale[j] = sum_xl[j] / sum_l2[j] if b > F(0) else a
            t_min[j] = F(0) if b > F(0) else b
            ok[j] = F(1) if (D > F(0)) & (live[j] != F(0)) else F(0)
        for i in range(n):
            for j in range(nl):
                diff = t_scale[j] * Laux[i, j] + t_min[j] - X[i, j]
                err[j] += W[i, j] * (abs(diff) if use_mad else diff * diff)
        for j in range(nl):
            if (ok[j] != F(0)) & (err[j] < best[j]):
                best[j] = err[j]
                scale[j] = t_scale[j]
                best_iscale[j] = iscale[j]
                best_from[j] = mn[j]
                mn[j] = t_min[j]
    for i in range(n):
        for j in range(nl):
            v = best_iscale[j] * (X[i, j] - best_from[j])
            fl = F(max(_I0, min(imax, np.int32(nearest_int(v)))))
            L[i, j] = fl if live[j] != F(0) else F(0)
    for j in range(nl):
        scale[j] = scale[j] if live[j] != F(0) else F(0)
        the_min[j] = -mn[j]


# NOTE: ggml's make_qkx3_quants differs from make_qkx2_quants only when called without weights
# (it then weights by x**2); every caller passes weights, so it is the same search.  The two
# paths differ in their parameters: the importance path runs rmin=-0.9, rdelta=0.05, nstep=36.
make_qkx3_quants = make_qkx2_quants


@njit("f4(int64, f4[::1], u1[::1], f4[::1])", **_JIT)
def make_qp_quants(nmax, x, L, quant_weights):
    """Quantize non-negative ``x`` (sub-block scales or mins) to L in 0..nmax, x ~ scale * L.

    Tries ``iscale = (nmax + 0.1 * is) / max(x)`` for is in -4..4 (weighted squared error),
    then refines single levels for up to 5 passes while sum(w x L)^2 / sum(w L^2) grows, and
    returns the least-squares scale sum(w x L) / sum(w L^2).  Fills ``L``.
    """
    n = x.shape[0]
    mx = F(0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx < F(1e-15):  # GROUP_MAX_EPS: all zero
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(nmax) / mx
    for i in range(n):
        # NOTE: stored unclipped into uint8 like ggml (a negative level wraps)
        L[i] = np.uint8(nearest_int(iscale * x[i]) & 0xFF)
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += quant_weights[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + F(nmax)) / mx
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = np.uint8(l & 0xFF)
        w = quant_weights[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            li = F(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > F(0) and sl2 > F(0):
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != np.int32(L[i]):
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = np.uint8(new_l & 0xFF)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F(0) else F(0)


# ---------------------------------------------------------------- 6-bit scale packing (Q4_K, Q5_K)
#
# 8 sub-block scales ls[j] and mins lm[j], 6 bits each, in 12 bytes q[0..11]:
#
#   q[j]     (j < 4) = ls[j] low 6 bits | ls[j+4] bits 4-5 in bits 6-7
#   q[j + 4] (j < 4) = lm[j] low 6 bits | lm[j+4] bits 4-5 in bits 6-7
#   q[j + 8] (j < 4) = ls[j+4] bits 0-3 | lm[j+4] bits 0-3 << 4


@njit("void(u1[::1], u1[::1], u1[::1])", **_JIT)
def pack_scale_min_k4(ls, lm, q):
    """Pack 8 six-bit scales ``ls`` and mins ``lm`` (uint8) into the 12 bytes ``q``."""
    for j in range(8):
        s = np.uint8(ls[j])
        m = np.uint8(lm[j])
        if j < 4:
            q[j] = s
            q[j + 4] = m
        else:
            q[j + 4] = np.uint8((s & 0xF) | ((m & 0xF) << 4))
            q[j - 4] |= np.uint8((s >> 4) << 6)
            q[j] |= np.uint8((m >> 4) << 6)


@njit("UniTuple(int32, 2)(int64, u1[::1])", **_JIT)
def get_scale_min_k4(j, q):
    """Scale and min (0..63) of sub-block ``j`` from the 12 packed bytes ``q``."""
    if j < 4:
        return np.int32(q[j] & 63), np.int32(q[j + 4] & 63)
    return (np.int32((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)),
            np.int32((q[j + 4] >> 4) | ((q[j] >> 6) << 4)))


# ---------------------------------------------------------------- error weights per lane
#
# The kernels see the rows as one run of blocks (a row is whole blocks, and so are its bytes):
# weight k of the matrix is x[k], in column k % cols.  They search _CHUNK weights at a time.


@njit("f4[::1](f4[::1], int64, f4)", **_JIT)
def _sigma2(x, group, factor):
    """factor * mean(x**2) over each run of ``group`` weights (ggml sums in order)."""
    out = np.empty(x.shape[0] // group, np.float32)
    for g in range(out.shape[0]):
        s = F(0)
        for k in range(g * group, (g + 1) * group):
            s += x[k] * x[k]
        out[g] = factor * s / F(group)
    return out


@njit("void(f4[:, ::1], f4[::1], int64, int64, f4[::1], int64, f4[:, ::1])", **_JIT)
def _importance_weights(X, w, k0, cols, sigma2, group, W):
    """W = imatrix[col] * sqrt(sigma2 + x**2) for lanes starting at weight ``k0`` (the _impl
    routines' error weights; sigma2 is per run of ``group`` weights)."""
    n, nl = X.shape
    for j in range(nl):
        k = k0 + j * n
        s2 = sigma2[k // group]
        c = k % cols
        for i in range(n):
            W[i, j] = w[c + i] * np.sqrt(s2 + X[i, j] * X[i, j])


@njit("void(f4[:, ::1], int64, int64, u1[::1], f4[:, ::1], f4[::1])", **_JIT)
def _take_block(Lt, lane0, n_sub, Lb, W, sw):
    """Levels of the ``n_sub`` sub-blocks (lanes ``lane0``...) of one super-block into ``Lb``
    (weight order) and, per sub-block, the sum of its error weights into ``sw``."""
    n = Lt.shape[0]
    for j in range(n_sub):
        t = F(0)
        for i in range(n):
            Lb[n * j + i] = np.uint8(Lt[i, lane0 + j])
            t += W[i, lane0 + j]
        sw[j] = t


@njit("UniTuple(f4[:, ::1], 5)(f4[::1], int64, int64)", **_JIT)
def _lane_buffers(buf, n, nl):
    """X, W, L, Laux (n, nl) and ws (_WS_ROWS, nl) as C-contiguous views of one scratch buffer."""
    m = n * nl
    return (buf[:m].reshape((n, nl)), buf[m:2 * m].reshape((n, nl)),
            buf[2 * m:3 * m].reshape((n, nl)), buf[3 * m:4 * m].reshape((n, nl)),
            buf[4 * m:4 * m + _WS_ROWS * nl].reshape((_WS_ROWS, nl)))


# ---------------------------------------------------------------- Q4_1, Q5_1 (32 weights)
#
# Q4_1 block, 20 bytes:  0..1 d (f16) | 2..3 m (f16) | 4..19 qs: byte j = q[j] | q[j+16] << 4
# Q5_1 block, 24 bytes:  0..1 d | 2..3 m | 4..7 qh (u32 LE, bit j = bit 4 of q[j]) | 8..23 qs
#                        (low 4 bits, as Q4_1)
# w = d * q + m  (m is the block's min, usually negative)


@njit("void(u1[::1], f4, f4, u1[::1], int64)", **_JIT)
def _put_q4_1_q5_1(L, d, m, y, nbits):  # L (32,) levels, y (20 or 24,) the block's bytes
    put_f16(y, 0, d)
    put_f16(y, 2, m)
    qs = 4
    if nbits == 5:
        qh = 0
        for j in range(QK):
            qh |= (np.int64(L[j]) >> 4) << j
        for k in range(4):
            y[4 + k] = (qh >> (8 * k)) & 0xFF
        qs = 8
    for j in range(QK // 2):
        y[qs + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)


@njit("void(f4[:, ::1], f4[::1], boolean, u1[:, ::1], int64)", nogil=True, **_JIT)
def _quantize_q4_1_q5_1(xs, w, has_w, out, nbits):  # (rows, cols), (cols,), (rows, row_bytes)
    cols = xs.shape[1]
    x = xs.reshape(xs.size)  # (rows * cols,)
    y = out.reshape(out.size)  # (n_blocks * bs,)
    nmax = (1 << nbits) - 1
    bs = 20 if nbits == 4 else 24
    nb = x.shape[0] // QK
    L = np.empty(QK, np.uint8)
    if not has_w:  # quantize_row_q4_1_ref / q5_1_ref: the block's min and max
        for ib in range(nb):
            xb = x[ib * QK:(ib + 1) * QK]
            lo = F(3.4028234663852886e38)  # FLT_MAX
            hi = -lo
            for j in range(QK):
                lo = xb[j] if xb[j] < lo else lo
                hi = xb[j] if xb[j] > hi else hi
            d = (hi - lo) / F(nmax)
            idl = F(1) / d if d != F(0) else F(0)
            for j in range(QK):
                # NOTE: truncation of v + 0.5 (round half up), not nearest_int, as ggml does
                L[j] = min(nmax, np.int32((xb[j] - lo) * idl + F(0.5)))
            _put_q4_1_q5_1(L, d, lo, y[ib * bs:(ib + 1) * bs], nbits)
        return
    # quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants per block, sigma2 over the row
    sigma2 = _sigma2(x, cols, F(1))
    lanes = _CHUNK // QK
    buf = np.empty((4 * QK + _WS_ROWS) * lanes, np.float32)
    for b0 in range(0, nb, lanes):
        nl = min(lanes, nb - b0)
        X, W, Lt, Laux, ws = _lane_buffers(buf, QK, nl)
        _transpose_in(x[b0 * QK:], QK, X)
        _importance_weights(X, w, b0 * QK, cols, sigma2, cols, W)
        make_qkx3_quants(nmax, X, W, Lt, Laux, ws, F(-0.9), F(0.05), 36, False)
        for j in range(nl):
            for i in range(QK):
                L[i] = np.uint8(Lt[i, j])
            ib = b0 + j
            _put_q4_1_q5_1(L, ws[0, j], -ws[1, j], y[ib * bs:(ib + 1) * bs], nbits)


# ---------------------------------------------------------------- Q2_K (256 = 16 x 16 weights)
#
# Q2_K block, 84 bytes: 0..15 scales: byte j = scale[j] (4 bits) | min[j] << 4 |
#   16..79 qs: for each half h (128 weights) byte 16 + 32h + l holds q[128h + 32s + l] in bits
#   2s..2s+1 (s = 0..3) | 80..81 d (f16) | 82..83 dmin (f16)
# w = d * scale[j] * q - dmin * min[j]


@njit("void(f4[::1], u1[::1], u1[::1], f4[::1], f4[::1], f4[::1], boolean)", **_JIT)
def _finish_q2_k(xb, Lb, y, scales, mins, sw, has_w):
    """One super-block from its searched sub-blocks: xb (256,) weights, Lb (256,) levels,
    scales/mins/sw (16,), y (84,) the block's bytes."""
    sc = y[0:16]
    Ls = np.empty(16, np.uint8)
    Lm = np.empty(16, np.uint8)
    if has_w:  # quantize_row_q2_K_impl: weighted 4-bit fit of the scales and of the mins
        dm = put_f16(y, 80, make_qp_quants(15, scales, Ls, sw))
        mm = put_f16(y, 82, make_qp_quants(15, mins, Lm, sw))
        for j in range(16):
            sc[j] = Ls[j] | (Lm[j] << 4)
    else:  # quantize_row_q2_K_ref: 4 bits against the largest
        max_scale = F(0)
        max_min = F(0)
        for j in range(16):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        for j in range(16):
            sc[j] = 0
        dm = put_f16(y, 80, F(0))
        mm = put_f16(y, 82, F(0))
        if max_scale > F(0):
            iscale = F(15) / max_scale
            for j in range(16):
                sc[j] = nearest_int(iscale * scales[j]) & 0xFF  # NOTE: wraps like ggml's uint8
            dm = put_f16(y, 80, max_scale / F(15))
        if max_min > F(0):
            iscale = F(15) / max_min
            for j in range(16):
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
            mm = put_f16(y, 82, max_min / F(15))
    # requantize against the stored (f16, 4-bit) scales and mins
    for j in range(16):
        d = dm * F(sc[j] & 0xF)
        if d == F(0):
            continue  # keep the search's levels
        m = mm * F(sc[j] >> 4)
        for i in range(16):
            Lb[16 * j + i] = max(0, min(3, nearest_int((xb[16 * j + i] + m) / d)))
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            y[16 + 32 * h + l] = Lb[b] | (Lb[b + 32] << 2) | (Lb[b + 64] << 4) | (Lb[b + 96] << 6)


@njit("void(f4[:, ::1], f4[::1], boolean, u1[:, ::1])", nogil=True, **_JIT)
def _quantize_q2_k(xs, w, has_w, out):  # (rows, cols), (cols,), (rows, row_bytes)
    cols = xs.shape[1]
    x = xs.reshape(xs.size)  # (rows * cols,)
    y = out.reshape(out.size)  # (n_super_blocks * 84,)
    nsb = x.shape[0] // QK_K
    # (rmin, rdelta, nstep, use_mad): make_qkx3_quants with weights, else make_qkx2_quants
    if has_w:
        rmin, rdelta, nstep, use_mad = F(-0.9), F(0.05), 36, False
        sigma2 = _sigma2(x, QK_K, F(1))
    else:
        rmin, rdelta, nstep, use_mad = F(-0.5), F(0.1), 15, True
        sigma2 = np.empty(0, np.float32)
    Lb = np.empty(QK_K, np.uint8)
    sw = np.empty(16, np.float32)
    per = _CHUNK // QK_K
    buf = np.empty((4 * 16 + _WS_ROWS) * 16 * per, np.float32)
    for s0 in range(0, nsb, per):
        ns = min(per, nsb - s0)
        X, W, Lt, Laux, ws = _lane_buffers(buf, 16, 16 * ns)
        _transpose_in(x[s0 * QK_K:], 16, X)
        if has_w:
            _importance_weights(X, w, s0 * QK_K, cols, sigma2, QK_K, W)
        else:
            for i in range(16):
                for j in range(16 * ns):
                    W[i, j] = abs(X[i, j])
        make_qkx2_quants(3, X, W, Lt, Laux, ws, rmin, rdelta, nstep, use_mad)
        for s in range(ns):
            b = s0 + s
            _take_block(Lt, 16 * s, 16, Lb, W, sw)
            _finish_q2_k(x[b * QK_K:(b + 1) * QK_K], Lb, y[b * 84:(b + 1) * 84],
                         ws[0, 16 * s:16 * s + 16], ws[1, 16 * s:16 * s + 16], sw, has_w)


# ---------------------------------------------------------------- Q4_K, Q5_K (256 = 8 x 32)
#
# Q4_K block, 144 bytes: 0..1 d (f16) | 2..3 dmin (f16) | 4..15 6-bit scales and mins (above) |
#   16..143 qs: for each 64 weights g, byte 16 + 32g + l = q[64g + l] | q[64g + 32 + l] << 4
# Q5_K block, 176 bytes: 0..1 d | 2..3 dmin | 4..15 scales | 16..47 qh: in byte 16 + l, bit 2g
#   is bit 4 of q[64g + l] and bit 2g+1 is bit 4 of q[64g + 32 + l] | 48..175 qs (low 4 bits,
#   as Q4_K)
# w = d * scale[j] * q - dmin * min[j]


@njit("void(f4[::1], u1[::1], u1[::1], f4[::1], f4[::1], f4[::1], boolean, int64)", **_JIT)
def _finish_q4_k_q5_k(xb, Lb, y, scales, mins, sw, has_w, nbits):
    """One super-block from its searched sub-blocks: xb (256,) weights, Lb (256,) levels,
    scales/mins/sw (8,), y (144 or 176,) the block's bytes."""
    nmax = (1 << nbits) - 1
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    if has_w:  # quantize_row_q4_K_impl / q5_K_impl: weighted 6-bit fit of scales and mins
        d_block = make_qp_quants(63, scales, Ls, sw)
        m_block = make_qp_quants(63, mins, Lm, sw)
        if nbits == 5:  # NOTE: ggml clamps to 63 for Q5_K only (a no-op unless a level wrapped)
            for j in range(8):
                Ls[j] = min(63, Ls[j])
                Lm[j] = min(63, Lm[j])
    else:  # quantize_row_q4_K_ref / q5_K_ref: 6 bits against the largest
        max_scale = F(0)
        max_min = F(0)
        for j in range(8):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        inv_scale = F(63) / max_scale if max_scale > F(0) else F(0)
        inv_min = F(63) / max_min if max_min > F(0) else F(0)
        for j in range(8):
            # NOTE: ggml stores to uint8 before clamping (a negative level wraps)
            Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
            Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        d_block = max_scale / F(63)
        m_block = max_min / F(63)
    q = y[4:16]
    pack_scale_min_k4(Ls, Lm, q)
    dd = put_f16(y, 0, d_block)
    dmn = put_f16(y, 2, m_block)
    # requantize against the stored (f16, 6-bit) scales and mins
    for j in range(8):
        sc, m = get_scale_min_k4(j, q)
        d = dd * F(sc)
        if d == F(0):
            continue  # keep the search's levels
        dm = dmn * F(m)
        for i in range(32):
            Lb[32 * j + i] = max(0, min(nmax, nearest_int((xb[32 * j + i] + dm) / d)))
    qs = 16
    if nbits == 5:
        qs = 48
        for l in range(32):
            y[16 + l] = 0
    for g in range(4):
        for l in range(32):
            l1 = Lb[64 * g + l]
            l2 = Lb[64 * g + 32 + l]
            if nbits == 5:
                y[16 + l] |= ((l1 >> 4) << (2 * g)) | ((l2 >> 4) << (2 * g + 1))
            y[qs + 32 * g + l] = (l1 & 0xF) | ((l2 & 0xF) << 4)


@njit("void(f4[:, ::1], f4[::1], boolean, u1[:, ::1], int64)", nogil=True, **_JIT)
def _quantize_q4_k_q5_k(xs, w, has_w, out, nbits):  # (rows, cols), (cols,), (rows, row_bytes)
    cols = xs.shape[1]
    x = xs.reshape(xs.size)  # (rows * cols,)
    y = out.reshape(out.size)  # (n_super_blocks * bs,)
    nmax = (1 << nbits) - 1
    bs = 144 if nbits == 4 else 176
    nsb = x.shape[0] // QK_K
    # (rmin, rdelta, nstep): make_qkx3_quants with weights, else make_qkx2_quants
    if has_w:
        rmin, rdelta, nstep = F(-0.9), F(0.05), 36
        sigma2 = _sigma2(x, QK_K, F(2))
    elif nbits == 4:
        rmin, rdelta, nstep = F(-1.0), F(0.1), 20
        sigma2 = np.empty(0, np.float32)
    else:
        rmin, rdelta, nstep = F(-0.5), F(0.1), 15
        sigma2 = np.empty(0, np.float32)
    Lb = np.empty(QK_K, np.uint8)
    sw = np.empty(8, np.float32)
    per = _CHUNK // QK_K
    buf = np.empty((4 * 32 + _WS_ROWS) * 8 * per, np.float32)
    for s0 in range(0, nsb, per):
        ns = min(per, nsb - s0)
        nl = 8 * ns
        X, W, Lt, Laux, ws = _lane_buffers(buf, 32, nl)
        _transpose_in(x[s0 * QK_K:], 32, X)
        if has_w:
            _importance_weights(X, w, s0 * QK_K, cols, sigma2, QK_K, W)
        else:  # av_x + |x|, av_x = rms of the sub-block
            av_x = ws[2]  # scratch until the search fills it
            for j in range(nl):
                av_x[j] = F(0)
            for i in range(32):
                for j in range(nl):
                    av_x[j] += X[i, j] * X[i, j]
            for j in range(nl):
                av_x[j] = np.sqrt(av_x[j] / F(32))
            for i in range(32):
                for j in range(nl):
                    W[i, j] = av_x[j] + abs(X[i, j])
        make_qkx2_quants(nmax, X, W, Lt, Laux, ws, rmin, rdelta, nstep, False)
        for s in range(ns):
            b = s0 + s
            _take_block(Lt, 8 * s, 8, Lb, W, sw)
            _finish_q4_k_q5_k(x[b * QK_K:(b + 1) * QK_K], Lb, y[b * bs:(b + 1) * bs],
                              ws[0, 8 * s:8 * s + 8], ws[1, 8 * s:8 * s + 8], sw, has_w, nbits)


# ---------------------------------------------------------------- driver
#
# NOTE: rows are split over threads from Python (the kernels release the GIL) rather than with
# a numba ``prange`` driver: a parallel driver re-optimizes every kernel inlined into it and
# tripled the first-call compile time.

_NO_WEIGHTS = np.zeros(0, np.float32)
_MIN_WEIGHTS_PER_THREAD = 1 << 14  # below this a thread costs more than it saves


def _quantizer(name: str, kernel, *extra):
    def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
        has_w = imatrix is not None
        w = imatrix if has_w else _NO_WEIGHTS
        split_rows(lambda xs, os: kernel(xs, w, has_w, os, *extra), x, out,
                   _MIN_WEIGHTS_PER_THREAD)

    quantize_rows.__name__ = quantize_rows.__qualname__ = f"quantize_{name.lower()}"
    quantize_rows.__doc__ = f"Fill ``out`` (rows, row_bytes) with {name} blocks of ``x``."
    return quantize_rows


QUANTIZERS = {
    "Q4_1": _quantizer("Q4_1", _quantize_q4_1_q5_1, 4),
    "Q5_1": _quantizer("Q5_1", _quantize_q4_1_q5_1, 5),
    "Q2_K": _quantizer("Q2_K", _quantize_q2_k),
    "Q4_K": _quantizer("Q4_K", _quantize_q4_k_q5_k, 4),
    "Q5_K": _quantizer("Q5_K", _quantize_q4_k_q5_k, 5),
}
