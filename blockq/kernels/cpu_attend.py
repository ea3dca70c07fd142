"""A prompt's causal attention on the CPU (``attend_prompt``), written as two small matrix
products per task with 16-lane float vectors.

The work is split into tasks of one query head and ATTEND_QB consecutive queries, which read each
key and value row once for all of them:

- scores: the keys come transposed, ``KT`` (n_kv * hd, keys) built once per call, so 16 keys are
  one vector and each query's 16 scores accumulate over the head dimension in a register (one
  load and ATTEND_QB broadcast multiply-adds per dimension), no horizontal sums;
- softmax per query over the keys it sees (``exp32``: vectorized);
- values: 16 dimensions of the output are one vector per query, accumulated over the keys (one
  value load and ATTEND_QB multiply-adds per key); head dimensions past a multiple of 16 take a
  scalar loop.

The vectors are generic LLVM ``<16 x float>`` operations (loads, stores, ``fmuladd``): one zmm
register with AVX-512, two ymm with AVX2, four NEON registers on arm64, never an instruction the
CPU lacks.  The tasks run on Numba's threads through a parfor that is compiled only when more than
one thread is asked for (a parfor costs ~2 s of compile time).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_exp import exp32
from .cpu_simd16 import F32x16, _V16F32, _fmuladd16, _load16f, _ptr, _splat16, zeros16

F32 = np.float32
ATTEND_QB = 4  # queries per task: they share every key and value row read
L = 16  # lanes of a vector
_JIT = dict(cache=True, fastmath=True, error_model="numpy")


@intrinsic
def vload(typingctx, a, r, i):
    """a[r, i:i+16] of a float32 2-D array as an F32x16 (unaligned, no bounds check)."""
    def codegen(context, builder, signature, args):
        aty, rty, ity = signature.args
        return _load16f(context, builder, aty, args[0], rty, args[1], ity, args[2])
    return F32x16(a, r, i), codegen


@intrinsic
def vstore(typingctx, a, r, i, v):
    """a[r, i:i+16] = v for a float32 2-D array."""
    def codegen(context, builder, signature, args):
        aty, rty, ity, _ = signature.args
        ptr = _ptr(context, builder, aty, args[0], rty, args[1], ity, args[2])
        builder.store(args[3], builder.bitcast(ptr, _V16F32.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(a, r, i, v), codegen


@intrinsic
def vfma(typingctx, acc, v, s):
    """acc + v * s: F32x16 acc and v, a scalar s broadcast."""
    def codegen(context, builder, signature, args):
        return _fmuladd16(builder, args[1], _splat16(context, builder, signature.args[2],
                                                     args[2]), args[0])
    return F32x16(acc, v, s), codegen


@njit(**_JIT)
def _keys_by_dim(kc, base, T, KT):
    """KT[kv * hd + d, t - base] = kc[kv, t, d] for keys base..T-1; the L columns past them 0."""
    n_kv, _, hd = kc.shape
    for kv in range(n_kv):
        for t in range(base, T):
            for d in range(hd):
                KT[kv * hd + d, t - base] = kc[kv, t, d]
        for d in range(hd):
            for t in range(T - base, KT.shape[1]):
                KT[kv * hd + d, t] = F32(0.0)


@njit(**_JIT)
def _softmax_rows(s, lo, hi, span, scale, softcap):
    """Row j of s (QB, >= span): scale (and soft-cap) columns lo[j]..hi[j]-1, softmax over them,
    zeros in the other columns below span."""
    for j in range(s.shape[0]):
        m = -np.inf
        for c in range(lo[j], hi[j]):
            x = s[j, c] * scale
            if softcap > 0:
                x = np.float32(np.tanh(x * (np.float32(1.0) / softcap)) * softcap)
            s[j, c] = x
            m = max(m, x)
        total = 0.0
        for c in range(lo[j], hi[j]):
            e = exp32(s[j, c] - m)
            s[j, c] = e
            total += e
        inv = np.float32(1.0 / total)
        for c in range(span):
            s[j, c] = s[j, c] * inv if lo[j] <= c < hi[j] else np.float32(0.0)


@njit(nogil=True, **_JIT)
def _attend_prompt_chunk(c, q, KT, base, V, n_ctx, p0, scale, window, softcap, out, n_threads):
    """Tasks c * J / n_threads .. (c + 1) * J / n_threads of the J of attend_prompt; V is the
    value cache as (n_kv * n_ctx, hd)."""
    n, n_head, hd = q.shape
    g = n_head // (KT.shape[0] // hd)
    nb = (n + ATTEND_QB - 1) // ATTEND_QB
    jobs = n_head * nb
    hv = hd - hd % L  # head dimensions in whole vectors
    s = np.empty((ATTEND_QB, KT.shape[1]), F32)  # scores, then weights
    lo = np.empty(ATTEND_QB, np.int64)  # each query's keys, relative to the task's first
    hi = np.empty(ATTEND_QB, np.int64)
    for job in range(jobs * c // n_threads, jobs * (c + 1) // n_threads):
        hh, i0 = job // nb, (job % nb) * ATTEND_QB
        kv = hh // g
        # queries past n are copies of query n - 1 (computed, stored to the same row)
        i1, i2, i3 = min(i0 + 1, n - 1), min(i0 + 2, n - 1), min(i0 + 3, n - 1)
        first = max(0, p0 + i0 - window + 1) if window > 0 else 0  # keys first..last
        span = p0 + i3 + 1 - first
        for j in range(ATTEND_QB):
            i = min(i0 + j, n - 1)
            lo[j] = (max(0, p0 + i - window + 1) if window > 0 else 0) - first
            hi[j] = p0 + i + 1 - first
        k0 = first - base  # KT's column of key `first`
        for tb in range(0, span, L):
            a0, a1, a2, a3 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            for d in range(hd):
                kt = vload(KT, kv * hd + d, k0 + tb)
                a0 = vfma(a0, kt, q[i0, hh, d])
                a1 = vfma(a1, kt, q[i1, hh, d])
                a2 = vfma(a2, kt, q[i2, hh, d])
                a3 = vfma(a3, kt, q[i3, hh, d])
            vstore(s, 0, tb, a0)
            vstore(s, 1, tb, a1)
            vstore(s, 2, tb, a2)
            vstore(s, 3, tb, a3)
        _softmax_rows(s, lo, hi, span, scale, softcap)
        r0 = kv * n_ctx + first  # V's row of key `first`
        for d0 in range(0, hv, L):
            b0, b1, b2, b3 = zeros16(0.0), zeros16(0.0), zeros16(0.0), zeros16(0.0)
            for t in range(span):
                v = vload(V, r0 + t, d0)
                b0 = vfma(b0, v, s[0, t])
                b1 = vfma(b1, v, s[1, t])
                b2 = vfma(b2, v, s[2, t])
                b3 = vfma(b3, v, s[3, t])
            o = hh * hd + d0
            vstore(out, i3, o, b3)
            vstore(out, i2, o, b2)
            vstore(out, i1, o, b1)
            vstore(out, i0, o, b0)
        for d in range(hv, hd):
            x0, x1, x2, x3 = F32(0.0), F32(0.0), F32(0.0), F32(0.0)
            for t in range(span):
                v = V[r0 + t, d]
                x0 += s[0, t] * v
                x1 += s[1, t] * v
                x2 += s[2, t] * v
                x3 += s[3, t] * v
            o = hh * hd + d
            out[i3, o], out[i2, o], out[i1, o], out[i0, o] = x3, x2, x1, x0


@njit(parallel=True, **_JIT)
def _attend_prompt_par(q, KT, base, V, n_ctx, p0, scale, window, softcap, out, n_threads):
    for c in prange(n_threads):
        _attend_prompt_chunk(c, q, KT, base, V, n_ctx, p0, scale, window, softcap, out,
                             n_threads)


def attend_prompt(q, kc, vc, p0, scale, window, softcap, out):
    """:func:`blockq.ops.attention` of n queries at positions p0.. (already rotated) over the
    cache's keys 0..p0+n-1, on Numba's threads.

    q (n, n_head, hd); kc, vc (n_head_kv, n_ctx, hd); out (n, n_head * hd) float32.  ``window``
    > 0: query position p sees keys p - window < t <= p; ``softcap`` > 0: scores become
    ``softcap * tanh(score / softcap)``.
    """
    n, n_head, hd = q.shape
    n_kv, n_ctx, _ = kc.shape
    T = p0 + n
    base = max(0, p0 - window + 1) if window > 0 else 0  # the first key any query sees
    KT = np.empty((n_kv * hd, T - base + L), F32)
    _keys_by_dim(kc, base, T, KT)
    q = np.ascontiguousarray(q, F32)
    V = np.ascontiguousarray(vc, F32).reshape(n_kv * n_ctx, hd)
    jobs = n_head * ((n + ATTEND_QB - 1) // ATTEND_QB)
    threads = min(numba.get_num_threads(), jobs)
    if threads <= 1:
        _attend_prompt_chunk(0, q, KT, base, V, n_ctx, p0, scale, window, softcap, out, 1)
    else:
        _attend_prompt_par(q, KT, base, V, n_ctx, p0, scale, window, softcap, out, threads)


__all__ = ["attend_prompt", "ATTEND_QB"]
