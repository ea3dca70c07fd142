"""Quantizers of the non-uniform grid types IQ4_NL, IQ4_XS and MXFP4, byte-exact with llama.cpp.

- IQ4_NL / IQ4_XS (``quantize_iq4_nl`` / ``quantize_iq4_xs`` in ggml-quants.c): every 32 weights
  get a scale from a small search (15 candidate scales around ``max / 127``, each weight on its
  nearest of the 16 ``kvalues``, the weighted least-squares scale of the best candidate kept);
  IQ4_XS then stores those 8 scales as 6-bit multiples of one f16 ``d`` and re-picks each
  weight's value for the rounded scale.  With an importance vector the weights of the search are
  ``qw[j] * sqrt(sigma2 + x[j]**2)``, without one ``x[j]**2``.
- MXFP4 (``quantize_row_mxfp4_ref``): a power-of-two scale from the block's largest magnitude,
  each weight on its nearest doubled E2M1 value; the importance vector is ignored, as in
  llama.cpp.

Writing rules as in :mod:`.symmetric`: float32 throughout, each C expression in its order, no
fma; float tables (``_KV``) so that no integer promotes a product to float64.  The algorithms in
words: ``formats/IQ4_NL.md``, ``IQ4_XS.md``, ``MXFP4.md`` ("## Quantize").
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import codebooks
from ..types import QK, QK_K
from . import split_rows
from .symmetric import fp32_to_fp16, nearest_int, put_f16

F32 = np.float32
_JIT = dict(cache=True, error_model="numpy")
_KV = codebooks.IQ4_NL.astype(np.float32)  # the 16 IQ4_NL values, ascending
_FP4 = codebooks.MXFP4.astype(np.float32)  # the 16 doubled E2M1 values
GROUP_MAX_EPS = F32(1e-15)  # a group whose largest |x| is below this gets scale 0
NTRY = 7  # candidate scales -NTRY..NTRY around max / 127 (llama.cpp's quantize_iq4_*)


@njit(**_JIT)  # val is a global table (a read-only constant array): typed when first called
def best_index(val, x):
    """Index of the value of the ascending table ``val`` nearest to x (ties to the upper one),
    by bisection as llama.cpp's ``best_index_int8``."""
    n = val.size
    if x <= val[0]:
        return 0
    if x >= val[n - 1]:
        return n - 1
    ml, mu = 0, n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - val[mu - 1] < val[mu] - x else mu


@njit("float32(float32[::1], float32[::1], uint8[::1])", **_JIT)
def _group_scale(xb, weight, L):
    """The searched scale of one group of 32 (0 for an all-tiny group); fills L with the value
    indices of the first candidate (the caller re-picks them for the final scale)."""
    amax, mx = F32(0.0), F32(0.0)
    for j in range(xb.size):
        ax = abs(xb[j])
        if ax > amax:
            amax, mx = ax, xb[j]
    if amax < GROUP_MAX_EPS:
        return F32(0.0)
    d = -mx / _KV[0]
    idd = F32(1.0) / d
    sumqx, sumq2 = F32(0.0), F32(0.0)
    for j in range(xb.size):
        l = best_index(_KV, idd * xb[j])
        L[j] = l
        q, w = _KV[l], weight[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else F32(0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        idd = F32(itry + _KV[0]) / mx
        sumqx, sumq2 = F32(0.0), F32(0.0)
        for j in range(xb.size):
            q, w = _KV[best_index(_KV, idd * xb[j])], weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit("void(float32[::1], float32[::1], boolean, float32[::1])", **_JIT)
def _weights(x, qw, use_qw, weight):
    """Search weights of the groups of one (super-)block x: qw * sqrt(sigma2 + x^2) or x^2."""
    sigma2 = F32(0.0)
    for j in range(x.size):
        sigma2 += x[j] * x[j]
    sigma2 *= F32(2.0) / F32(x.size)
    for j in range(x.size):
        weight[j] = qw[j] * np.sqrt(sigma2 + x[j] * x[j]) if use_qw else x[j] * x[j]


@njit("void(uint8[::1], int64, uint8[::1])", **_JIT)
def _pack_nibbles(out, o, L):
    # byte j of each 16 = value index of weight j (low nibble) | of weight j + 16 (high nibble)
    for i in range(L.size // 32):
        for j in range(16):
            out[o + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit("void(float32[::1], float32[::1], boolean, uint8[::1])", **_JIT)
def _iq4_nl_row(x, qw, use_qw, out):
    # block, 18 bytes: 0..1 d | 2..17 value indices, nibbles as Q4_0
    weight = np.empty(QK, F32)
    L = np.zeros(QK, np.uint8)
    for b in range(x.size // QK):
        xb = x[b * QK:(b + 1) * QK]
        _weights(xb, qw[b * QK:(b + 1) * QK], use_qw, weight)
        d = _group_scale(xb, weight, L)
        o = 18 * b
        put_f16(out, o, d)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        for j in range(QK):  # NOTE: the values are re-picked for the float32 d, not the f16
            L[j] = best_index(_KV, idd * xb[j])
        _pack_nibbles(out, o + 2, L)


@njit("void(float32[::1], float32[::1], boolean, uint8[::1])", **_JIT)
def _iq4_xs_row(x, qw, use_qw, out):
    # block, 136 bytes: 0..1 d | 2..3 scales_h | 4..7 scales_l | 8..135 value indices
    weight = np.empty(QK_K, F32)
    L = np.zeros(QK_K, np.uint8)
    scales = np.empty(QK_K // QK, F32)
    for b in range(x.size // QK_K):
        xs = x[b * QK_K:(b + 1) * QK_K]
        o = 136 * b
        # NOTE: sigma2 is taken over the whole super-block, the weights per group of 32
        sigma2 = F32(0.0)
        for j in range(QK_K):
            sigma2 += xs[j] * xs[j]
        sigma2 *= F32(2.0) / F32(QK_K)
        max_scale, amax_scale = F32(0.0), F32(0.0)
        for ib in range(QK_K // QK):
            xb = xs[ib * QK:(ib + 1) * QK]
            for j in range(QK):
                weight[j] = (qw[b * QK_K + ib * QK + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                             if use_qw else xb[j] * xb[j])
            d = _group_scale(xb, weight[:QK], L[ib * QK:(ib + 1) * QK])
            scales[ib] = d
            if abs(d) > amax_scale:
                amax_scale, max_scale = abs(d), d
        d = -max_scale / F32(32.0)
        put_f16(out, o, d)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        sh = 0
        for ib in range(QK_K // QK):
            l = max(-32, min(31, nearest_int(idd * scales[ib])))
            dl = d * F32(l)
            idl = F32(1.0) / dl if dl != 0 else F32(0.0)
            for j in range(QK):
                L[ib * QK + j] = best_index(_KV, idl * xs[ib * QK + j])
            l += 32
            if ib % 2 == 0:
                out[o + 4 + ib // 2] = l & 0xF
            else:
                out[o + 4 + ib // 2] |= (l & 0xF) << 4
            sh |= (l >> 4) << (2 * ib)
        out[o + 2] = sh & 0xFF
        out[o + 3] = sh >> 8
        _pack_nibbles(out, o + 8, L)


@njit("int64(float32, float32)", **_JIT)
def _best_fp4(x, d):
    """Index of the E2M1 value whose multiple of d is nearest to x (the first on ties)."""
    best, best_err = 0, abs(_FP4[0] * d - x)
    for i in range(1, 16):
        err = abs(_FP4[i] * d - x)
        if err < best_err:
            best, best_err = i, err
    return best


@njit("void(float32[::1], float32[::1], boolean, uint8[::1])", **_JIT)
def _mxfp4_row(x, qw, use_qw, out):
    # block, 17 bytes: 0 e (E8M0) | 1..16 E2M1 indices, nibbles as Q4_0
    for b in range(x.size // QK):
        xb = x[b * QK:(b + 1) * QK]
        amax = F32(0.0)
        for j in range(QK):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
        e = 0
        if amax > 0:
            # NOTE: floorf(log2f(amax)) - 2 + 127 in float, then a C cast to uint8; log2f is
            # correctly rounded in glibc, which float64 log2 rounded to float32 reproduces
            lg = np.floor(F32(np.log2(np.float64(amax))))
            e = np.int64(F32(lg) - F32(2.0) + F32(127.0)) & 0xFF
        bits = (0x00200000 << e) if e < 2 else ((e - 1) << 23)  # 2**(e - 128)
        d = np.uint32(bits).view(np.float32)
        o = 17 * b
        out[o] = e
        for j in range(QK // 2):
            out[o + 1 + j] = _best_fp4(xb[j], d) | (_best_fp4(xb[QK // 2 + j], d) << 4)



@njit("void(int64, float32[:, ::1], float32[::1], boolean, uint8[:, ::1])", nogil=True, **_JIT)
def _quantize_rows(kind, x, qw, use_qw, out):  # x (rows, cols), qw (cols,), out (rows, bytes)
    for r in range(x.shape[0]):
        if kind == 0:
            _iq4_nl_row(x[r], qw, use_qw, out[r])
        elif kind == 1:
            _iq4_xs_row(x[r], qw, use_qw, out[r])
        else:
            _mxfp4_row(x[r], qw, use_qw, out[r])


_MIN_WEIGHTS_PER_THREAD = 1 << 15


def _row_quantizer(kind: int, uses_imatrix: bool, name: str):
    def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
        use_qw = uses_imatrix and imatrix is not None
        qw = imatrix if use_qw else np.zeros(x.shape[1], F32)
        split_rows(lambda xs, os: _quantize_rows(kind, xs, qw, use_qw, os), x, out,
                   _MIN_WEIGHTS_PER_THREAD)

    quantize_rows.__name__ = quantize_rows.__qualname__ = f"quantize_{name.lower()}"
    quantize_rows.__doc__ = f"Fill ``out`` (rows, row_bytes) with {name} blocks of ``x``."
    return quantize_rows


QUANTIZERS = {
    "IQ4_NL": _row_quantizer(0, True, "IQ4_NL"),
    "IQ4_XS": _row_quantizer(1, True, "IQ4_XS"),
    "MXFP4": _row_quantizer(2, False, "MXFP4"),  # NOTE: llama.cpp ignores quant_weights
}
