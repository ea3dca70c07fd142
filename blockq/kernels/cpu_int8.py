"""Int8-activation products for x86 (AVX2, AVX-VNNI, AVX-512 VNNI): weights x 8-bit activations.

This is what llama.cpp's CPU backend computes.  A matrix input (one token's activations, or a
prompt's) is quantized once per product to the activation blocks llama.cpp dots each weight type
with -- Q8_K (256 values: f32 scale, int8 codes, sums of 16) for the k-quants, Q8_1 (32 values:
f16 scale, f16 scaled sum, int8 codes) for the legacy types -- and each weight block's integer
codes are dotted with the int8 codes in 32-byte registers:

    pmaddubsw  32 unsigned bytes x 32 signed bytes -> 16 int16 (sums of adjacent pairs)
    pmaddwd    16 int16 x 16 int16 (a sub-block scale, or ones) -> 8 int32
    vpdpbusd   acc + the two steps above with ones, in one instruction, without the int16
               saturation (the VNNI variants)
    vpdpwssd   acc + pmaddwd, in one instruction (the VNNI variants)

Signed weight codes (Q4_0, Q5_0, Q8_0) take the usual sign trick: ``|w| * (sign(w) * y)``.  The
constant offsets of Q3_K (-4) and Q6_K (-32) and the mins of Q2_K / Q4_K / Q5_K are applied once
per super-block through Q8_K's sums of 16 activation codes.  ``pmaddubsw`` saturates at int16:
every pair here is at most 2 * 128 * 127 = 32512.

A kernel ``_dot_<type>(w, r, y, t)`` returns row r of the weights times activation row t; one
driver per job runs it over rows and tokens on Numba's threads (decode: a range of rows per
thread, with a software prefetch a few KiB ahead of the row being read; prompt: tiles of
``TILE_ROWS`` weight rows that stay in cache while every token's activation row passes over
them).

The vector type here is ``I8x32`` (``<32 x i8>``, one ymm register); int32 and float lanes are
:mod:`blockq.kernels.cpu_simd`'s ``I32x8`` / ``F32x8``.  The dots (``dot_us``, ``dot_ss``,
``dot_usv`` and their accumulating forms ``*_acc``) expand to the instructions of the variant
:func:`blockq.kernels.cpu_isa.isa` chose for this process, once, when this module is imported;
import it only where that is not ``float``: compiling it elsewhere aborts the process.  Every
jitted function that calls them must be compiled with :func:`variant_jit`, whose disk cache is
keyed by the variant (the Python source is the same for all of them, the machine code is not).
Results equal ``dequantize(W) @ dequantize(Q8(x))`` up to float32 summation order
(``tests/test_int8.py``).  Block sizes come from :mod:`blockq.types`.
"""
from __future__ import annotations

import functools
import operator

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global, signature
from numba.extending import intrinsic

from ..types import BY_NAME, QK, QK_K
from .cpu_isa import VNNI, announce_compile, isa
from .cpu_matvec import _function_at
from .jitcache import keyed_jit
from .cpu_simd import I32x8, _as_i64, _row_ptr, _row_reader, f16_to_f32, f32_at, fma, hsum, \
    to_f32, u32_at, vector_type, zeros

VARIANT = isa()  # the instructions the dots below expand to, fixed for the process
if VARIANT == "float":  # pragma: no cover - guarded by the caller
    raise ImportError("blockq.kernels.cpu_int8 needs an int8 variant; this process runs float")
_VNNI = VARIANT in VNNI

F32 = np.float32
JIT = dict(fastmath=True, cache=True)
INLINE = dict(JIT, inline="always")  # a row's dot and its pieces: inlined into the row loop
EXACT = dict(cache=True)  # the activation quantizers: each float operation as ggml's C does it


def variant_jit(**options):
    """``numba.njit(cache=True, **options)`` whose cache entries belong to this variant: for
    every function that calls the dots of this module, here or elsewhere.

    NOTE: the kernels' Python source is the same for every variant, the machine code their
    intrinsics expand to is not; without the variant in the cache key a process forcing
    ``avx2`` would load the VNNI code a previous process cached (and the reverse)."""
    return keyed_jit((VARIANT,), **options)

_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_V32I8 = ir.VectorType(_I8, 32)
_V16I8 = ir.VectorType(_I8, 16)
_V16I16 = ir.VectorType(_I16, 16)
_V8I32 = ir.VectorType(_I32, 8)


def _offsets(name: str) -> dict[str, int]:
    """Byte offset of each field of a block type, from the table."""
    out, o = {}, 0
    for f, dt, count in BY_NAME[name].fields:
        out[f] = o
        o += np.dtype(dt).itemsize * count
    return out


# Activation blocks.  Q8_K is in the type table.  Q8_1 (ggml's block_q8_1, not a file type)
# is laid out as Q8_0 with the scaled sum after the scale:
#   36 bytes: 0..1 d (f16) | 2..3 s = d * sum(qs) (f16) | 4..35 qs (int8)
# and the Q8_0 blocks of Q4_0 / Q5_0 / Q8_0 weights the same way with the exact sum instead:
#   36 bytes: 0..1 d (f16) | 2..3 sum(qs) (int16) | 4..35 qs (int8)
# (d and qs are ggml's Q8_0, which has no sum; the kernels use it to take the weights' codes
# unsigned and subtract their offset once per block)
Q8K = BY_NAME["Q8_K"].type_size  # 292: 0..3 d (f32) | 4..259 qs (int8) | 260..291 bsums (i16)
Q8K_QS, Q8K_BSUMS = _offsets("Q8_K")["qs"], _offsets("Q8_K")["bsums"]
Q8_1 = BY_NAME["Q8_0"].type_size + 2
Q8_1_QS = 4

PREFETCH_BYTES = 4096  # how far ahead of the weight byte being read the prefetch points
TILE_ROWS = 16  # prompt path: weight rows a thread keeps in cache while all tokens pass


# =============================================================================================
# the <32 x i8> value and its intrinsics


I8x32Type, I8x32 = vector_type("I8x32", _V32I8, __name__)  # 32 bytes (one ymm register)
I16x16Type, I16x16 = vector_type("I16x16", _V16I16, __name__)  # 16 int16 lanes


def _splat(builder, value, vty):
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _lane_operand(context, builder, ty, val, vty):
    if isinstance(ty, (I8x32Type, I16x16Type)):
        return val
    scalar = builder.trunc(context.cast(builder, val, ty, types.int64), vty.element)
    return _splat(builder, scalar, vty)


# lane-wise & | << >> (logical) + - with a value of the same type or an int (broadcast)
_LANE_OPS = {operator.and_: "and_", operator.or_: "or_", operator.lshift: "shl",
             operator.rshift: "lshr", operator.add: "add", operator.sub: "sub"}


def _register_lane_ops(cls, vtype, vty):
    for op, method in _LANE_OPS.items():
        def lower(context, builder, sig, args, method=method):
            x = _lane_operand(context, builder, sig.args[0], args[0], vty)
            y = _lane_operand(context, builder, sig.args[1], args[1], vty)
            return getattr(builder, method)(x, y)
        lower_builtin(op, cls, cls)(lower)
        lower_builtin(op, cls, types.Integer)(lower)

        class Template(AbstractTemplate):
            key = op

            def generic(self, args, kws):
                if len(args) == 2 and not kws and isinstance(args[0], cls) and \
                        isinstance(args[1], (cls, types.Integer)):
                    return signature(vtype, *args)
                return None
        infer_global(op)(Template)


_register_lane_ops(I8x32Type, I8x32, _V32I8)
_register_lane_ops(I16x16Type, I16x16, _V16I16)

# 32 bytes at byte offset i of row a[r] (unaligned)
load32 = _row_reader(I8x32, _V32I8)


# 16 int16 at byte offset i of row a[r]; 16 bytes there widened to int16 (zeros / sign)
load16 = _row_reader(I16x16, _V16I16)
u8x16 = _row_reader(I16x16, _V16I8, lambda b, v: b.zext(v, _V16I16))
i8x16 = _row_reader(I16x16, _V16I8, lambda b, v: b.sext(v, _V16I16))


def _nibbles(builder, v):
    hi = builder.lshr(v, _splat(builder, ir.Constant(_I8, 4), _V16I8))
    both = builder.shuffle_vector(v, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
    return builder.and_(both, _splat(builder, ir.Constant(_I8, 15), _V32I8))


# 16 bytes of 4-bit codes at byte offset i of row a[r], legacy order: lanes 0..15 = the low
# nibbles, lanes 16..31 = the high nibbles
nibbles = _row_reader(I8x32, _V16I8, _nibbles)


@intrinsic
def bits32(typingctx, u):
    """An I8x32 whose byte j is bit j (0 or 1) of the low 32 bits of the integer u."""
    def codegen(context, builder, signature, args):
        v = builder.trunc(context.cast(builder, args[0], signature.args[0], types.int64), _I32)
        return builder.zext(builder.bitcast(v, ir.VectorType(_I1, 32)), _V32I8)
    return I8x32(u), codegen


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]),
                                        name)
    return builder.call(fn, args)


def _maddubs(builder, u, s):  # u8 x s8 pairs -> i16 (saturating; never reached here)
    return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u, s])


def _madd(builder, a, b):  # i16 x i16 pairs -> i32
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [a, b])


def _as_v8i32(builder, v):
    return builder.bitcast(v, _V8I32)


def _dpbusd(builder, acc, u, s):  # acc + sums of four u8 x s8 products -> i32 (VNNI only)
    # NOTE: operands as <8 x i32>, the form older LLVMs declare; LLVM 22 upgrades it
    return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                 [acc, _as_v8i32(builder, u), _as_v8i32(builder, s)])


def _dpwssd(builder, acc, a, b):  # acc + pmaddwd(a, b) (VNNI only)
    return _call(builder, "llvm.x86.avx512.vpdpwssd.256", _V8I32,
                 [acc, _as_v8i32(builder, a), _as_v8i32(builder, b)])


def _izero():
    return ir.Constant(_V8I32, [0] * 8)


def _ones16(builder):
    return _splat(builder, ir.Constant(_I16, 1), _V16I16)


def _us(builder, acc, u, s):
    """acc + (lane k: sum of u[j] * s[j], j in 4k..4k+3)."""
    if _VNNI:
        return _dpbusd(builder, acc, u, s)
    return builder.add(acc, _madd(builder, _maddubs(builder, u, s), _ones16(builder)))


def _ss(builder, acc, a, b):
    """``_us`` for two signed operands: |a| * (b with a's signs)."""
    absa = _call(builder, "llvm.abs.v32i8", _V32I8, [a, ir.Constant(_I1, 0)])
    return _us(builder, acc, absa, _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [b, a]))


def _usv(builder, acc, u, s, sc):
    """acc + (lane k: sum of the int16 pair sums of u * s, each times its lane of sc)."""
    p = _maddubs(builder, u, s)
    if _VNNI:
        return _dpwssd(builder, acc, p, sc)
    return builder.add(acc, _madd(builder, p, sc))


@intrinsic
def dot_us(typingctx, u, s):
    """Lane k of an I32x8: sum of u[j] * s[j] for j in 4k..4k+3 (u unsigned, s signed bytes)."""
    def codegen(context, builder, signature, args):
        return _us(builder, _izero(), *args)
    return I32x8(u, s), codegen


@intrinsic
def dot_us_acc(typingctx, acc, u, s):
    """``acc + dot_us(u, s)`` (one ``vpdpbusd`` on the VNNI variants)."""
    def codegen(context, builder, signature, args):
        return _us(builder, *args)
    return I32x8(acc, u, s), codegen


@intrinsic
def dot_usv(typingctx, u, s, sc):
    """``dot_us(u, s)`` with each int16 pair sum times the matching lane of the I16x16 sc."""
    def codegen(context, builder, signature, args):
        return _usv(builder, _izero(), *args)
    return I32x8(u, s, sc), codegen


@intrinsic
def dot_usv_acc(typingctx, acc, u, s, sc):
    """``acc + dot_usv(u, s, sc)`` (``pmaddubsw`` + ``vpdpwssd`` on the VNNI variants)."""
    def codegen(context, builder, signature, args):
        return _usv(builder, *args)
    return I32x8(acc, u, s, sc), codegen


@intrinsic
def pick(typingctx, v, a, b):
    """An I16x16 of lane a of v in lanes 0..7 and lane b in lanes 8..15 (a, b constant once
    the loops are unrolled; LLVM then makes it one shuffle)."""
    def codegen(context, builder, signature, args):
        ia, ib = (builder.trunc(context.cast(builder, x, t, types.int64), _I32)
                  for x, t in zip(args[1:], signature.args[1:]))
        two = builder.insert_element(ir.Constant(ir.VectorType(_I16, 2), ir.Undefined),
                                     builder.extract_element(args[0], ia), ir.Constant(_I32, 0))
        two = builder.insert_element(two, builder.extract_element(args[0], ib),
                                     ir.Constant(_I32, 1))
        return builder.shuffle_vector(two, two, ir.Constant(ir.VectorType(_I32, 16),
                                                            [0] * 8 + [1] * 8))
    return I16x16(v, a, b), codegen


@intrinsic
def pairs_hi(typingctx, v):
    """An I16x16 of lanes 8, 8, 9, 9, ..., 15, 15 of v (eight values, each for two sums of 16)."""
    def codegen(context, builder, signature, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(
            ir.VectorType(_I32, 16), [8 + k // 2 for k in range(16)]))
    return I16x16(v), codegen


@intrinsic
def madd16(typingctx, a, b):
    """An I32x8 of the sums of adjacent int16 products of two I16x16 (``pmaddwd``)."""
    def codegen(context, builder, signature, args):
        return _madd(builder, args[0], args[1])
    return I32x8(a, b), codegen


@intrinsic
def madd_sum(typingctx, a, b):
    """sum over the 16 lanes of a * b (two I16x16), as an int64."""
    def codegen(context, builder, signature, args):
        v = _madd(builder, args[0], args[1])
        width = 8
        while width > 1:
            width //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width),
                                                          list(range(width))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width),
                                                          list(range(width, 2 * width))))
            v = builder.add(lo, hi)
        return builder.sext(builder.extract_element(v, ir.Constant(_I32, 0)), _I64)
    return types.int64(a, b), codegen


@intrinsic
def words16(typingctx, u0, u1, u2, u3):
    """An I16x16 of the 16 bytes (little-endian) of four 32-bit integers, zero-extended."""
    def codegen(context, builder, signature, args):
        v = ir.Constant(ir.VectorType(_I32, 4), ir.Undefined)
        for k, (x, t) in enumerate(zip(args, signature.args)):
            v = builder.insert_element(v, builder.trunc(context.cast(builder, x, t, types.int64),
                                                        _I32), ir.Constant(_I32, k))
        return builder.zext(builder.bitcast(v, _V16I8), _V16I16)
    return I16x16(u0, u1, u2, u3), codegen


@intrinsic
def dot_ss(typingctx, a, b):
    """``dot_us`` for two signed operands: |a| * (b with a's signs)."""
    def codegen(context, builder, signature, args):
        return _ss(builder, _izero(), *args)
    return I32x8(a, b), codegen


@intrinsic
def dot_ss_acc(typingctx, acc, a, b):
    """``acc + dot_ss(a, b)``."""
    def codegen(context, builder, signature, args):
        return _ss(builder, *args)
    return I32x8(acc, a, b), codegen


@intrinsic
def lane0(typingctx, v):
    """An I32x8 of the integer v (its low 32 bits) in lane 0 and zeros elsewhere."""
    def codegen(context, builder, signature, args):
        x = builder.trunc(context.cast(builder, args[0], signature.args[0], types.int64), _I32)
        return builder.insert_element(_izero(), x, ir.Constant(_I32, 0))
    return I32x8(v), codegen


@intrinsic
def izeros(typingctx):
    def codegen(context, builder, signature, args):
        return _izero()
    return I32x8(), codegen


@intrinsic
def prefetch(typingctx, a, r, i):
    """Hint the cache line at byte offset i of row a[r] into L1 (any address; never faults)."""
    def codegen(context, builder, signature, args):
        aty, rty, ity = signature.args
        ptr = _row_ptr(context, builder, aty, args[0], _as_i64(context, builder, rty, args[1]),
                       _as_i64(context, builder, ity, args[2]))
        c = lambda v: ir.Constant(_I32, v)  # noqa: E731
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, c(0), c(3), c(1)])
        return context.get_dummy_value()
    return types.none(a, r, i), codegen


# ---- stores into activation blocks (uint8 rows) ---------------------------------------------

def _writer(convert, doc):
    """An intrinsic ``f(a, r, i, v)`` storing ``convert(context, builder, type of v, v)`` at
    byte offset i of row a[r] (unaligned)."""
    def typer(typingctx, a, r, i, v):
        def codegen(context, builder, signature, args):
            aty, rty, ity, vty = signature.args
            ptr = _row_ptr(context, builder, aty, args[0],
                           _as_i64(context, builder, rty, args[1]),
                           _as_i64(context, builder, ity, args[2]))
            x = convert(context, builder, vty, args[3])
            builder.store(x, builder.bitcast(ptr, x.type.as_pointer()), align=1)
            return context.get_dummy_value()
        return types.none(a, r, i, v), codegen
    typer.__doc__ = doc
    return intrinsic(typer)


def _as_f32(context, builder, ty, v):
    return context.cast(builder, v, ty, types.float32)


put_f32 = _writer(_as_f32, "a[r, i:i+4] = float32 v")
put_f16 = _writer(lambda c, b, t, v: b.bitcast(b.fptrunc(_as_f32(c, b, t, v), ir.HalfType()), _I16),
                  "a[r, i:i+2] = the IEEE half nearest to v (F16C vcvtps2ph)")
i16_at = _row_reader(types.int64, _I16, lambda b, v: b.sext(v, _I64))  # int16 at byte i
put_i16 = _writer(lambda c, b, t, v: b.trunc(c.cast(b, v, t, types.int64), _I16),
                  "a[r, i:i+2] = the low 16 bits of the integer v")


# =============================================================================================
# activations -> Q8_K / Q8_1 rows (one uint8 row of blocks per token)


@variant_jit(**EXACT)
def _quantize_q8_k(X, Y):
    """``quantize_row_q8_K_ref`` per row of X (n, cols) into Y (n, cols / 256 * 292).

    ``iscale = -127 / x[first argmax |x|]``, ``q = min(127, rint(iscale * x))``,
    ``d = 1 / iscale``; an all-zero block gets d = 0 and zero codes and sums."""
    n, cols = X.shape
    for t in range(n):
        for b in range(cols // QK_K):
            x0, yo = b * QK_K, b * Q8K
            amax, mx = F32(0), F32(0)
            for j in range(QK_K):
                ax = abs(X[t, x0 + j])
                if ax > amax:
                    amax, mx = ax, X[t, x0 + j]
            iscale = F32(F32(-127.0) / mx) if amax != 0 else F32(0)
            for g in range(QK_K // 16):
                s = 0
                for j in range(16):
                    q = min(127, np.int64(np.rint(F32(iscale * X[t, x0 + 16 * g + j]))))
                    Y[t, yo + Q8K_QS + 16 * g + j] = np.uint8(q & 255)
                    s += q
                put_i16(Y, t, yo + Q8K_BSUMS + 2 * g, s)
            put_f32(Y, t, yo, F32(F32(1.0) / iscale) if amax != 0 else F32(0))


@variant_jit(**EXACT)
def _quantize_q8_32(X, Y, exact_sum):
    """ggml's AVX2 ``quantize_row_q8_1`` per row of X (n, cols) into Y (n, cols / 32 * 36):
    ``d = amax / 127``, ``q = rint(x * (127 / amax))``, ``s = d * sum(q)``, both as f16; with
    ``exact_sum`` the Q8_0 blocks above (the same d and q, the int16 sum(q) for s)."""
    n, cols = X.shape
    for t in range(n):
        for b in range(cols // QK):
            x0, yo = b * QK, b * Q8_1
            amax = F32(0)
            for j in range(QK):
                amax = max(amax, abs(X[t, x0 + j]))
            inv = F32(F32(127.0) / amax) if amax != 0 else F32(0)
            s = 0
            for j in range(QK):
                q = np.int64(np.rint(F32(X[t, x0 + j] * inv)))
                Y[t, yo + Q8_1_QS + j] = np.uint8(q & 255)
                s += q
            d = F32(amax / F32(127.0))
            put_f16(Y, t, yo, d)
            if exact_sum:
                put_i16(Y, t, yo + 2, s)
            else:
                put_f16(Y, t, yo + 2, F32(d * F32(s)))


def _q8_32_quantizer(exact_sum):
    @variant_jit(**EXACT)
    def quantize(X, Y):
        _quantize_q8_32(X, Y, exact_sum)
    return quantize


_quantize_q8_1, _quantize_q8_0 = _q8_32_quantizer(False), _q8_32_quantizer(True)


@variant_jit(**EXACT)
def _dequantize_q8(Y, X, per, size, scale_f32):
    """X = the values of the activation blocks Y (``d * q``): Q8_K (scale_f32) or Q8_1."""
    n, cols = X.shape
    qs = Q8K_QS if scale_f32 else Q8_1_QS
    for t in range(n):
        for b in range(cols // per):
            yo = b * size
            d = f32_at(Y, t, yo) if scale_f32 else f16_to_f32(Y, t, yo)
            for j in range(per):
                X[t, b * per + j] = F32(np.int8(Y[t, yo + qs + j])) * d


# =============================================================================================
# legacy 32-weight blocks x Q8_1 (layouts as in blockq.types; see cpu_matvec for drawings)

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (BY_NAME[n].type_size for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                                                  "Q8_0"))
_O = {n: _offsets(n) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                                "Q5_K", "Q6_K")}
Q4_0_QS = _O["Q4_0"]["qs"]
Q4_1_M, Q4_1_QS = _O["Q4_1"]["m"], _O["Q4_1"]["qs"]
Q5_0_QH, Q5_0_QS = _O["Q5_0"]["qh"], _O["Q5_0"]["qs"]
Q5_1_M, Q5_1_QH, Q5_1_QS = _O["Q5_1"]["m"], _O["Q5_1"]["qh"], _O["Q5_1"]["qs"]
Q8_0_QS = _O["Q8_0"]["qs"]


# the legacy types, as kinds of one loop (constants once a kernel below inlines it)
_LQ4_0, _LQ4_1, _LQ5_0, _LQ5_1, _LQ8_0 = range(5)


@variant_jit(**INLINE)
def _legacy_block(w, r, y, t, o, yo, kind):
    """The weight block at byte o of row r times the Q8_1 block at byte yo of row t:
    (integer lanes, their scale d * d_y, the min term m * s of Q4_1 / Q5_1, else 0)."""
    ys = load32(y, t, yo + Q8_1_QS)
    # Q4_0 / Q5_0 / Q8_0: w = d * (u - off) with unsigned codes u; the activation block's exact
    # code sum (Q8_0 blocks above) takes -off * sum(y) into lane 0 of the integer lanes
    if kind == _LQ8_0 and not _VNNI:  # w = d * q, q int8: the sign trick (pmaddubsw would
        p = dot_ss(load32(w, r, o + Q8_0_QS), ys)  # saturate on u = q + 128)
    elif kind == _LQ8_0:
        p = dot_us_acc(lane0(-128 * i16_at(y, t, yo + 2)), load32(w, r, o + Q8_0_QS) + 128, ys)
    elif kind == _LQ4_0:  # u = nibble
        p = dot_us_acc(lane0(-8 * i16_at(y, t, yo + 2)), nibbles(w, r, o + Q4_0_QS), ys)
    elif kind == _LQ5_0:  # u = nibble | fifth bit << 4
        p = dot_us_acc(lane0(-16 * i16_at(y, t, yo + 2)),
                       nibbles(w, r, o + Q5_0_QS) | (bits32(u32_at(w, r, o + Q5_0_QH)) << 4), ys)
    elif kind == _LQ4_1:  # w = d * q + m: the sum is d * dy * q.y + m * s
        p = dot_us(nibbles(w, r, o + Q4_1_QS), ys)
    else:  # Q5_1: w = d * q + m
        p = dot_us(nibbles(w, r, o + Q5_1_QS) | (bits32(u32_at(w, r, o + Q5_1_QH)) << 4), ys)
    m = F32(0)
    if kind == _LQ4_1 or kind == _LQ5_1:
        m = f16_to_f32(w, r, o + (Q4_1_M if kind == _LQ4_1 else Q5_1_M)) * f16_to_f32(y, t, yo + 2)
    return p, f16_to_f32(w, r, o) * f16_to_f32(y, t, yo), m


@variant_jit(**JIT)
def _legacy_rows(w, r0, r1, y, t, out, size, kind):
    """out[t, r] = row r of a legacy type of ``size``-byte blocks times activation row t, for
    r in r0..r1-1: two blocks per step into two accumulators (two dependency chains), one
    prefetch per step.

    NOTE: the loop over rows is here, with the row's dot written inline: a call per row (even
    one Numba inlines) costs reference-count updates of the arrays, which on SmolLM2's
    576-column rows took as long as the dot itself."""
    nb = w.shape[1] // size
    for r in range(r0, r1):
        acc0, acc1 = zeros(), zeros()
        m0, m1 = F32(0), F32(0)
        for b in range(0, nb - 1, 2):
            o, yo = b * size, b * Q8_1
            prefetch(w, r, o + PREFETCH_BYTES)
            p0, d0, mt0 = _legacy_block(w, r, y, t, o, yo, kind)
            p1, d1, mt1 = _legacy_block(w, r, y, t, o + size, yo + Q8_1, kind)
            acc0 = fma(to_f32(p0), d0, acc0)
            acc1 = fma(to_f32(p1), d1, acc1)
            m0 += mt0
            m1 += mt1
        if nb % 2:
            p0, d0, mt0 = _legacy_block(w, r, y, t, (nb - 1) * size, (nb - 1) * Q8_1, kind)
            acc0 = fma(to_f32(p0), d0, acc0)
            m0 += mt0
        out[t, r] = hsum(acc0 + acc1) + (m0 + m1)


def _legacy_kernel(size, kind):
    """The kernel of one legacy type (size and kind are compile-time constants in it)."""
    @variant_jit(**JIT)
    def rows(w, r0, r1, y, t, out):
        _legacy_rows(w, r0, r1, y, t, out, size, kind)
    return rows


_rows_q4_0, _rows_q4_1, _rows_q5_0, _rows_q5_1, _rows_q8_0 = (
    _legacy_kernel(size, kind) for size, kind in ((Q4_0, _LQ4_0), (Q4_1, _LQ4_1),
                                                  (Q5_0, _LQ5_0), (Q5_1, _LQ5_1),
                                                  (Q8_0, _LQ8_0)))


# =============================================================================================
# k-quants x Q8_K.  Per super-block the integer lanes of all sub-blocks (codes times sub-block
# scales) are summed first, then scaled once by d * d_y; offsets and mins go through Q8_K's sums
# of 16 codes (``bsum(s)``, sub-block s of 16): Q3_K / Q6_K's offsets in the integer lanes, the
# mins in float lanes summed once per row.

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (BY_NAME[n].type_size for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                                                  "Q6_K"))
Q2_K_SC, Q2_K_QS, Q2_K_D, Q2_K_DMIN = (_O["Q2_K"][f] for f in ("scales", "qs", "d", "dmin"))
Q3_K_HM, Q3_K_QS, Q3_K_SC, Q3_K_D = (_O["Q3_K"][f] for f in ("hmask", "qs", "scales", "d"))
Q4_K_SC, Q4_K_QS = _O["Q4_K"]["scales"], _O["Q4_K"]["qs"]  # d at 0, dmin at 2 (as Q5_K)
Q5_K_SC, Q5_K_QH, Q5_K_QS = (_O["Q5_K"][f] for f in ("scales", "qh", "qs"))
assert _O["Q4_K"]["dmin"] == _O["Q5_K"]["dmin"] == 2 and _O["Q4_K"]["d"] == _O["Q5_K"]["d"] == 0
Q6_K_QL, Q6_K_QH, Q6_K_SC, Q6_K_D = (_O["Q6_K"][f] for f in ("ql", "qh", "scales", "d"))


@variant_jit(**INLINE)
def _y32(y, t, yo, k):
    """Activation codes k..k+31 of the Q8_K block at byte yo."""
    return load32(y, t, yo + Q8K_QS + k)


@variant_jit(**INLINE)
def _bsums(y, t, yo):
    """The 16 sums of 16 codes of the Q8_K block at byte yo (I16x16)."""
    return load16(y, t, yo + Q8K_BSUMS)


@variant_jit(**JIT)
def _rows_q2_k(w, r0, r1, y, t, out):
    # 84 bytes: 0..15 scales (sub-block s: scale = low nibble, min = high nibble) | 16..79 qs:
    # in half h, bits 2j..2j+1 of qs[32h + l] = weight 128h + 32j + l | 80..81 d | 82..83 dmin
    for r in range(r0, r1):
        acc, acc_m = zeros(), zeros()
        for b in range(w.shape[1] // Q2_K):
            o, yo = b * Q2_K, b * Q8K
            prefetch(w, r, o + PREFETCH_BYTES)
            dy = f32_at(y, t, yo)
            sm = u8x16(w, r, o + Q2_K_SC)
            sc = sm & 15
            sumi0, sumi1 = izeros(), izeros()  # even / odd bit pairs: two dependency chains
            for h in range(2):
                qv = load32(w, r, o + Q2_K_QS + 32 * h)
                for j in range(0, 4, 2):
                    s, k = 8 * h + 2 * j, 128 * h + 32 * j
                    sumi0 = dot_usv_acc(sumi0, (qv >> 2 * j) & 3, _y32(y, t, yo, k),
                                        pick(sc, s, s + 1))
                    sumi1 = dot_usv_acc(sumi1, (qv >> 2 * j + 2) & 3, _y32(y, t, yo, k + 32),
                                        pick(sc, s + 2, s + 3))
            mins = madd16(sm >> 4, _bsums(y, t, yo))  # summed over lanes once per row
            acc = fma(to_f32(sumi0 + sumi1), f16_to_f32(w, r, o + Q2_K_D) * dy, acc)
            acc_m = fma(to_f32(mins), f16_to_f32(w, r, o + Q2_K_DMIN) * dy, acc_m)
        out[t, r] = hsum(acc) - hsum(acc_m)


@variant_jit(**INLINE)
def _q3_k_scales(w, r, o):
    """The 16 signed 6-bit sub-block scales from the 12 bytes at o (I16x16, in order):
    byte k (k < 8): low 4 bits of sub-blocks k (low nibble) and k + 8 (high nibble);
    byte 8 + i: bits 2m..2m+1 = high 2 bits of sub-block 4m + i."""
    a0, a1, hi = u32_at(w, r, o), u32_at(w, r, o + 4), u32_at(w, r, o + 8)
    m2, m4 = 0x03030303, 0x0F0F0F0F
    return words16((a0 & m4) | ((hi & m2) << 4), (a1 & m4) | (((hi >> 2) & m2) << 4),
                   ((a0 >> 4) & m4) | (((hi >> 4) & m2) << 4),
                   ((a1 >> 4) & m4) | (((hi >> 6) & m2) << 4)) - 32


@variant_jit(**INLINE)
def _q3_k_sumi(w, r, y, t, o, yo, sc):
    # 110 bytes: 0..31 hmask (bit 4h + j of hmask[l]: high bit of weight 128h + 32j + l)
    # | 32..95 qs (low 2 bits, as Q2_K) | 96..107 scales | 108..109 d
    # w = d * sc * (low + 4 * hbit - 4); here the codes low + 4 * hbit
    hm = load32(w, r, o + Q3_K_HM)
    sumi0, sumi1 = izeros(), izeros()  # even / odd j: two dependency chains
    for h in range(2):
        qv = load32(w, r, o + Q3_K_QS + 32 * h)
        for j in range(0, 4, 2):
            s, k = 8 * h + 2 * j, 128 * h + 32 * j
            u0 = ((qv >> 2 * j) & 3) | (((hm >> (4 * h + j)) & 1) << 2)
            u1 = ((qv >> 2 * j + 2) & 3) | (((hm >> (4 * h + j + 1)) & 1) << 2)
            sumi0 = dot_usv_acc(sumi0, u0, _y32(y, t, yo, k), pick(sc, s, s + 1))
            sumi1 = dot_usv_acc(sumi1, u1, _y32(y, t, yo, k + 32), pick(sc, s + 2, s + 3))
    return sumi0 + sumi1


@variant_jit(**INLINE)
def _q6_k_sumi(w, r, y, t, o, yo, sc):
    # 210 bytes: 0..127 ql | 128..191 qh | 192..207 scales (int8, sub-blocks of 16) | 208 d.
    # Half h (128 weights), l < 32: weight 128h + 32k + l has low 4 bits in ql[64h + l] (k = 0:
    # low nibble, k = 2: high) or ql[64h + 32 + l] (k = 1: low, k = 3: high) and its top two bits
    # at bits 2k..2k+1 of qh[32h + l].  w = d * sc * (q - 32); here the codes q
    sumi0, sumi1 = izeros(), izeros()  # q0, q2 / q1, q3: two dependency chains
    for h in range(2):
        ql0 = load32(w, r, o + Q6_K_QL + 64 * h)
        ql1 = load32(w, r, o + Q6_K_QL + 64 * h + 32)
        qh = load32(w, r, o + Q6_K_QH + 32 * h)
        q0 = (ql0 & 15) | ((qh & 3) << 4)
        q1 = (ql1 & 15) | ((qh & 12) << 2)
        q2 = (ql0 >> 4) | (qh & 48)
        q3 = (ql1 >> 4) | ((qh >> 6) << 4)
        s, k = 8 * h, 128 * h
        sumi0 = dot_usv_acc(sumi0, q0, _y32(y, t, yo, k), pick(sc, s, s + 1))
        sumi1 = dot_usv_acc(sumi1, q1, _y32(y, t, yo, k + 32), pick(sc, s + 2, s + 3))
        sumi0 = dot_usv_acc(sumi0, q2, _y32(y, t, yo, k + 64), pick(sc, s + 4, s + 5))
        sumi1 = dot_usv_acc(sumi1, q3, _y32(y, t, yo, k + 96), pick(sc, s + 6, s + 7))
    return sumi0 + sumi1


@variant_jit(**JIT)
def _offset_rows(w, r0, r1, y, t, out, q6):
    """Q3_K (q6 False) or Q6_K: 16 signed sub-block scales and codes with a constant offset
    (-4 / -32), which goes through the activation sums once per super-block."""
    size = Q6_K if q6 else Q3_K
    for r in range(r0, r1):
        acc = zeros()
        for b in range(w.shape[1] // size):
            o, yo = b * size, b * Q8K
            prefetch(w, r, o + PREFETCH_BYTES)
            dy = f32_at(y, t, yo)
            if q6:  # offset 32 = 1 << 5
                sc = i8x16(w, r, o + Q6_K_SC)
                sumi = _q6_k_sumi(w, r, y, t, o, yo, sc) - (madd16(sc, _bsums(y, t, yo)) << 5)
                d = f16_to_f32(w, r, o + Q6_K_D) * dy
            else:  # offset 4 = 1 << 2
                sc = _q3_k_scales(w, r, o + Q3_K_SC)
                sumi = _q3_k_sumi(w, r, y, t, o, yo, sc) - (madd16(sc, _bsums(y, t, yo)) << 2)
                d = f16_to_f32(w, r, o + Q3_K_D) * dy
            acc = fma(to_f32(sumi), d, acc)  # the offset taken in the integer lanes
        out[t, r] = hsum(acc)


def _offset_kernel(q6):
    """The kernel of Q3_K (q6 False) or Q6_K."""
    @variant_jit(**JIT)
    def rows(w, r0, r1, y, t, out):
        _offset_rows(w, r0, r1, y, t, out, q6)
    return rows


_rows_q3_k, _rows_q6_k = _offset_kernel(False), _offset_kernel(True)


@variant_jit(**INLINE)
def _k4_scales(w, r, o):
    """Q4_K / Q5_K's 12 scale bytes at o as an I16x16: lanes 0..7 = the eight 6-bit scales,
    8..15 = the eight 6-bit mins.  Sub-block j < 4: low 6 bits of bytes j (scale) and j + 4
    (min); j >= 4: low / high nibble of byte j + 4 below the top two bits of byte j - 4 / j."""
    u0, u1, u2 = u32_at(w, r, o), u32_at(w, r, o + 4), u32_at(w, r, o + 8)
    m6, m4, m2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303
    return words16(u0 & m6, (u2 & m4) | (((u0 >> 6) & m2) << 4), u1 & m6,
                   ((u2 >> 4) & m4) | (((u1 >> 6) & m2) << 4))


@variant_jit(**INLINE)
def _k4_codes(w, r, o, o_qs, o_qh, qh, j):
    """The codes of chunk j of the Q4_K (o_qh < 0) / Q5_K super-block at o: weights 64j..+31
    (low nibbles) and 64j+32..+63 (high nibbles), Q5_K's fifth bits taken from qh (I8x32)."""
    qv = load32(w, r, o + o_qs + 32 * j)
    lo, hi = qv & 15, qv >> 4
    if o_qh >= 0:
        lo = lo | (((qh >> 2 * j) & 1) << 4)
        hi = hi | (((qh >> (2 * j + 1)) & 1) << 4)
    return lo, hi


@variant_jit(**JIT)
def _k4_rows(w, r0, r1, y, t, out, size, o_sc, o_qs, o_qh):
    """Q4_K (o_qh < 0) or Q5_K, whose blocks share this layout:
    0..1 d | 2..3 dmin | 4..15 scales | Q5_K only: 16..47 qh (bit 2j / 2j+1 of qh[l]: fifth bit
    of weight 64j + l / 64j + 32 + l) | qs: in chunk j (64 weights), qs[32j + l] = weight
    64j + l (low nibble), 64j + 32 + l (high)."""
    for r in range(r0, r1):
        acc, acc_m = zeros(), zeros()
        for b in range(w.shape[1] // size):
            o, yo = b * size, b * Q8K
            prefetch(w, r, o + PREFETCH_BYTES)
            dy = f32_at(y, t, yo)
            sm = _k4_scales(w, r, o + o_sc)
            qh = load32(w, r, o + (o_qh if o_qh >= 0 else o_qs))
            sumi0, sumi1 = izeros(), izeros()  # low / high nibbles: two dependency chains
            for j in range(4):
                lo, hi = _k4_codes(w, r, o, o_qs, o_qh, qh, j)
                sumi0 = dot_usv_acc(sumi0, lo, _y32(y, t, yo, 64 * j), pick(sm, 2 * j, 2 * j))
                sumi1 = dot_usv_acc(sumi1, hi, _y32(y, t, yo, 64 * j + 32),
                                    pick(sm, 2 * j + 1, 2 * j + 1))
            acc = fma(to_f32(sumi0 + sumi1), f16_to_f32(w, r, o) * dy, acc)
            mins = madd16(pairs_hi(sm), _bsums(y, t, yo))  # summed over lanes once per row
            acc_m = fma(to_f32(mins), f16_to_f32(w, r, o + 2) * dy, acc_m)
        out[t, r] = hsum(acc) - hsum(acc_m)


def _k4_kernel(size, o_sc, o_qs, o_qh):
    """The kernel of Q4_K (o_qh < 0) or Q5_K."""
    @variant_jit(**JIT)
    def rows(w, r0, r1, y, t, out):
        _k4_rows(w, r0, r1, y, t, out, size, o_sc, o_qs, o_qh)
    return rows


_rows_q4_k = _k4_kernel(Q4_K, Q4_K_SC, Q4_K_QS, -1)
_rows_q5_k = _k4_kernel(Q5_K, Q5_K_SC, Q5_K_QS, Q5_K_QH)


# =============================================================================================
# the table: weight type -> (its dot kernel, the activation blocks it takes)

# weight type -> its dot kernel; what the activations are quantized to is the table's ``dot``
# (llama.cpp's vec_dot_type).  Q8_0 and Q8_1 blocks share d and codes; both are laid out as
# above, with the exact code sum (Q8_0: Q4_0, Q5_0, Q8_0) or the f16 scaled sum (Q8_1).
KERNELS = {
    "Q4_0": _rows_q4_0, "Q4_1": _rows_q4_1, "Q5_0": _rows_q5_0, "Q5_1": _rows_q5_1,
    "Q8_0": _rows_q8_0, "Q2_K": _rows_q2_k, "Q3_K": _rows_q3_k, "Q4_K": _rows_q4_k,
    "Q5_K": _rows_q5_k, "Q6_K": _rows_q6_k,
}
_ACT = {"Q8_K": (_quantize_q8_k, QK_K, Q8K), "Q8_0": (_quantize_q8_0, QK, Q8_1),
        "Q8_1": (_quantize_q8_1, QK, Q8_1)}  # dot type -> (quantizer, values per block, bytes)


def activation_type(name: str) -> str:
    """The activation blocks weight type ``name`` is dotted with ("Q8_K", "Q8_0" or "Q8_1")."""
    return BY_NAME[name].dot


def activation_bytes(name: str, cols: int) -> int:
    """Bytes of one quantized activation row of ``cols`` values for weight type ``name``."""
    _, per, size = _ACT[activation_type(name)]
    return cols // per * size


# =============================================================================================
# running kernels on all threads

_W = types.Array(types.uint8, 2, "C", readonly=True)  # weight blocks (rows, row_bytes)
_Y = types.Array(types.uint8, 2, "C")  # activation blocks (n, activation_bytes)
_X = types.Array(types.float32, 2, "C")  # float activations (n, cols)
# (w, r0, r1, y, t, out): out[t, r] = row r . token t for r in r0..r1-1
DOT_SIG = types.void(_W, types.int64, types.int64, _Y, types.int64, _X)
QUANT_SIG = types.void(_X, _Y)


_dot_at = _function_at(DOT_SIG)
_quant_at = _function_at(QUANT_SIG)


def _run(quant, dot, w, X, Y, out, n_threads):  # (n, cols) -> (n, rows)
    """Y = the activation blocks of X, then out[t, r] = row r . token t for all rows and
    tokens: each thread a range of rows (one kernel call for one token; for more, tiles of
    TILE_ROWS rows that every token passes over while they are in cache)."""
    _quant_at(quant)(X, Y)
    rows, n = w.shape[0], X.shape[0]
    for c in prange(n_threads):
        r0, r1 = rows * c // n_threads, rows * (c + 1) // n_threads
        if n == 1:
            _dot_at(dot)(w, r0, r1, Y, 0, out)
            continue
        for rt in range(r0, r1, TILE_ROWS):
            for t in range(n):
                _dot_at(dot)(w, rt, min(rt + TILE_ROWS, r1), Y, t, out)


def _run_many(quant, dots, ws, x, Y, outs, n_threads):  # (1, cols) -> (1, rows_i) each
    """One token times several matrices of the same input (q, k, v; gate, up): Y = the
    activation blocks of x once, then each thread its share of the rows of every matrix, all in
    one parallel region."""
    _quant_at(quant)(x, Y)
    for c in prange(n_threads):
        for i in range(len(ws)):
            rows = ws[i].shape[0]
            _dot_at(dots[i])(ws[i], rows * c // n_threads, rows * (c + 1) // n_threads, Y, 0,
                             outs[i])


RUN_SIG = types.void(types.int64, types.int64, _W, _X, _Y, _X, types.int64)
MAX_MANY = 3  # matrices of one input: q, k and v


def _many_sig(m: int):
    return types.void(types.int64, types.UniTuple(types.int64, m), types.UniTuple(_W, m), _X, _Y,
                      types.UniTuple(_X, m), types.int64)


# A product that reads fewer weight bytes than this (times its tokens) runs on the calling
# thread: waking the other threads costs more.  NOTE: with Numba's OpenMP layer (the default) the
# pool's threads spin a while after each parallel region, and a decode step's products follow
# each other closely, so the hand-off is cheap (tools/bench_threads.py: SmolLM2 Q4_K_M at -t 2
# 198 / 205 / 191 / 175 / 152 tok/s with 16 K / 64 K / 128 K / 256 K / 2 MiB limits, Gemma-3 137
# at 64 K-512 K, 114 at 2 MiB; the 0.56 B file, every matrix above 2 MiB, unchanged).  The 2 MiB
# limit before was measured with the workqueue layer, which sleeps between regions.
PARALLEL_MIN_BYTES = 128 << 10


@functools.cache
def _driver(parallel: bool, m: int = 0):
    """The driver of one matrix (m = 0) or of m matrices of one token, serial or threaded."""
    fn = keyed_jit(("parallel" if parallel else "serial",), parallel=parallel)(
        _run_many if m else _run)
    return compiled(fn, _many_sig(m) if m else RUN_SIG)[0]


def compiled(fn, sig):
    """Compile ``fn`` for ``sig`` (or load it from Numba's disk cache) and return it with the
    native address of that compilation; say so on stderr when it really compiles."""
    if sig.args not in fn.overloads:
        cres = None
        try:  # NOTE: what Dispatcher.compile does first, done here to know whether it compiles
            cres = fn._cache.load_overload(sig, fn.targetctx)
            if cres is not None:
                fn.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
                fn.add_overload(cres)
        except Exception:  # pragma: no cover - Numba internals moved: just compile
            cres = None
        if cres is None:
            announce_compile()
            fn.compile(sig)
    cres = fn.overloads[sig.args]
    return fn, cres.library.get_pointer_to_function(cres.fndesc.mangled_name)


@functools.cache
def _addresses(name: str) -> tuple[int, int]:
    return (compiled(_ACT[activation_type(name)][0], QUANT_SIG)[1],
            compiled(KERNELS[name], DOT_SIG)[1])


def quantize_activations(name: str, X: np.ndarray) -> np.ndarray:
    """X float32 (n, cols) -> the activation blocks weight type ``name`` dots with, uint8
    (n, activation_bytes(name, cols)): Q8_K or Q8_1 as ggml's CPU quantizes them."""
    fn = compiled(_ACT[activation_type(name)][0], QUANT_SIG)[0]
    Y = np.empty((X.shape[0], activation_bytes(name, X.shape[1])), np.uint8)
    fn(X, Y)
    return Y


def round_trip(name: str, X: np.ndarray) -> np.ndarray:
    """X float32 (n, cols) -> the values of its activation blocks for weight type ``name``
    (``dequantize(Q8(X))``, float32): for products of many tokens that multiply decoded weight
    tiles in float (see :meth:`blockq.kernels.cpu_matvec.QMatrix.matmul`)."""
    act = activation_type(name)
    fn, per, size = _ACT[act]
    Y = np.empty((X.shape[0], activation_bytes(name, X.shape[1])), np.uint8)
    compiled(fn, QUANT_SIG)[0](X, Y)
    out = np.empty_like(X)
    _dequantize_q8(Y, out, per, size, act == "Q8_K")
    return out


def product(name: str, w: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """``out = Q8(X) @ W.T``: X float32 (n, cols) C-contiguous, w read-only uint8
    (rows, row_bytes), out float32 (n, rows)."""
    quant, dot = _addresses(name)
    Y = np.empty((X.shape[0], activation_bytes(name, X.shape[1])), np.uint8)
    n_threads = numba.get_num_threads()
    if n_threads == 1 or w.nbytes * X.shape[0] < PARALLEL_MIN_BYTES:
        _driver(False)(quant, dot, w, X, Y, out, 1)
    else:
        _driver(True)(quant, dot, w, X, Y, out, min(n_threads, w.shape[0]))


def can_share_input(names) -> bool:
    """Whether matrices of these types can run as one :func:`products` call (one activation
    quantization serves them all: the same activation blocks)."""
    return 1 < len(names) <= MAX_MANY and all(n in KERNELS for n in names) and \
        len({_ACT[activation_type(n)][0] for n in names}) == 1


def products(names, ws, x: np.ndarray, outs) -> None:
    """``outs[i] = Q8(x) @ W_i.T`` for one token and two or three matrices (``can_share_input``)
    in one call: x float32 (1, cols) C-contiguous, ws read-only uint8 (rows_i, row_bytes_i),
    outs float32 (1, rows_i)."""
    prepare_products(names, ws, x.shape[1])(x, tuple(outs))


def prepare_products(names, ws, cols: int):
    """:func:`products` with everything but the input fixed: ``run(x, outs)`` (outs a tuple),
    for the decode step, which calls it once per token for the same matrices."""
    quant = _addresses(names[0])[0]
    dots = tuple(_addresses(n)[1] for n in names)
    ws = tuple(ws)
    nbytes = activation_bytes(names[0], cols)
    m, serial = len(ws), _driver(False, len(ws))
    small = sum(w.nbytes for w in ws) < PARALLEL_MIN_BYTES

    def run(x, outs):
        Y = np.empty((1, nbytes), np.uint8)
        n_threads = numba.get_num_threads()
        if n_threads == 1 or small:
            serial(quant, dots, ws, x, Y, outs, 1)
        else:  # NOTE: compiled on first use: one thread never pays for the parfor (~2 s)
            _driver(True, m)(quant, dots, ws, x, Y, outs, n_threads)
    return run


# IQ4_NL / IQ4_XS: a table lookup before the same dots, in their own module
from .cpu_int8_iquant import KERNELS as _IQ4  # noqa: E402 (it imports this module's pieces)
KERNELS.update(_IQ4)
