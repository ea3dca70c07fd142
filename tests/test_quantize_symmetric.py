"""Scale-only quantizers (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, Q8_K) against llama.cpp's own blocks.

``tests/data/refblocks_sym_*.npz`` hold float rows and the blocks llama.cpp made of them, with
and without an importance vector (written by ``tools/quant_quality.py --write-test-data``):
evenly spaced rows of each ``../shared/refdata`` source, and edge-case rows (``_edge``).
"""
import numba
import numpy as np
import pytest

from blockq.quantize import quantize
from blockq.quantize import symmetric as sym
from blockq.types import qtype
from quant_reference import TYPES, edge_file, names, source_files

EDGE = edge_file("sym")
SOURCES = source_files("sym")
NAMES = names("sym")
USES_IMATRIX = [n for n, fam, _, _, uses in TYPES if fam == "sym" and uses]


def test_every_type_has_reference_blocks():
    stored = set()
    for path in SOURCES + [EDGE]:
        with np.load(path) as d:
            stored |= set(d.files)
    for name in NAMES:
        assert name in stored
        if name in USES_IMATRIX:
            assert name + "_imatrix" in stored


@pytest.mark.parametrize("name", ["Q8_0", "Q8_K"])
def test_importance_ignored_like_llama_cpp(name, rng):
    x = rng.standard_normal((4, 512)).astype(np.float32)
    w = rng.gamma(0.3, 1.0, 512).astype(np.float32)
    assert np.array_equal(quantize(x, name), quantize(x, name, w))


def test_q8_k_blocks(rng):
    x = (rng.standard_normal((4, 512)) * rng.uniform(0.01, 10, (4, 1))).astype(np.float32)
    x[1, 256:] = 0  # an all-zero block
    b = quantize(x, "Q8_K").reshape(-1).view(qtype("Q8_K").dtype)  # (8,) blocks
    qs = b["qs"].astype(np.int32)  # (8, 256)
    assert np.array_equal(b["bsums"], qs.reshape(8, 16, 16).sum(-1))
    live = b["d"] != 0
    assert list(np.flatnonzero(~live)) == [3] and not qs[3].any()
    assert (np.abs(qs[live]).max(1) == 127).all()  # the largest value maps to -127 * sign
    xb = x.reshape(8, 256)
    err = np.abs(xb - b["d"][:, None] * qs)
    assert (err[live] <= 0.5001 * np.abs(b["d"][live, None])).all()


def test_q4_0_literal_block():
    # x = 0.5 * (j % 16 - 8): the largest magnitude is -4 -> d = 0.5 (f16 0x3800), q = j % 16
    x = (0.5 * (np.arange(32) % 16 - 8)).astype(np.float32)[None]
    want = bytes([0x00, 0x38]) + bytes(0x11 * j for j in range(16))
    assert quantize(x, "Q4_0").tobytes() == want


@pytest.mark.parametrize("f,want", [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2),
                                    (-2.5, -2), (0.49999997, 0), (3.7, 4), (-3.7, -4),
                                    (4194303.0, 4194303)])
def test_nearest_int_ties_to_even(f, want):
    assert sym.nearest_int(np.float32(f)) == want


def test_fp16_conversion_matches_ieee(rng):
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.996, 65520.0, 1e6, -1e6, np.inf, -np.inf,
                        6.1035156e-05, 6.1035153e-05, 5.9604645e-08, 2.9802322e-08,
                        2.9802326e-08, 8.940697e-08, 1e-30, -1e-8, 0.1, 1 / 3], np.float32)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([special, bits[np.isfinite(bits)]])
    got = np.array([sym.fp32_to_fp16(v) for v in values], np.uint16)
    with np.errstate(over="ignore"):
        want16 = values.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want16)
    assert sym.fp32_to_fp16(np.float32(np.nan)) == 0x7E00
    halves = np.arange(0, 65536, 7, dtype=np.uint16)
    back = np.array([sym.fp16_to_fp32(int(h)) for h in halves], np.float32)
    want = halves.view(np.float16).astype(np.float32)
    assert np.array_equal(back.view(np.uint32)[~np.isnan(want)],
                          want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(back[np.isnan(want)]).all()


def test_registered_types():
    assert set(sym.QUANTIZERS) == set(NAMES)


def test_threads_give_the_same_bytes(rng, monkeypatch):
    x = rng.standard_normal((64, 2048)).astype(np.float32)
    w = rng.gamma(0.5, 1.0, 2048).astype(np.float32)
    whole = quantize(x, "Q6_K", w)
    monkeypatch.setattr(sym, "_MIN_WEIGHTS_PER_THREAD", 1)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 3)
    assert np.array_equal(quantize(x, "Q6_K", w), whole)
