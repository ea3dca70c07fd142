"""Error-compensated rounding (GPTQ / OBQ) onto the block grids of the GGUF formats.

For a weight matrix ``W`` (rows, cols) whose inputs ``x`` (cols,) have the second moment
``H = E[x x^T]`` (calibration, :mod:`blockq.calibrate`), the output error of a quantized
``Q`` is ``tr((W - Q) H (W - Q)^T)``.  Plain rounding minimises each weight's error on its
own; here the columns are rounded one after another and each column's rounding error is pushed
into the columns not yet rounded, along the rows of the upper Cholesky factor ``U`` of
``H^-1`` (``H^-1 = U^T U``), which is the least-squares correction for the error that column
causes in the outputs.

Grids: each quantization block (32 or 256 columns) gets its scales (and mins) at the moment its
first column is reached, from blockq's importance-weighted search (llama.cpp's algorithm) run on
the *already corrected* weights of that block; they are then frozen and the block's columns are
rounded onto ``a*q + b`` (:mod:`blockq.quantize.codes`).  The bytes are standard blocks of the
type; any GGUF reader decodes them.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import BadArgument
from ..types import qtype as _qtype
from .codes import RANGES, SUB_BLOCK, affine, expand, pack_codes

DEFAULT_DAMP = 0.01  # fraction of the mean diagonal added to H (GPTQ's percdamp)


def check_hessian(H: np.ndarray, n_cols: int, name: str = "") -> np.ndarray:
    """Validate a Hessian for rows of ``n_cols``: square, finite, symmetric, PSD diagonal."""
    where = f"{name}: " if name else ""
    H = np.asarray(H)
    if H.shape != (n_cols, n_cols):
        raise BadArgument(f"{where}Hessian has shape {H.shape}, the matrix has {n_cols} columns: "
                          f"it needs ({n_cols}, {n_cols})")
    if not np.isfinite(H).all():
        bad = int((~np.isfinite(H)).sum())
        raise BadArgument(f"{where}Hessian has {bad} NaN/inf entries; recalibrate")
    d = np.diag(H)
    if (d < 0).any():
        raise BadArgument(f"{where}Hessian has {int((d < 0).sum())} negative diagonal entries; "
                          f"it must be a sum of x x^T (positive semi-definite)")
    return H


def inverse_cholesky(H: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag H)*I)^-1`` (float64, (n, n)).

    Columns the calibration never saw (zero diagonal) get a unit diagonal so that their rounding
    error is not propagated anywhere.  Raises BadArgument if H is singular even after damping.
    """
    H = np.array(H, dtype=np.float64, copy=True)
    n = H.shape[0]
    d = np.diag(H).copy()
    dead = d <= 0
    mean = float(d[~dead].mean()) if (~dead).any() else 1.0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[np.arange(n), np.arange(n)] = np.where(dead, mean, d) + damp * mean
    try:
        np.linalg.cholesky(H)  # raises if H is not positive definite
        Hinv = np.linalg.inv(H)
        return np.linalg.cholesky((Hinv + Hinv.T) / 2).T
    except np.linalg.LinAlgError:
        raise BadArgument("Hessian is not positive definite even after damping "
                          f"({damp:g} x mean diagonal); recalibrate with more text") from None


_FACTOR: list = []  # [(H, scale, damp, U)]: q/k/v (gate/up) share one input's factor


def _cached_factor(H: np.ndarray, scale: float, damp: float) -> np.ndarray:
    for h, s, d, U in _FACTOR:
        if h is H and s == scale and d == damp:
            return U
    U = inverse_cholesky(H / scale, damp)
    _FACTOR[:] = [(H, scale, damp, U)]
    return U


@njit(nogil=True, cache=True)
def _round_block(W, U, c0, c1, a, b, lo, hi, Q, E, e0):  # pragma: no cover - compiled
    """Round columns c0..c1 of W (in place, float64 (rows, cols)) onto a*q + b per column
    (a, b (rows, c1-c0)), propagating each column's scaled error into the later columns up to
    c1; the scaled errors go to E[:, e0 + j] for the caller's lazy update past c1."""
    rows = W.shape[0]
    zero = 0 if lo <= 0 <= hi else lo
    for j in range(c1 - c0):
        c = c0 + j
        d = U[c, c]
        for r in range(rows):
            ar = a[r, j]
            w = W[r, c]
            if ar != 0.0:
                q = np.rint((w - b[r, j]) / ar)
                q = min(max(q, lo), hi)
            else:
                q = zero
            Q[r, c] = q
            err = (w - (ar * q + b[r, j])) / d
            E[r, e0 + j] = err
            for k in range(c + 1, c1):
                W[r, k] -= err * U[c, k]


def gptq_quantize(W, qtype, H, *, imatrix=None, damp: float = DEFAULT_DAMP,
                  batch: int = 256, name: str = "") -> np.ndarray:
    """Quantize ``W`` (rows, cols) to ``qtype`` blocks with error compensation under ``H``.

    ``H`` (cols, cols): second moment of the inputs (any positive scale).  ``imatrix`` (cols,)
    weights the scale search of each block (default: the diagonal of ``H``).  Returns uint8
    ``(rows, row_bytes)`` exactly like :func:`blockq.quantize.quantize`.
    """
    from ..api import _set_blas_threads as set_blas_threads
    from . import quantize  # the plain quantizers (scales search)

    set_blas_threads(1)
    t = _qtype(qtype)
    if t.name not in RANGES:
        raise BadArgument(f"error-compensated rounding needs an integer grid; {t.name} has none")
    W0 = np.asarray(W, dtype=np.float32)
    if W0.ndim != 2:
        raise BadArgument(f"{name or 'matrix'}: expected 2-D weights, got shape {W0.shape}")
    rows, cols = W0.shape
    t.row_bytes(cols)
    H = check_hessian(H, cols, name)
    diag = np.diag(H).astype(np.float64)
    scale = float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0
    imp = (diag / scale).astype(np.float32) if imatrix is None else np.asarray(imatrix, np.float32)
    U = _cached_factor(H, scale, damp)
    lo, hi = RANGES[t.name]
    B = t.block_size
    nb = cols // B
    # float32 like GPTQ itself: halves the memory of a vocabulary-sized head
    U = U.astype(np.float32)
    Wc = W0.copy()  # corrected weights, updated in place
    Q = np.zeros((rows, cols), dtype=np.int16)
    out = np.empty((rows, nb, t.type_size), dtype=np.uint8)
    step = max(B, (batch // B) * B)
    for s0 in range(0, cols, step):
        s1 = min(cols, s0 + step)
        E = np.zeros((rows, s1 - s0), dtype=np.float32)
        for c0 in range(s0, s1, B):
            c1 = c0 + B
            blk = quantize(Wc[:, c0:c1].astype(np.float32), t.name, imatrix=imp[c0:c1])
            a, b = affine(blk, t)
            a, b = expand(a, t), expand(b, t)  # float32 (rows, B)
            _round_block(Wc, U, c0, c1, a, b, lo, hi, Q, E, c0 - s0)
            # the rest of this batch sees this block's errors now
            if c1 < s1:
                Wc[:, c1:s1] -= E[:, c0 - s0:c1 - s0] @ U[c0:c1, c1:s1]
            out[:, c0 // B] = pack_codes(blk, t, Q[:, c0:c1])
        if s1 < cols:
            Wc[:, s1:] -= E @ U[s0:s1, s1:]
    return out.reshape(rows, nb * t.type_size)


def output_error(W, Qw, H) -> float:
    """``tr((W - Qw) H (W - Qw)^T)``: the summed squared output error over the calibration."""
    D = np.asarray(W, np.float64) - np.asarray(Qw, np.float64)
    return float(np.einsum("ij,jk,ik->", D, np.asarray(H, np.float64), D))


assert SUB_BLOCK  # re-exported grid facts live in codes
