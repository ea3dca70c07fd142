"""Sixteen-lane values for Numba CPU kernels: ``I32x16`` (int32 lanes) and ``F32x16`` (float32
lanes), LLVM ``<16 x i32>`` / ``<16 x float>`` vectors, and the codegen helpers the kernels built
on them share.

Only generic LLVM vector operations are emitted here (loads, stores, shuffles, ``fmuladd``): on
AVX-512 one value is one zmm register, with AVX2 LLVM splits it into two ymm, on arm64 into four
NEON registers; never an instruction the CPU lacks.  So this module, unlike the int8 kernel
modules, may be imported on any CPU (``cpu_attend``, a prompt's attention, runs everywhere); the
x86-only intrinsics built on these types live in :mod:`blockq.kernels.cpu_int8_gemm`.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_simd import _as_i64, _row_ptr, vector_type

_V16I32 = ir.VectorType(ir.IntType(32), 16)
_V16F32 = ir.VectorType(ir.FloatType(), 16)
I32x16Type, I32x16 = vector_type("I32x16", _V16I32, __name__)
F32x16Type, F32x16 = vector_type("F32x16", _V16F32, __name__)


@intrinsic
def zeros16(typingctx, like):
    """All-zero I32x16 (like an int) or F32x16 (like a float)."""
    ret, lty = (F32x16, _V16F32) if isinstance(like, types.Float) else (I32x16, _V16I32)

    def codegen(context, builder, signature, args):
        return ir.Constant(lty, [0.0 if lty is _V16F32 else 0] * 16)
    return ret(like), codegen


def _ptr(context, builder, aty, arr, rty, r, ity, i):
    return _row_ptr(context, builder, aty, arr, _as_i64(context, builder, rty, r),
                    _as_i64(context, builder, ity, i))


def _load16f(context, builder, aty, a, rty, r, ity, i):
    ptr = _ptr(context, builder, aty, a, rty, r, ity, i)
    return builder.load(builder.bitcast(ptr, _V16F32.as_pointer()), align=1)


def _splat16(context, builder, ty, v):
    x = context.cast(builder, v, ty, types.float32)
    vec = builder.insert_element(ir.Constant(_V16F32, ir.Undefined), x,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, ir.Constant(_V16F32, ir.Undefined),
                                  ir.Constant(_V16I32, [0] * 16))


def _fmuladd16(builder, a, b, c):
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3),
                                       "llvm.fmuladd.v16f32")
    return builder.call(f, [a, b, c])


def _load16i(context, builder, aty, a, rty, r, ity, i):
    ptr = _ptr(context, builder, aty, a, rty, r, ity, i)
    return builder.load(builder.bitcast(ptr, _V16I32.as_pointer()), align=1)
