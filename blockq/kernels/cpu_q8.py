"""llama.cpp's CPU numerics, reproduced in numpy: ``Model.load(path, numerics="llama")``.

blockq's default kernels multiply float32 activations by the decoded weights.  llama.cpp's CPU
backend (x86, AVX2 + FMA build) instead rounds every matmul's activations to 8 bits first and
dots integer codes, and rounds attention's q and probabilities to f16.  Those roundings make the
network chaotic at the last bit: one ulp of difference anywhere flips an 8-bit code a few layers
later, and the logits end up ~0.3 RMS apart (llama.cpp against itself with an f32 KV cache
lands just as far).  Matching llama.cpp's greedy tokens therefore needs every step bit-exact,
which is what this module does (measured on SmolLM2-135M Q4_1: logits identical to the bit,
greedy 5/5; tools/compare_llama_cpp.py).  It is slow (numpy, ~0.3 s per token for 135M) and meant
for comparisons, not for serving.

What is reproduced, step by step (x86 AVX2 code paths of ggml-cpu):

- activations -> Q8_0 / Q8_1 blocks of 32: ``amax = max|x|``, ``d = f16(amax / 127)``,
  ``q = rint(x * (127 / amax))`` (round half to even, as ``_mm256_round_ps``); Q8_1 also keeps
  ``s = f16(d_f32 * sum(q))`` with the *unrounded* d.
- Q4_1 x Q8_1 dot (``ggml_vec_dot_q4_1_q8_1``), Q8_0 x Q8_0 dot: per block, 8 float lanes
  each holding the integer sum of 4 adjacent products, ``acc = fma(d_w * d_a, lanes, acc)``;
  Q4_1 adds ``summs = fma(m_w, s_a, summs)`` (GCC contracts it); the result is
  ``hsum8(acc) + summs``.
- rms_norm: squares in float, summed in double, ``mean`` in float, ``1 / sqrtf(mean + eps)``.
- rope: angles by repeated float multiplication, libm ``cosf`` / ``sinf``,
  ``x0 * c - x1 * s`` contracted to ``fma(x0, c, -(x1 * s))``.
- attention (flash attention off, f16 KV cache): q rounded to f16, ``kq`` and ``p @ v`` as f16
  dots; a batch (n >= 2 tokens) goes through llamafile's tinyBLAS (one 8-lane accumulator over k),
  one token through ``ggml_vec_dot_f16`` (four 8-lane accumulators, steps of 32); softmax with
  ggml's 8-lane ``expf`` polynomial, chunk sums in double, probabilities rounded to f16.
- swiglu: ``x / (1 + expf(-x)) * g`` with the same ``expf``.

Weight types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K..Q6_K, each through the kernel llama.cpp
picks for it (:func:`llama_dot`: repacked Q4_0 / Q4_K, vec_dot, tinyBLAS, the tiled k-quant
matmul for >= 8 rows); measured: logits identical to the bit on SmolLM2 as Q4_1, as Q4_K_M and
as a mix of every k-quant (tools/compare_llama_cpp.py).  F16 / BF16 / F32 matrices raise
:class:`~blockq.errors.UnsupportedModel`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np
from numba import vectorize

from ..errors import BadArgument, UnsupportedModel
from ..types import qtype as _lookup

F32 = np.float32
QK = 32  # values per Q8_0 / Q8_1 block

# 32-value weight type -> the activation blocks llama.cpp dots it with (ggml-cpu type_traits
# vec_dot_type)
ACTIVATIONS = {"Q4_0": "Q8_0", "Q4_1": "Q8_1", "Q5_0": "Q8_0", "Q5_1": "Q8_1", "Q8_0": "Q8_0"}


# ---------------------------------------------------------------------------------------------
# float helpers


@vectorize(["float32(float32, float32, float32)", "float32(float64, float64, float64)"],
           cache=True)
def fma32(a, b, c):
    """float32 fused multiply-add, correctly rounded (a numpy ufunc: broadcasts, any shapes;
    float64 operands, e.g. exact integer sums, are taken as they are).

    a * b is exact in float64, so ``f32(a * b + c)`` (two roundings) differs from a true fma
    only where the float64 sum lands exactly on a float32 midpoint; there the exact TwoSum
    error of the sum decides the side (a plain float64 detour is one ulp off in ~2^-29 of
    cases)."""
    p = np.float64(a) * np.float64(b)
    cd = np.float64(c)
    s = p + cd
    r = np.float32(s)
    rd = np.float64(r)
    if rd == s or math.isinf(rd) or math.isnan(s):
        return r
    o = 2.0 * s - rd  # the float32 on the other side of s, if s is halfway between the two
    if np.float64(np.float32(o)) != o:
        return r  # not a midpoint: one rounding either way
    bp = s - p
    err = (p - (s - bp)) + (cd - bp)  # (p + c) - s, exactly
    if err == 0.0:
        return r  # a true tie: to even, as the conversion did
    return np.float32(o) if (err > 0.0) == (o > rd) else r


def hsum8(v: np.ndarray) -> np.ndarray:
    """``hsum_float_8``: 8 lanes (last axis) added as ((0+4)+(2+6)) + ((1+5)+(3+7))."""
    return ((v[..., 0] + v[..., 4]) + (v[..., 2] + v[..., 6])) + \
        ((v[..., 1] + v[..., 5]) + (v[..., 3] + v[..., 7]))


_H = float.fromhex
# ggml_v_expf's constants (a range reduction by ln2 and a degree-5 polynomial)
_EXP = {k: F32(_H(v)) for k, v in dict(
    shift="0x1.8p23", log2e="0x1.715476p+0", ln2_hi="0x1.62e4p-1", ln2_lo="0x1.7f7d1cp-20",
    c5="0x1.0e4020p-7", c4="0x1.573e2ep-5", c3="0x1.555e66p-3", c2="0x1.fffdb6p-2",
    c1="0x1.ffffecp-1").items()}


def v_expf(x: np.ndarray) -> np.ndarray:
    """exp as ggml's 8-lane AVX2 ``ggml_v_expf`` computes it (max error ~1.5 ulp), elementwise."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return _v_expf(np.asarray(x, F32))


def _v_expf(x: np.ndarray) -> np.ndarray:
    c = _EXP
    z = fma32(x, c["log2e"], c["shift"])
    n = (z - c["shift"]).astype(F32)
    b = fma32(-n, c["ln2_lo"], fma32(-n, c["ln2_hi"], x))
    e = (z.view(np.uint32) << np.uint32(23)).astype(np.uint32)
    k = (e + np.uint32(0x3F800000)).astype(np.uint32).view(F32)  # 2^n
    u = (b * b).astype(F32)
    j = fma32(fma32(fma32(c["c5"], b, c["c4"]), u, fma32(c["c3"], b, c["c2"])), u,
              (c["c1"] * b).astype(F32))
    out = fma32(j, k, k)
    an = np.abs(n)
    if (an > 126).any():  # 2^n out of range: scale in two steps, or flush to 0 / inf
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0)).astype(np.uint32)
        s1 = (g + np.uint32(0x7F000000)).astype(np.uint32).view(F32)
        s2 = (e - g).astype(np.uint32).view(F32)
        far = (fma32(s2, j, s2) * s1).astype(F32)
        out = np.where(an > 192, (s1 * s1).astype(F32), np.where(an > 126, far, out))
    return out


# ---------------------------------------------------------------------------------------------
# activations -> 8-bit blocks


def activations(x, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """``x`` as float32 (n, cols) for a (rows, cols) ``qtype`` matrix, or BadArgument."""
    x = np.asarray(x, F32)
    if x.ndim != 2 or x.shape[1] != shape[1]:
        raise BadArgument(f"{qtype} matrix {tuple(shape)} takes activations (n, {shape[1]}), "
                          f"got shape {x.shape}")
    return x


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, k) -> codes (n, k/32, 32) float32 in [-127, 127], d (n, k/32) float32 (f16 values),
    s (n, k/32) float32 (f16 of d_f32 * sum(codes), Q8_1's block sum)."""
    n, k = x.shape
    b = np.ascontiguousarray(x, F32).reshape(n, k // QK, QK)
    amax = np.abs(b).max(-1)
    d32 = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    q = np.rint(b * inv[..., None])  # NOTE: x * (127/amax), not x / d, as ggml's AVX2 path
    d = d32.astype(np.float16).astype(F32)
    s = (d32 * q.sum(-1)).astype(np.float16).astype(F32)
    return q, d, s


# ---------------------------------------------------------------------------------------------
# weights x 8-bit activations


class Q8Dot:
    """A matrix of 32-value blocks (a ``QMatrix``) multiplied the way llama.cpp's CPU does:
    ``vec_dot`` and tinyBLAS agree to the bit (per block, 8 float lanes each holding the integer
    sum of 4 adjacent products, ``acc = fma(d_w * d_a, lanes, acc)``; types with a min add
    ``summs = fma(m_w, s_a, summs)``; result ``hsum8(acc) + summs``).

    This class takes Q4_1 and Q8_0; :class:`.cpu_q8_legacy.LegacyDot` the same arithmetic for
    Q4_0, Q5_0 and Q5_1.  Codes are decoded once to float32 (a comparison tool); the lane sums
    (|sum| < 2^16) are exact in float32 in any order.
    """

    TYPES: tuple[str, ...] = ("Q4_1", "Q8_0")

    def __init__(self, weight):
        from ..dequantize import quant_ints

        t = str(weight.qtype)
        if t not in self.TYPES:
            raise UnsupportedModel(f"{type(self).__name__} reproduces llama.cpp's "
                                   f"{'/'.join(self.TYPES)} dots; got a {t} matrix "
                                   f"{tuple(weight.shape)}")
        rows, cols = weight.shape
        nb = cols // QK
        blocks = np.asarray(weight.data).view(_lookup(t).dtype).reshape(rows, nb)
        codes = quant_ints(weight.data, t).astype(F32)  # (rows * nb, 32)
        # lanes of 4 adjacent values, batched by (block, lane): (nb * 8, rows, 4)
        self.codes = np.ascontiguousarray(codes.reshape(rows, nb * 8, 4).transpose(1, 0, 2))
        self.d = np.ascontiguousarray(blocks["d"].astype(F32).T)  # (nb, rows)
        self.m = (np.ascontiguousarray(blocks["m"].astype(F32).T)  # (nb, rows)
                  if "m" in blocks.dtype.names else None)
        self.vec_dot_type = ACTIVATIONS[t]
        self.qtype, self.shape = t, (rows, cols)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (n, rows)
        x = activations(x, self.qtype, self.shape)
        with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN propagate as in ggml
            return self._dot(x)

    def _dot(self, x: np.ndarray) -> np.ndarray:
        rows, cols = self.shape
        n, nb = x.shape[0], cols // QK
        q, d, s = quantize_q8(x)  # (n, nb, 32), (n, nb), (n, nb)
        qa = q.reshape(n, nb * 8, 4).transpose(1, 2, 0)  # (nb * 8, 4, n)
        lanes = np.matmul(self.codes, qa).reshape(nb, 8, rows, n)  # exact
        acc = np.zeros((8, rows, n), F32)
        for ib in range(nb):
            dd = (self.d[ib][:, None] * d[:, ib][None, :]).astype(F32)  # (rows, n)
            acc = fma32(dd, lanes[ib], acc)
        out = hsum8(np.moveaxis(acc, 0, -1)).astype(F32)  # (rows, n)
        if self.m is not None:
            summs = np.zeros((rows, n), F32)
            for ib in range(nb):  # NOTE: GCC contracts ggml's summs += m * s into an fma
                summs = fma32(self.m[ib][:, None], s[:, ib][None, :], summs)
            out = (out + summs).astype(F32)
        return np.ascontiguousarray(out.T)


def llama_dot(weight, repackable: bool = True):
    """The emulation of llama.cpp's product for this ``QMatrix``, following the path its CPU
    backend takes (x86 AVX2 build):

    ==========================  =====================================================
    Q4_0, Q4_K, rows % 8 == 0   repacked 8x8 gemv / gemm (:mod:`.cpu_q8_repack`)
    Q4_1, Q8_0                  vec_dot / tinyBLAS on Q8_1 / Q8_0 (:class:`Q8Dot`)
    Q4_0, Q5_0, Q5_1            vec_dot / tinyBLAS (:mod:`.cpu_q8_legacy`)
    Q2_K .. Q6_K                vec_dot / tiled on Q8_K (:mod:`.cpu_q8_kquant`)
    ==========================  =====================================================

    ``repackable``: False for a matrix llama.cpp keeps in an ordinary buffer although its type
    could be repacked (the tied output, which is the token embedding table: a GET_ROWS input).
    """
    t = str(weight.qtype)
    from .cpu_q8_repack import is_repacked

    if repackable and is_repacked(t, weight.shape):
        from .cpu_q8_repack import RepackDot
        return RepackDot(weight)
    if t in Q8Dot.TYPES:
        return Q8Dot(weight)
    if t in ACTIVATIONS:
        from .cpu_q8_legacy import LegacyDot
        return LegacyDot(weight)
    if t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        from .cpu_q8_kquant import KQuantDot
        return KQuantDot(weight)
    raise UnsupportedModel(f"numerics='llama' reproduces the products of Q4_0, Q4_1, Q5_0, Q5_1, "
                           f"Q8_0 and Q2_K..Q6_K matrices; this model has a {t} matrix "
                           f"{tuple(weight.shape)}")


# ---------------------------------------------------------------------------------------------
# the other steps of a layer


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # (n, d)
    sq = (x * x).astype(np.float64)  # NOTE: squared in float, summed in double
    mean = (sq.sum(-1) / x.shape[-1]).astype(F32)
    scale = F32(1) / np.sqrt(mean + F32(eps))
    return ((x * scale[:, None]) * w).astype(F32)


_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
for _name in ("cosf", "sinf"):
    getattr(_libm, _name).restype = ctypes.c_float
    getattr(_libm, _name).argtypes = [ctypes.c_float]


def rope_tables(base: float, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, dim/2) as ggml's rope cache: theta_i = p * s^i by repeated float
    multiplication, s = base^(-2/dim), then libm's cosf / sinf (numpy's float32 cos differs
    in the last bit now and then)."""
    step = F32(F32(base) ** F32(-2.0 / dim))
    theta = np.empty((n, dim // 2), F32)
    t = np.arange(n).astype(F32)
    for i in range(dim // 2):
        theta[:, i] = t
        t = (t * step).astype(F32)
    flat = theta.ravel().tolist()
    cos = np.array([_libm.cosf(v) for v in flat], F32).reshape(theta.shape)
    sin = np.array([_libm.sinf(v) for v in flat], F32).reshape(theta.shape)
    return cos, sin


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x (n, heads, hd) in place; cos, sin (n, half)."""
    h = cos.shape[-1]
    lo, hi = (np.s_[..., :h], np.s_[..., h:2 * h]) if neox else \
        (np.s_[..., 0:2 * h:2], np.s_[..., 1:2 * h:2])
    x0, x1 = x[lo].copy(), x[hi].copy()
    c, s = cos[:, None, :], sin[:, None, :]
    # NOTE: GCC contracts ggml's x0*c - x1*s and x0*s + x1*c into these two fmas
    x[lo] = fma32(x0, c, -(x1 * s).astype(F32))
    x[hi] = fma32(x0, s, (x1 * c).astype(F32))
    return x


def _pad(a: np.ndarray, m: int) -> np.ndarray:
    L = a.shape[-1]
    if L % m == 0:
        return a
    return np.concatenate([a, np.zeros(a.shape[:-1] + (m - L % m,), F32)], -1)


def f16_dot(a: np.ndarray, b: np.ndarray, batch: bool) -> np.ndarray:
    """Dot over the last axis of f16-valued float32 arrays (broadcast over the others).

    batch: tinyBLAS (llamafile_sgemm, used when the product has >= 2 columns): one 8-lane
    accumulator over steps of 8.  Otherwise ``ggml_vec_dot_f16``: four 8-lane accumulators over
    steps of 32, folded (0+2, 1+3, then 0+1).  Zero padding adds nothing, so both pad.
    """
    step = 8 if batch else 32
    a, b = _pad(a, step), _pad(b, step)
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    L = a.shape[-1]
    if batch:
        acc = np.zeros(shape + (8,), F32)
        for i in range(0, L, 8):
            acc = fma32(a[..., i:i + 8], b[..., i:i + 8], acc)
        return hsum8(acc).astype(F32)
    acc = np.zeros(shape + (4, 8), F32)
    for i in range(0, L, 32):
        acc = fma32(a[..., i:i + 32].reshape(a.shape[:-1] + (4, 8)),
                    b[..., i:i + 32].reshape(b.shape[:-1] + (4, 8)), acc)
    v = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    # GGML_F32x8_REDUCE's last step: ((0+4)+(1+5)) + ((2+6)+(3+7))
    return (((v[..., 0] + v[..., 4]) + (v[..., 1] + v[..., 5]))
            + ((v[..., 2] + v[..., 6]) + (v[..., 3] + v[..., 7]))).astype(F32)


def softmax(s: np.ndarray) -> np.ndarray:
    """``ggml_soft_max`` over the last axis (-inf = masked): 8-lane expf, chunk sums of 8 in
    float added in double, one float scale by 1/sum."""
    mx = s.max(-1, keepdims=True)
    masked = np.isneginf(s)
    y = np.where(masked, F32(0), v_expf(np.where(masked, F32(0), s - mx)))
    yp = _pad(y, 8)
    chunks = hsum8(yp.reshape(yp.shape[:-1] + (-1, 8))).astype(np.float64)
    total = np.zeros(y.shape[:-1], np.float64)
    for i in range(chunks.shape[-1]):  # in order, as the loop adds them
        total = total + chunks[..., i]
    return (y * (1.0 / total).astype(F32)[..., None]).astype(F32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, scale: float) -> np.ndarray:
    """As ``blockq.model.attention`` (same shapes), with llama.cpp's f16 roundings and orders;
    k, v must hold f16 values (an f16 cache)."""
    n, n_head, hd = q.shape
    n_kv, T, _ = k.shape
    g = n_head // n_kv
    batch = n >= 2
    q16 = q.astype(np.float16).astype(F32)  # NOTE: ggml converts q to K's type (f16)
    qh = q16.reshape(n, n_kv, g, hd).transpose(1, 2, 0, 3).reshape(n_kv, g * n, hd)
    s = (f16_dot(qh[:, :, None, :], k[:, None, :, :], batch) * F32(scale)).astype(F32)
    if n > 1:
        future = np.arange(T)[None, :] > (p0 + np.arange(n))[:, None]  # (n, T)
        s.reshape(n_kv, g, n, T)[:, :, future] = -np.inf
    p = softmax(s).astype(np.float16).astype(F32)  # NOTE: and p to V's type
    vt = np.ascontiguousarray(v.transpose(0, 2, 1))  # (n_kv, hd, T)
    o = f16_dot(p[:, :, None, :], vt[:, None, :, :], batch)  # (n_kv, g*n, hd)
    return o.reshape(n_kv, g, n, hd).transpose(2, 0, 1, 3).reshape(n, n_head * hd)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    e = v_expf((F32(0) - gate).astype(F32))
    return ((gate / (F32(1) + e).astype(F32)).astype(F32) * up).astype(F32)
