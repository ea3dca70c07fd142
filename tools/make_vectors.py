"""Write the golden dequantization vectors ``formats/vectors/<TYPE>.json``.

Each file holds a few runs of blocks of one type: their bytes (hex), the float32 values they
dequantize to and, where known, the floats they were quantized from.  Blocks come from the two
llama.cpp-written model files where the type occurs there (Q4_1, Q8_0, F32 from SmolLM2; Q4_K,
Q6_K, Q5_0, Q8_0 from Gemma-3) and otherwise from ``blockq.quantize`` on fixed inputs.

Expected values come from gguf-py's ``gguf.quants.dequantize`` (the oracle), except Q8_K which
gguf-py lacks: there blockq's numpy reference is used.  When llama-cpp-python is installed, every
run is also dequantized by llama.cpp's own C code (``ggml_get_type_traits(t)->to_float``, and
``dequantize_row_q8_K``) and the generator refuses to write a vector that disagrees; quantized
inputs are re-quantized with ``ggml_quantize_chunk`` and whether llama.cpp makes the same bytes
is recorded per vector (``llama_cpp_same_bytes``).

    python tools/make_vectors.py            # (re)write formats/vectors/*.json
    python tools/make_vectors.py --check    # only verify the existing files, write nothing

``tools/bench_dequant.py`` imports :func:`ggml_dequantizer` from here.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType, GGUFReader  # noqa: E402
from gguf import quants as gq  # noqa: E402

from blockq import fetch  # noqa: E402
from blockq.dequantize import dequantize, dequantize_blocks_ref  # noqa: E402
from blockq.types import ALL, qtype  # noqa: E402

OUT = ROOT / "formats" / "vectors"

# (file, tensor, runs) taken from the real files; a run is (first block, number of blocks).
FROM_FILES = {
    "F32": [("smollm2", "blk.0.attn_norm.weight", [(0, 8), (300, 8)])],
    "Q4_1": [("smollm2", "blk.0.attn_q.weight", [(0, 1), ("max", 1), (5000, 1)])],
    "Q8_0": [("smollm2", "token_embd.weight", [(0, 1), ("max", 1)]),
             ("gemma3", "blk.0.attn_v.weight", [(0, 1), ("max", 1)])],
    "Q4_K": [("gemma3", "blk.0.attn_output.weight", [(0, 1), ("max", 1), (1000, 1)])],
    "Q6_K": [("gemma3", "blk.0.ffn_down.weight", [(0, 1), ("max", 1), (2000, 1)])],
    "Q5_0": [("gemma3", "blk.0.attn_k.weight", [(0, 1), ("max", 1), (3000, 1)])],
}
FILES = {"smollm2": fetch.smollm2_path, "gemma3": fetch.gemma3_path}


# --- llama.cpp through ctypes (optional) ------------------------------------------------------

class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ggml_base_path() -> Path | None:
    """Where libggml-base is: $GGML_BASE_LIB (a llama.cpp build of one's own), else the
    llama_cpp package's copy; None when neither exists."""
    import os
    if os.environ.get("GGML_BASE_LIB"):
        return Path(os.environ["GGML_BASE_LIB"])
    try:
        import llama_cpp
    except Exception:
        return None
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    return path if path.exists() else None


def _libggml():
    """libggml-base from llama-cpp-python (or the file $GGML_BASE_LIB names), or None."""
    path = ggml_base_path()
    if path is None:
        return None
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


def ggml_dequantizer(name: str):
    """llama.cpp's own dequantize for a type: fn(uint8 blocks) -> float32 (n_weights,), or None
    when llama-cpp-python is missing.  F32 is a plain view."""
    lib = _libggml()
    if lib is None:
        return None
    t = qtype(name)
    if name == "F32":
        return lambda blocks: np.frombuffer(np.ascontiguousarray(blocks), np.float32).copy()
    if name == "Q8_K":  # no to_float in its traits, but the function is exported
        fn = _ROW_FN(ctypes.cast(lib.dequantize_row_q8_K, ctypes.c_void_p).value)
    else:
        fn = _ROW_FN(lib.ggml_get_type_traits(t.id).contents.to_float)

    def run(blocks):
        b = np.ascontiguousarray(blocks, dtype=np.uint8)
        k = b.size // t.type_size * t.block_size
        y = np.empty(k, np.float32)
        fn(b.ctypes.data, y.ctypes.data, k)
        return y
    run.lib = lib
    return run


def ggml_quantize(name: str, x: np.ndarray) -> np.ndarray | None:
    """llama.cpp's quantization of float32 rows (no importance vector), or None if unavailable."""
    lib = _libggml()
    if lib is None:
        return None
    t = qtype(name)
    x = np.ascontiguousarray(x, np.float32).reshape(1, -1)
    out = np.zeros(t.row_bytes(x.shape[1]), np.uint8)
    if name == "Q8_K":  # ggml_quantize_chunk refuses it; its reference row quantizer is exported
        lib.quantize_row_q8_K_ref(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data),
                                  ctypes.c_int64(x.shape[1]))
    elif name == "F32":
        out[:] = x.view(np.uint8).ravel()
    else:
        lib.ggml_quantize_chunk(t.id, x.ctypes.data, out.ctypes.data, 0, 1, x.shape[1], None)
    return out


# --- inputs for the types the files do not hold -----------------------------------------------

def _inputs(name: str) -> list[np.ndarray]:
    """Fixed float32 inputs, one array per vector (whole blocks)."""
    t = qtype(name)
    rng = np.random.default_rng(20251123 + t.id)
    if not t.is_quantized:
        special = np.array([0.0, -0.0, 1.0, -2.5, np.pi, 65504.0, 6e-8, -1e-40, 1 / 3, 1e30,
                            1.00048828125, 1.0009765625, 0.1, -0.02, 3.0e-5, 7.0], np.float32)
        if name == "F16":
            special[9] = -60000.0  # keep F16 finite
        return [special[:8], special[8:]]
    n = t.block_size
    gauss = (rng.standard_normal(n) * 0.02).astype(np.float32)
    outlier = (rng.standard_normal(n) * 0.02).astype(np.float32)
    outlier[rng.integers(0, n, 2)] *= 25  # a couple of large weights
    skewed = (np.abs(rng.standard_normal(n)) * 0.01 + 0.003).astype(np.float32)  # all positive
    return [gauss, outlier, skewed, np.zeros(n, np.float32)]


def _quantize(name: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    try:
        import blockq
        return blockq.quantize(x.reshape(1, -1), name).ravel(), "blockq.quantize"
    except Exception as err:  # the quantizers may not cover the type yet
        g = GGMLQuantizationType[name]
        try:
            b = gq.quantize(x.reshape(1, -1), g)
        except NotImplementedError:
            raise SystemExit(f"{name}: blockq.quantize failed ({err}) and gguf-py cannot "
                             f"quantize it either") from err
        return np.ascontiguousarray(b).view(np.uint8).ravel(), "gguf.quants.quantize"


# --- expected values --------------------------------------------------------------------------

def _expected(name: str, blocks: np.ndarray) -> tuple[np.ndarray, str]:
    try:
        y = gq.dequantize(blocks.reshape(1, -1), GGMLQuantizationType[name])
        return np.asarray(y, np.float32).ravel(), "gguf.quants.dequantize"
    except NotImplementedError:
        return dequantize_blocks_ref(blocks, name).ravel(), "blockq.dequantize_blocks_ref"


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _vector(name, blocks, inputs=None, **where) -> dict:
    blocks = np.ascontiguousarray(blocks, np.uint8).ravel()
    t = qtype(name)
    want, expected_from = _expected(name, blocks)
    ggml = ggml_dequantizer(name)
    checked = []
    if ggml is not None:
        got = ggml(blocks)
        if not np.array_equal(_bits(got), _bits(want)):
            raise SystemExit(f"{name} {where}: llama.cpp and {expected_from} disagree")
        checked.append("llama.cpp")
    v = dict(where)
    v["n_blocks"] = blocks.size // t.type_size
    v["expected_from"] = expected_from
    v["checked_with"] = checked
    if inputs is not None:
        v["input"] = [float(f) for f in np.asarray(inputs, np.float32)]
        same = ggml_quantize(name, inputs)
        if same is not None:
            v["llama_cpp_same_bytes"] = bool(np.array_equal(same, blocks))
    v["block_hex"] = blocks.tobytes().hex()
    v["dequantized"] = [float(f) for f in want]
    return v


def _file_vectors(name: str, readers: dict) -> list[dict]:
    t = qtype(name)
    vectors = []
    for file_key, tensor_name, runs in FROM_FILES[name]:
        reader = readers.setdefault(file_key, GGUFReader(FILES[file_key]()))
        tensor = next(x for x in reader.tensors if x.name == tensor_name)
        assert tensor.tensor_type.name == name, (tensor_name, tensor.tensor_type.name)
        blocks = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1, t.type_size)
        for first, count in runs:
            if first == "max":  # the block holding the largest |weight| of the tensor
                w = dequantize_blocks_ref(blocks, name)
                first = int(np.argmax(np.abs(w).max(axis=1)))
            vectors.append(_vector(name, blocks[first:first + count],
                                   source=Path(FILES[file_key]()).name, tensor=tensor_name,
                                   first_block=first))
    return vectors


def build(name: str, readers: dict) -> dict:
    t = qtype(name)
    doc = {"type": name, "ggml_id": t.id, "block_size": t.block_size, "type_size": t.type_size,
           "generator": "tools/make_vectors.py"}
    if name in FROM_FILES:
        doc["vectors"] = _file_vectors(name, readers)
    else:
        doc["vectors"] = []
        for x in _inputs(name):
            blocks, how = _quantize(name, x)
            doc["vectors"].append(_vector(name, blocks, inputs=x, source=how))
    return doc


def _dumps(doc: dict) -> str:
    """JSON with one line per top-level key and per vector (diffs stay readable)."""
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()
                      if k != "vectors")
    vecs = ",\n".join("  " + json.dumps(v) for v in doc["vectors"])
    return "{\n" + head + ',\n "vectors": [\n' + vecs + "\n ]\n}\n"


def check(path: Path) -> None:
    doc = json.loads(path.read_text())
    t = qtype(doc["type"])
    for i, v in enumerate(doc["vectors"]):
        blocks = np.frombuffer(bytes.fromhex(v["block_hex"]), np.uint8)
        want = np.array(v["dequantized"], np.float32)
        got = dequantize(blocks, t, (v["n_blocks"] * t.block_size,))
        if not np.array_equal(_bits(got), _bits(want)):
            raise SystemExit(f"{path.name} vector {i}: blockq.dequantize differs")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify existing files, write nothing")
    ap.add_argument("types", nargs="*", help="type names (default: all)")
    args = ap.parse_args(argv)
    names = [n.upper() for n in args.types] or [t.name for t in ALL if t.has("quantize") and not t.needs_imatrix]
    if args.check:
        for n in names:
            check(OUT / f"{n}.json")
        print(f"{len(names)} vector files agree with blockq.dequantize")
        return
    if _libggml() is None:
        print("llama-cpp-python not found: vectors are not cross-checked with llama.cpp",
              file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    readers: dict = {}
    for n in names:
        doc = build(n, readers)
        path = OUT / f"{n}.json"
        path.write_text(_dumps(doc))
        check(path)
        notes = {v.get("llama_cpp_same_bytes") for v in doc["vectors"]} - {None}
        print(f"{path.relative_to(ROOT)}: {len(doc['vectors'])} vectors, "
              f"{sum(v['n_blocks'] for v in doc['vectors'])} blocks"
              + (f", llama.cpp same bytes: {sorted(notes)}" if notes else ""))


if __name__ == "__main__":
    main()
