"""Eight-lane SIMD values for Numba CPU kernels: ``I32x8`` (int32 lanes), ``F32x8`` (float32 lanes).

Numba's auto-vectorizer does poorly on block-quantized rows: a block's inner loop (16 or 32
bytes) is fully unrolled first and LLVM then vectorizes across *blocks*, gathering one byte per
lane.  These two types are LLVM vectors (``<8 x i32>``, ``<8 x float>``), so a kernel spells out
the vector code it wants and LLVM keeps it: on x86-64 with AVX2 one value is one ``ymm`` register,
elsewhere LLVM splits it into what the target has (two NEON registers, two SSE registers...).

Loads (``arr`` is a C-contiguous 1-D or 2-D array; ``i`` counts elements along its last axis; no
bounds checks, so callers index inside the array):

    load_u8(a, r, i)   8 bytes of uint8 row a[r], widened to I32x8 with zeros
    load_i8(a, r, i)   8 bytes of uint8 row a[r] read as int8, sign-extended to I32x8
    load_f16(a, r, i)  8 IEEE halves from byte offset i of uint8 row a[r], as F32x8 (exact)
    load_bf16(a, r, i) 8 bfloat16 from byte offset i of uint8 row a[r], as F32x8 (exact)
    load_f32(x, i)     x[i:i + 8] of a float32 vector
    store_f32(y, r, i, v)  y[r, i:i + 8] = v for a float32 2-D array

Arithmetic: ``I32x8`` supports ``& | << >> + -`` with another I32x8 or an int (broadcast; ``>>``
is a logical shift); ``to_f32(v)`` converts lanes.  ``F32x8`` supports ``+ - *`` with another
F32x8 or a float (broadcast), each one IEEE operation rounded on its own (never contracted, so
decoding matches numpy bit for bit).  ``fma(a, b, c)`` is a*b + c (fused where the target can),
``hsum(v)`` the float32 sum of the lanes, ``zeros()`` an all-zero F32x8, ``lane(v, k)`` lane k of
an F32x8 broadcast to all lanes, ``halves(a, b)`` lanes 0..3 of a with lanes 4..7 of b (I32x8),
``lane_bits(u, k, m)`` spreads bits of a 32-bit scalar over lanes (lane j: ``(u >> (k+j)) & m``).

Scalars: ``f16_to_f32(a, r, i)``, ``bf16_at(a, r, i)``, ``f32_at(a, r, i)`` read the IEEE half,
bfloat16 or float32 at byte offset i of uint8 row a[r], as float32; ``u32_at(a, r, i)`` the
little-endian uint32 there, as int64.
"""
from __future__ import annotations

import operator

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global, signature
from numba.extending import intrinsic, models, register_model

LANES = 8
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()
_VI8 = ir.VectorType(_I8, LANES)
_VI16 = ir.VectorType(_I16, LANES)
_VI32 = ir.VectorType(_I32, LANES)
_VF32 = ir.VectorType(_F32, LANES)
_VF16 = ir.VectorType(ir.HalfType(), LANES)


def vector_type(name: str, lty, module: str):
    """A Numba type (class, instance) held in registers as the LLVM vector type ``lty``; the
    class must be bound to the global ``name + "Type"`` of ``module`` (Numba's cache pickles
    it by that name)."""
    cls = type(name + "Type", (types.Type,), {
        "__init__": lambda self: types.Type.__init__(self, name=name),
        "__module__": module, "__qualname__": name + "Type"})

    class Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, lty)
    register_model(cls)(Model)
    return cls, cls()


I32x8Type, I32x8 = vector_type("I32x8", _VI32, __name__)
F32x8Type, F32x8 = vector_type("F32x8", _VF32, __name__)


# ---- helpers used inside codegen ------------------------------------------------------------

def _splat(builder, value, vty):
    vec = ir.Constant(vty, ir.Undefined)
    vec = builder.insert_element(vec, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(_VI32, [0] * LANES))


def _row_ptr(context, builder, aty, arr, row, i):
    """Pointer to element (row, i) of a C-contiguous 2-D array, or i of a 1-D one, as i8*."""
    ary = context.make_array(aty)(context, builder, arr)
    if aty.ndim == 2:
        stride0 = builder.extract_value(ary.strides, 0)
        base = builder.gep(builder.bitcast(ary.data, _I8.as_pointer()),
                           [builder.mul(row, stride0)])
    else:
        base = builder.bitcast(ary.data, _I8.as_pointer())
    itemsize = context.get_abi_sizeof(context.get_data_type(aty.dtype))
    return builder.gep(base, [builder.mul(i, ir.Constant(i.type, itemsize))])


def _load(builder, ptr, vty):
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _as_i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


# ---- loads and stores -----------------------------------------------------------------------

def _row_reader(ret, lty, convert=None):
    """An intrinsic ``f(a, r, i)`` reading the ``lty`` value (an LLVM scalar or 8-lane vector
    type) at element i of row a[r] (of a uint8 2-D array: byte offset i; or of a 1-D array),
    unaligned, then ``convert(builder, value)`` to the Numba type ``ret``."""
    def typer(typingctx, a, r, i):
        def codegen(context, builder, signature, args):
            aty, rty, ity = signature.args
            row = _as_i64(context, builder, rty, args[1])
            idx = _as_i64(context, builder, ity, args[2])
            v = _load(builder, _row_ptr(context, builder, aty, args[0], row, idx), lty)
            return v if convert is None else convert(builder, v)
        return ret(a, r, i), codegen
    return intrinsic(typer)


def _bf16_bits(builder, h, ity, fty):
    """bfloat16 bits (i16 or <8 x i16>) -> float32: they are the upper half of a float32."""
    sixteen = ir.Constant(_I32, 16) if ity is _I32 else _splat(builder, ir.Constant(_I32, 16), ity)
    return builder.bitcast(builder.shl(builder.zext(h, ity), sixteen), fty)


# 8 lanes at once
load_u8 = _row_reader(I32x8, _VI8, lambda b, v: b.zext(v, _VI32))
load_i8 = _row_reader(I32x8, _VI8, lambda b, v: b.sext(v, _VI32))
load_f16 = _row_reader(F32x8, _VI16, lambda b, v: _half_to_float(b, v))
load_bf16 = _row_reader(F32x8, _VI16, lambda b, v: _bf16_bits(b, v, _VI32, _VF32))


@intrinsic
def load_f32(typingctx, x, i):
    sig = F32x8(x, i)

    def codegen(context, builder, signature, args):
        xty, ity = signature.args
        idx = _as_i64(context, builder, ity, args[1])
        return _load(builder, _row_ptr(context, builder, xty, args[0], None, idx), _VF32)
    return sig, codegen


@intrinsic
def store_f32(typingctx, y, r, i, v):
    sig = types.none(y, r, i, v)

    def codegen(context, builder, signature, args):
        yty, rty, ity, _ = signature.args
        row = _as_i64(context, builder, rty, args[1])
        idx = _as_i64(context, builder, ity, args[2])
        ptr = _row_ptr(context, builder, yty, args[0], row, idx)
        builder.store(args[3], builder.bitcast(ptr, _VF32.as_pointer()), align=1)
        return context.get_dummy_value()
    return sig, codegen


# ---- IEEE half -> float ---------------------------------------------------------------------

def _use_hardware_f16() -> bool:
    """True where LLVM turns ``fpext half`` into an instruction rather than a library call."""
    import platform

    from .cpu_isa import host_features  # as Numba compiles: NUMBA_CPU_FEATURES applied
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        return bool(host_features().get("f16c", False))
    return False


_HW_F16 = _use_hardware_f16()


def _half_to_float(builder, h):
    """<8 x i16> half bits -> <8 x float>, exact for all inputs (zeros, subnormals, inf, NaN)."""
    if _HW_F16:
        return builder.fpext(builder.bitcast(h, _VF16), _VF32)
    # Portable path: move exponent+mantissa into float position and rescale by 2**112, which is
    # exact for normal and subnormal halves alike; inf/NaN get the float exponent set directly.
    c = lambda v: _splat(builder, ir.Constant(_I32, v), _VI32)  # noqa: E731
    u = builder.zext(h, _VI32)
    mag = builder.shl(builder.and_(u, c(0x7FFF)), c(13))
    scaled = builder.fmul(builder.bitcast(mag, _VF32),
                          _splat(builder, ir.Constant(_F32, 2.0 ** 112), _VF32))
    special = builder.icmp_unsigned(">=", builder.and_(u, c(0x7C00)), c(0x7C00))
    mag = builder.select(special, builder.or_(mag, c(0x7F800000)), builder.bitcast(scaled, _VI32))
    sign = builder.shl(builder.and_(u, c(0x8000)), c(16))
    return builder.bitcast(builder.or_(mag, sign), _VF32)


# one value, as a scalar: the IEEE half, float32, uint32 (as int64) and bfloat16 at byte offset
# i of uint8 row a[r]
f16_to_f32 = _row_reader(types.float32, _I16, lambda b, h: b.extract_element(
    _half_to_float(b, _splat(b, h, _VI16)), ir.Constant(_I32, 0)))
f32_at = _row_reader(types.float32, _F32)
u32_at = _row_reader(types.int64, _I32, lambda b, v: b.zext(v, ir.IntType(64)))
bf16_at = _row_reader(types.float32, _I16, lambda b, h: _bf16_bits(b, h, _I32, _F32))


# ---- arithmetic -----------------------------------------------------------------------------

def _operand(context, builder, ty, val, vty):
    """A vector operand: the vector itself, or a scalar converted and broadcast."""
    if isinstance(ty, (I32x8Type, F32x8Type)):
        return val
    if vty is _VI32:
        return _splat(builder, context.cast(builder, val, ty, types.int32), _VI32)
    return _splat(builder, context.cast(builder, val, ty, types.float32), _VF32)


_INT_OPS = {operator.and_: "and_", operator.or_: "or_", operator.lshift: "shl",
            operator.rshift: "lshr", operator.add: "add", operator.sub: "sub"}
_FLOAT_OPS = {operator.add: "fadd", operator.sub: "fsub", operator.mul: "fmul"}

# NOTE: operators are registered with Numba's low-level API (a typing template plus a lowering
# per operand-kind pair) rather than ``@overload``: an overload compiles a small function per
# signature, which made first-call compilation of the kernels several times slower.


def _lower_binop(op, method, vcls, vty, scalars):
    def lower(context, builder, sig, args):
        x = _operand(context, builder, sig.args[0], args[0], vty)
        y = _operand(context, builder, sig.args[1], args[1], vty)
        return getattr(builder, method)(x, y)
    lower_builtin(op, vcls, vcls)(lower)
    for scalar in scalars:
        lower_builtin(op, vcls, scalar)(lower)
        lower_builtin(op, scalar, vcls)(lower)


def _typing_template(op):
    class Template(AbstractTemplate):
        def generic(self, args, kws):
            if len(args) != 2 or kws:
                return None
            a, b = args
            for vcls, vtype, scalars, table in (
                    (I32x8Type, I32x8, (types.Integer,), _INT_OPS),
                    (F32x8Type, F32x8, (types.Float, types.Integer), _FLOAT_OPS)):
                if op not in table:
                    continue
                if isinstance(a, vcls) and isinstance(b, (vcls,) + scalars) or \
                        isinstance(b, vcls) and isinstance(a, scalars):
                    return signature(vtype, a, b)
            return None
    Template.key = op
    infer_global(op)(Template)


def _register_ops():
    for op, method in _INT_OPS.items():
        _lower_binop(op, method, I32x8Type, _VI32, (types.Integer,))
    for op, method in _FLOAT_OPS.items():
        _lower_binop(op, method, F32x8Type, _VF32, (types.Float, types.Integer))
    for op in set(_INT_OPS) | set(_FLOAT_OPS):
        _typing_template(op)


_register_ops()


@intrinsic
def to_f32(typingctx, v):
    sig = F32x8(v)

    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], _VF32)
    return sig, codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c, lane by lane; a or b may be a scalar (broadcast)."""
    sig = F32x8(a, b, c)

    def codegen(context, builder, signature, args):
        x, y, z = (_operand(context, builder, t, v, _VF32) for t, v in zip(signature.args, args))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VF32, [_VF32] * 3), "llvm.fmuladd.v8f32")
        return builder.call(fn, [x, y, z])
    return sig, codegen


@intrinsic
def hsum(typingctx, v):
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        x = args[0]
        width = LANES
        while width > 1:  # fold halves: 8 -> 4 -> 2 -> 1
            width //= 2
            half = ir.VectorType(_I32, width)
            lo = builder.shuffle_vector(x, x, ir.Constant(half, list(range(width))))
            hi = builder.shuffle_vector(x, x, ir.Constant(half, list(range(width, 2 * width))))
            x = builder.fadd(lo, hi)
        return builder.extract_element(x, ir.Constant(_I32, 0))
    return sig, codegen


@intrinsic
def zeros(typingctx):
    sig = F32x8()

    def codegen(context, builder, signature, args):
        return ir.Constant(_VF32, [0.0] * LANES)
    return sig, codegen


@intrinsic
def lane(typingctx, v, k):
    """All eight lanes set to lane k of an F32x8 (a broadcast; k constant after unrolling)."""
    sig = F32x8(v, k)

    def codegen(context, builder, signature, args):
        idx = context.cast(builder, args[1], signature.args[1], types.int32)
        return _splat(builder, builder.extract_element(args[0], idx), _VF32)
    return sig, codegen


@intrinsic
def halves(typingctx, a, b):
    """An I32x8 of a's lanes 0..3 and b's lanes 4..7."""
    sig = I32x8(a, b)

    def codegen(context, builder, signature, args):
        return builder.shuffle_vector(args[0], args[1],
                                      ir.Constant(_VI32, [0, 1, 2, 3, 12, 13, 14, 15]))
    return sig, codegen


@intrinsic
def lane_bits(typingctx, u, k, m):
    """Lane j = (u >> (k + j)) & m, for the low 32 bits of an integer scalar u."""
    sig = I32x8(u, k, m)

    def codegen(context, builder, signature, args):
        uv = _splat(builder, context.cast(builder, args[0], signature.args[0], types.int32), _VI32)
        kv = _splat(builder, context.cast(builder, args[1], signature.args[1], types.int32), _VI32)
        mv = _splat(builder, context.cast(builder, args[2], signature.args[2], types.int32), _VI32)
        shifts = builder.add(kv, ir.Constant(_VI32, list(range(LANES))))
        return builder.and_(builder.lshr(uv, shifts), mv)
    return sig, codegen


__all__ = ["I32x8", "F32x8", "LANES", "load_u8", "load_i8", "load_f16", "load_bf16", "load_f32",
           "store_f32", "f16_to_f32", "bf16_at", "f32_at", "u32_at", "to_f32", "fma", "hsum",
           "zeros", "lane", "halves", "lane_bits"]
