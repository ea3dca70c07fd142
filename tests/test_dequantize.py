"""Dequantization: numpy reference and Numba kernels against gguf-py (the oracle), hand-derived
blocks, every tensor of two llama.cpp-written files, field decoding, and bad input."""
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gq

from blockq import BadArgument
from blockq.dequantize import (block_fields, dequantize, dequantize_blocks_ref, quant_ints,
                               unpack_q3k_scales, unpack_scale_min_k4)
from blockq.kernels import cpu_dequant
from blockq.testing import random_blocks
from blockq.types import ALL, qtype

TYPES = [t.name for t in ALL if t.has("reference")]


def _gguf_can_dequantize(name):
    try:
        gq.dequantize(np.zeros(qtype(name).type_size, np.uint8), GGMLQuantizationType[name])
        return True
    except NotImplementedError:
        return False


GGUF_TYPES = [n for n in TYPES if _gguf_can_dequantize(n)]  # all but Q8_K in gguf-py 0.19
INT_TYPES = ["I8", "I16", "I32", "I64", "F64"]  # gguf-py reads them as plain numpy arrays


def as_f32_bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_bits(got, want):
    """Bit-identical float32, except that any NaN matches any NaN (payloads may differ)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    same = (as_f32_bits(got) == as_f32_bits(want)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        i = np.flatnonzero(~same)
        raise AssertionError(f"{i.size} of {same.size} values differ, first at flat index "
                             f"{i[0]}: got {got.ravel()[i[0]]!r}, want {want.ravel()[i[0]]!r}")


def gguf_dequantize(blocks, name):
    return gq.dequantize(blocks, GGMLQuantizationType[name]).reshape(len(blocks), -1)


def kernel_dequantize(blocks, name):
    t = qtype(name)
    return dequantize(blocks, name, (len(blocks), t.block_size))


# --- (a) random blocks: reference and kernels against gguf-py -------------------------------

def test_gguf_covers_every_type_but_q8_k_and_the_plain_numbers():
    assert set(TYPES) - set(GGUF_TYPES) <= {"Q8_K", *INT_TYPES}
    assert set(TYPES) == {t.name for t in ALL}  # every type of the table dequantizes


@pytest.mark.parametrize("name", INT_TYPES)
def test_plain_numbers_convert_as_numpy(name, rng):
    t = qtype(name)
    raw = random_blocks(name, 300, rng)
    want = raw.view(t.dtype[0]).astype(np.float32)  # (300, 1), F64 rounded to nearest
    with np.errstate(over="ignore"):
        assert_same_bits(dequantize_blocks_ref(raw, name), want)
        assert_same_bits(kernel_dequantize(raw, name), want)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_random_blocks_match_gguf(name, rng):
    blocks = random_blocks(name, 300, rng)
    want = gguf_dequantize(blocks, name)
    assert not np.isnan(want).any()
    ref = dequantize_blocks_ref(blocks, name)
    assert np.array_equal(as_f32_bits(ref), as_f32_bits(want))
    assert np.array_equal(as_f32_bits(kernel_dequantize(blocks, name)), as_f32_bits(want))


def test_q8_k_by_hand(rng):
    # gguf-py 0.19 has no Q8_K dequantizer, so check the formula w = d * q directly.
    blocks = random_blocks("Q8_K", 50, rng)
    d = blocks[:, :4].copy().view(np.float32)  # (n, 1)
    q = blocks[:, 4:260].view(np.int8).astype(np.float32)  # (n, 256)
    want = q * d
    assert np.array_equal(as_f32_bits(dequantize_blocks_ref(blocks, "Q8_K")), as_f32_bits(want))
    assert np.array_equal(as_f32_bits(kernel_dequantize(blocks, "Q8_K")), as_f32_bits(want))


# --- literal blocks, decoded by hand ----------------------------------------------------------

def _q4_k_block():
    b = np.zeros(144, np.uint8)
    b[0:2] = [0x00, 0x3C]  # d = 1.0
    b[2:4] = [0x00, 0x38]  # dmin = 0.5
    b[4] = 0b01_000001  # scale 0 = 1; top bits of scale 4 = 1
    b[8] = 2  # min 0 = 2
    b[12] = 0x52  # scale 4 low bits = 2 (-> 2 | 1 << 4 = 18), min 4 low bits = 5
    b[16] = 0xF3  # weight 0 = 3 (sub-block 0), weight 32 = 15 (sub-block 1: scale 0, min 0)
    b[16 + 64 + 1] = 0x07  # weight 129 = 7 (sub-block 4)
    want = np.zeros(256, np.float32)
    want[0:32] = -1.0  # 1*0 - 0.5*2
    want[0] = 2.0  # 1*3 - 0.5*2
    want[128:160] = -2.5  # 18*0 - 0.5*5
    want[129] = 123.5  # 18*7 - 0.5*5
    return b, want


def _q3_k_block():
    b = np.zeros(110, np.uint8)
    b[0:32] = 0xFF  # every high bit set: no -4 ...
    b[1] = 0xFE  # ... except weight 1
    b[32] = 0x03  # weight 0: low bits 3
    b[33] = 0x01  # weight 1: low bits 1
    b[96] = 0x01  # scale 0 low bits = 1
    b[104:108] = 0xAA  # every scale's high bits = 2 -> stored 32 + low -> scale = low
    b[108:110] = [0x00, 0x40]  # d = 2.0
    want = np.zeros(256, np.float32)
    want[0] = 6.0  # 2 * 1 * 3
    want[1] = -6.0  # 2 * 1 * (1 - 4)
    return b, want


def _q5_0_block():
    b = np.zeros(22, np.uint8)
    b[0:2] = [0x00, 0x38]  # d = 0.5
    b[2:6] = [0x01, 0x00, 0x01, 0x80]  # 5th bits of weights 0, 16, 31
    b[6] = 0x21  # weight 0 low bits 1, weight 16 low bits 2
    want = np.full(32, -8.0, np.float32)  # 0.5 * (0 - 16)
    want[0] = 0.5  # 0.5 * (1 + 16 - 16)
    want[16] = 1.0  # 0.5 * (2 + 16 - 16)
    want[31] = 0.0  # 0.5 * (0 + 16 - 16)
    return b, want


def _q8_k_block():
    b = np.zeros(292, np.uint8)
    b[0:4] = np.array([0.25], np.float32).view(np.uint8)
    b[4:9] = np.array([-128, -1, 0, 1, 127], np.int8).view(np.uint8)
    want = np.zeros(256, np.float32)
    want[:5] = [-32.0, -0.25, 0.0, 0.25, 31.75]
    return b, want


@pytest.mark.parametrize("name,make", [("Q4_K", _q4_k_block), ("Q3_K", _q3_k_block),
                                       ("Q5_0", _q5_0_block), ("Q8_K", _q8_k_block)])
@pytest.mark.parametrize("impl", [dequantize_blocks_ref, kernel_dequantize])
def test_hand_decoded_block(name, make, impl):
    block, want = make()
    assert np.array_equal(impl(block[None, :], name)[0], want)


def test_unpack_scale_min_k4_by_hand():
    sc, mn = unpack_scale_min_k4(_q4_k_block()[0][4:16])
    assert sc.tolist() == [1, 0, 0, 0, 18, 0, 0, 0]
    assert mn.tolist() == [2, 0, 0, 0, 5, 0, 0, 0]


def test_unpack_q3k_scales_by_hand():
    s = np.zeros(12, np.uint8)
    s[0] = 0x5F  # scale 0 low = 15, scale 8 low = 5
    s[8] = 0b11_00_00_01  # scale 0 high = 1, scale 12 high = 3
    want = np.full(16, -32)
    want[0] = 15 + 16 - 32
    want[8] = 5 - 32
    want[12] = 48 - 32
    assert unpack_q3k_scales(s).tolist() == want.tolist()


# --- (c) kernels against the reference, every bit pattern of scales -------------------------

@pytest.mark.parametrize("name", TYPES)
def test_kernels_match_reference_any_scales(name, rng, monkeypatch):
    # tiny work per thread so that the multi-threaded path runs too
    monkeypatch.setattr(cpu_dequant, "WEIGHTS_PER_THREAD", 64)
    blocks = random_blocks(name, 257, rng, scales="any")
    assert_same_bits(kernel_dequantize(blocks, name), dequantize_blocks_ref(blocks, name))


def test_f16_every_bit_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = h.view(np.float16).astype(np.float32)  # NaN payloads kept, as numpy does
    got = dequantize(h.view(np.uint8), "F16", (1 << 16,))
    assert np.array_equal(as_f32_bits(got), as_f32_bits(want))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_shapes_ids_and_byte_sources_agree(name, rng):
    t = qtype(name)
    blocks = random_blocks(name, 24, rng)  # 3 x 2 x (4 blocks per row)
    shape = (3, 2, 4 * t.block_size)
    want = dequantize_blocks_ref(blocks, name).reshape(shape)
    ro = blocks.reshape(6, -1).copy()
    ro.flags.writeable = False
    for data, q in [(blocks, name), (blocks.tobytes(), t.id), (ro, name.lower()),
                    (blocks.view(np.uint16), t)]:
        got = dequantize(data, q, shape)
        assert got.shape == shape and got.dtype == np.float32
        assert np.array_equal(got, want)
    out = np.full(shape, np.nan, np.float32)
    assert dequantize(blocks, name, shape, out=out) is out
    assert np.array_equal(out, want)
    assert dequantize(b"", name, (0, t.block_size)).shape == (0, t.block_size)


# --- block_fields: one block's fields rebuild its values ------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_block_fields_rebuild_the_block(name, rng):
    t = qtype(name)
    block = random_blocks(name, 1, rng)[0]
    f = block_fields(name, block.tobytes())
    assert f["type"] == name and f["formula"]
    want = dequantize_blocks_ref(block, name)[0]
    if not t.is_quantized:
        assert np.float32(f["value"]) == want[0]
        return
    assert np.array_equal(np.array(f["values"], np.float32), want)
    q = np.array(f["q"], np.float32)
    if "scale_values" in f:  # k-quants with sub-block scales
        sub = np.arange(t.block_size) // f["sub_block_size"]
        w = np.array(f["scale_values"], np.float32)[sub] * q
        if "min_values" in f:
            w = w - np.array(f["min_values"], np.float32)[sub]
    else:
        w = q * np.float32(f["d"])
        if "m" in f:
            w = w + np.float32(f["m"])
    assert np.array_equal(as_f32_bits(w), as_f32_bits(want))


@pytest.mark.parametrize("name,lo,hi", [("Q4_0", -8, 7), ("Q4_1", 0, 15), ("Q5_0", -16, 15),
                                        ("Q5_1", 0, 31), ("Q8_0", -128, 127), ("Q2_K", 0, 3),
                                        ("Q3_K", -4, 3), ("Q4_K", 0, 15), ("Q5_K", 0, 31),
                                        ("Q6_K", -32, 31), ("Q8_K", -128, 127)])
def test_quant_ints_cover_exactly_their_range(name, lo, hi, rng):
    q = quant_ints(random_blocks(name, 400, rng), name)
    assert q.min() == lo and q.max() == hi


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("data,name,shape,match", [
    (np.zeros(143, np.uint8), "Q4_K", (1, 256), r"needs 144 bytes.*got 143"),
    (np.zeros(288, np.uint8), "Q4_K", (3, 256), r"shape \(3, 256\) needs 432 bytes"),
    (np.zeros(144, np.uint8), "Q4_K", (1, 100), r"last dimension 100 .* multiple of .* 256"),
    (np.zeros(18, np.uint8), "Q4_0", (48,), r"48 is not a multiple of the block size 32"),
    (np.zeros(18, np.uint8), "Q4_0", (), r"at least one dimension"),
    (np.zeros(18, np.uint8), "Q4_0", (-1, 32), r"negative"),
    (np.zeros(18, np.uint8), "Q9_0", (32,), r"unknown block type 'Q9_0'"),
    (np.zeros(18, np.uint8), 77, (32,), r"unknown GGML type id 77"),
    (np.array([None]), "Q4_0", (32,), r"raw bytes"),
])
def test_bad_arguments_are_named(data, name, shape, match):
    with pytest.raises(BadArgument, match=match):
        dequantize(data, name, shape)


@pytest.mark.parametrize("out", [np.zeros((2, 32), np.float32), np.zeros((1, 32), np.float64),
                                 np.zeros((1, 64), np.float32)[:, ::2]])
def test_bad_out_is_refused(out):
    with pytest.raises(BadArgument, match=r"out must be a C-contiguous float32 array"):
        dequantize(np.zeros(18, np.uint8), "Q4_0", (1, 32), out=out)


def test_block_fields_wants_one_whole_block():
    with pytest.raises(BadArgument, match="a Q6_K block is 210 bytes, got 209"):
        block_fields("Q6_K", bytes(209))


# --- (b) every tensor of two files written by llama.cpp -------------------------------------

def _check_file(path, expected_types):
    seen = set()
    for t in GGUFReader(path).tensors:
        name = t.tensor_type.name
        seen.add(name)
        shape = tuple(int(s) for s in reversed(t.shape))  # numpy order: (rows, cols)
        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data[None]
        rows = data.shape[0]
        step = max(1, (1 << 22) // shape[-1])  # ~4M weights at a time
        for r0 in range(0, rows, step):
            chunk = data[r0:r0 + step]
            want = gq.dequantize(chunk, t.tensor_type).reshape(len(chunk), shape[-1])
            got = dequantize(chunk, int(t.tensor_type), (len(chunk), shape[-1]))
            if not np.array_equal(as_f32_bits(got), as_f32_bits(want)):
                raise AssertionError(f"{t.name} ({name}) rows {r0}..{r0 + len(chunk)} differ")
    assert seen == expected_types


@pytest.mark.realfile
@pytest.mark.slow
def test_every_tensor_of_smollm2(smollm2_file):
    _check_file(smollm2_file, {"F32", "Q4_1", "Q8_0"})


@pytest.mark.realfile
@pytest.mark.slow
def test_every_tensor_of_gemma3(gemma3_file):
    _check_file(gemma3_file, {"F32", "Q4_K", "Q6_K", "Q5_0", "Q8_0"})


# --- (e) blocks llama.cpp made: IQ*, TQ*, MXFP4 (tools/record_llama_blocks.py) -----------------

LLAMA_IQ = Path(__file__).parent / "data" / "llama_blocks_iq.npz"


def _llama_iq_types():
    with np.load(LLAMA_IQ) as d:
        return sorted(k for k in d.files if not k.endswith("_f32"))


@pytest.mark.parametrize("name", _llama_iq_types())
def test_blocks_quantized_by_llama_cpp(name):
    with np.load(LLAMA_IQ) as d:
        blocks, want = d[name], d[name + "_f32"]  # llama.cpp's blocks and its own floats
    rows, cols = want.shape
    assert_same_bits(dequantize(blocks, name, (rows, cols)), want)
    assert_same_bits(dequantize_blocks_ref(blocks, name).reshape(rows, cols), want)
    assert_same_bits(gguf_dequantize(blocks.reshape(-1, qtype(name).type_size), name)
                     .reshape(rows, cols), want)


def test_llama_cpp_blocks_cover_every_new_quantized_type():
    old = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
    new = {t.name for t in ALL if t.is_quantized} - old
    assert set(_llama_iq_types()) == new
