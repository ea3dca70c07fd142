"""Scale-and-min quantizers (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) against llama.cpp's own blocks.

``tests/data/refblocks_asym_*.npz`` hold float rows and the blocks llama.cpp made of them, with
and without an importance vector: 6 evenly spaced rows of each ``../shared/refdata`` source
(blocks copied from there), and edge-case rows (``_edge``: zeros, constants, tiny and huge
values, one-signed rows, outliers; importance vectors with zero runs) quantized by llama.cpp's
``ggml_quantize_chunk``.  Regenerate with ``python tests/test_quantize_asymmetric.py
--write-data`` (needs ``../shared/refdata`` and the ``llama_cpp`` package).
"""
from pathlib import Path

import numba
import numpy as np
import pytest

from blockq.quantize import asymmetric as asym
from blockq.quantize import quantize
from blockq.types import qtype
from quant_reference import BOUND, all_files, dequantize, edge_file, names, rmse, source_files

DATA = Path(__file__).parent / "data"
EDGE = edge_file("asym")
SOURCES = source_files("asym")
FILES = all_files("asym")  # (test_reference_data_is_complete needs all)
NAMES = names("asym")


def test_reference_data_is_complete():
    assert EDGE.exists() and len(SOURCES) == 6, "run this file with --write-data"
    stored = set()
    for path in FILES:
        with np.load(path) as d:
            stored |= set(d.files)
    for name in NAMES:
        assert {name, name + "_imatrix", name + "_imatrix_sparse"} <= stored


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_independent(name, rng):
    """Rows quantized together (threads, lanes across rows) give each row's own bytes."""
    x = (rng.standard_normal((40, 512)) * rng.uniform(0.01, 10, (40, 1))).astype(np.float32)
    w = rng.gamma(0.5, 1.0, 512).astype(np.float32)
    for imatrix in (None, w):
        whole = quantize(x, name, imatrix)
        assert np.array_equal(whole[7], quantize(x[7:8], name, imatrix)[0])
        assert np.array_equal(whole[39], quantize(x[39:], name, imatrix)[0])


def test_threads_give_the_same_bytes(rng, monkeypatch):
    x = rng.standard_normal((64, 2048)).astype(np.float32)
    w = rng.gamma(0.5, 1.0, 2048).astype(np.float32)
    whole = quantize(x, "Q4_K", w)
    monkeypatch.setattr(asym, "_MIN_WEIGHTS_PER_THREAD", 1)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 3)
    assert np.array_equal(quantize(x, "Q4_K", w), whole)


def test_long_rows_span_search_chunks(rng):
    """Rows longer than one search batch (asym._CHUNK weights) and a ragged last batch."""
    cols = 2 * asym._CHUNK + 3 * 256
    x = rng.standard_normal((2, cols)).astype(np.float32)
    w = rng.gamma(0.5, 1.0, cols).astype(np.float32)
    for name in ("Q4_1", "Q4_K", "Q2_K"):
        # without an importance vector every (super-)block stands alone
        tail = quantize(np.ascontiguousarray(x[:, -1024:]), name)
        assert np.array_equal(quantize(x, name)[:, -qtype(name).row_bytes(1024):], tail)
        q = quantize(x, name, w)
        assert rmse(x, dequantize(name, q, cols)) / x.std() < BOUND[name]


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_constant_rows(name):
    x = np.zeros((3, 256), np.float32)
    x[1] = 0.75
    x[2] = -3.0
    got = dequantize(name, quantize(x, name), 256)
    assert np.array_equal(got[0], x[0])
    # a constant c >= 0 needs min = 0 and a scale; c < 0 is the block's min exactly
    assert np.allclose(got[1:], x[1:], rtol=2e-3)


def test_q4_1_literal_block():
    # x = j % 16 - 4: min -4 -> m = -4 (f16 0xC400), d = 15 / 15 = 1 (0x3C00), q = j % 16
    x = (np.arange(32) % 16 - 4).astype(np.float32)[None]
    want = bytes([0x00, 0x3C, 0x00, 0xC4]) + bytes(0x11 * j for j in range(16))
    assert quantize(x, "Q4_1").tobytes() == want


def test_scale_min_packing_round_trips(rng):
    for _ in range(50):
        ls = rng.integers(0, 64, 8).astype(np.uint8)
        lm = rng.integers(0, 64, 8).astype(np.uint8)
        q = np.zeros(12, np.uint8)
        asym.pack_scale_min_k4(ls, lm, q)
        assert [tuple(asym.get_scale_min_k4(j, q)) for j in range(8)] == list(zip(ls, lm))


def test_scale_min_packing_is_what_gguf_reads(rng):
    """Pack known 6-bit scales and mins into a Q4_K block with d = dmin = 1 and every q = 1:
    gguf-py must read back w = scale[j] - min[j] for each sub-block j of 32."""
    ls = rng.integers(0, 64, 8).astype(np.uint8)
    lm = rng.integers(0, 64, 8).astype(np.uint8)
    block = np.zeros(144, np.uint8)
    block[0:4] = [0x00, 0x3C, 0x00, 0x3C]  # d = dmin = 1.0 (f16)
    asym.pack_scale_min_k4(ls, lm, block[4:16])
    block[16:] = 0x11
    w = dequantize("Q4_K", block[None], 256)[0]
    assert np.array_equal(w, np.repeat(ls.astype(np.float32) - lm, 32))


def test_registered_types():
    assert set(asym.QUANTIZERS) == set(NAMES)


# ---------------------------------------------------------------- test data (not a test)


def _write_data(refdata=Path(__file__).resolve().parents[2] / "shared" / "refdata", rows=6):
    """Write tests/data/refblocks_asym_*.npz: reference subsets and llama.cpp-made edge rows."""
    import ctypes
    import os

    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib",
                                   "libggml-base.so"))
    chunk = lib.ggml_quantize_chunk
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def llama(x, name, w):
        t = qtype(name)
        out = np.zeros((x.shape[0], t.row_bytes(x.shape[1])), np.uint8)
        chunk(t.id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
              None if w is None else w.ctypes.data)
        return out

    for src in sorted(refdata.glob("*.npz")):
        d = np.load(src)
        pick = np.linspace(0, d["x"].shape[0] - 1, rows).round().astype(np.int64)
        arrays = {"x": d["x"][pick], "imatrix": d["imatrix"], "rows": pick}
        for name in NAMES:
            for key in (name, name + "_imatrix"):
                if key in d.files:
                    arrays[key] = d[key][pick]
        np.savez_compressed(DATA / f"refblocks_asym_{src.stem}.npz", **arrays)

    rng = np.random.default_rng(7)
    cols = 512
    edge = [
        np.zeros(cols),
        np.full(cols, 0.3),
        np.full(cols, -2.5),
        np.repeat(rng.standard_normal(cols // 16), 16),  # constant sub-blocks
        rng.standard_normal(cols) * 1e-6,
        rng.standard_normal(cols) * 1e4,
        rng.random(cols),  # all positive: min clipped to 0
        -rng.random(cols),
        rng.standard_normal(cols) * (rng.random(cols) < 0.1),  # mostly zeros
        rng.integers(-3, 4, cols).astype(float),
        rng.laplace(size=cols) * np.where(rng.random(cols) < 0.01, 50, 1),
        np.concatenate([np.zeros(256), rng.standard_normal(256)]),
    ]
    x = np.ascontiguousarray(np.stack(edge), dtype=np.float32)
    im = rng.gamma(0.5, 1.0, cols).astype(np.float32)
    sparse = (im * (rng.random(cols) < 0.5)).astype(np.float32)
    sparse[64:128] = 0  # whole blocks without importance
    arrays = {"x": x, "imatrix": im, "imatrix_sparse": sparse}
    for name in NAMES:
        arrays[name] = llama(x, name, None)
        arrays[name + "_imatrix"] = llama(x, name, im)
        arrays[name + "_imatrix_sparse"] = llama(x, name, sparse)
    np.savez_compressed(EDGE, **arrays)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-data"]:
        _write_data()
    else:
        sys.exit("usage: python tests/test_quantize_asymmetric.py --write-data")
