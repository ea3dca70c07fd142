"""The block-type table against its own field layouts, llama.cpp's struct sizes and gguf-py."""
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from blockq import BadArgument
from blockq.types import ALL, CAPABILITIES, QK_K, qtype, register, undecodable

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
    "IQ2_XXS": (256, HALF + QK_K // 8 * 2),
    "IQ2_XS": (256, HALF + QK_K // 8 * 2 + QK_K // 32),
    "IQ2_S": (256, HALF + QK_K // 4 + QK_K // 16),
    "IQ3_XXS": (256, HALF + 3 * QK_K // 8),
    "IQ3_S": (256, HALF + QK_K // 4 + QK_K // 8 + QK_K // 32 + QK_K // 64),
    "IQ1_S": (256, HALF + QK_K // 8 + QK_K // 16),
    "IQ1_M": (256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    "IQ4_NL": (32, HALF + 32 // 2),
    "IQ4_XS": (256, HALF + 2 + QK_K // 2 + QK_K // 64),
    "TQ1_0": (256, HALF + QK_K // 64 + (QK_K - 4 * QK_K // 64) // 5),
    "TQ2_0": (256, HALF + QK_K // 4),
    "MXFP4": (32, 1 + 32 // 2),
    "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8), "F64": (1, 8),
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


@pytest.mark.parametrize("t", [t for t in ALL if t.name in VALUE_BITS], ids=lambda t: t.name)
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


# --- one record per type: every capability, or its explicit absence ---------------------------
# One line per type: the capabilities it has (R reference dequantizer, D CPU dequantize kernel,
# Q quantizer, M CPU matvec/matmul, G CUDA decoder) and llama.cpp's activation (vec_dot) type.
# A capability that is not listed must be declared in the type's ``lacks`` and be unregistered.
CAPS = {"R": "reference", "D": "dequantize", "Q": "quantize", "M": "matvec", "G": "gpu"}
EXPECTED = {
    "F32": ("RDQMG", "F32"), "F16": ("RDQMG", "F16"), "BF16": ("RDQMG", "BF16"),
    "Q4_0": ("RDQMG", "Q8_0"), "Q4_1": ("RDQMG", "Q8_1"), "Q5_0": ("RDQMG", "Q8_0"),
    "Q5_1": ("RDQMG", "Q8_1"), "Q8_0": ("RDQMG", "Q8_0"),
    "Q2_K": ("RDQMG", "Q8_K"), "Q3_K": ("RDQMG", "Q8_K"), "Q4_K": ("RDQMG", "Q8_K"),
    "Q5_K": ("RDQMG", "Q8_K"), "Q6_K": ("RDQMG", "Q8_K"), "Q8_K": ("RDQMG", None),
    "IQ2_XXS": ("RDQMG", "Q8_K"), "IQ2_XS": ("RDQMG", "Q8_K"), "IQ2_S": ("RDQMG", "Q8_K"),
    "IQ3_XXS": ("RDQMG", "Q8_K"), "IQ3_S": ("RDQMG", "Q8_K"), "IQ1_S": ("RDQMG", "Q8_K"),
    "IQ1_M": ("RDQMG", "Q8_K"), "IQ4_NL": ("RDQMG", "Q8_0"), "IQ4_XS": ("RDQMG", "Q8_K"),
    "TQ1_0": ("RDQMG", "Q8_K"), "TQ2_0": ("RDQMG", "Q8_K"), "MXFP4": ("RDQMG", "Q8_0"),
    "I8": ("RD", None), "I16": ("RD", None), "I32": ("RD", None), "I64": ("RD", None),
    "F64": ("RD", None),
}


def test_capability_table_covers_every_type():
    assert sorted(EXPECTED) == sorted(t.name for t in ALL)
    assert sorted(CAPS.values()) == sorted(CAPABILITIES)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_every_capability_is_registered_or_declared_absent(t):
    letters, dot = EXPECTED[t.name]
    assert t.dot == dot
    for letter, cap in CAPS.items():
        if letter in letters:
            assert t.has(cap) and cap not in t.lacks
            assert t.impl(cap) is not None  # imports the backend, which registered it
        else:
            assert cap in t.lacks and not t.has(cap)
            with pytest.raises(BadArgument, match=f"block type {t.name} has no {cap}"):
                t.impl(cap)


def test_register_refuses_unknown_or_declared_absent_capabilities():
    with pytest.raises(ValueError, match="unknown capability 'fly'"):
        register("Q4_0", "fly", object())
    lacking = next(t for t in ALL if t.lacks)
    with pytest.raises(ValueError, match="declares it lacks"):
        register(lacking, lacking.lacks[0], object())


def test_undecodable_placeholder_has_nothing():
    u = undecodable(31, "Q4_0_4_4")
    assert u.name == "Q4_0_4_4 (id 31, cannot be decoded)" and not u.decodable
    assert not any(u.has(c) for c in CAPABILITIES)
    with pytest.raises(BadArgument, match="cannot be decoded"):
        u.impl("reference")


def test_types_needing_an_importance_matrix_are_llama_cpps():
    # ggml_quantize_requires_imatrix: IQ2_XXS, IQ2_XS, IQ1_S
    assert {t.name for t in ALL if t.needs_imatrix} == {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
