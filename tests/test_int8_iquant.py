"""Int8-activation kernels of IQ4_NL and IQ4_XS (blockq.kernels.cpu_int8_iquant) against the
numpy reference :func:`blockq.testing.int8_reference` (``dequantize(W) @ dequantize(Q8(x))``
in float64, Q8_0 activations for IQ4_NL, Q8_K for IQ4_XS).  Stated tolerance, as for the other
int8 kernels (tests/test_int8.py): every output within ``1e-5 * (|W| @ |x|)`` of it.
"""
import os
import sys

import numpy as np
import pytest

from blockq.dequantize import dequantize
from blockq.kernels import cpu_isa
from blockq.quantize import quantize
from blockq.testing import random_blocks
from blockq.types import BY_NAME

sys.path.insert(0, os.path.dirname(__file__))
import test_int8 as base  # noqa: E402 (the same checks as the other types)

check_product = base.check_product

TYPES = ("IQ4_NL", "IQ4_XS")

pytestmark = pytest.mark.skipif(cpu_isa.isa() == "float",
                                reason="this CPU runs the float kernels only (no AVX2+FMA+F16C)")


def _k8():
    from blockq.kernels import cpu_int8  # (it registers cpu_int8_iquant's kernels)
    return cpu_int8


def test_registered_with_the_tables_activation_type():
    k8 = _k8()
    for name in TYPES:
        assert name in k8.KERNELS
        assert k8.activation_type(name) == BY_NAME[name].dot
    assert k8.activation_bytes("IQ4_NL", 64) == 2 * 36 and k8.activation_bytes("IQ4_XS", 512) \
        == 2 * BY_NAME["Q8_K"].type_size


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows, cols, n, threads", [
    (1, 256, 1, 1), (37, 512, 3, 1), (70, 768, 17, 2), (300, 256, 1, 2)])
def test_product_random_blocks(name, rows, cols, n, threads, rng):
    base.test_product_random_blocks(name, rows, cols, n, threads, rng)


@pytest.mark.parametrize("name", TYPES)
def test_every_code_and_scale(name, rng):
    """Each of the 16 grid indices in every nibble position, and (IQ4_XS) every one of the 64
    sub-block scales in every sub-block position: a wrong table entry, nibble order or scale
    bit shows up in some output."""
    t = BY_NAME[name]
    rows, cols = 64, 512
    b = random_blocks(name, rows * cols // t.block_size, rng, scales=0.05)  # (blocks, bytes)
    w = b.view(t.dtype)[:, 0]  # the same bytes as records
    codes = (np.arange(rows)[:, None] + np.arange(cols // 2)[None, :]) % 16  # (rows, cols / 2)
    w["qs"] = (codes | ((codes + 5) % 16) << 4).astype(np.uint8).reshape(w["qs"].shape)
    if name == "IQ4_XS":
        ls = (np.arange(w.size)[:, None] * 8 + np.arange(8)[None, :]) % 64  # (blocks, 8)
        w["scales_l"] = (ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)
        w["scales_h"] = sum(((ls[:, s] >> 4) & 3) << (2 * s) for s in range(8))
        W = dequantize(b.reshape(-1), name, (rows, cols))
        assert len(np.unique(np.abs(W[W != 0]))) > 1000  # the scales do vary
    X = rng.standard_normal((2, cols)).astype(np.float32)
    check_product(name, b.reshape(rows, -1), X)


@pytest.mark.parametrize("name", TYPES)
def test_product_extreme_codes(name, rng):
    """All-ones / all-zero / 0x80 / 0x7F bytes (grid ends -127 and 113, IQ4_XS scale +31 and
    -32) against activations at +-127: no int16 saturation."""
    base.test_product_extreme_codes(name, rng)


@pytest.mark.parametrize("name", TYPES)
def test_real_weights_quantized(name, rng):
    """Gaussian rows with outliers quantized by blockq's (llama.cpp-identical) quantizer, and
    activations with a few large channels, as in real models."""
    W = rng.standard_normal((48, 1536)).astype(np.float32) * 0.02
    W[:, ::97] *= 20
    X = rng.standard_normal((3, 1536)).astype(np.float32)
    X[:, 5] = 40
    check_product(name, quantize(W, name), X, threads=2)


@pytest.mark.parametrize("name", TYPES)
def test_qmatrix_uses_int8_and_can_switch(name, rng):
    base.test_qmatrix_uses_int8_and_can_switch(name, rng)
