"""blockq.gguf.writer: round trips through gguf-py (the oracle), byte-identical rewrites of the
real files, metadata typing, file_type / quantization_version, the state machine, streaming
and atomic replacement."""
import gc
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from blockq import BadArgument, FormatError, read_gguf, write_gguf
from blockq.gguf import FileType, GGUFWriter, Value, ValueType as VT, WriterState
from blockq.types import ALL

# --- round trip: blockq writes, gguf-py reads ---------------------------------------------------
METADATA = {
    "general.architecture": "llama",
    "general.name": "tiny",
    "llama.context_length": 4096,
    "llama.rope.freq_base": 10000,  # an int for a FLOAT32 key
    "llama.attention.head_count": [4, 4, 2],  # per-layer list for a UINT32 key
    "tokenizer.ggml.tokens": ["<s>", "a", "é"],
    "tokenizer.ggml.scores": [0.0, -1.5, 2.0],
    "tokenizer.ggml.token_type": np.array([3, 1, 1]),
    "tokenizer.ggml.add_bos_token": True,
    "custom.u8": Value(VT.UINT8, 200),
    "custom.i8": Value(VT.INT8, -100),
    "custom.u16": Value(VT.UINT16, 60000),
    "custom.i16": Value(VT.INT16, -30000),
    "custom.i32": -5,
    "custom.u64": 2**63 + 5,
    "custom.i64": -2**40,
    "custom.f64": np.float64(1e-200),
    "custom.bools": [True, False],
    "custom.nested": [[1, 2], [3]],
    "custom.nested_typed": Value(VT.ARRAY, [Value(VT.ARRAY, ["x"], VT.STRING),
                                           Value(VT.ARRAY, [1.5], VT.FLOAT64)], VT.ARRAY),
    "custom.empty": Value(VT.ARRAY, [], VT.UINT32),
}
EXPECT_TYPES = {  # key -> gguf-py's types list
    "general.architecture": ["STRING"], "llama.context_length": ["UINT32"],
    "llama.rope.freq_base": ["FLOAT32"], "llama.attention.head_count": ["ARRAY", "UINT32"],
    "tokenizer.ggml.tokens": ["ARRAY", "STRING"], "tokenizer.ggml.scores": ["ARRAY", "FLOAT32"],
    "tokenizer.ggml.token_type": ["ARRAY", "INT32"], "tokenizer.ggml.add_bos_token": ["BOOL"],
    "custom.u8": ["UINT8"], "custom.i8": ["INT8"], "custom.u16": ["UINT16"],
    "custom.i16": ["INT16"], "custom.i32": ["INT32"], "custom.u64": ["UINT64"],
    "custom.i64": ["INT64"], "custom.f64": ["FLOAT64"], "custom.bools": ["ARRAY", "BOOL"],
    "custom.nested": ["ARRAY", "ARRAY", "INT32"],
    "custom.nested_typed": ["ARRAY", "ARRAY", "STRING"],  # gguf-py records the first inner type
    "custom.empty": ["ARRAY"],
    "general.quantization_version": ["UINT32"], "general.file_type": ["UINT32"],
}


def _tensors(rng):
    out = []
    for t in ALL:  # one tensor of every block type, two rows
        shape = (2, t.block_size * (2 if t.block_size > 1 else 64))
        nbytes = shape[0] * shape[1] // t.block_size * t.type_size
        out.append((f"t.{t.name}", t.name, shape, rng.integers(0, 256, nbytes, dtype=np.uint8)))
    out.append(("t.3d", "F32", (2, 3, 4), rng.standard_normal((2, 3, 4)).astype(np.float32)))
    return out


def test_round_trip_through_gguf_py(tmp_path, rng):
    import gguf
    path = tmp_path / "rt.gguf"
    tensors = _tensors(rng)
    write_gguf(path, METADATA, tensors)
    ref = gguf.GGUFReader(path)
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(METADATA) + ["general.quantization_version",
                                             "general.file_type"]
    for k, types in EXPECT_TYPES.items():
        assert [gguf.GGUFValueType(int(t)).name for t in fields[k].types] == types, k
    # (gguf-py's contents() assumes one element type throughout a nested array)
    got = {k: f.contents() for k, f in fields.items() if k != "custom.nested_typed"}
    assert got["tokenizer.ggml.tokens"] == ["<s>", "a", "é"]
    assert got["tokenizer.ggml.scores"] == [0.0, -1.5, 2.0]
    assert got["llama.rope.freq_base"] == 10000.0 and got["custom.u64"] == 2**63 + 5
    assert got["custom.nested"] == [1, 2, 3]  # gguf-py flattens nested arrays
    assert got["custom.f64"] == 1e-200 and got["custom.empty"] == []
    assert [t.name for t in ref.tensors] == [t[0] for t in tensors]
    for (name, qt, shape, data), r in zip(tensors, ref.tensors):
        assert r.tensor_type.name == qt
        assert tuple(int(d) for d in r.shape) == shape[::-1]
        assert r.data_offset % 32 == 0
        assert np.array_equal(r.data.reshape(-1).view(np.uint8),
                              np.ascontiguousarray(data).reshape(-1).view(np.uint8)), name
    # and blockq reads back the same values
    with read_gguf(path) as f:
        assert f.metadata["custom.nested"][1].tolist() == [3]
        assert f.metadata.typed("custom.nested_typed") == Value(
            VT.ARRAY, [Value(VT.ARRAY, ["x"], VT.STRING), Value(VT.ARRAY, f.metadata[
                "custom.nested_typed"][1], VT.FLOAT64)], VT.ARRAY)


@pytest.mark.parametrize("qt,dtype", [("F32", "<f4"), ("F16", "<f2")])
def test_float_arrays_for_float_types(tmp_path, rng, qt, dtype):
    x = rng.standard_normal((3, 64)).astype(np.float64)
    write_gguf(tmp_path / "f.gguf", {}, [("w", qt, x.shape, x)])
    with read_gguf(tmp_path / "f.gguf") as f:
        assert f.tensors["w"].data.tobytes() == x.astype(dtype).tobytes()


def test_bf16_from_floats_rounds_like_ggml(tmp_path):
    x = np.array([[1.0, 1.00390625, 1.01171875, -3.5] * 8], dtype=np.float32)
    write_gguf(tmp_path / "b.gguf", {}, [("w", "BF16", x.shape, x)])
    with read_gguf(tmp_path / "b.gguf") as f:
        got = f.tensors["w"].data.view("<u2")[:4].tolist()
    # round to nearest even on the upper half: 1.00390625 is a tie -> 1.0; 1.01171875 -> up
    assert got == [0x3F80, 0x3F80, 0x3F82, 0xC060]


# --- real files: byte-identical rewrites --------------------------------------------------------
def _same_bytes(a, b, chunk=1 << 24):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


@pytest.mark.realfile
@pytest.mark.parametrize("which", ["smollm2_file", "gemma3_file"])
def test_rewrite_real_file_byte_identical(which, request, tmp_path):
    src = request.getfixturevalue(which)
    out = tmp_path / "copy.gguf"
    with read_gguf(src) as f:
        write_gguf(out, f.metadata, f.tensors.values())
    assert _same_bytes(src, out)


@pytest.mark.realfile
@pytest.mark.parametrize("which", ["smollm2_file", "gemma3_file"])
def test_plain_values_get_llama_cpp_types(which, request, tmp_path):
    # decoded values (no types) re-encoded through the key table give the original records
    src = request.getfixturevalue(which)
    out = tmp_path / "meta.gguf"
    with read_gguf(src) as f:
        write_gguf(out, dict(f.metadata), [])
        with read_gguf(out) as g:
            assert list(g.metadata) == list(f.metadata)
            for k in f.metadata:
                a, b = f.metadata.field(k), g.metadata.field(k)
                assert (b.label, b.raw) == (a.label, a.raw), k


# --- metadata typing ----------------------------------------------------------------------------
TYPING = [  # (key, value, expected label)
    ("x.bool", True, "BOOL"), ("x.int", 5, "UINT32"), ("x.neg", -5, "INT32"),
    ("x.big", 2**40, "INT64"), ("x.huge", 2**64 - 1, "UINT64"), ("x.float", 0.5, "FLOAT32"),
    ("x.str", "s", "STRING"), ("x.bytes", b"\xff", "STRING"), ("x.ints", [1, 2], "ARRAY[INT32]"),
    ("x.bigints", [1, 2**40], "ARRAY[INT64]"), ("x.floats", [1, 0.5], "ARRAY[FLOAT32]"),
    ("x.strs", ("a", "b"), "ARRAY[STRING]"), ("x.bools", [True], "ARRAY[BOOL]"),
    ("x.np_u16", np.uint16(3), "UINT16"), ("x.np_f64", np.float64(2), "FLOAT64"),
    ("x.np_i64", np.array([1, 2], dtype=np.int64), "ARRAY[INT64]"),
    ("x.np_f32", np.zeros(2, np.float32), "ARRAY[FLOAT32]"),
    ("x.nested", [[1], ["a"]], "ARRAY[ARRAY]"),
    ("llama.context_length", 4096, "UINT32"), ("llama.attention.layer_norm_rms_epsilon", 1e-5,
                                               "FLOAT32"),
    ("llama.attention.head_count_kv", [1, 2], "ARRAY[UINT32]"),
    ("general.alignment", 64, "UINT32"), ("tokenizer.ggml.token_type", [1, 2], "ARRAY[INT32]"),
    ("tokenizer.ggml.scores", [0, 1], "ARRAY[FLOAT32]"),
    ("tokenizer.ggml.bos_token_id", 1, "UINT32"), ("tokenizer.ggml.add_eos_token", 0, "BOOL"),
    ("general.base_model.0.name", "b", "STRING"), ("general.base_model.count", 1, "UINT32"),
    ("x.typed", Value(VT.INT16, 7), "INT16"),
]


@pytest.mark.parametrize("key,value,label", TYPING, ids=[t[0] for t in TYPING])
def test_metadata_typing(tmp_path, key, value, label):
    write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama", key: value}, [])
    with read_gguf(tmp_path / "m.gguf") as f:
        assert f.metadata.field(key).label == label


BAD_VALUES = [  # (key, value, message fragment)
    ("x", Value(VT.UINT8, 300), "300 does not fit UINT8 (0..255)"),
    ("llama.context_length", "long", "UINT32 needs an integer, got str"),
    ("llama.context_length", -1, "-1 does not fit UINT32"),
    ("x", [], "an empty list has no element type"),
    ("x", [1, "a"], "a GGUF array holds one type"),
    ("x", Value(VT.ARRAY, [1, 300], VT.UINT8), "values 1..300 do not fit UINT8"),
    ("x", 2**64, "does not fit any GGUF integer type"),
    ("general.alignment", 48, "general.alignment 48 is not valid"),
    ("general.alignment", Value(VT.INT32, 32), "general.alignment must be UINT32"),
]


@pytest.mark.parametrize("key,value,fragment", BAD_VALUES)
def test_bad_metadata_values(tmp_path, key, value, fragment):
    with pytest.raises(FormatError, match=fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        write_gguf(tmp_path / "bad.gguf", {"general.architecture": "llama", key: value}, [])
    assert os.listdir(tmp_path) == []


# --- general.file_type and general.quantization_version -----------------------------------------
def _shapes(*types_and_ndims):
    return [(f"t{i}", q, (32,) * nd if q in ("F32", "F16") else (2, 256)[-nd:] if nd < 3 else
             (2, 2, 256), None) for i, (q, nd) in enumerate(types_and_ndims)]


GUESSES = [  # (tensor types and ndims, expected llama_ftype)
    ([("Q4_K", 2), ("Q4_K", 2), ("Q6_K", 2), ("F32", 1), ("F32", 1), ("F32", 1)],
     FileType.MOSTLY_Q4_K_M),
    ([("Q8_0", 2), ("F32", 1)], FileType.MOSTLY_Q8_0),
    ([("F32", 1)], FileType.ALL_F32),
    ([("Q6_K", 2), ("Q3_K", 2)], FileType.MOSTLY_Q6_K),  # tie: first to reach the top count
    ([("Q3_K", 3), ("Q5_K", 2), ("Q3_K", 2)], FileType.MOSTLY_Q3_K_M),
    ([("F16", 2)], FileType.MOSTLY_F16),
    ([("Q8_K", 2)], FileType.ALL_F32),  # no preset for Q8_K
]


@pytest.mark.parametrize("types,ftype", GUESSES)
def test_file_type_guess(tmp_path, types, ftype):
    tensors = []
    for i, (q, nd) in enumerate(types):
        from blockq.types import qtype
        t = qtype(q)
        shape = (2,) * (nd - 1) + (t.block_size * 32 if t.block_size == 1 else t.block_size,)
        nbytes = int(np.prod(shape)) // t.block_size * t.type_size
        tensors.append((f"t{i}", q, shape, bytes(nbytes)))
    write_gguf(tmp_path / "g.gguf", {"general.name": "g"}, tensors)
    with read_gguf(tmp_path / "g.gguf") as f:
        assert list(f.metadata) == ["general.name", "general.quantization_version",
                                    "general.file_type"]
        assert f.metadata["general.file_type"] == ftype
        assert f.metadata["general.quantization_version"] == 2


def test_present_keys_are_kept_in_place(tmp_path):
    md = {"general.file_type": 3, "general.quantization_version": 1, "general.name": "n"}
    write_gguf(tmp_path / "a.gguf", md, [("w", "Q4_K", (1, 256), bytes(144))])
    with read_gguf(tmp_path / "a.gguf") as f:
        assert dict(f.metadata) == md and list(f.metadata) == list(md)
    write_gguf(tmp_path / "b.gguf", md, [], file_type=FileType.MOSTLY_Q4_K_M)
    with read_gguf(tmp_path / "b.gguf") as f:
        assert list(f.metadata) == list(md) and f.metadata["general.file_type"] == 15


def test_alignment_argument(tmp_path, rng):
    tensors = [("a", "F32", (3,), np.ones(3, np.float32)), ("b", "Q8_0", (1, 32), bytes(34))]
    write_gguf(tmp_path / "a.gguf", {}, tensors, alignment=64)
    import gguf
    ref = gguf.GGUFReader(tmp_path / "a.gguf")
    assert ref.alignment == 64 and all(t.data_offset % 64 == 0 for t in ref.tensors)
    assert os.path.getsize(tmp_path / "a.gguf") % 64 == 0
    with pytest.raises(BadArgument, match="disagrees"):
        write_gguf(tmp_path / "c.gguf", {"general.alignment": 32}, [], alignment=64)


# --- the state machine --------------------------------------------------------------------------
def test_state_machine_refuses_out_of_order_calls(tmp_path):
    w = GGUFWriter(tmp_path / "s.gguf")
    assert w.state is WriterState.HEADER
    w.add_metadata("general.name", "s")
    assert w.state is WriterState.METADATA
    w.add_tensor_info("a", "F32", (4,))
    w.add_tensor_info("b", "F32", (4,))
    assert w.state is WriterState.TENSOR_INFOS
    with pytest.raises(BadArgument, match=r"add_metadata\(\) in state TENSOR_INFOS"):
        w.add_metadata("general.license", "x")
    with pytest.raises(BadArgument, match="next tensor due is 'a'"):
        w.write_tensor_data(bytes(16), name="b")
    w.write_tensor_data(bytes(16), name="a")
    assert w.state is WriterState.DATA
    with pytest.raises(BadArgument, match=r"add_tensor_info\(\) in state DATA"):
        w.add_tensor_info("c", "F32", (4,))
    with pytest.raises(BadArgument, match="finish.. after data for 1 of 2 tensors"):
        w.finish()
    with pytest.raises(FormatError, match="got 12 bytes of data but F32 of shape .4,. takes 16"):
        w.write_tensor_data(bytes(12))
    w.write_tensor_data(np.zeros(4, np.float32))
    assert w.finish() == tmp_path / "s.gguf" and w.state is WriterState.DONE
    with pytest.raises(BadArgument, match="after the writer is DONE"):
        w.add_metadata("x", 1)
    with read_gguf(tmp_path / "s.gguf") as f:
        assert list(f.tensors) == ["a", "b"]


BAD_INFOS = [  # (name, qtype, shape, error type, fragment)
    ("x" * 64, "F32", (4,), FormatError, "llama.cpp needs 1..63"),
    ("", "F32", (4,), FormatError, "llama.cpp needs 1..63"),
    ("w", "Q4_K", (2, 255), FormatError, "not whole Q4_K blocks of 256"),
    ("w", "F32", (0, 4), FormatError, "each at least 1"),
    ("w", "F32", (1, 1, 1, 1, 1), FormatError, "1..4 dimensions"),
    ("w", "F32", (2**32, 2**32), FormatError, "more than int64"),
    ("w", "IQ9", (4,), BadArgument, "unknown block type"),
]


@pytest.mark.parametrize("name,qt,shape,err,fragment", BAD_INFOS)
def test_bad_tensor_infos(tmp_path, name, qt, shape, err, fragment):
    w = GGUFWriter(tmp_path / "x.gguf")
    with pytest.raises(err, match=fragment):
        w.add_tensor_info(name, qt, shape)


def test_duplicates_refused(tmp_path):
    w = GGUFWriter(tmp_path / "d.gguf")
    w.add_metadata("k", 1)
    with pytest.raises(FormatError, match="added twice"):
        w.add_metadata("k", 2)
    w.add_tensor_info("t", "F32", (1,))
    with pytest.raises(FormatError, match="added twice"):
        w.add_tensor_info("t", "F32", (1,))


def test_quantized_type_refuses_floats(tmp_path):
    with pytest.raises(BadArgument, match="pass its encoded bytes"):
        write_gguf(tmp_path / "q.gguf", {}, [("w", "Q4_0", (1, 32), np.zeros(32))])


# --- streaming and atomicity ----------------------------------------------------------------
def test_callables_are_called_one_at_a_time_and_released(tmp_path):
    calls, alive = [], []

    def make(i):
        def data():
            gc.collect()
            # the previous tensor's array must already be gone: peak memory ~ one tensor
            assert all(r() is None for r in alive), f"tensor {i}: an earlier array is alive"
            calls.append(i)
            a = np.full(4096, i, dtype=np.float32)
            alive.append(weakref.ref(a))
            return a
        return data

    write_gguf(tmp_path / "s.gguf", {}, [(f"t{i}", "F32", (4096,), make(i)) for i in range(4)])
    assert calls == [0, 1, 2, 3]
    with read_gguf(tmp_path / "s.gguf") as f:
        assert [int(f.tensors[f"t{i}"].data.view(np.float32)[0]) for i in range(4)] == \
            [0, 1, 2, 3]


def test_failed_write_leaves_nothing_and_keeps_existing_file(tmp_path):
    dest = tmp_path / "m.gguf"

    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_gguf(dest, {}, [("a", "F32", (4,), bytes(16)), ("b", "F32", (4,), boom)])
    assert os.listdir(tmp_path) == []
    dest.write_bytes(b"precious")
    with pytest.raises(KeyboardInterrupt):
        def interrupt():
            raise KeyboardInterrupt
        write_gguf(dest, {}, [("a", "F32", (4,), interrupt)])
    assert os.listdir(tmp_path) == ["m.gguf"] and dest.read_bytes() == b"precious"
    with GGUFWriter(dest) as w:  # a clean context exit finishes and replaces
        w.add_tensor_info("a", "F32", (4,))
        w.write_tensor_data(bytes(16))
    assert read_gguf(dest).tensors["a"].nbytes == 16 and os.listdir(tmp_path) == ["m.gguf"]


def test_killed_writer_never_touches_destination(tmp_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"old")
    code = (
        "import os, signal, sys\n"
        "from blockq.gguf import write_gguf\n"
        "def die():\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_gguf(sys.argv[1], {'general.name': 'x'},\n"
        "           [('a', 'F32', (1024,), bytes(4096)), ('b', 'F32', (4,), die)])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    r = subprocess.run([sys.executable, "-c", code, str(dest)], env=env)
    assert r.returncode == -9
    assert dest.read_bytes() == b"old"
    leftovers = [p for p in os.listdir(tmp_path) if p != "m.gguf"]
    assert all(p.startswith(".m.gguf.") and p.endswith(".part") for p in leftovers)
