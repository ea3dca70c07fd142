"""Every quantized grid as ``w = a * v[q] + b``: the affine view of a block and its codes.

Error-compensated rounding (:mod:`blockq.quantize.gptq`) picks the codes of a block itself
once its scales are set.  It needs three things per type, all here:

- :func:`affine` — for blocks already holding scales (and mins): per weight the step ``a`` and
  offset ``b`` of its sub-block, so that the weight decodes as ``a * v[q] + b``;
- :func:`values` — ``v``, the grid's values in ascending order: the identity on the integer
  grids (``RANGES``: ``v[q] = q``, ``q`` in ``qmin..qmax``, the integers
  :func:`blockq.dequantize.quant_ints` returns), the 16-entry table of the non-uniform grids
  (``TABLES``: IQ4_NL and IQ4_XS, ``q`` the table index 0..15);
- :func:`pack_codes` — write chosen codes ``q`` into blocks, leaving their scales untouched.
  It is the exact inverse of :func:`codes_of`: ``pack_codes(b, t, codes_of(b, t)) == b``.

The bit layouts are drawn beside their unpackers in :mod:`blockq.dequantize`; the packers below
follow the same index names (``w = 128*h + 32*j + l`` etc.).
"""
from __future__ import annotations

import numpy as np

from .. import codebooks
from ..dequantize import (_nibbles, _records, quant_ints, scaled_parts, unpack_q3k_scales,
                          unpack_scale_min_k4)
from ..errors import BadArgument
from ..types import QK_K, QType, qtype as _qtype

F32 = np.float32

# integer range of each grid, as quant_ints returns it
RANGES = {
    "Q4_0": (-8, 7), "Q4_1": (0, 15), "Q5_0": (-16, 15), "Q5_1": (0, 31),
    # NOTE: llama.cpp's Q8_0 quantizer never writes -128 (it rounds to -127..127); we keep to
    # the same range so every kernel that assumes it stays safe.
    "Q8_0": (-127, 127),
    "Q2_K": (0, 3), "Q3_K": (-4, 3), "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31),
}
# the non-uniform grids: w = scale * table[q], q the index 0..15 into the ascending table
TABLES = {"IQ4_NL": codebooks.IQ4_NL.astype(F32), "IQ4_XS": codebooks.IQ4_NL.astype(F32)}
# weights that share one (a, b) pair: the sub-block length of each grid
SUB_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
             "Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16,
             "IQ4_NL": 32, "IQ4_XS": 32}


def supported(name: str) -> bool:
    return name in RANGES or name in TABLES


def _need(t: QType) -> None:
    if not supported(t.name):
        raise BadArgument(f"{t.name} has no grid to pick codes on (grids: "
                          + ", ".join([*RANGES, *TABLES]) + ")")


def code_range(qtype) -> tuple[int, int]:
    """The smallest and largest code of a grid: the integer range, or 0..len(table) - 1."""
    t = _qtype(qtype)
    _need(t)
    return RANGES[t.name] if t.name in RANGES else (0, len(TABLES[t.name]) - 1)


def values(qtype) -> np.ndarray:
    """``v``, float32 ascending: what each code means before ``a`` and ``b`` (``v[q - qmin]``
    for code ``q``): ``qmin..qmax`` on an integer grid, the value table on a non-uniform one."""
    t = _qtype(qtype)
    _need(t)
    if t.name in TABLES:
        return TABLES[t.name]
    lo, hi = RANGES[t.name]
    return np.arange(lo, hi + 1, dtype=F32)


def decode_codes(qtype, q: np.ndarray) -> np.ndarray:
    """``v[q]`` as float32 (any shape): the codes themselves on an integer grid."""
    t = _qtype(qtype)
    _need(t)
    q = np.asarray(q)
    return TABLES[t.name][q.astype(np.intp)] if t.name in TABLES else q.astype(F32)


def codes_of(blocks: np.ndarray, qtype) -> np.ndarray:
    """The code of every weight, int16 ``(n, block_size)``: the integers of
    :func:`blockq.dequantize.quant_ints` on an integer grid, the table indices on IQ4_NL /
    IQ4_XS."""
    t = _qtype(qtype)
    _need(t)
    if t.name in RANGES:
        return quant_ints(blocks, t)
    r = _records(blocks, t)
    n = len(r)
    if t.name == "IQ4_NL":  # byte j: weight j low nibble, j + 16 high
        return _nibbles(r["qs"]).astype(np.int16)
    # IQ4_XS: sub-block s in qs[16s:16s+16], nibbles as IQ4_NL
    return _nibbles(r["qs"].reshape(n, 8, 16)).reshape(n, QK_K).astype(np.int16)


def _f(a) -> np.ndarray:
    return np.asarray(a).astype(F32)[:, None]  # (n, 1)


def affine(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block step and offset of uint8 blocks ``(n, type_size)``:
    ``a, b`` float32 ``(n, n_sub)`` so that weight ``i`` decodes as
    ``a[:, i // sub] * q + b[:, i // sub]``."""
    t = _qtype(qtype)
    _need(t)
    if t.name in TABLES:  # w = scale * table[q]: blockq.dequantize's own scales, no offset
        _, a, _ = scaled_parts(blocks, t)
        return a.astype(F32), np.zeros_like(a, dtype=F32)
    r = _records(blocks, t)
    n = len(r)
    with np.errstate(over="ignore", invalid="ignore"):
        if t.name in ("Q4_0", "Q5_0", "Q8_0"):
            return _f(r["d"]), np.zeros((n, 1), F32)
        if t.name in ("Q4_1", "Q5_1"):
            return _f(r["d"]), _f(r["m"])
        if t.name == "Q2_K":
            a = _f(r["d"]) * (r["scales"] & 0xF).astype(F32)
            b = -(_f(r["dmin"]) * (r["scales"] >> 4).astype(F32))
            return a, b
        if t.name == "Q3_K":
            return _f(r["d"]) * unpack_q3k_scales(r["scales"]).astype(F32), np.zeros((n, 16), F32)
        if t.name in ("Q4_K", "Q5_K"):
            sc, mn = unpack_scale_min_k4(r["scales"])
            return _f(r["d"]) * sc.astype(F32), -(_f(r["dmin"]) * mn.astype(F32))
        # Q6_K
        return _f(r["d"]) * r["scales"].astype(F32), np.zeros((n, 16), F32)


def _pairs(u: np.ndarray, n: int) -> np.ndarray:
    """Q2_K/Q3_K low bits: weight w = 128*h + 32*j + l -> bits 2j..2j+1 of byte 32*h + l."""
    v = u.reshape(n, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(n, 64)


def _nibble_pack(u: np.ndarray) -> np.ndarray:
    """Legacy 32-blocks: weight j in the low nibble of byte j, weight j+16 in the high one."""
    u = u.astype(np.uint8)
    return (u[:, :16] & 0xF) | ((u[:, 16:] & 0xF) << 4)


def pack_codes(blocks: np.ndarray, qtype, q: np.ndarray) -> np.ndarray:
    """A copy of ``blocks`` (uint8 ``(n, type_size)``) with their codes replaced by ``q``
    (``(n, block_size)``, in :func:`code_range`), scales and mins kept."""
    t = _qtype(qtype)
    _need(t)
    lo, hi = code_range(t)
    q = np.asarray(q)
    n = blocks.shape[0]
    if q.shape != (n, t.block_size):
        raise BadArgument(f"{t.name}: codes have shape {q.shape}, blocks need ({n}, {t.block_size})")
    if q.size and (q.min() < lo or q.max() > hi):
        raise BadArgument(f"{t.name}: codes must lie in {lo}..{hi}, got {int(q.min())}..{int(q.max())}")
    out = np.array(blocks, dtype=np.uint8, copy=True)
    r = out.view(t.dtype)[:, 0]
    q = q.astype(np.int16)
    name = t.name
    if name in ("Q4_0", "Q4_1", "IQ4_NL"):
        r["qs"] = _nibble_pack(q - lo)
    elif name == "IQ4_XS":  # per sub-block of 32 the IQ4_NL nibble order, 16 bytes each
        r["qs"] = _nibble_pack(q.reshape(n * 8, 32)).reshape(n, 128)
    elif name in ("Q5_0", "Q5_1"):
        u = q - lo  # 0..31
        r["qs"] = _nibble_pack(u)
        r["qh"] = np.packbits((u >> 4).astype(np.uint8), axis=-1, bitorder="little")
    elif name == "Q8_0":
        r["qs"] = q.astype(np.int8)
    elif name == "Q2_K":
        r["qs"] = _pairs(q, n)
    elif name == "Q3_K":
        u = q + 4  # 0..7: low 2 bits, and the (inverted) high bit set when q >= 0
        r["qs"] = _pairs(u & 3, n)
        high = (u >> 2).reshape(n, 8, 32).astype(np.uint8)  # (n, 4*h + j, l)
        r["hmask"] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None],
                                          axis=1)
    elif name in ("Q4_K", "Q5_K"):
        v = q.reshape(n, 4, 2, 32).astype(np.uint8)  # (n, j, k, l), w = 64*j + 32*k + l
        r["qs"] = ((v[:, :, 0] & 0xF) | ((v[:, :, 1] & 0xF) << 4)).reshape(n, 128)
        if name == "Q5_K":
            high = (v >> 4).reshape(n, 8, 32)  # (n, 2*j + k, l)
            r["qh"] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None],
                                           axis=1)
    else:  # Q6_K: w = 128*h + 32*c + l
        u = (q + 32).reshape(n, 2, 4, 32).astype(np.uint8)  # (n, h, c, l)
        low, high = u & 0xF, u >> 4
        # ql[64*h + 32*(c%2) + l] holds nibble c//2
        ql = low[:, :, 0:2] | (low[:, :, 2:4] << 4)  # (n, h, c%2, l)
        r["ql"] = ql.reshape(n, 128)
        r["qh"] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
                   | (high[:, :, 3] << 6)).reshape(n, 64)
    return out


def expand(a: np.ndarray, t: QType) -> np.ndarray:
    """Per-sub-block values ``(n, n_sub)`` -> per weight ``(n, block_size)``."""
    return np.repeat(a, SUB_BLOCK[t.name], axis=1)


assert QK_K == 256
