"""The value tables of the non-linear types against gguf-py's independent copies: IQ4_NL's
values, the E2M1 values of MXFP4, the i-quant sign codes and every lattice codebook (blockq's are
generated from llama.cpp's ggml-common.h by tools/make_iq_grids.py)."""
import numpy as np
import pytest
from gguf import quants as gq

from blockq import codebooks


def test_iq4_nl_values():
    assert codebooks.IQ4_NL.tolist() == list(gq.IQ4_NL.kvalues)


def test_e2m1_values_from_the_bit_formula():
    assert codebooks.MXFP4.tolist() == list(gq.MXFP4.kvalues)


def test_sign_codes_have_even_parity():
    assert bytes(codebooks.KSIGNS) == gq.IQ2_XXS.ksigns
    assert all(bin(int(b)).count("1") % 2 == 0 for b in codebooks.KSIGNS)


@pytest.mark.parametrize("name, shape", [("IQ2_XXS", (256, 8)), ("IQ2_XS", (512, 8)),
                                         ("IQ2_S", (1024, 8)), ("IQ3_XXS", (256, 4)),
                                         ("IQ3_S", (512, 4)), ("IQ1_S", (2048, 8)),
                                         ("IQ1_M", (2048, 8))])
def test_grids_match_gguf_py(name, shape):
    ref = getattr(gq, name)
    ref.init_grid()
    g = codebooks.grid(name)
    assert g.shape == shape and g.dtype == np.int8
    assert np.array_equal(g.astype(np.float32), ref.grid.reshape(shape))
    assert len({tuple(row) for row in g}) == shape[0]  # no codeword twice
