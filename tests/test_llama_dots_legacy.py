"""numerics="llama" for Q4_0 / Q5_0 / Q5_1 weights: blockq.kernels.cpu_q8_legacy.LegacyDot.

The golden outputs in data/llama_dots_legacy.npz are ggml's own CPU mul_mat (vec_dot for one
activation row, llamafile's tinyBLAS for Q4_0 / Q5_0 batches), recorded by
tools/check_llama_dots_legacy.py --record; every float32 bit must match.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockq.dequantize import dequantize
from blockq.errors import BadArgument, UnsupportedModel
from blockq.kernels.cpu_matvec import QMatrix
from blockq.kernels.cpu_q8 import quantize_q8
from blockq.kernels.cpu_q8 import fma32
from blockq.kernels.cpu_q8_legacy import LEGACY, LegacyDot
from blockq.quantize import quantize

DATA = Path(__file__).parent / "data" / "llama_dots_legacy.npz"
with np.load(DATA) as _d:
    CASES = sorted({k.split(".")[0] for k in _d.files if not k.startswith("x")})
    NAMES = [str(_d[f"{k}.name"]) for k in CASES]


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_bit_identical_to_ggml_mul_mat(case):
    with np.load(DATA) as d:
        qt, shape = str(d[f"{case}.qtype"]), tuple(int(v) for v in d[f"{case}.shape"])
        blocks, x = d[f"{case}.blocks"], d[str(d[f"{case}.x"])]
        want = {int(k.split(".y")[1]): d[k] for k in d.files if k.startswith(f"{case}.y")}
    dot = LegacyDot(QMatrix(qt, blocks, shape))
    assert len(want) >= 4
    for n, y in sorted(want.items()):
        with np.errstate(over="ignore", invalid="ignore"):
            got = dot(x[:n])
        assert got.shape == y.shape == (n, shape[0])
        diff = got.view(np.uint32) != y.view(np.uint32)
        assert not diff.any(), f"n={n}: {diff.sum()} of {diff.size} outputs differ from ggml"


@pytest.mark.parametrize("qt", sorted(LEGACY))
def test_legacy_dot_is_the_dot_of_what_it_decodes(qt):
    """Independent of the oracle: the blocks' values (blockq.dequantize) dotted with the
    8-bit activations in float64 (+ Q5_1's m * s term, s being Q8_1's rounded block sum)."""
    rng = np.random.default_rng(7)
    rows, cols, n = 13, 192, 3
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = (rng.standard_normal((n, cols)) * 2).astype(np.float32)
    blocks = quantize(w, qt)
    got = LegacyDot(QMatrix(qt, blocks, (rows, cols)))(x)
    q, d, s = quantize_q8(x)
    wd = np.asarray(dequantize(blocks, qt, (rows, cols)), np.float64)
    want = (q * d[..., None]).reshape(n, cols).astype(np.float64) @ wd.T
    if qt == "Q5_1":  # ggml uses f16(d_f32 * sum q), not d_f16 * sum q, for the min's term
        m = blocks.view(np.uint8).reshape(rows, -1, 24)[:, :, 2:4].copy().view(np.float16)
        want += (s - d * q.sum(-1)).astype(np.float64) @ m[..., 0].astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


H = float.fromhex


@pytest.mark.parametrize("a, b, c, want", [
    # a * b + c = 1 + 3*2^-24 - 2^-54: float64 rounds it onto the float32 midpoint
    # 1 + 3*2^-24, which a second rounding (to even) would send up to 1 + 2^-22
    ("0x1.0002p+0", "0x1.fffcp-25", "0x1.000002p+0", "0x1.000002p+0"),
    ("-0x1.0002p+0", "0x1.fffcp-25", "-0x1.000002p+0", "-0x1.000002p+0"),
    # a true midpoint stays one: ties to even
    ("0x1p+0", "0x1p-24", "0x1.000002p+0", "0x1.000004p+0"),
    ("0x1.8p+0", "0x1p+1", "-0x1p-30", "0x1.8p+1"),  # below half an ulp
])
def test_fma32_rounds_once(a, b, c, want):
    f = [np.float32(H(v)) for v in (a, b, c)]
    assert fma32(*f) == np.float32(H(want))


def test_rejects_other_types_and_shapes():
    w = np.ones((4, 256), np.float32)
    with pytest.raises(UnsupportedModel, match="Q4_K"):
        LegacyDot(QMatrix("Q4_K", quantize(w, "Q4_K"), (4, 256)))
    dot = LegacyDot(QMatrix("Q5_0", quantize(w, "Q5_0"), (4, 256)))
    with pytest.raises(BadArgument, match=r"\(n, 256\)"):
        dot(np.ones((2, 128), np.float32))
