"""numerics="llama" for k-quant weights: blockq.kernels.cpu_q8_kquant against ggml's own results.

tests/data/llama_dots_kquant.npz is written by tools/check_llama_dots_kquant.py --record (ggml's
mul_mat through llama-cpp-python): per type and case, 8 weight rows as raw blocks, ggml's outputs
for each activation row alone ("vec": the vec_dot kernels) and for all rows at once ("tiled":
ggml-cpu/tiled, which mul_mat takes from 8 rows on), and ggml's Q8_K bytes of the activations.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from blockq.errors import BadArgument, UnsupportedModel
from blockq.kernels.cpu_matvec import QMatrix
from blockq.kernels.cpu_q8_kquant import TILED_MIN_BATCH, TYPES, KQuantDot, quantize_q8_k
from blockq.quantize import quantize
from blockq.types import QK_K, qtype

DATA = np.load(Path(__file__).parent / "data" / "llama_dots_kquant.npz")
CASES = sorted({tuple(k.split(".")[:2]) for k in DATA.files if k.count(".") == 2})
WIDTHS = (256, 512, 1536)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def case(t: str, name: str):
    blocks = DATA[f"{t}.{name}.blocks"]
    cols = blocks.shape[1] // qtype(t).type_size * QK_K
    return KQuantDot(QMatrix(t, blocks, (blocks.shape[0], cols))), DATA[f"x{cols}"]


def test_every_type_recorded():
    assert sorted({t for t, _ in CASES}) == sorted(TYPES)
    assert all(any(n.startswith("smollm2") for t2, n in CASES if t2 == t) for t in TYPES)


@pytest.mark.parametrize("cols", WIDTHS)
def test_quantize_q8_k_matches_ggml(cols):
    x, raw = DATA[f"x{cols}"], DATA[f"q8k{cols}"].view(qtype("Q8_K").dtype)  # (n, nb)
    q, d, bsums = quantize_q8_k(x)
    assert (bits(d) == bits(raw["d"])).all()
    assert (q == raw["qs"]).all()
    live = raw["d"] != 0  # ggml leaves an all-zero block's bsums unwritten
    assert (bsums[live] == raw["bsums"][live]).all()
    assert (~live).any() and (bsums[~live] == 0).all()  # the recorded rows hold a zero block


@pytest.mark.parametrize("cols", WIDTHS)
def test_quantize_q8_k_matches_blockq_quantizer(cols):
    x = DATA[f"x{cols}"]
    x = x[np.abs(x).max(1) > 1e-30]  # blockq.quantize: finite rows (the 1e-39 block overflows)
    q, d, bsums = quantize_q8_k(x)
    blk = quantize(x, "Q8_K").view(qtype("Q8_K").dtype)
    assert (bits(d) == bits(blk["d"])).all() and (q == blk["qs"]).all()
    assert (bsums == blk["bsums"]).all()


@pytest.mark.parametrize("t, name", CASES)
def test_vec_dot_path_bit_exact(t, name):
    """n < 8: ggml_vec_dot_qX_K_q8_K, one output at a time."""
    dot, x = case(t, name)
    want = DATA[f"{t}.{name}.vec"]
    step = TILED_MIN_BATCH - 1
    got = np.concatenate([dot(x[i:i + step]) for i in range(0, len(x), step)])
    assert (bits(got) == bits(want)).all(), f"{(bits(got) != bits(want)).sum()} outputs differ"


@pytest.mark.parametrize("t, name", CASES)
def test_tiled_path_bit_exact(t, name):
    """n >= 8: ggml-cpu/tiled's AVX2 microtile."""
    dot, x = case(t, name)
    want = DATA[f"{t}.{name}.tiled"]
    assert len(x) > TILED_MIN_BATCH
    for n in (len(x), TILED_MIN_BATCH):  # an output does not depend on the batch's other rows
        got = dot(x[:n])
        assert (bits(got) == bits(want[:n])).all(), \
            f"n={n}: {(bits(got) != bits(want[:n])).sum()} outputs differ"


@pytest.mark.parametrize("t", TYPES)
def test_the_two_paths_round_differently(t):
    """The recorded data can tell the paths apart (a wrong switch would fail above)."""
    differ = sum(int((bits(DATA[f"{t}.{n}.vec"]) != bits(DATA[f"{t}.{n}.tiled"])).sum())
                 for t2, n in CASES if t2 == t)
    assert differ > 50


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n", [3, 9])
def test_matches_its_definition(t, n):
    """sum(w * d_a * q_a) with w from gguf-py's dequantizer, in float64."""
    rng = np.random.default_rng(7)
    rows, cols = 24, 3 * QK_K
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_t(4, (n, cols)).astype(np.float32)
    blocks = quantize(w, t)
    got = KQuantDot(QMatrix(t, blocks, (rows, cols)))(x)
    wd = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[t]).astype(np.float64)
    q, d, _ = quantize_q8_k(x)
    xq = (q * d[..., None].astype(np.float64)).reshape(n, cols)
    want = xq @ wd.T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_other_types_and_shapes_refused():
    w = QMatrix("Q8_0", quantize(np.ones((2, 64), np.float32), "Q8_0"), (2, 64))
    with pytest.raises(UnsupportedModel, match="Q8_0"):
        KQuantDot(w)
    dot = KQuantDot(QMatrix("Q4_K", quantize(np.ones((2, 256), np.float32), "Q4_K"), (2, 256)))
    with pytest.raises(BadArgument, match=r"\(n, 256\)"):
        dot(np.ones((1, 512), np.float32))
