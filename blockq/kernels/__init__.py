"""Compute kernels, one module per backend and job.

- :mod:`blockq.kernels.cpu_dequant` — Numba CPU kernels that dequantize blocks of every type,
  bit-exact with the numpy reference in :mod:`blockq.dequantize` (which tests hold them to).
- :mod:`blockq.kernels.cpu_matvec` — Numba CPU products with block-quantized weights (``QMatrix``).
- :mod:`blockq.kernels.cpu_simd` — eight-lane SIMD value types the CPU product kernels use.

Kernels take plain C-contiguous arrays and fill outputs in place; validation lives in the public
functions that call them (e.g. ``blockq.dequantize``), so kernels stay small and fast to compile.
"""

import os as _os

import numba as _numba

# NOTE: Numba's own thread pool ("workqueue") rather than OpenMP's, unless NUMBA_THREADING_LAYER
# says otherwise.  Decoding launches a few hundred short parallel regions per token; OpenMP's
# workers spin between them and, on a machine whose cores other processes share, a descheduled
# spinner stalls every region (SmolLM2 Q4_K_M at -t 2 with a load average of 5 on 2 cores,
# alternating runs: decode 31-36 -> 39-64 tokens/s, pp64 97-108 -> 232-275 tokens/s).  The
# workqueue pool must not be entered from two threads at once; blockq's model steps hold a lock
# (blockq.api), and nested parallel regions do not occur.
if "NUMBA_THREADING_LAYER" not in _os.environ:
    _numba.config.THREADING_LAYER = "workqueue"
