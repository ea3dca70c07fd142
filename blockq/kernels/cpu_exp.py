"""A float32 ``exp`` that Numba loops vectorize (``exp32``), and ``silu32`` on it.

``np.exp`` in a Numba loop is a call to the C library's ``expf`` per element: LLVM cannot
vectorize the loop around it, and a prompt's SwiGLU (5.9 M elements on SmolLM2 at 128 tokens)
and attention softmax spent ~3.4 ns per element there.  ``exp32`` is plain arithmetic, so the loop
around it becomes 16-lane (AVX-512) or 8-lane (AVX2) code:

    exp(x) = 2^n * exp(b),  n = rint(x / ln 2),  b = x - n ln 2  (|b| <= ln2 / 2)

with n ln 2 subtracted in two parts (Cody-Waite: a short high part whose product by n is exact,
then the rest), exp(b) - 1 a degree-5 polynomial in b (ggml's ``ggml_v_expf`` coefficients, so
the default numerics round as llama.cpp's vector ``expf`` does), and 2^n built from its exponent
bits.  x is clamped to [-87.33, 88.37] first (2^n stays a normal float): below, the result is
~1.2e-38 instead of a subnormal or 0; above, ~2.4e38 instead of inf.  Within the range the error
is under 2 ulp (``tests/test_ops.py`` checks it against numpy on a dense grid).

NOTE: the functions are compiled without the ``reassoc`` fast-math flag: with it LLVM may fold
the two-part reduction ``(x - n hi) - n lo`` into ``x - n (hi + lo)``, which loses the exactness
of the first part (~40 ulp near the ends of the range).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32
_H = float.fromhex
LOG2E = F32(_H("0x1.715476p+0"))
LN2_HI = F32(_H("0x1.62e4p-1"))  # 11 significant bits: n * LN2_HI is exact for |n| < 2^13
LN2_LO = F32(_H("0x1.7f7d1cp-20"))
C1, C2, C3 = F32(_H("0x1.ffffecp-1")), F32(_H("0x1.fffdb6p-2")), F32(_H("0x1.555e66p-3"))
C4, C5 = F32(_H("0x1.573e2ep-5")), F32(_H("0x1.0e4020p-7"))
X_LO, X_HI = F32(-87.33), F32(88.37)  # 2^n within the normal floats: n in [-126, 127]

# contraction into fma and no-NaN / no-inf assumptions (min / max become single instructions),
# but no reassociation (see the module's NOTE)
_FLAGS = {"contract", "nnan", "ninf", "nsz", "arcp"}


@intrinsic
def bits_f32(typingctx, i):
    """The float32 whose IEEE bits are the int32 ``i``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of the float32 ``x`` as an int32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@njit(fastmath=_FLAGS, cache=True, error_model="numpy")
def exp32(x):
    """exp(x) for a float32 x (see the module's doc for range and error)."""
    x = min(max(x, X_LO), X_HI)
    n = np.rint(x * LOG2E)
    b = (x - n * LN2_HI) - n * LN2_LO
    k = bits_f32((np.int32(n) + np.int32(127)) << np.int32(23))  # 2^n
    u = b * b
    j = ((C5 * b + C4) * u + (C3 * b + C2)) * u + C1 * b  # exp(b) - 1
    return j * k + k


@njit(fastmath=_FLAGS, cache=True, error_model="numpy")
def silu32(x):
    """x / (1 + exp(-x)) for a float32 x."""
    return x / (F32(1.0) + exp32(-x))


__all__ = ["exp32", "silu32", "bits_f32", "f32_bits"]
