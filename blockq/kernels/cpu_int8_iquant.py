"""Int8-activation products of the non-linear 4-bit types IQ4_NL and IQ4_XS (every x86 variant).

Both types store 4-bit indices into one fixed grid of 16 signed values
(:data:`blockq.codebooks.IQ4_NL`, all within int8).  A register of 32 indices becomes the 32
grid values with one byte shuffle (``vpshufb``: each byte picks a byte of a 16-byte table, the
table repeated in both 128-bit halves), and the values are then signed int8 codes, dotted with
the activation codes exactly as :mod:`blockq.kernels.cpu_int8` dots Q4_0 or Q8_0 (sign trick,
``pmaddubsw`` + ``pmaddwd``).  Activations as llama.cpp quantizes them for these types (the
table's ``dot``): Q8_0 blocks (taken in cpu_int8's Q8_1 layout, whose sum is not read) for
IQ4_NL, Q8_K for IQ4_XS.

This module only adds kernels to ``cpu_int8.KERNELS`` (which imports it at its end); the
drivers, activation quantizers and dispatch are cpu_int8's.  Like it, it must only be imported
where :func:`blockq.kernels.cpu_isa.isa` names an int8 variant.  Results equal ``dequantize(W) @
dequantize(Q8(x))`` up to float32 summation order (``tests/test_int8_iquant.py``).
"""
from __future__ import annotations

from llvmlite import ir
from numba.extending import intrinsic

from .. import codebooks
from .cpu_int8 import (_I1, _V32I8, INLINE, JIT, PREFETCH_BYTES, Q8_1, Q8_1_QS, Q8K, Q8K_QS,
                       I8x32, _call, _madd, _maddubs, _offsets, dot_ss, izeros, load32, nibbles,
                       pick, prefetch, variant_jit, words16)
from .cpu_simd import I32x8, f16_to_f32, f32_at, fma, hsum, to_f32, u32_at, zeros
from ..types import BY_NAME


def _lookup16(values) -> "intrinsic":
    """An intrinsic ``f(q)``: the I8x32 whose byte j is ``values[q[j]]`` (q[j] in 0..15)."""
    assert len(values) == 16 and all(-128 <= int(v) <= 127 for v in values)
    table = ir.Constant(_V32I8, [int(v) for v in values] * 2)  # both 128-bit halves

    @intrinsic
    def lookup(typingctx, q):
        def codegen(context, builder, signature, args):
            return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [table, args[0]])
        return I8x32(q), codegen
    return lookup


iq4_values = _lookup16(codebooks.IQ4_NL)  # 4-bit indices -> the IQ4_NL grid's int8 values


@intrinsic
def dot_ssv(typingctx, a, b, sc):
    """``dot_ss(a, b)`` (two signed I8x32) with each int16 pair sum times the matching lane of
    the I16x16 ``sc`` before the pairs of pairs are added: lane k of an I32x8."""
    def codegen(context, builder, signature, args):
        absa = _call(builder, "llvm.abs.v32i8", _V32I8, [args[0], ir.Constant(_I1, 0)])
        sb = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [args[1], args[0]])
        return _madd(builder, _maddubs(builder, absa, sb), args[2])
    return I32x8(a, b, sc), codegen


IQ4_NL, IQ4_XS = BY_NAME["IQ4_NL"].type_size, BY_NAME["IQ4_XS"].type_size
_NL, _XS = _offsets("IQ4_NL"), _offsets("IQ4_XS")
IQ4_NL_QS = _NL["qs"]
IQ4_XS_SH, IQ4_XS_SL, IQ4_XS_QS = _XS["scales_h"], _XS["scales_l"], _XS["qs"]
assert _NL["d"] == _XS["d"] == 0


@variant_jit(**INLINE)
def _dot_iq4_nl(w, r, y, t):
    # 18 bytes: 0..1 d (f16) | 2..17 qs: weight j < 16 = low nibble of qs[j], weight 16 + j =
    # its high nibble (Q4_0's order).  w = d * grid[q]
    acc = zeros()
    for b in range(w.shape[1] // IQ4_NL):
        o, yo = b * IQ4_NL, b * Q8_1
        prefetch(w, r, o + PREFETCH_BYTES)
        p = dot_ss(iq4_values(nibbles(w, r, o + IQ4_NL_QS)), load32(y, t, yo + Q8_1_QS))
        acc = fma(to_f32(p), f16_to_f32(w, r, o) * f16_to_f32(y, t, yo), acc)
    return hsum(acc)


@variant_jit(**INLINE)
def _iq4_xs_scales(w, r, o):
    """The eight sub-block scales of the IQ4_XS super-block at o, minus 32, in lanes 0..7 of an
    I16x16 (lanes 8..15: -32, unused).  Sub-block s: low 4 bits = nibble s of the four
    scales_l bytes (bits 4s..4s+3 of their uint32), high 2 bits = bits 2s..2s+1 of scales_h."""
    lo, hi = u32_at(w, r, o + IQ4_XS_SL), u32_at(w, r, o) >> (8 * IQ4_XS_SH)
    u0 = u1 = 0
    for s in range(4):
        u0 |= (((lo >> 4 * s) & 15) | (((hi >> 2 * s) & 3) << 4)) << 8 * s
        u1 |= (((lo >> 4 * (s + 4)) & 15) | (((hi >> 2 * (s + 4)) & 3) << 4)) << 8 * s
    return words16(u0, u1, 0, 0) - 32


@variant_jit(**INLINE)
def _dot_iq4_xs(w, r, y, t):
    # 136 bytes: 0..1 d (f16) | 2..3 scales_h | 4..7 scales_l | 8..135 qs: sub-block s (32
    # weights) in qs[16s..16s+15], IQ4_NL's nibble order.  w = d * (ls - 32) * grid[q].
    # Per super-block the integer sums of all eight sub-blocks (times their scales) are added
    # first, then scaled once by d * d_y.
    acc = zeros()
    for b in range(w.shape[1] // IQ4_XS):
        o, yo = b * IQ4_XS, b * Q8K
        prefetch(w, r, o + PREFETCH_BYTES)
        sc = _iq4_xs_scales(w, r, o)
        sumi = izeros()
        for s in range(8):
            v = iq4_values(nibbles(w, r, o + IQ4_XS_QS + 16 * s))
            sumi = sumi + dot_ssv(v, load32(y, t, yo + Q8K_QS + 32 * s), pick(sc, s, s))
        acc = fma(to_f32(sumi), f16_to_f32(w, r, o) * f32_at(y, t, yo), acc)
    return hsum(acc)


# the kernels cpu_int8's drivers call: rows r0..r1 of the weights times activation row t
@variant_jit(**JIT)
def _rows_iq4_nl(w, r0, r1, y, t, out):
    for r in range(r0, r1):
        out[t, r] = _dot_iq4_nl(w, r, y, t)


@variant_jit(**JIT)
def _rows_iq4_xs(w, r0, r1, y, t, out):
    for r in range(r0, r1):
        out[t, r] = _dot_iq4_xs(w, r, y, t)


# weight type -> its kernel (cpu_int8 adds these to its KERNELS)
KERNELS = {"IQ4_NL": _rows_iq4_nl, "IQ4_XS": _rows_iq4_xs}
