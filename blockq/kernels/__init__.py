"""Compute kernels, one module per backend and job.

- :mod:`blockq.kernels.cpu_dequant` — Numba CPU kernels that dequantize blocks of every type,
  bit-exact with the numpy reference in :mod:`blockq.dequantize` (which tests hold them to).
- :mod:`blockq.kernels.cpu_matvec` — Numba CPU products with block-quantized weights (``QMatrix``).
- :mod:`blockq.kernels.cpu_simd` — eight-lane SIMD value types the CPU product kernels use.

Kernels take plain C-contiguous arrays and fill outputs in place; validation lives in the public
functions that call them (e.g. ``blockq.dequantize``), so kernels stay small and fast to compile.
"""
