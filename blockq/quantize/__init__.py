"""Quantize float rows into blocks of any type in the table.

Public entry: :func:`quantize`.  It validates its arguments (shape, finiteness, the importance
vector) and hands C-contiguous float32 rows to a per-type row quantizer.  Row quantizers live in
family modules and have the signature ``fn(x, imatrix, out)`` where ``x`` is float32
``(rows, cols)``, ``imatrix`` is float32 ``(cols,)`` or ``None`` and ``out`` is uint8
``(rows, row_bytes)`` to fill in place:

- ``floats``: F32, F16, BF16
- ``symmetric``: scale-only types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, Q8_K)
- ``asymmetric``: scale-and-min types (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K)
- ``nonlinear``: non-uniform grids (IQ4_NL, IQ4_XS, MXFP4)
- ``ternary``: TQ1_0, TQ2_0
- ``iquant``: lattice-codebook i-quants (IQ3_S, IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S)
- ``iq1``: the ternary-codebook i-quants IQ1_S, IQ1_M

Each family module registers its quantizers in the block-type record (``QUANTIZERS`` dict,
registered by :func:`load_quantizers`); a new family is one more name in ``_FAMILIES``.
"""
from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..errors import BadArgument
from ..types import QType, qtype as _qtype, register
from ..validate import check_encoded

_FAMILIES = ("floats", "symmetric", "asymmetric", "nonlinear", "ternary", "iquant", "iq1")


def load_quantizers() -> None:
    """Import every family module and register its row quantizers (the record's loader)."""
    for fam in _FAMILIES:
        mod = importlib.import_module(f"{__name__}.{fam}")
        for name, fn in mod.QUANTIZERS.items():
            register(name, "quantize", fn)


def row_quantizer(name: str):
    """The registered row quantizer for a type name (imports the family modules on first use)."""
    return _qtype(name).impl("quantize")


def split_rows(call, x: np.ndarray, out: np.ndarray, min_weights_per_thread: int) -> None:
    """Run ``call(x_chunk, out_chunk)`` on one contiguous chunk of rows per thread.

    The row kernels are compiled ``nogil``, so Python threads run them in parallel; tiny inputs
    stay on the calling thread, where a thread would cost more than it saves.
    """
    rows = x.shape[0]
    n = min(numba.config.NUMBA_NUM_THREADS, rows, max(1, x.size // min_weights_per_thread))
    if n <= 1:
        call(x, out)
        return
    cuts = [rows * k // n for k in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        jobs = [pool.submit(call, x[a:b], out[a:b]) for a, b in zip(cuts, cuts[1:])]
        for job in jobs:
            job.result()


def check_imatrix(imatrix, n_cols: int) -> np.ndarray | None:
    """Validate an importance vector for rows of ``n_cols``: float, right length, finite, >= 0."""
    if imatrix is None:
        return None
    w = np.asarray(imatrix)
    if w.ndim != 1 or w.shape[0] != n_cols:
        raise BadArgument(f"importance vector has shape {w.shape}, rows have {n_cols} columns: "
                          f"it needs exactly one entry per column, shape ({n_cols},)")
    w = np.ascontiguousarray(w, dtype=np.float32)
    bad = ~np.isfinite(w)
    if bad.any():
        raise BadArgument(f"importance vector has {int(bad.sum())} NaN/inf entries "
                          f"(first at column {int(np.argmax(bad))})")
    neg = w < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise BadArgument(f"importance vector has {int(neg.sum())} negative entries "
                          f"(column {i} is {float(w[i])}); it holds mean squared activations, >= 0")
    return w


def quantize(x, qtype: "str | int | QType", imatrix=None) -> np.ndarray:
    """Quantize float rows ``x`` of shape ``(rows, cols)`` to blocks of ``qtype``.

    ``imatrix`` (optional) is the per-column importance (mean squared activation), shape
    ``(cols,)``; it weights the error like llama.cpp's ``quant_weights``.
    Returns uint8 of shape ``(rows, bytes_per_row)``.
    """
    t = _qtype(qtype)
    fn = t.impl("quantize")  # refuses a type without a quantizer before looking at x
    a = np.asarray(x)
    if a.ndim != 2:
        raise BadArgument(f"quantize takes a 2-D (rows, cols) array, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise BadArgument(f"quantize takes float input, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    rows, cols = a.shape
    if cols == 0:
        raise BadArgument(f"rows have length 0; {t.name} needs a multiple of {t.block_size}")
    row_bytes = t.row_bytes(cols)  # raises for a partial block
    bad = ~np.isfinite(a)
    if bad.any():
        r, c = np.unravel_index(int(np.argmax(bad)), a.shape)
        raise BadArgument(f"input has {int(bad.sum())} NaN/inf values (first at row {r}, "
                          f"column {c}: {float(a[r, c])}); only finite weights can be quantized")
    w = check_imatrix(imatrix, cols)
    if w is None and t.needs_imatrix:
        raise BadArgument(f"{t.name} needs an importance matrix (llama.cpp refuses to quantize "
                          f"it without one: the result would be garbage); pass imatrix=")
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    if rows:
        fn(a, w, out)
        check_encoded(out, t, a)  # no NaN/inf scale is ever returned
    return out
