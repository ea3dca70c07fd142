"""llama.cpp's CPU dot for the legacy 4/5-bit weights Q4_0, Q5_0, Q5_1 (numerics="llama").

Same contract as :class:`blockq.kernels.cpu_q8.Q8Dot`: float32 activations (n, cols) in,
(n, rows) float32 out, bit-identical to ggml's CPU backend (x86, AVX2 + FMA build).

Which code runs in ggml (``ggml_compute_forward_mul_mat``, weights in an ordinary CPU buffer):

- the activations are first quantized to the weight type's ``vec_dot_type`` (Q8_0 for Q4_0 and
  Q5_0, Q8_1 for Q5_1) with the AVX2 row quantizer (:func:`cpu_q8.quantize_q8`);
- n >= 2 activation rows, Q4_0 / Q5_0 (and Q8_0): ``llamafile_sgemm`` takes the product
  (``tinyBLAS_Q0_AVX``: tiles of up to 4 weight rows x 4 activation rows, split over threads by
  tile).  It refuses n == 1 ("only enable sgemm for prompt processing") and has no Q5_1 case;
- otherwise (n == 1, or Q5_1 always) ``ggml_vec_dot_q4_0_q8_0`` / ``_q5_0_q8_0`` /
  ``_q5_1_q8_1``, one output at a time.

Both paths compute every output the same way, so one emulation serves all n: per 32-block, the
8 float lanes of ``maddubs`` + ``madd`` (each the exact integer sum of 4 adjacent code products)
are accumulated as ``acc = fma(d_w * d_a, lanes, acc)`` over the blocks in order, and the
output is ``hsum8(acc)`` (tinyBLAS's ``hsum`` adds the lanes in the same tree as
``hsum_float_8``).  The tile shape only decides which outputs are computed together, never
the order within one.  Q5_1 adds ``summs = fma(m_w, s_a, summs)`` (``summs += m * s``,
contracted by GCC) after the 8-lane sum.  No ``maddubs`` pair sum can saturate here
(|code| <= 31 against |activation| <= 127).
"""
from __future__ import annotations

from .cpu_q8 import ACTIVATIONS, Q8Dot

LEGACY = ("Q4_0", "Q5_0", "Q5_1")  # the 32-value types this module takes (see ACTIVATIONS)


class LegacyDot(Q8Dot):
    """A Q4_0, Q5_0 or Q5_1 matrix (a ``QMatrix``) multiplied the way llama.cpp's CPU does:
    the arithmetic of :class:`.cpu_q8.Q8Dot`, which the module docstring derives."""

    TYPES = LEGACY


assert set(LEGACY) | set(Q8Dot.TYPES) == set(ACTIVATIONS)
