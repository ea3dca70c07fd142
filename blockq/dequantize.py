"""Dequantize blocks of any type in the table back to float32.

- :func:`dequantize_blocks_ref` — the vectorized numpy reference, one small function per type
  with its packed layout drawn beside the code.  It is the oracle the Numba (and GPU) kernels are
  tested against; it is written for clarity, not speed.
- :func:`dequantize` — the public entry: validates sizes and runs the Numba kernels of
  :mod:`blockq.kernels.cpu_dequant` (bit-exact with the reference).
- :func:`block_fields` — one block's fields decoded for people (``blockq inspect --block``).
- Small helpers other modules share: :func:`unpack_scale_min_k4` (Q4_K/Q5_K 6-bit scales and
  mins), :func:`unpack_q3k_scales` (Q3_K 6-bit signed scales), :func:`quant_ints` (the integer
  each weight's formula multiplies), :func:`as_blocks` / :func:`raw_bytes`.

Every formula multiplies in float32 in the same order as llama.cpp's ``dequantize_row_*``
(e.g. Q4_K: ``(d * sc) * q - (dmin * m)``), so results are bit-identical to ggml and gguf-py.
"""
from __future__ import annotations

from math import prod

import numpy as np

from . import codebooks
from .errors import BadArgument
from .types import QK_K, QType, qtype as _qtype, register

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# shared unpacking helpers
# ---------------------------------------------------------------------------------------------

def raw_bytes(data) -> np.ndarray:
    """Any bytes-like object or array, as its raw bytes: uint8 ``(nbytes,)`` (a view if it can)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    a = np.asarray(data)
    if a.dtype.hasobject or a.dtype.itemsize == 0:
        raise BadArgument(f"data must be raw bytes (uint8 array or bytes), got dtype {a.dtype}")
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def as_blocks(data, t: QType) -> np.ndarray:
    """View raw bytes (any shape, whole blocks) as uint8 ``(n_blocks, type_size)``."""
    a = raw_bytes(data)
    if a.size % t.type_size:
        raise BadArgument(f"{a.size} bytes is not a whole number of {t.name} blocks "
                          f"({t.type_size} bytes each)")
    return a.reshape(-1, t.type_size)


def unpack_scale_min_k4(scales12) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: unpack the 12 scale bytes into 8 six-bit scales and 8 six-bit mins.

    Works on ``(..., 12)`` uint8 and returns two uint8 arrays ``(..., 8)``.
    """
    s = np.asarray(scales12, dtype=np.uint8)
    # Sub-blocks 0..3 keep their scale and min whole in the low 6 bits of bytes 0..3 / 4..7;
    # sub-blocks 4..7 take their low 4 bits from bytes 8..11 and their top 2 bits from the spare
    # top bits of bytes 0..3 (scales) and 4..7 (mins):
    #   byte  0..3 : SS ssssss   s = scale j (j=0..3),     SS = scale j+4 bits 4..5
    #   byte  4..7 : MM mmmmmm   m = min j   (j=0..3),     MM = min j+4 bits 4..5
    #   byte 8..11 : mmmm ssss   low nibble = scale j+4 bits 0..3, high nibble = min j+4 bits 0..3
    lo_s, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_s & 63, (hi & 0xF) | ((lo_s >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def unpack_q3k_scales(scales12) -> np.ndarray:
    """Q3_K: unpack the 12 scale bytes into 16 signed scales (stored 6-bit with offset 32).

    Works on ``(..., 12)`` uint8 and returns int8 ``(..., 16)`` in -32..31.
    """
    s = np.asarray(scales12, dtype=np.uint8)
    # Scale i (0..15) = low 4 bits | high 2 bits << 4, minus 32:
    #   low 4 bits : byte i%8, nibble i//8          (bytes 0..7:  [scale i+8 | scale i])
    #   high 2 bits: byte 8 + i%4, bit pair i//4     (bytes 8..11: [i+12 | i+8 | i+4 | i])
    i = np.arange(16)
    low = (s[..., i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0xF
    high = (s[..., 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


def _records(blocks, t: QType) -> np.ndarray:
    """uint8 (n_blocks, type_size) -> structured (n_blocks,) records of ``t.dtype``."""
    return as_blocks(blocks, t).view(t.dtype)[:, 0]


def _f(a) -> np.ndarray:
    """A float16/float32 field as float32 with a trailing axis for broadcasting: (n, 1)."""
    return np.asarray(a).astype(F32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) nibbles: the k low nibbles first, then the k high nibbles."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


# ---------------------------------------------------------------------------------------------
# numpy reference.  Per type: ``_q_<type>(r)`` unpacks the integers the formula multiplies,
# records (n,) -> ints (n, block_size), and ``_ref_<type>(r)`` applies the formula in float32.
# ---------------------------------------------------------------------------------------------

def _ref_f32(r):
    # byte 0..3: f (f32)
    return r["f"].astype(F32)[:, None]


def _ref_f16(r):
    # byte 0..1: f (f16)
    return r["f"].astype(F32)[:, None]


def _ref_bf16(r):
    # byte 0..1: the upper 16 bits of an f32 (sign | 8-bit exponent | 7-bit mantissa)
    return (r["f"].astype(np.uint32) << 16).view(F32)[:, None]


def _q_q4_0(r):
    # byte 0..1: d (f16) | 2..17: qs, weight j in the low nibble of qs[j], weight j+16 in the high
    return _nibbles(r["qs"]).astype(np.int8) - 8  # (n, 32) in -8..7


def _ref_q4_0(r):
    return _q_q4_0(r).astype(F32) * _f(r["d"])


def _q_q4_1(r):
    # byte 0..1: d (f16) | 2..3: m (f16) | 4..19: qs, nibbles as Q4_0
    return _nibbles(r["qs"])  # (n, 32) in 0..15


def _ref_q4_1(r):
    return _q_q4_1(r).astype(F32) * _f(r["d"]) + _f(r["m"])


def _q_q5_1(r):
    # Q5_1 byte 0..1: d (f16) | 2..3: m (f16) | 4..7: qh | 8..23: qs
    # Q5_0 byte 0..1: d (f16) | 2..5: qh | 6..21: qs
    # qs holds the low 4 bits as Q4_0.  qh (4 bytes) read as a little-endian u32: bit i is the
    # 5th bit (value 16) of weight i, so its bits in little bit order are in weight order.
    hi = np.unpackbits(r["qh"], axis=-1, bitorder="little")  # (n, 32) in 0..1
    return _nibbles(r["qs"]) | (hi << 4)  # (n, 32) in 0..31


def _ref_q5_1(r):
    return _q_q5_1(r).astype(F32) * _f(r["d"]) + _f(r["m"])


def _q_q5_0(r):
    return _q_q5_1(r).astype(np.int8) - 16  # (n, 32) in -16..15


def _ref_q5_0(r):
    return _q_q5_0(r).astype(F32) * _f(r["d"])


def _q_q8_0(r):
    # byte 0..1: d (f16) | 2..33: qs (int8), weight j = d * qs[j]
    return r["qs"]  # (n, 32) int8


def _ref_q8_0(r):
    return _q_q8_0(r).astype(F32) * _f(r["d"])


_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]  # bit pair j of a byte
_SHIFT4 = np.array([0, 4], dtype=np.uint8)[None, None, :, None]  # nibble k of a byte


def _q_q2_k(r):
    # byte 0..15: scales, sub-block s (16 weights): low nibble = scale, high nibble = min
    #      16..79: qs, 2 bits per weight | 80..81: d (f16) | 82..83: dmin (f16)
    # Weight w = 128*h + 32*j + l (half h, bit pair j, l < 32) is bits 2j..2j+1 of qs[32*h + l];
    # its sub-block is w // 16.
    n = len(r)
    return ((r["qs"].reshape(n, 2, 1, 32) >> _SHIFT2) & 3).reshape(n, QK_K)  # 0..3


def _ref_q2_k(r):
    n = len(r)
    dl = (_f(r["d"]) * (r["scales"] & 0xF).astype(F32))[..., None]  # (n, 16, 1)
    ml = (_f(r["dmin"]) * (r["scales"] >> 4).astype(F32))[..., None]
    return (dl * _q_q2_k(r).reshape(n, 16, 16).astype(F32) - ml).reshape(n, QK_K)


def _q_q3_k(r):
    # byte 0..31: hmask, 1 high bit per weight | 32..95: qs, low 2 bits per weight
    #     96..107: scales, 16 x 6 bits (see unpack_q3k_scales) | 108..109: d (f16)
    # Weight w = 128*h + 32*j + l: low bits = bits 2j..2j+1 of qs[32*h + l];
    # high bit = bit (4*h + j) of hmask[l]; q = low - 4 if the high bit is CLEAR, else low.
    # NOTE: the high bit is stored inverted (set means "no -4"), as llama.cpp does.
    n = len(r)
    low = (r["qs"].reshape(n, 2, 1, 32) >> _SHIFT2) & 3  # (n, h, j, l)
    bit = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)  # 4*h + j
    high = (r["hmask"].reshape(n, 1, 1, 32) >> bit) & 1  # (n, h, j, l)
    q = low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)
    return q.reshape(n, QK_K)  # -4..3


def _ref_q3_k(r):
    n = len(r)
    dl = (_f(r["d"]) * unpack_q3k_scales(r["scales"]).astype(F32))[..., None]  # (n, 16, 1)
    return (dl * _q_q3_k(r).reshape(n, 16, 16).astype(F32)).reshape(n, QK_K)


def _q_q4_k(r):
    # byte 0..1: d (f16) | 2..3: dmin (f16) | 4..15: 8 x (6-bit scale, 6-bit min), see
    # unpack_scale_min_k4 | 16..143: qs.  Weight w = 64*j + 32*k + l: nibble k of qs[32*j + l]
    # (k=0 low, k=1 high); its sub-block is w // 32 = 2*j + k.
    n = len(r)
    return ((r["qs"].reshape(n, 4, 1, 32) >> _SHIFT4) & 0xF).reshape(n, QK_K)  # 0..15


def _q_q5_k(r):
    # byte 0..1: d | 2..3: dmin | 4..15: scales/mins as Q4_K | 16..47: qh | 48..175: qs
    # Weight w = 64*j + 32*k + l: low 4 bits as Q4_K; 5th bit = bit (2*j + k) of qh[l].
    n = len(r)
    low = (r["qs"].reshape(n, 4, 1, 32) >> _SHIFT4) & 0xF  # (n, j, k, l)
    bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)  # 2*j + k
    high = (r["qh"].reshape(n, 1, 1, 32) >> bit) & 1
    return (low | (high << 4)).reshape(n, QK_K)  # 0..31


def _ref_q4_k(r, q=None):
    n = len(r)
    q = _q_q4_k(r) if q is None else q
    sc, mn = unpack_scale_min_k4(r["scales"])  # (n, 8) each
    d = (_f(r["d"]) * sc.astype(F32))[..., None]  # (n, 8, 1)
    m = (_f(r["dmin"]) * mn.astype(F32))[..., None]
    return (d * q.reshape(n, 8, 32).astype(F32) - m).reshape(n, QK_K)


def _ref_q5_k(r):
    return _ref_q4_k(r, _q_q5_k(r))


def _q_q6_k(r):
    # byte 0..127: ql, low 4 bits | 128..191: qh, high 2 bits | 192..207: scales (int8, one per
    # 16 weights) | 208..209: d (f16).
    # Weight w = 128*h + 32*c + l (c = 0..3): low bits = nibble c//2 of ql[64*h + 32*(c%2) + l],
    # high bits = bits 2c..2c+1 of qh[32*h + l]; q = (low | high << 4) - 32; sub-block w // 16.
    n = len(r)
    ql = r["ql"].reshape(n, 2, 1, 2, 32) >> _SHIFT4[..., None]  # (n, h, c//2, c%2, l)
    ql = (ql & 0xF).reshape(n, 2, 4, 32)  # (n, h, c, l)
    qh = (r["qh"].reshape(n, 2, 1, 32) >> _SHIFT2) & 3  # (n, h, c, l)
    return ((ql | (qh << 4)).astype(np.int8) - 32).reshape(n, QK_K)  # -32..31


def _ref_q6_k(r):
    n = len(r)
    dl = (_f(r["d"]) * r["scales"].astype(F32))[..., None]  # (n, 16, 1)
    return (dl * _q_q6_k(r).reshape(n, 16, 16).astype(F32)).reshape(n, QK_K)


def _q_q8_k(r):
    # byte 0..3: d (f32) | 4..259: qs (int8) | 260..291: bsums (16 x int16, sums of 16 qs; used
    # only by dot products, not needed to dequantize)
    return r["qs"]  # (n, 256) int8


def _ref_q8_k(r):
    return _q_q8_k(r).astype(F32) * _f(r["d"])


# --- the non-linear, ternary and i-quant types: w = scale[s] * value -------------------------
# Per type: ``_v_<type>(r)``, the value each weight's scale multiplies, records (n,) -> float32
# (n, block_size) (a codebook entry with its sign, an E2M1 value, a trit...), and
# ``_s_<type>(r)``, the scales, float32 (n, n_sub), one per ``sub`` weights (``_SCALED``).
# ``_ref_scaled`` multiplies them once per weight, which is llama.cpp's last (only inexact) step.

def _v_iq4_nl(r):
    # byte 0..1: d (f16) | 2..17: qs, nibbles as Q4_0 (weight j low nibble of qs[j], j+16 high);
    # each nibble indexes the 16-value table codebooks.IQ4_NL
    return codebooks.IQ4_NL[_nibbles(r["qs"])].astype(F32)  # (n, 32) in -127..113


def _s_d(r):
    return _f(r["d"])  # (n, 1): one f16 scale for the block


def iq4_xs_scales(r) -> np.ndarray:
    """IQ4_XS: the 8 six-bit sub-block scales, minus 32: int16 (n, 8) in -32..31."""
    # scales_l (4 bytes): low 4 bits, sub-block s in nibble s%2 of byte s//2
    # scales_h (u16): high 2 bits, sub-block s in bits 2s..2s+1
    s = np.arange(8)
    low = (r["scales_l"][:, s // 2] >> (4 * (s % 2)).astype(np.uint8)) & 0xF
    high = (r["scales_h"][:, None] >> (2 * s).astype(np.uint16)) & 3
    return (low | (high << 4)).astype(np.int16) - 32


def _v_iq4_xs(r):
    # byte 0..1: d | 2..3: scales_h | 4..7: scales_l | 8..135: qs; sub-block s (32 weights) has
    # its 16 bytes at qs[16*s:16*s+16], nibbles in Q4_0 order, values from codebooks.IQ4_NL
    n = len(r)
    return codebooks.IQ4_NL[_nibbles(r["qs"].reshape(n, 8, 16))].reshape(n, QK_K).astype(F32)


def _s_iq4_xs(r):
    return _f(r["d"]) * iq4_xs_scales(r).astype(F32)  # (n, 8)


def e8m0_half(e) -> np.ndarray:
    """MXFP4's E8M0 scale byte e as float32 2**(e - 128) (half the OCP value: the stored E2M1
    values are doubled), subnormal for e < 2, as ggml's ``ggml_e8m0_to_fp32_half``."""
    e = np.asarray(e, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


def _v_mxfp4(r):
    # byte 0: e (E8M0 scale) | 1..16: qs, E2M1 codes as nibbles in Q4_0 order
    return codebooks.MXFP4[_nibbles(r["qs"])].astype(F32)  # (n, 32), doubled E2M1: -12..12


def _s_mxfp4(r):
    return e8m0_half(r["e"])[:, None]


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _trits(b, k):
    # A byte holds k trits as the fraction b / 256 ~ 0.t1t2t3t4t5 in base 3 (rounded up):
    # trit i = the integer part of 3 * frac(b * 3**i / 256), i.e. ((b * 3**i mod 256) * 3) >> 8.
    # Returns (..., k, bytes) in 0..2, trit i of every byte in row i.
    q = (b[..., None, :] * _POW3[:k, None]).astype(np.uint8)  # wraps mod 256, as uint8 in C
    return ((q.astype(np.uint16) * 3) >> 8).astype(np.int8)


def _v_tq1_0(r):
    # byte 0..47: qs | 48..51: qh | 52..53: d (f16).  Weights, in order:
    #   0..159:   trit i (0..4) of qs[0..31]  -> weight 32*i + m
    #   160..239: trit i of qs[32..47]        -> weight 160 + 16*i + m
    #   240..255: trit i (0..3) of qh[0..3]   -> weight 240 + 4*i + m
    # stored trit t in 0..2 means t - 1
    n = len(r)
    parts = [_trits(r["qs"][:, :32], 5), _trits(r["qs"][:, 32:], 5), _trits(r["qh"], 4)]
    return (np.concatenate([p.reshape(n, -1) for p in parts], axis=-1) - 1).astype(F32)


def _v_tq2_0(r):
    # byte 0..63: qs, 2 bits per weight | 64..65: d (f16).  Weight 128*h + 32*j + m is bits
    # 2j..2j+1 of qs[32*h + m] (as Q2_K); stored 0..2 means -1..1
    n = len(r)
    q = (r["qs"].reshape(n, 2, 1, 32) >> _SHIFT2) & 3
    return (q.reshape(n, QK_K).astype(np.int8) - 1).astype(F32)


def _signs(bits) -> np.ndarray:
    """uint8 (...) sign bytes -> float32 (..., 8): bit j set means weight j is negative."""
    b = np.unpackbits(np.asarray(bits, np.uint8)[..., None], axis=-1, bitorder="little")
    return np.where(b == 1, F32(-1), F32(1))


def _grid(name, idx) -> np.ndarray:
    """Codewords idx (any int array) of a type's codebook as float32 (..., group)."""
    return codebooks.grid(name)[idx].astype(F32)


def _half_scales(d, s, factor):
    # IQ2/IQ3 scale of a sub-block: d * (0.5 + s) * factor, in this order in float32
    return (d * (F32(0.5) + s.astype(F32))) * F32(factor)


def _iq2_xxs_words(r):
    n = len(r)
    return r["qs"].view("<u4").reshape(n, 8, 2)


def _v_iq2_xxs(r):
    # byte 0..1: d | 2..65: 8 sub-blocks of 32 weights, each two u32 (as 4 u16 in qs):
    #   u32 0: 4 grid indices (one byte per group of 8)
    #   u32 1: bits 0..27: 4 x 7-bit sign codes (codebooks.KSIGNS) | bits 28..31: scale s
    #   w = d * (0.5 + s) * 0.25 * grid[idx] * sign
    n = len(r)
    u = _iq2_xxs_words(r)
    idx = u[..., 0:1].view(np.uint8).reshape(n, 8, 4)
    sign = codebooks.KSIGNS[(u[..., 1:2] >> (7 * np.arange(4, dtype=np.uint32))) & 127]
    return (_grid("IQ2_XXS", idx) * _signs(sign)).reshape(n, QK_K)


def _s_iq2_xxs(r):
    return _half_scales(_f(r["d"]), _iq2_xxs_words(r)[..., 1] >> 28, 0.25)  # (n, 8)


def _v_iq2_xs(r):
    # byte 0..1: d | 2..65: qs, 32 u16: bits 0..8 grid index, bits 9..15 sign code | 66..73:
    # scales, sub-block s: 4-bit scales of its two halves of 16 in the low and high nibble
    n = len(r)
    q = r["qs"].reshape(n, 8, 4)
    return (_grid("IQ2_XS", q & 511) * _signs(codebooks.KSIGNS[q >> 9])).reshape(n, QK_K)


def _s_iq2_xs(r):
    # (n, 16): half h of sub-block s is nibble h of scales[s]
    n = len(r)
    return _half_scales(_f(r["d"]), _nibbles(r["scales"][:, :, None]).reshape(n, 16), 0.25)


def _v_iq2_s(r):
    # byte 0..1: d | 2..33: qs, low 8 bits of 32 grid indices | 34..65: signs, one byte per group
    # of 8 | 66..73: qh, bits 2l..2l+1 of byte s = index bits 8..9 of group l of sub-block s |
    # 74..81: scales as IQ2_XS
    n = len(r)
    hi = (r["qh"][..., None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # (n, 8, 4)
    idx = r["qs"].reshape(n, 8, 4).astype(np.int32) | (hi.astype(np.int32) << 8)
    return (_grid("IQ2_S", idx) * _signs(r["signs"].reshape(n, 8, 4))).reshape(n, QK_K)


def _v_iq3_xxs(r):
    # byte 0..1: d | 2..65: qs, 64 grid indices (groups of 4) | 66..97: 8 u32, sub-block s:
    # bits 0..27 four 7-bit sign codes (each covers 8 weights = 2 groups), bits 28..31 scale
    #   w = d * (0.5 + s) * 0.5 * grid[idx] * sign
    n = len(r)
    u = r["scales_signs"]  # (n, 8)
    sign = codebooks.KSIGNS[(u[..., None] >> (7 * np.arange(4, dtype=np.uint32))) & 127]
    g = _grid("IQ3_XXS", r["qs"].reshape(n, 8, 4, 2)).reshape(n, 8, 4, 8)
    return (g * _signs(sign)).reshape(n, QK_K)


def _s_iq3_xxs(r):
    return _half_scales(_f(r["d"]), r["scales_signs"] >> 28, 0.5)  # (n, 8)


def _v_iq3_s(r):
    # byte 0..1: d | 2..65: qs, low 8 bits of 64 grid indices (groups of 4) | 66..73: qh, bit k
    # of byte s = bit 8 of index 8*s + k | 74..105: signs, one byte per 8 weights |
    # 106..109: scales, 4-bit, two per byte (sub-blocks of 32):  w = d * (1 + 2*s) * grid * sign
    n = len(r)
    hi = np.unpackbits(r["qh"][..., None], axis=-1, bitorder="little").astype(np.int32)
    idx = r["qs"].reshape(n, 8, 8).astype(np.int32) | (hi << 8)  # (n, 8, 8)
    g = _grid("IQ3_S", idx).reshape(n, 8, 4, 8)
    return (g * _signs(r["signs"].reshape(n, 8, 4))).reshape(n, QK_K)


def _s_iq3_s(r):
    n = len(r)
    sc = _nibbles(r["scales"][:, :, None]).reshape(n, 8)  # sub-block 2b: low nibble of byte b
    return _f(r["d"]) * (1 + 2 * sc.astype(np.int32)).astype(F32)


IQ1_DELTA = F32(0.125)


def _v_iq1_s(r):
    # byte 0..1: d | 2..33: qs, low 8 bits of 32 grid indices | 34..49: qh, 8 u16, sub-block s:
    # bits 3l..3l+2 = index bits 8..10 of group l, bits 12..14 scale s, bit 15 sign of delta
    #   w = d * (2*s + 1) * (grid[idx] + delta), delta = +-0.125
    n = len(r)
    qh = r["qh"]  # (n, 8)
    hi = (qh[..., None] >> (3 * np.arange(4, dtype=np.uint16))) & 7
    idx = r["qs"].reshape(n, 8, 4).astype(np.int32) | (hi.astype(np.int32) << 8)
    delta = np.where(qh & 0x8000, -IQ1_DELTA, IQ1_DELTA)  # (n, 8)
    return (_grid("IQ1_S", idx) + delta[..., None, None]).reshape(n, QK_K)


def _s_iq1_s(r):
    return _f(r["d"]) * (2 * ((r["qh"] >> 12) & 7).astype(np.int32) + 1).astype(F32)  # (n, 8)


def iq1_m_scale(r) -> np.ndarray:
    """IQ1_M's f16 super-block scale, spread over the top 4 bits of its four scale words."""
    sc = r["scales"]  # (n, 4) u16
    u = ((sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00)
         | (sc[:, 3] & 0xF000))
    return u.astype(np.uint16).view(np.float16).astype(F32)


def _v_iq1_m(r):
    # byte 0..31: qs, low 8 bits of 32 grid indices | 32..47: qh, one nibble per group of 8:
    # bits 0..2 index bits 8..10, bit 3 sign of delta | 48..55: scales, 4 u16: bits 0..11 are
    # 3-bit scales of 16 weights (u16 k holds those of weights 64k..64k+63), bits 12..15 a
    # nibble of d (f16).   w = d * (2*s + 1) * (grid[idx] + delta)
    n = len(r)
    nib = _nibbles(r["qh"][:, :, None]).reshape(n, 32)  # group g: nibble g%2 of qh[g//2]
    idx = r["qs"].astype(np.int32) | ((nib & 7).astype(np.int32) << 8)
    delta = np.where(nib & 8, -IQ1_DELTA, IQ1_DELTA)  # (n, 32)
    return (_grid("IQ1_M", idx) + delta[..., None]).reshape(n, QK_K)


def _s_iq1_m(r):
    n = len(r)
    s = (r["scales"][..., None] >> (3 * np.arange(4, dtype=np.uint16))) & 7  # (n, 4, 4)
    return iq1_m_scale(r)[:, None] * (2 * s.reshape(n, 16).astype(np.int32) + 1).astype(F32)


# name -> (weights per scale, scales, values)
_SCALED = {
    "IQ4_NL": (32, _s_d, _v_iq4_nl), "IQ4_XS": (32, _s_iq4_xs, _v_iq4_xs),
    "MXFP4": (32, _s_mxfp4, _v_mxfp4), "TQ1_0": (256, _s_d, _v_tq1_0),
    "TQ2_0": (256, _s_d, _v_tq2_0), "IQ2_XXS": (32, _s_iq2_xxs, _v_iq2_xxs),
    "IQ2_XS": (16, _s_iq2_xs, _v_iq2_xs), "IQ2_S": (16, _s_iq2_xs, _v_iq2_s),
    "IQ3_XXS": (32, _s_iq3_xxs, _v_iq3_xxs), "IQ3_S": (32, _s_iq3_s, _v_iq3_s),
    "IQ1_S": (32, _s_iq1_s, _v_iq1_s), "IQ1_M": (16, _s_iq1_m, _v_iq1_m),
}


def scaled_parts(blocks, qtype: "str | int | QType") -> tuple[int, np.ndarray, np.ndarray]:
    """(weights per scale, scales (n, n_sub), values (n, block_size)) of a scale-times-value type:
    its weight j is ``scales[:, j // sub] * values[:, j]`` in float32."""
    t = _qtype(qtype)
    sub, scales, values = _SCALED[t.name]
    r = _records(blocks, t)
    with np.errstate(over="ignore", invalid="ignore"):
        return sub, scales(r), values(r)


def _scaled_ref(name):
    sub, scales, values = _SCALED[name]

    def ref(r):
        v = values(r)  # (n, block_size)
        return (np.repeat(scales(r), sub, axis=-1) * v)
    return ref


# --- plain integers and F64: w = the value, as float32 ---------------------------------------

def _ref_int(r):
    # one value per "block": byte 0..size-1: i (little-endian) or f (F64)
    return r[r.dtype.names[0]].astype(F32)[:, None]


_REF = {
    "F32": _ref_f32, "F16": _ref_f16, "BF16": _ref_bf16,
    "Q4_0": _ref_q4_0, "Q4_1": _ref_q4_1, "Q5_0": _ref_q5_0, "Q5_1": _ref_q5_1, "Q8_0": _ref_q8_0,
    "Q2_K": _ref_q2_k, "Q3_K": _ref_q3_k, "Q4_K": _ref_q4_k, "Q5_K": _ref_q5_k, "Q6_K": _ref_q6_k,
    "Q8_K": _ref_q8_k,
    **{name: _scaled_ref(name) for name in _SCALED},
    "I8": _ref_int, "I16": _ref_int, "I32": _ref_int, "I64": _ref_int, "F64": _ref_int,
}
_QINTS = {
    "Q4_0": _q_q4_0, "Q4_1": _q_q4_1, "Q5_0": _q_q5_0, "Q5_1": _q_q5_1, "Q8_0": _q_q8_0,
    "Q2_K": _q_q2_k, "Q3_K": _q_q3_k, "Q4_K": _q_q4_k, "Q5_K": _q_q5_k, "Q6_K": _q_q6_k,
    "Q8_K": _q_q8_k,
}
for _name, _fn in _REF.items():
    register(_name, "reference", _fn)


def quant_ints(blocks, qtype: "str | int | QType") -> np.ndarray:
    """The integers each weight's formula multiplies, ``(n_blocks, block_size)`` int16.

    Signed where the type subtracts an offset (Q4_0 -8..7, Q5_0 -16..15, Q3_K -4..3,
    Q6_K -32..31, Q8_0/Q8_K int8), unsigned otherwise (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K).
    """
    t = _qtype(qtype)
    if not t.is_quantized:
        raise BadArgument(f"{t.name} is a float type; it has no quantized integers")
    return _QINTS[t.name](_records(blocks, t)).astype(np.int16)


def dequantize_blocks_ref(blocks, qtype: "str | int | QType") -> np.ndarray:
    """numpy reference: uint8 blocks (any shape, whole blocks) -> float32 (n_blocks, block_size).
    """
    t = _qtype(qtype)
    r = _records(blocks, t)
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN scales decode as they are
        out = t.impl("reference")(r)
    return np.ascontiguousarray(out, dtype=F32).reshape(len(r), t.block_size)


# ---------------------------------------------------------------------------------------------
# public entry
# ---------------------------------------------------------------------------------------------

def _check_shape(shape, t: QType) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise BadArgument(f"shape must be a tuple of ints, got {shape!r}") from None
    if not shape:
        raise BadArgument("shape must have at least one dimension (the row length), got ()")
    if any(s < 0 for s in shape):
        raise BadArgument(f"shape {shape} has a negative dimension")
    if shape[-1] % t.block_size:
        raise BadArgument(f"{t.name} tensor of shape {shape}: the last dimension {shape[-1]} is "
                          f"not a multiple of the block size {t.block_size}")
    return shape


def dequantize(data, qtype: "str | int | QType", shape, out: np.ndarray | None = None
               ) -> np.ndarray:
    """Dequantize raw block bytes to a float32 array of ``shape``.

    ``data`` is the tensor's bytes: a uint8 array of any shape (or any bytes-like / array whose
    raw bytes are the blocks), holding exactly ``prod(shape[:-1])`` rows of
    ``shape[-1] // block_size`` blocks.  ``qtype`` is a type name ("Q4_K") or GGML id (12).
    ``out`` (optional) is a C-contiguous float32 array of ``shape`` to write into.
    """
    t = _qtype(qtype)
    shape = _check_shape(shape, t)
    rows = prod(shape[:-1])
    row_bytes = shape[-1] // t.block_size * t.type_size
    a = raw_bytes(data)
    nbytes = a.size
    if nbytes != rows * row_bytes:
        raise BadArgument(f"{t.name} tensor of shape {shape} needs {rows * row_bytes} bytes "
                          f"({rows} rows x {row_bytes} bytes), got {nbytes}")
    if out is None:
        out = np.empty(shape, dtype=F32)
    elif (not isinstance(out, np.ndarray) or out.dtype != F32 or out.shape != shape
          or not out.flags.c_contiguous):
        raise BadArgument(f"out must be a C-contiguous float32 array of shape {shape}, got "
                          f"{getattr(out, 'dtype', type(out).__name__)} "
                          f"{getattr(out, 'shape', '')}")
    if out.size:
        from .kernels.cpu_dequant import dequantize_into
        dequantize_into(as_blocks(a, t), t.name, out.reshape(-1, t.block_size))
    return out


# ---------------------------------------------------------------------------------------------
# one block, decoded for people
# ---------------------------------------------------------------------------------------------

def _floats(a) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=F32).ravel()]


def _ints(a) -> list[int]:
    return [int(v) for v in np.asarray(a).ravel()]


def block_fields(qtype: "str | int | QType", block) -> dict:
    """Decode ONE block into its fields (plain Python values, JSON-ready).

    Always present: ``type``, ``formula`` (how a weight is made from the fields) and ``values``
    (the dequantized weights).  Then, by family:

    - floats: ``value``;
    - legacy: ``d`` (and ``m`` for Q4_1/Q5_1) and ``q``, the integers the formula multiplies
      (signed for Q4_0 -8..7, Q5_0 -16..15, Q8_0 -128..127; unsigned for Q4_1 0..15, Q5_1 0..31);
    - k-quants: ``d`` (and ``dmin``), ``scales`` / ``mins`` as stored integers, ``scale_values``
      (d*sc) / ``min_values`` (dmin*m) as floats, ``sub_block_size``, and ``q`` (Q2_K 0..3,
      Q3_K -4..3, Q4_K 0..15, Q5_K 0..31, Q6_K -32..31, Q8_K -128..127).
    """
    t = _qtype(qtype)
    b = raw_bytes(block)
    if b.size != t.type_size:
        raise BadArgument(f"a {t.name} block is {t.type_size} bytes, got {b.size}")
    r = _records(b, t)[0]
    out: dict = {"type": t.name}
    name = t.name
    if not t.is_quantized:
        out["formula"] = ("w = the f32 whose upper 16 bits are f" if name == "BF16" else
                          f"w = {t.fields[0][0]}")
        out["value"] = float(dequantize_blocks_ref(b, t)[0, 0])
        return out
    if name in _SCALED:
        return _scaled_fields(out, t, b)
    d = F32(r["d"])
    out["d"] = float(d)
    if name in ("Q4_0", "Q5_0", "Q8_0"):
        out["formula"] = "w = d * q"
    elif name in ("Q4_1", "Q5_1"):
        out["m"] = float(r["m"])
        out["formula"] = "w = d * q + m"
    elif name in ("Q2_K", "Q4_K", "Q5_K"):
        dmin = F32(r["dmin"])
        out["dmin"] = float(dmin)
        if name == "Q2_K":
            sc, mn = r["scales"] & 0xF, r["scales"] >> 4
        else:
            sc, mn = unpack_scale_min_k4(r["scales"])
        out["sub_block_size"] = 16 if name == "Q2_K" else 32
        out["scales"], out["mins"] = _ints(sc), _ints(mn)
        out["scale_values"] = _floats(d * sc.astype(F32))
        out["min_values"] = _floats(dmin * mn.astype(F32))
        out["formula"] = "w = (d * scales[s]) * q - (dmin * mins[s]), s = sub-block"
    elif name in ("Q3_K", "Q6_K"):
        sc = unpack_q3k_scales(r["scales"]) if name == "Q3_K" else r["scales"]
        out["sub_block_size"] = 16
        out["scales"] = _ints(sc)
        out["scale_values"] = _floats(d * sc.astype(F32))
        out["formula"] = "w = (d * scales[s]) * q, s = sub-block"
    else:  # Q8_K
        out["bsums"] = _ints(r["bsums"])
        out["formula"] = "w = d * q (d is f32; bsums are sums of 16 q, for dot products)"
    out["q"] = _ints(quant_ints(b, t)[0])
    out["values"] = _floats(dequantize_blocks_ref(b, t)[0])
    return out


_SCALE_NAMES = {"MXFP4": "2**(e - 128) (E8M0, halved)", "IQ4_XS": "d * (scale - 32)",
                "IQ2_XXS": "d * (0.5 + s) / 4", "IQ2_XS": "d * (0.5 + s) / 4",
                "IQ2_S": "d * (0.5 + s) / 4", "IQ3_XXS": "d * (0.5 + s) / 2",
                "IQ3_S": "d * (1 + 2 s)", "IQ1_S": "d * (2 s + 1)", "IQ1_M": "d * (2 s + 1)"}
_VALUE_NAMES = {"IQ4_NL": "kvalues[q]", "IQ4_XS": "kvalues[q]", "MXFP4": "2 * e2m1(q)",
                "TQ1_0": "trit - 1", "TQ2_0": "q - 1", "IQ1_S": "grid[idx] + delta",
                "IQ1_M": "grid[idx] + delta"}


def _scaled_fields(out: dict, t: QType, b: np.ndarray) -> dict:
    sub, scales, values = scaled_parts(b, t)
    r = _records(b, t)
    if "d" in t.dtype.names:
        out["d"] = float(F32(r["d"][0]))
    elif t.name == "IQ1_M":
        out["d"] = float(iq1_m_scale(r)[0])
    else:  # MXFP4
        out["e"] = int(r["e"][0])
    out["sub_block_size"] = sub
    out["scale_values"] = _floats(scales[0])
    out["formula"] = (f"w = scale_values[s] * q, s = sub-block; scale = "
                      f"{_SCALE_NAMES.get(t.name, 'd')}, q = "
                      f"{_VALUE_NAMES.get(t.name, 'grid[idx] * sign')}")
    q = values[0]
    out["q"] = _ints(q) if np.array_equal(q, np.round(q)) else _floats(q)
    out["values"] = _floats(dequantize_blocks_ref(b, t)[0])
    return out


__all__ = ["scaled_parts", "as_blocks", "block_fields", "dequantize", "dequantize_blocks_ref", "quant_ints",
           "raw_bytes", "unpack_q3k_scales", "unpack_scale_min_k4"]
