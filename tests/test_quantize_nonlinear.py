"""Quantizers of IQ4_NL, IQ4_XS, MXFP4, TQ1_0, TQ2_0 (blockq/quantize/nonlinear.py, ternary.py).

Byte-identity with llama.cpp on stored rows is in test_quantize_reference.py (family "nl" of
quant_reference.TYPES).  Here: gguf-py's own quantizers of MXFP4 and the ternary types (ports of
llama.cpp's reference rows) as a second oracle, the importance vector ignored as llama.cpp
ignores it, and properties of the IQ4 search."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from blockq import BadArgument, codebooks
from blockq.dequantize import dequantize
from blockq.quantize import quantize
from blockq.types import qtype


def _rows(rng, rows=24, cols=512):
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 30
    x[1] = 0
    x[2, :256] = 0
    x[3] = np.round(x[3] * 200) / 200  # many exact ties
    x[4] *= 1e-30
    return x


@pytest.mark.parametrize("name", ["MXFP4", "TQ1_0", "TQ2_0"])
def test_matches_gguf_py(name, rng):
    x = _rows(rng)
    want = np.asarray(gq.quantize(x, GGMLQuantizationType[name])).view(np.uint8)
    assert np.array_equal(quantize(x, name), want.reshape(x.shape[0], -1))


@pytest.mark.parametrize("name", ["MXFP4", "TQ1_0", "TQ2_0"])
def test_importance_vector_ignored_like_llama_cpp(name, rng):
    x = _rows(rng, 6)
    w = rng.gamma(0.5, 1.0, x.shape[1]).astype(np.float32)
    assert np.array_equal(quantize(x, name, w), quantize(x, name))


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_a_block_on_the_grid_comes_back_exactly(name, rng):
    # 32 weights that are a power-of-two multiple of the IQ4_NL values: the search must find
    # that scale and the values (the scale is exact in f16, the products exact in float32)
    q = rng.integers(0, 16, (4, 256))
    q[:, ::32] = 0  # every group holds -127, so max / 127 is the scale
    x = (codebooks.IQ4_NL[q].astype(np.float32) * np.float32(2.0 ** -9))
    y = dequantize(quantize(x, name), name, x.shape)
    assert np.array_equal(y, x)


def test_iq4_xs_largest_sub_block_scale_is_minus_32_times_d(rng):
    # d = -max_scale / 32, so the sub-block holding max_scale stores l = -32 (0 after the
    # offset); an all-zero row stores d = 0
    from blockq.dequantize import _records, iq4_xs_scales
    x = _rows(rng, 8, 256)
    b = quantize(x, "IQ4_XS")
    ls = iq4_xs_scales(_records(b, qtype("IQ4_XS")))  # (8, 8) in -32..31
    d = b[:, :2].copy().view(np.float16)[:, 0]
    assert d[1] == 0
    live = [i for i in range(8) if np.abs(x[i]).max() > 1e-15]
    assert live and all(ls[i].min() == -32 for i in live)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ1_S"])
def test_refuses_to_quantize_without_importance_vectors(name, rng):
    # llama.cpp's ggml_quantize_requires_imatrix; IQ2_S and IQ1_M quantize without one
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(BadArgument, match=f"{name} needs an importance matrix"):
        quantize(x, name)
    assert quantize(x, name, np.ones(256, np.float32)).shape == (2, qtype(name).type_size)
