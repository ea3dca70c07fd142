"""QMatrix (blockq.kernels.cpu_matvec) against the numpy oracle, gguf-py's dequantization.

Stated tolerance for products: every output satisfies
    |y - y_ref| <= 1e-5 * (|W| @ |x|)
where y_ref is the float64 product of gguf-py's dequantized W and x.  That is float32 summation
error (~n eps in the worst case, here ~100x smaller in practice) scaled by the problem's own
conditioning, so it is independent of the data's magnitude.  Row decoding (``take_rows``, and the
tiles ``matmul`` hands to BLAS) is bit-exact with gguf-py.
"""
import functools

import gguf
import numba
import numpy as np
import pytest
from gguf import quants

from blockq.errors import BadArgument
from blockq.kernels import cpu_matvec
from blockq.kernels.cpu_matvec import QMatrix
from blockq.testing import random_blocks
from blockq.types import ALL, qtype

RTOL = 1e-5
# every type with CPU kernels: floats, legacy, k-quants, Q8_K, IQ4_NL/XS, MXFP4, TQ, i-quants
TYPES = tuple(t.name for t in ALL if t.has("matvec"))


@pytest.fixture(autouse=True)
def float_kernels(monkeypatch):
    """These tests hold the float kernels; the int8 ones are tests/test_int8.py's."""
    monkeypatch.setattr(cpu_matvec, "int8_kernels", lambda: None)


def dequantize_ref(name, data, rows, cols):
    """The oracle: gguf-py's numpy dequantization (Q8_K, which gguf-py lacks: d * qs)."""
    if name == "Q8_K":
        b = np.ascontiguousarray(data).reshape(-1).view(qtype(name).dtype)
        return (b["d"][:, None] * b["qs"].astype(np.float32)).reshape(rows, cols)
    if name == "F32":
        return np.ascontiguousarray(data).view(np.float32).reshape(rows, cols)
    if name == "F16":
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32).reshape(rows, cols)
    w = quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType[name])
    return w.reshape(rows, cols)


def assert_close(y, w, x):
    """Every entry of y (..., rows) within RTOL * (|x| @ |W|.T) of the float64 product."""
    w64 = w.astype(np.float64)
    ref = x.astype(np.float64) @ w64.T
    bound = RTOL * (np.abs(x).astype(np.float64) @ np.abs(w64).T)
    err = np.abs(y - ref)
    assert y.dtype == np.float32
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.2f}"


def _shape(name):
    return (37, 512) if qtype(name).is_quantized else (37, 515)  # 515: not a multiple of 8


@pytest.mark.parametrize("name", TYPES)
def test_matvec_matmul_take_rows(name, rng):
    rows, cols = _shape(name)
    data = random_blocks(name, rows * cols // qtype(name).block_size, rng, 0.02).reshape(rows, -1)
    w = dequantize_ref(name, data, rows, cols)
    m = QMatrix(name, data, (rows, cols))
    x = rng.standard_normal(cols).astype(np.float32)
    assert_close(m.matvec(x), w, x)
    X = rng.standard_normal((7, cols)).astype(np.float32)
    for n in (7, 4, 2, 1):  # register blocks of 4 tokens and the rest; few tokens: matvec
        assert_close(m.matmul(X[:n]), w, X[:n])
    assert np.array_equal(m.take_rows(np.arange(rows)), w)
    ids = np.array([5, 0, 36, 5])
    assert np.array_equal(m.take_rows(ids), w[ids])


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q6_K", "BF16", "IQ4_XS", "IQ2_S"])
def test_parallel_and_tiled_paths_match_serial(name, rng, monkeypatch):
    """Big enough for the thread drivers; matmul through several tiles, the last one odd."""
    rows, cols = 150, 1024
    assert rows * cols >= cpu_matvec.PARALLEL_MIN_WEIGHTS
    data = random_blocks(name, rows * cols // qtype(name).block_size, rng, 0.02).reshape(rows, -1)
    w = dequantize_ref(name, data, rows, cols)
    m = QMatrix(name, data, (rows, cols))
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((6, cols)).astype(np.float32)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = m.matvec(x)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        yn = m.matvec(x)
        monkeypatch.setattr(cpu_matvec, "TILE_BYTES", 4 * cols * 40)  # F16/BF16: 40-row tiles
        Y = m.matmul(X)
        rows_all = m.take_rows(np.arange(rows))
    finally:
        numba.set_num_threads(saved)
    assert np.array_equal(y1, yn)  # each row is computed the same way whichever thread runs it
    assert_close(yn, w, x)
    assert_close(Y, w, X)
    assert np.array_equal(rows_all, w)


def test_zero_copy_and_layout_forms(rng):
    rows, cols = 4, 64
    data = random_blocks("Q8_0", rows * cols // 32, rng, 0.02).reshape(rows, -1)
    m = QMatrix("Q8_0", data, (rows, cols))
    assert np.shares_memory(m.data, data) and m.nbytes == data.nbytes == rows * 68
    assert (m.qtype, m.shape) == ("Q8_0", (rows, cols))
    flat = data.reshape(-1).copy()
    flat.flags.writeable = False  # as a read-only GGUF mmap
    m2 = QMatrix(8, flat, (rows, cols))  # GGML id instead of the name
    x = rng.standard_normal(cols).astype(np.float32)
    assert np.shares_memory(m2.data, flat)
    assert np.array_equal(m.matvec(x), m2.matvec(x))
    assert np.array_equal(m.matvec(x.astype(np.float64)), m.matvec(x))  # x converted


@pytest.mark.parametrize("hardware", [True, False])
def test_half_to_float_is_exact_for_every_bit_pattern(hardware, monkeypatch):
    """Both half->float paths (F16C/NEON instruction, portable bit arithmetic), all 65536 inputs."""
    from numba import njit

    from blockq.kernels import cpu_simd as simd
    monkeypatch.setattr(simd, "_HW_F16", hardware)  # read when the function below compiles

    @njit
    def convert(a, vec, one):
        for i in range(0, a.shape[1] // 2, 8):
            simd.store_f32(vec, 0, i, simd.load_f16(a, 0, 2 * i))
        for i in range(a.shape[1] // 2):
            one[i] = simd.f16_to_f32(a, 0, 2 * i)

    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    vec, one = np.empty((1, 1 << 16), np.float32), np.empty(1 << 16, np.float32)
    convert(h.view(np.uint8).reshape(1, -1), vec, one)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    for got in (vec[0], one):
        assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))
        assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("call, message", [
    (lambda: QMatrix("Q4_K", np.zeros((2, 144), np.uint8), (2, 200)), "multiple of 256"),
    (lambda: QMatrix("Q4_0", np.zeros(35, np.uint8), (2, 32)), "needs 36 bytes"),
    (lambda: QMatrix("IQ9_Z", np.zeros(36, np.uint8), (2, 32)), "unknown block type"),
    (lambda: QMatrix("I8", np.zeros(64, np.uint8), (2, 32)), "block type I8 has no matvec"),
    (lambda: QMatrix("Q4_0", np.zeros(36, np.uint8), (2, 32)).matvec(np.zeros(31)),
     r"x of shape \(32,\)"),
    (lambda: QMatrix("Q4_0", np.zeros(36, np.uint8), (2, 32)).matmul(np.zeros((3, 16))),
     r"X of shape \(n, 32\)"),
    (lambda: QMatrix("Q4_0", np.zeros(36, np.uint8), (2, 32)).take_rows(np.array([0, 2])),
     "row id 2 is out of range"),
    (lambda: QMatrix("Q4_0", np.zeros(36, np.uint8), (2, 32)).take_rows(np.array([0.5])),
     "integer array"),
])
def test_errors_name_the_problem(call, message):
    with pytest.raises(BadArgument, match=message):
        call()


@functools.cache
def _reader(path):
    return gguf.GGUFReader(path)  # parsing the metadata takes seconds: once per file


def _real_tensor(path, type_name):
    """The smallest 2-D tensor of a type in a GGUF file: (uint8 bytes view, (rows, cols))."""
    reader = _reader(path)
    ts = [t for t in reader.tensors if t.tensor_type.name == type_name and len(t.shape) == 2]
    t = min(ts, key=lambda t: t.data.nbytes)
    cols, rows = (int(n) for n in t.shape)  # GGUF lists the row length first
    return t.data, (rows, cols)


@pytest.mark.realfile
@pytest.mark.parametrize("model, type_name", [
    ("smollm2", "Q4_1"), ("smollm2", "Q8_0"),
    ("gemma3", "Q4_K"), ("gemma3", "Q6_K"), ("gemma3", "Q5_0"),
])
def test_real_tensors(model, type_name, smollm2_file, gemma3_file, rng):
    path = smollm2_file if model == "smollm2" else gemma3_file
    data, (rows, cols) = _real_tensor(path, type_name)
    m = QMatrix(type_name, data, (rows, cols))
    assert np.shares_memory(m.data, data)  # the mmap itself, no copy
    w = dequantize_ref(type_name, data, rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    assert_close(m.matvec(x), w, x)
    X = rng.standard_normal((4, cols)).astype(np.float32)
    assert_close(m.matmul(X), w, X)
    ids = rng.integers(0, rows, 16)
    assert np.array_equal(m.take_rows(ids), w[ids])


@pytest.mark.parametrize("hardware", [True, False])
def test_table_lookup_both_paths(hardware, monkeypatch):
    """lut16 (IQ4_NL / MXFP4 values of 4-bit codes): the AVX2 permute where the CPU has it and
    the portable compare-and-select chain, for every code."""
    from numba import njit

    from blockq import codebooks
    from blockq.kernels import cpu_iquant, cpu_simd as simd
    if hardware and not cpu_iquant._HW_PERMUTE:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setattr(cpu_iquant, "_HW_PERMUTE", hardware)  # read when convert compiles

    @njit
    def convert(codes, out):
        for i in range(0, codes.shape[1], 8):
            c = simd.load_u8(codes, 0, i)
            simd.store_f32(out, 0, i, cpu_iquant.lut_iq4(c))
            simd.store_f32(out, 1, i, cpu_iquant.lut_fp4(c))

    codes = np.tile(np.arange(16, dtype=np.uint8), 2)[None, :]  # (1, 32)
    out = np.zeros((2, 32), np.float32)
    convert(codes, out)
    assert out[0].tolist() == codebooks.IQ4_NL[codes[0]].tolist()
    assert out[1].tolist() == codebooks.MXFP4[codes[0]].tolist()
