"""Value tables of the non-linear block types: what a stored code means before scaling.

- ``IQ4_NL``: the 16 values of IQ4_NL / IQ4_XS (a non-uniform 4-bit grid, denser near 0);
- ``MXFP4``: the 16 E2M1 values (doubled, as ggml stores them), built from the FP4 bit formula;
- ``KSIGNS``: the i-quants' 7-bit sign codes: 8 signs with even parity, bit 7 implied;
- :func:`grid`: the lattice codebooks of IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S and IQ1_S,
  int8 ``(n_codewords, 8 or 4)``, read from ``data/iq_grids.npz`` (written by
  ``tools/make_iq_grids.py`` from llama.cpp's ggml-common.h; ``tests/test_codebooks.py`` checks
  every table against gguf-py's copies).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

# NOTE: the 16 IQ4_NL values are llama.cpp's ``kvalues_iq4nl``, chosen by its authors (they are
# not a formula); tests/test_codebooks.py checks them against gguf-py.
IQ4_NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                  dtype=np.int8)


def _e2m1_doubled() -> np.ndarray:
    # FP4 E2M1 code: bit 3 sign | bits 1..2 exponent e | bit 0 mantissa m.
    # value = m / 2 (e = 0, subnormal) or (1 + m / 2) * 2**(e - 1); stored doubled, as integers.
    c = np.arange(16)
    e, m = (c >> 1) & 3, c & 1
    twice = np.where(e == 0, m, (2 + m) << np.maximum(e - 1, 0))
    return np.where(c & 8, -twice, twice).astype(np.int8)


MXFP4 = _e2m1_doubled()  # 0 1 2 3 4 6 8 12, then the same negated


def _ksigns() -> np.ndarray:
    # code i (7 bits) -> signs byte: the 7 bits of i, plus bit 7 set when i has odd parity, so
    # every byte has an even number of minus signs.
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    return (i | (parity << 7)).astype(np.uint8)


KSIGNS = _ksigns()

GRID_NAMES = {"IQ2_XXS": "iq2xxs_grid", "IQ2_XS": "iq2xs_grid", "IQ2_S": "iq2s_grid",
              "IQ3_XXS": "iq3xxs_grid", "IQ3_S": "iq3s_grid", "IQ1_S": "iq1s_grid",
              "IQ1_M": "iq1s_grid"}
_FILE = Path(__file__).parent / "data" / "iq_grids.npz"


@functools.cache
def _grids() -> dict[str, np.ndarray]:
    with np.load(_FILE) as z:
        return {k: z[k] for k in z.files}


def grid(type_name: str) -> np.ndarray:
    """The codebook of an i-quant type: int8 ``(n_codewords, group)``, one codeword per row."""
    return _grids()[GRID_NAMES[type_name]]
