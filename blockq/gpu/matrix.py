"""Quantized matrices on the GPU: the bytes of the file uploaded as they are, dequantized inside
the kernels.  Mirrors the CPU ``QMatrix`` interface (matvec, matmul, take_rows) on CuPy arrays.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import BadArgument
from ..types import qtype as _qtype
from .source import block_geometry, kernel_suffix, kernels_source

_WARPS_PER_BLOCK = 8  # matvec: 8 rows (warps) per thread block
_DEQUANT_TILE = 1 << 24  # prompt path: dequantize at most this many weights at a time


@functools.lru_cache(maxsize=1)
def module():
    """Compile (once per process; CuPy caches the binary on disk) the kernels' module."""
    import cupy
    return cupy.RawModule(code=kernels_source(), options=("-std=c++17",))


class GPUQMatrix:
    """A (rows, cols) weight matrix of one block type, resident on the GPU."""

    def __init__(self, qtype, data: np.ndarray, shape: tuple[int, int]):
        import cupy
        t = _qtype(qtype)
        rows, cols = shape
        if cols % 8:
            raise BadArgument(f"GPU kernels need rows whose length is a multiple of 8, got {cols}")
        self.qtype, self.shape = t.name, (int(rows), int(cols))
        self.row_bytes = t.row_bytes(cols)
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != rows * self.row_bytes:
            raise BadArgument(f"{t.name} matrix {shape} needs {rows * self.row_bytes} bytes, "
                              f"got {raw.size}")
        self.data = cupy.asarray(raw)  # (rows * row_bytes,) uint8
        self.nbytes = int(raw.size)
        suffix = kernel_suffix(t)
        self._matvec = module().get_function(f"matvec_{suffix}")
        self._dequant = module().get_function(f"dequant_{suffix}")
        self._qk, self._ts = block_geometry(t)

    def matvec(self, x):
        """x (cols,) float32 on the GPU -> (rows,) float32."""
        import cupy
        rows, cols = self.shape
        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        y = cupy.empty(rows, dtype=cupy.float32)
        grid = (rows + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK
        self._matvec((grid,), (32 * _WARPS_PER_BLOCK,),
                     (self.data, x, y, np.int32(rows), np.int32(cols), np.int64(self.row_bytes)))
        return y

    def dequantize_rows(self, row0: int, n_rows: int):
        """Rows [row0, row0 + n_rows) as float32 (n_rows, cols) on the GPU."""
        import cupy
        cols = self.shape[1]
        out = cupy.empty((n_rows, cols), dtype=cupy.float32)
        n_threads = n_rows * (cols // 8)
        self._dequant(((n_threads + 255) // 256,), (256,),
                      (self.data, out, np.int32(row0), np.int32(n_rows), np.int32(cols),
                       np.int64(self.row_bytes)))
        return out

    def matmul(self, X):
        """X (n, cols) float32 -> (n, rows): dequantize tiles of rows, multiply with cuBLAS."""
        import cupy
        rows, cols = self.shape
        X = cupy.ascontiguousarray(X, dtype=cupy.float32)
        out = cupy.empty((X.shape[0], rows), dtype=cupy.float32)
        step = max(1, _DEQUANT_TILE // cols)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            out[:, r0:r0 + n] = X @ self.dequantize_rows(r0, n).T
        return out

    def take_rows(self, ids):
        """Dequantized rows for token ids: (len(ids), cols) float32 on the GPU."""
        import cupy
        ids = np.asarray(ids).reshape(-1)
        return cupy.concatenate([self.dequantize_rows(int(i), 1) for i in ids]) if ids.size \
            else cupy.empty((0, self.shape[1]), dtype=cupy.float32)
