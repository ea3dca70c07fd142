"""llama.cpp's CPU product for repacked weights, Q4_0 / Q4_K with rows % 8 (numerics="llama").

Same contract as :class:`blockq.kernels.cpu_q8.Q8Dot`: float32 activations (n, cols) in,
(n, rows) float32 out, bit-identical to ggml's CPU backend (x86, AVX2 + FMA build).

On an AVX2 machine llama.cpp loads these matrices into the ``CPU_REPACK`` buffer
(ggml-cpu/repack.cpp, ``ggml_repack_get_optimal_repack_type``): every 8 consecutive rows are
interleaved 8 bytes at a time into ``block_q4_0x8`` / ``block_q4_Kx8`` (Q4_0 nibbles also get
``^ 0x88`` so that a lookup turns them into ``q - 8``).  The interleave is a pure permutation; it
only decides which values sit in which SIMD lane, so this module works on the plain blocks and
reproduces the arithmetic, not the layout.  ``forward_mul_mat`` then splits the n activation rows:

- rows ``[0, 4 * (n // 4))``: quantized 4 at a time (``ggml_quantize_mat_q8_0_4x8`` /
  ``_q8_K_4x8``) and multiplied by ``ggml_gemm_*_8x8``;
- the last ``n % 4`` rows: quantized by the type's row quantizer (``quantize_row_q8_0`` AVX2 /
  ``quantize_row_q8_K`` = the reference) and multiplied by ``ggml_gemv_*_8x8``.

What each kernel computes for one output (weight row r, activation row t), all integer sums exact:

Q4_0 (gemv and gemm alike), per 32-block b in order::

    acc = fma(float(sum_k (q[r,b,k] - 8) * a[t,b,k]), d_w[r,b] * d_a[t,b], acc)

so Q4_0 does not depend on n's split (the 4x8 quantizer rounds exactly as the row quantizer).

Q4_K: two chains, ``acc`` for the codes and ``mn`` for the mins, output ``acc - mn``.
With ``dot[s] = sum_k q[r,s,k] * a[t,s,k]`` and ``bsum[s] = sum_k a[t,s,k]`` over a 32-value
sub-block s, 6-bit scale ``sc[s]`` and min ``m[s]``:

- gemv: one step per 256-superblock b: ``acc = fma(float(sum_s sc*dot), d * d_a, acc)``,
  ``mn = fma(float(sum_s m*bsum), dmin * d_a, mn)`` (the int32 sum can pass 2^24 and rounds);
- gemm: one step per PAIR of sub-blocks (4 per superblock), the same with ``s in {2j, 2j+1}``.

So a Q4_K output differs (by rounding) depending on whether its activation row was in a group
of 4.  No ``maddubs`` pair or int16 partial sum can saturate (|code| <= 15 against
|activation| <= 127, at most 16 products per int16 lane).
"""
from __future__ import annotations

import numpy as np

from ..dequantize import quant_ints, unpack_scale_min_k4
from ..errors import UnsupportedModel
from ..types import QK_K
from ..types import qtype as _lookup
from .cpu_q8 import F32, QK, activations, fma32, quantize_q8
from .cpu_q8_kquant import quantize_q8_k

F64 = np.float64
ROWS_INTERLEAVED = 8  # repack.cpp's nrows_interleaved for q4_0_8x8 / q4_K_8x8
GEMM_ROWS = 4  # activation rows per gemm group (block_q8_0x4 / block_q8_Kx4)
REPACKED = ("Q4_0", "Q4_K")  # weight types llama.cpp repacks on AVX2 (rows % 8 == 0)


def is_repacked(qtype: str, shape: tuple[int, int]) -> bool:
    """Whether llama.cpp (x86 AVX2) puts this weight matrix in its CPU_REPACK buffer."""
    return str(qtype) in REPACKED and shape[0] % ROWS_INTERLEAVED == 0


# ---------------------------------------------------------------------------------------------
# weight decoding


def _matmul_codes(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact integer dots per block: codes (S, rows, L), q (n, S, L) -> (S, rows, n) float32.
    Every partial sum is an integer below 2^24, so float32 BLAS is exact in any order."""
    return np.matmul(codes, np.ascontiguousarray(q.transpose(1, 2, 0)))


# ---------------------------------------------------------------------------------------------
# weights x 8-bit activations


class RepackDot:
    """A Q4_0 or Q4_K matrix with rows % 8 == 0 (a ``QMatrix``) multiplied the way llama.cpp's
    repacked gemv / gemm kernels do (see the module docstring for the exact order).

    Codes are decoded once to float32 (8x the Q4 bytes): this is a comparison tool.
    Blocks:  Q4_0 | d f16 | qs[16] |                                 w = d * (q - 8)
             Q4_K | d f16 | dmin f16 | scales[12] | qs[128] |        w = d*sc*q - dmin*m
    """

    def __init__(self, weight):
        t = str(weight.qtype)
        rows, cols = weight.shape
        if not is_repacked(t, (rows, cols)):
            raise UnsupportedModel(
                f"RepackDot reproduces llama.cpp's repacked {'/'.join(REPACKED)} matrices with "
                f"rows % {ROWS_INTERLEAVED} == 0; got a {t} matrix {weight.shape}")
        self.qtype, self.shape = t, (rows, cols)
        blocks = np.asarray(weight.data).view(_lookup(t).dtype).reshape(rows, -1)
        nb = blocks.shape[1]
        self.d = np.ascontiguousarray(blocks["d"].astype(F32).T)  # (nb, rows)
        codes = quant_ints(blocks, t).astype(F32)  # (rows * nb, block_size), value order
        if t == "Q4_0":  # -8..7
            codes = codes.reshape(rows, nb, QK)
            self.codes = np.ascontiguousarray(codes.transpose(1, 0, 2))  # (nb, rows, 32)
            return
        self.dmin = np.ascontiguousarray(blocks["dmin"].astype(F32).T)  # (nb, rows)
        sc, m = unpack_scale_min_k4(blocks["scales"])  # (rows, nb, 8) each
        self.sc = sc.astype(F64).transpose(1, 2, 0)[..., None].copy()  # (nb, 8, rows, 1)
        self.m = m.astype(F64).transpose(1, 2, 0)[..., None].copy()  # (nb, 8, rows, 1)
        codes = codes.reshape(rows, nb * 8, QK)  # 0..15
        self.codes = np.ascontiguousarray(codes.transpose(1, 0, 2))  # (nb*8, rows, 32)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (n, rows)
        x = activations(x, self.qtype, self.shape)
        if self.qtype == "Q4_0":  # gemm and gemv agree to the bit
            return np.ascontiguousarray(self._q4_0(x).T)
        g = GEMM_ROWS * (x.shape[0] // GEMM_ROWS)  # rows [0, g) go to gemm, [g, n) to gemv
        parts = [self._q4_K(x[:g], gemm=True)] if g else []
        if g < x.shape[0]:
            parts.append(self._q4_K(x[g:], gemm=False))
        return np.ascontiguousarray(np.concatenate(parts, axis=1).T)

    def _q4_0(self, x: np.ndarray) -> np.ndarray:  # (n, cols) -> (rows, n)
        with np.errstate(over="ignore"):  # Q8_1's block sum (unused here) may overflow f16
            q, d_a, _ = quantize_q8(x)  # (n, nb, 32), (n, nb)
        dots = _matmul_codes(self.codes, q)  # (nb, rows, n)
        acc = np.zeros(dots.shape[1:], F32)  # (rows, n)
        for b in range(dots.shape[0]):
            scale = (self.d[b][:, None] * d_a[:, b][None, :]).astype(F32)  # (rows, n)
            acc = fma32(dots[b], scale, acc)
        return acc

    def _q4_K(self, x: np.ndarray, gemm: bool) -> np.ndarray:  # (n, cols) -> (rows, n)
        n = x.shape[0]
        # NOTE: gemm's ggml_quantize_mat_q8_K_4x8 picks iscale = -127/amax whenever +amax occurs,
        # where the reference (used here, and by gemv) takes the sign of the FIRST largest |x|.
        # Both codes and d flip together, so isum * (d_w * d_a) and every output are unchanged.
        q8, d_a, _ = quantize_q8_k(x)  # (n, nb, 256) int8, (n, nb) float32
        nb = q8.shape[1]
        q = q8.astype(F32).reshape(n, nb * 8, QK)  # (n, nb*8, 32)
        dots = _matmul_codes(self.codes, q).astype(F64).reshape(nb, 8, -1, n)  # (nb, 8, rows, n)
        bsum = q.sum(-1).astype(F64).T.reshape(nb, 8, 1, n)  # (nb, 8, 1, n)
        isum = self.sc * dots  # (nb, 8, rows, n), exact integers in float64
        imin = self.m * bsum
        # gemv sums all 8 sub-blocks of a superblock before its one fma; gemm sums pairs
        steps = [(b, slice(2 * j, 2 * j + 2)) for b in range(nb) for j in range(4)] if gemm \
            else [(b, slice(0, 8)) for b in range(nb)]
        acc = np.zeros((self.shape[0], n), F32)
        mn = np.zeros_like(acc)
        for b, s in steps:
            i_acc = isum[b, s].sum(0).astype(F32)  # NOTE: gemv's int32 -> float rounds > 2^24
            i_min = imin[b, s].sum(0).astype(F32)
            acc = fma32(i_acc, (self.d[b][:, None] * d_a[:, b][None, :]).astype(F32), acc)
            mn = fma32(i_min, (self.dmin[b][:, None] * d_a[:, b][None, :]).astype(F32), mn)
        return (acc - mn).astype(F32)
