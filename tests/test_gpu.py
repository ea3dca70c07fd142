"""GPU kernels against the CPU reference.  Skipped cleanly where CuPy or a CUDA device is missing
(the decoders themselves are checked without a GPU in test_gpu_source.py)."""
import numpy as np
import pytest

from blockq.gpu import gpu_status
from blockq.types import ALL

ok, why = gpu_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=f"no GPU: {why}")]

# Tolerance: float32 accumulation in a different order than numpy's; relative to |W| |x|.
RTOL = 1e-5


def _quantized(name, rows, cols, rng):
    import blockq
    # a type llama.cpp only quantizes with importance vectors gets uniform ones
    im = np.ones(cols, np.float32) if blockq.types.qtype(name).needs_imatrix else None
    return blockq.quantize(rng.standard_normal((rows, cols)).astype(np.float32), name, im)


@pytest.mark.parametrize("name", [t.name for t in ALL if t.has("gpu") and t.has("quantize")])
def test_matvec_and_matmul_match_cpu(name, rng):
    import cupy
    import blockq
    from blockq.gpu.matrix import GPUQMatrix
    rows, cols = 96, 512
    data = _quantized(name, rows, cols, rng)
    w = blockq.dequantize(data, name, (rows, cols)).astype(np.float64)
    m = GPUQMatrix(name, data, (rows, cols))
    x = rng.standard_normal(cols).astype(np.float32)
    want = w @ x
    got = cupy.asnumpy(m.matvec(cupy.asarray(x)))
    scale = np.abs(w) @ np.abs(x)
    assert np.all(np.abs(got - want) <= RTOL * scale + 1e-6)
    X = rng.standard_normal((5, cols)).astype(np.float32)
    got2 = cupy.asnumpy(m.matmul(cupy.asarray(X)))
    want2 = X.astype(np.float64) @ w.T
    assert np.all(np.abs(got2 - want2) <= 1e-3 * (np.abs(X) @ np.abs(w).T) + 1e-5)  # cuBLAS may use TF32
    # nvcc may fuse d*q - m into one FMA, so dequantized rows agree to rounding, not bit-exactly
    np.testing.assert_allclose(cupy.asnumpy(m.take_rows([3, 0])), w[[3, 0]], rtol=1e-6, atol=1e-6)
