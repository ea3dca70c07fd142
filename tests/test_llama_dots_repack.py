"""RepackDot (llama.cpp's repacked Q4_0 / Q4_K gemv + gemm) against ggml's recorded outputs.

tests/data/llama_dots_repack.npz is written by ``tools/check_llama_dots_repack.py --record``
(ggml's CPU_REPACK mul_mat through llama-cpp-python's libraries); no llama_cpp needed here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockq.errors import UnsupportedModel
from blockq.kernels.cpu_matvec import QMatrix
from blockq.kernels.cpu_q8_repack import RepackDot, is_repacked
from blockq.quantize import quantize

DATA = np.load(Path(__file__).parent / "data" / "llama_dots_repack.npz")
CASES = [str(c) for c in DATA["cases"]]


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("case", CASES)
def test_bit_identical_to_ggml(case):
    qt = str(DATA[f"{case}.qtype"])
    shape = tuple(int(v) for v in DATA[f"{case}.shape"])
    x = DATA[f"{case}.x"]
    dot = RepackDot(QMatrix(qt, DATA[f"{case}.blocks"], shape))
    ns = sorted(int(k.rsplit("out", 1)[1]) for k in DATA.files if k.startswith(f"{case}.out"))
    assert 1 in ns and 4 in ns and 5 in ns  # gemv only, gemm only, both
    for n in ns:
        want = DATA[f"{case}.out{n}"]
        got = dot(x[:n])
        assert got.shape == want.shape == (n, shape[0]) and got.dtype == np.float32
        ok = _bits_equal(got, want)
        assert ok.all(), f"{case} n={n}: {int((~ok).sum())} of {ok.size} outputs differ"


def test_q4_k_depends_on_the_gemm_grouping():
    # the same activation row gives other bits through gemv (n % 4 tail) than through gemm
    case = "Q4_K_16x512_bytes1_gauss"
    x = DATA[f"{case}.x"]
    out4, out5 = DATA[f"{case}.out4"], DATA[f"{case}.out5"]
    assert (out4 == out5[:4]).all()  # rows 0..3 are a gemm group in both
    dot = RepackDot(QMatrix("Q4_K", DATA[f"{case}.blocks"], (16, 512)))
    alone = dot(x[4:5])  # row 4 alone: gemv, as in n = 5
    grouped = dot(x[4:8])[0]  # row 4 first in a gemm group
    assert (alone[0] == out5[4]).all()
    assert (grouped != alone[0]).any()


@pytest.mark.parametrize("qt, shape", [("Q4_1", (8, 32)), ("Q4_0", (12, 32)),
                                       ("Q4_K", (4, 256)), ("Q6_K", (8, 256))])
def test_rejects_matrices_llama_cpp_does_not_repack(qt, shape):
    assert not is_repacked(qt, shape)
    data = quantize(np.zeros(shape, np.float32), qt)
    with pytest.raises(UnsupportedModel, match=qt):
        RepackDot(QMatrix(qt, data, shape))
