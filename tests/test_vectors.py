"""Golden vectors (formats/vectors/<TYPE>.json, written by tools/make_vectors.py): every block
type's bytes dequantize to exactly the recorded floats."""
import json
from pathlib import Path

import numpy as np
import pytest

from blockq.dequantize import block_fields, dequantize, dequantize_blocks_ref
from blockq.types import ALL, qtype

VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"
# every type blockq can quantize has vectors (made from quantized inputs or the real files),
# but those llama.cpp quantizes only with importance vectors (vectors are made without)
TYPES = [t.name for t in ALL if t.has("quantize") and not t.needs_imatrix]
# Types whose vectors come from the llama.cpp-written model files.
FROM_FILES = {"F32", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_0"}


def load(name):
    return json.loads((VECTORS / f"{name}.json").read_text())


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("name", TYPES)
def test_vector_file_describes_its_type(name):
    doc = load(name)
    t = qtype(name)
    assert (doc["type"], doc["ggml_id"], doc["block_size"], doc["type_size"]) == \
        (t.name, t.id, t.block_size, t.type_size)
    assert len(doc["vectors"]) >= 2
    sources = {v["source"] for v in doc["vectors"]}
    assert all(s.endswith(".gguf") for s in sources) == (name in FROM_FILES)
    for v in doc["vectors"]:
        assert len(v["block_hex"]) == 2 * v["n_blocks"] * t.type_size
        assert len(v["dequantized"]) == v["n_blocks"] * t.block_size
        assert "input" not in v or len(v["input"]) == len(v["dequantized"])


@pytest.mark.parametrize("name", TYPES)
def test_vectors_dequantize_exactly(name):
    t = qtype(name)
    for i, v in enumerate(load(name)["vectors"]):
        blocks = np.frombuffer(bytes.fromhex(v["block_hex"]), np.uint8)
        want = np.array(v["dequantized"], np.float32)
        got = dequantize(blocks, name, (v["n_blocks"], t.block_size)).ravel()
        assert np.array_equal(bits(got), bits(want)), f"{name} vector {i} ({v['source']})"
        ref = dequantize_blocks_ref(blocks, name).ravel()
        assert np.array_equal(bits(ref), bits(want)), f"{name} vector {i}, numpy reference"
        first = bytes.fromhex(v["block_hex"])[:t.type_size]
        if t.is_quantized:
            assert np.array_equal(bits(block_fields(name, first)["values"]),
                                  bits(want[:t.block_size]))


@pytest.mark.parametrize("name", [n for n in TYPES if n not in FROM_FILES])
def test_quantized_vectors_stay_close_to_their_input(name):
    # Sanity on the generated vectors: the dequantized block is a coarse copy of its input.
    t = qtype(name)
    for v in load(name)["vectors"]:
        x = np.array(v["input"], np.float32)
        y = np.array(v["dequantized"], np.float32)
        if not t.is_quantized:
            assert np.allclose(y, x, rtol=1e-2, atol=1e-7)
            continue
        step = (x.max() - x.min()) / (2 ** (t.bits_per_weight - 1.5) - 1) + 1e-12
        if name == "MXFP4":  # the power-of-two scale d leaves |x| up to 16 d against a top
            step = (x.max() - x.min()) / 2  # value of 12 d (E2M1's top gap is 4 d as well)
        assert np.abs(y - x).max() <= step, f"{name}: max error {np.abs(y - x).max()}"


@pytest.mark.parametrize("name", [n for n in TYPES if n not in FROM_FILES])
def test_quantize_reproduces_llama_cpp_bytes(name):
    # Vectors whose bytes llama.cpp's own quantizer also made from `input` pin blockq.quantize.
    import blockq
    pinned = [v for v in load(name)["vectors"] if v.get("llama_cpp_same_bytes")]
    assert pinned, f"{name}: no vector was confirmed by llama.cpp's quantizer"
    for v in pinned:
        x = np.array(v["input"], np.float32).reshape(1, -1)
        assert blockq.quantize(x, name).tobytes().hex() == v["block_hex"]
