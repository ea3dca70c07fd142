"""The block-type table against its own field layouts, llama.cpp's struct sizes and gguf-py."""
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from blockq import BadArgument
from blockq.types import ALL, QK_K, qtype

HALF, F32, I16 = 2, 4, 2  # sizeof(ggml_half), sizeof(float), sizeof(int16_t)

# Block sizes as llama.cpp's ggml-common.h static_asserts write them (name: (weights, bytes)).
GGML_COMMON = {
    "F32": (1, F32),
    "F16": (1, HALF),
    "BF16": (1, 2),
    "Q4_0": (32, HALF + 32 // 2),
    "Q4_1": (32, 2 * HALF + 32 // 2),
    "Q5_0": (32, HALF + 4 + 32 // 2),
    "Q5_1": (32, 2 * HALF + 4 + 32 // 2),
    "Q8_0": (32, HALF + 32),
    "Q2_K": (256, 2 * HALF + QK_K // 16 + QK_K // 4),
    "Q3_K": (256, HALF + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (256, 2 * HALF + 12 + QK_K // 2),
    "Q5_K": (256, 2 * HALF + 12 + QK_K // 2 + QK_K // 8),
    "Q6_K": (256, HALF + QK_K // 16 + 3 * QK_K // 4),
    "Q8_K": (256, F32 + QK_K + QK_K // 16 * I16),
}

# Bits that hold each weight's quantized value, per type: the fields that are not scales.
VALUE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3,
              "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_K": 8}
VALUE_FIELDS = {"qs", "qh", "ql", "hmask"}


def test_table_covers_exactly_the_documented_types():
    assert sorted(t.name for t in ALL) == sorted(GGML_COMMON)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_block_size_is_the_sum_of_its_fields(t):
    field_bytes = sum(np.dtype(dt).itemsize * count for _, dt, count in t.fields)
    assert field_bytes == t.type_size
    assert t.dtype.itemsize == t.type_size
    # Fields are laid out back to back, in order, with no padding.
    offsets = [t.dtype.fields[name][1] for name, _, _ in t.fields]
    ends = np.cumsum([0] + [np.dtype(dt).itemsize * c for _, dt, c in t.fields])
    assert offsets == list(ends[:-1])


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_sizes_match_llama_cpp_structs(t):
    assert (t.block_size, t.type_size) == GGML_COMMON[t.name]


@pytest.mark.parametrize("t", [t for t in ALL if t.is_quantized], ids=lambda t: t.name)
def test_value_fields_hold_exactly_bits_per_weight(t):
    value_bits = sum(8 * np.dtype(dt).itemsize * c for n, dt, c in t.fields if n in VALUE_FIELDS)
    assert value_bits == VALUE_BITS[t.name] * t.block_size


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_ids_names_and_sizes_match_gguf(t):
    g = GGMLQuantizationType(t.id)
    assert g.name == t.name
    assert GGML_QUANT_SIZES[g] == (t.block_size, t.type_size)


@pytest.mark.parametrize("key", ["q4_k", "Q4_K", 12, np.int32(12)])
def test_lookup_by_name_or_id(key):
    assert qtype(key).name == "Q4_K"


@pytest.mark.parametrize("key", ["Q7_K", 99, 1.5, True])
def test_unknown_type_is_a_bad_argument(key):
    with pytest.raises(BadArgument):
        qtype(key)


def test_row_bytes_refuses_partial_blocks():
    assert qtype("Q4_K").row_bytes(512) == 2 * 144
    with pytest.raises(BadArgument, match="multiple of 256"):
        qtype("Q4_K").row_bytes(100)
