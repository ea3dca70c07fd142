"""Helpers shared by the tests and the benchmarks in tools/: random blocks of any type."""
from __future__ import annotations

import numpy as np

from .types import QType, qtype as _qtype


def random_blocks(qtype: "str | int | QType", n: int, rng: np.random.Generator,
                  scales: "str | float" = "finite") -> np.ndarray:
    """``n`` random blocks of a type as uint8 ``(n, type_size)``: random bytes everywhere, with
    the float fields (d, dmin, m, Q8_K's d, and the values of F16/BF16/F32) set by ``scales``:

    - ``"finite"``: any finite value (f16: every exponent, subnormals included);
    - a number s: normal values of standard deviation s (modest scales for products);
    - ``"any"``: left as random bits, inf and NaN included (F32 values too; Q8_K's d is normal).

    MXFP4's E8M0 scale byte and IQ1_M's f16 d (spread over the top nibbles of its scale words)
    follow ``scales`` the same way.
    """
    t = _qtype(qtype)
    b = rng.integers(0, 256, (n, t.type_size), dtype=np.uint8)
    rec = b.view(t.dtype)[:, 0]
    for field, dt, count in t.fields:
        shape = rec[field].shape
        if not isinstance(scales, str):
            if dt in ("<f2", "<f4"):
                rec[field] = (rng.standard_normal((n, count)) * scales).astype(dt).reshape(shape)
            elif t.name == "BF16":
                f = (rng.standard_normal(n) * scales).astype(np.float32)
                rec[field] = (f.view(np.uint32) >> 16).astype(np.uint16)
            elif (t.name, field) == ("MXFP4", "e"):  # 2**(e - 128) ~ scales / 4 (doubled E2M1 values reach 12)
                e = 126 + np.round(np.log2(scales)) + rng.integers(-2, 3, n)
                rec[field] = np.clip(e, 0, 254).astype(np.uint8)
            elif (t.name, field) == ("IQ1_M", "scales"):
                rec[field] = _iq1_m_with_d(rec[field], rng.standard_normal(n) * scales)
        elif (t.name, field, scales) == ("IQ1_M", "scales", "finite"):
            h = rng.integers(0, 1 << 16, n, dtype=np.uint16)
            h[(h & 0x7C00) == 0x7C00] &= 0xBFFF
            rec[field] = _iq1_m_with_d(rec[field], h.view(np.float16))
        elif dt == "<f2" and scales == "finite":
            h = rng.integers(0, 1 << 16, (n, count), dtype=np.uint16)
            h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent 31 (inf/NaN) -> 15 (finite)
            rec[field] = h.view(np.float16).reshape(shape)
        elif dt == "<f4" and (t.is_quantized or scales == "finite"):
            rec[field] = rng.standard_normal(n).astype(np.float32)
        elif t.name == "BF16" and scales == "finite":
            rec[field][(rec[field] & 0x7F80) == 0x7F80] &= 0xBFFF  # exponent 255 -> 127
    return b


def _iq1_m_with_d(words: np.ndarray, d: np.ndarray) -> np.ndarray:
    """IQ1_M scale words (n, 4) with their top nibbles replaced by the f16 bits of d (n,)."""
    h = d.astype(np.float16).view(np.uint16).astype(np.uint16)
    top = np.stack([(h << 12), (h << 8), (h << 4), h], axis=1).astype(np.uint16) & 0xF000
    return (words & 0x0FFF) | top


def filled_blocks(qtype: "str | int | QType", rows: int, fill: int) -> np.ndarray:
    """uint8 ``(rows, 2 super-blocks' bytes)`` with every byte ``fill`` and every f16 field 0.5:
    the extreme codes of a type (all ones, all zeros, half bytes) under a harmless scale."""
    t = _qtype(qtype)
    w = np.full((rows, 2 * t.type_size * 256 // t.block_size), fill, np.uint8)
    rec = w.reshape(-1, t.type_size).view(t.dtype)
    for f, dt, _ in t.fields:
        if dt == "<f2":
            rec[f] = np.float16(0.5)
    return w


def int8_reference(name: str, w: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference of an int8-activation product (``blockq.kernels.cpu_int8``):
    ``dequantize(W) @ dequantize(Q8(x))`` in float64, Q8(x) from the numpy activation
    quantizers of ``cpu_q8`` / ``cpu_q8_kquant``; types with a min (Q4_1, Q5_1) add ``m * s``
    with Q8_1's f16 block sum ``s``, as llama.cpp does.

    w uint8 (rows, row_bytes), X float32 (n, cols) -> (reference (n, rows), bound (n, rows)):
    ``bound = |W| @ |x|``, the scale float32 summation errors are measured against.
    """
    from .dequantize import dequantize
    from .kernels.cpu_q8 import quantize_q8
    from .kernels.cpu_q8_kquant import quantize_q8_k

    t = _qtype(name)
    rows, cols = w.shape[0], X.shape[1]
    W = dequantize(np.ascontiguousarray(w).reshape(-1), name, (rows, cols)).astype(np.float64)
    if t.dot == "Q8_K":
        q, d, _ = quantize_q8_k(X)
        xd = (q.astype(np.float64) * d[..., None]).reshape(X.shape)
    else:
        q, d, s = quantize_q8(X)
        xd = (q * d[..., None].astype(np.float64)).reshape(X.shape)
    ref, bound = xd @ W.T, np.abs(xd) @ np.abs(W).T  # (n, rows)
    if t.dot == "Q8_1":  # m * s instead of m * d * sum(q)
        m = np.ascontiguousarray(w).reshape(-1).view(t.dtype)["m"].astype(np.float64)
        m = m.reshape(rows, -1)  # (rows, blocks)
        ref += (s - q.sum(-1) * d) @ m.T
        bound += np.abs(s) @ np.abs(m).T
    return ref, bound
