"""blockq.gguf.reader: every value type, nested arrays, v2, alignment, zero-copy views, laziness,
and agreement with gguf-py (the oracle) on both real llama.cpp-written files.

Small files are built by hand here (``gguf_bytes``), independent of blockq's writer.
"""
import struct

import numpy as np
import pytest

from blockq import read_gguf
from blockq.errors import BadArgument
from blockq.gguf import ValueType as VT

# --- a tiny hand-written GGUF builder (shared with test_gguf_errors / test_gguf_fuzz) ---------


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def gstr(s):
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def kv(key, vtype, payload):
    """One metadata record: key, type tag, already-encoded value."""
    return gstr(key) + u32(vtype) + payload


def arr(elem, count, body):
    return u32(elem) + u64(count) + body


def ti(name, dims, type_id, offset):
    """One tensor info; ``dims`` in GGUF order (innermost first)."""
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(type_id) + u64(offset)


def gguf_bytes(kvs=(), tis=(), data=b"", *, version=3, magic=b"GGUF", n_kv=None, n_tensors=None,
               alignment=32):
    head = (magic + u32(version) + u64(len(tis) if n_tensors is None else n_tensors)
            + u64(len(kvs) if n_kv is None else n_kv))
    body = head + b"".join(kvs) + b"".join(tis)
    body += b"\0" * (-len(body) % alignment)
    return body + data


# --- every value type -------------------------------------------------------------------------
SCALARS = [  # (type, encoded payload, decoded value)
    (VT.UINT8, b"\xff", 255),
    (VT.INT8, b"\x80", -128),
    (VT.UINT16, struct.pack("<H", 65535), 65535),
    (VT.INT16, struct.pack("<h", -2), -2),
    (VT.UINT32, u32(4096), 4096),
    (VT.INT32, struct.pack("<i", -7), -7),
    (VT.FLOAT32, struct.pack("<f", 0.5), 0.5),
    (VT.BOOL, b"\x01", True),
    (VT.BOOL, b"\x00", False),
    (VT.STRING, gstr("héllo"), "héllo"),
    (VT.UINT64, u64(2**64 - 1), 2**64 - 1),
    (VT.INT64, struct.pack("<q", -2**63), -2**63),
    (VT.FLOAT64, struct.pack("<d", 1e-300), 1e-300),
]


@pytest.mark.parametrize("vtype,payload,value", SCALARS)
def test_scalar_value_types(vtype, payload, value):
    with read_gguf(gguf_bytes([kv("k", vtype, payload), kv("after", VT.UINT8, b"\x07")])) as f:
        assert f.metadata["k"] == value and type(f.metadata["k"]) is type(value)
        assert f.metadata.value_type("k") is vtype
        assert f.metadata.field("k").raw == payload
        assert f.metadata["after"] == 7  # the record after it starts where it should


ARRAYS = [  # (element type, numpy dtype or None, values)
    (VT.UINT8, "u1", [0, 255]), (VT.INT8, "i1", [-1, 1]), (VT.UINT16, "<u2", [1, 65535]),
    (VT.INT16, "<i2", [-3]), (VT.UINT32, "<u4", [1, 2, 3]), (VT.INT32, "<i4", [-1, 0, 1]),
    (VT.FLOAT32, "<f4", [0.25, -1.0]), (VT.UINT64, "<u8", [2**64 - 1]),
    (VT.INT64, "<i8", [-5]), (VT.FLOAT64, "<f8", [3.5]), (VT.INT32, "<i4", []),
]


@pytest.mark.parametrize("elem,dtype,values", ARRAYS)
def test_numeric_arrays_are_readonly_views(elem, dtype, values):
    body = np.array(values, dtype=dtype).tobytes()
    with read_gguf(gguf_bytes([kv("a", VT.ARRAY, arr(elem, len(values), body))])) as f:
        a = f.metadata["a"]
        assert a.dtype == np.dtype(dtype) and a.tolist() == values
        assert not a.flags.writeable
        fld = f.metadata.field("a")
        assert (fld.type, fld.elem_type, fld.count, fld.label) == \
            (VT.ARRAY, elem, len(values), f"ARRAY[{elem.name}]")


def test_bool_and_string_arrays():
    strings = ["a", "", "ünï", "x" * 300]
    body = b"".join(gstr(s) for s in strings)
    f = read_gguf(gguf_bytes([kv("b", VT.ARRAY, arr(VT.BOOL, 3, b"\x01\x00\x01")),
                              kv("s", VT.ARRAY, arr(VT.STRING, 4, body))]))
    assert f.metadata["b"].tolist() == [True, False, True]
    assert f.metadata["s"] == strings


def test_nested_arrays():
    inner1 = arr(VT.INT32, 2, struct.pack("<2i", 1, -2))
    inner2 = arr(VT.STRING, 1, gstr("z"))
    deeper = arr(VT.ARRAY, 1, arr(VT.UINT8, 1, b"\x09"))
    f = read_gguf(gguf_bytes([kv("n", VT.ARRAY, arr(VT.ARRAY, 3, inner1 + inner2 + deeper)),
                              kv("tail", VT.STRING, gstr("ok"))]))
    n = f.metadata["n"]
    assert n[0].tolist() == [1, -2] and n[1] == ["z"] and n[2][0].tolist() == [9]
    assert f.metadata["tail"] == "ok"
    typed = f.metadata.typed("n")
    assert typed.elem_type is VT.ARRAY
    assert [v.elem_type for v in typed.value] == [VT.INT32, VT.STRING, VT.ARRAY]


@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3(version):
    with read_gguf(gguf_bytes([kv("k", VT.UINT32, u32(1))], version=version)) as f:
        assert f.version == version and f.metadata["k"] == 1 and len(f.tensors) == 0


def _two_tensor_file(alignment=32):
    # F32 (2, 3) at relative 0 and Q8_0 (1, 32) at the next aligned offset
    f32 = np.arange(6, dtype="<f4").tobytes()  # 24 bytes
    q8 = bytes(range(34))
    second = -(-len(f32) // alignment) * alignment
    data = f32 + b"\0" * (second - len(f32)) + q8
    kvs = [kv("general.alignment", VT.UINT32, u32(alignment))] if alignment != 32 else []
    return gguf_bytes(kvs, [ti("w.f32", [3, 2], 0, 0), ti("w.q8", [32, 1], 8, second)], data,
                      alignment=alignment), f32, q8


@pytest.mark.parametrize("alignment", [32, 64, 8])
def test_tensors_shapes_offsets_and_alignment(alignment):
    raw, f32, q8 = _two_tensor_file(alignment)
    with read_gguf(raw) as f:
        assert f.alignment == alignment and f.data_offset % alignment == 0
        a, b = f.tensors["w.f32"], f.tensors["w.q8"]
        assert list(f.tensors) == ["w.f32", "w.q8"]
        assert (a.qtype, a.shape, a.dims, a.nbytes) == ("F32", (2, 3), (3, 2), 24)
        assert (b.qtype, b.shape, b.nbytes, b.bits_per_weight) == ("Q8_0", (1, 32), 34, 8.5)
        assert a.offset == f.data_offset and b.offset % alignment == 0
        assert a.data.tobytes() == f32 and b.data.tobytes() == q8
        assert b.blocks()["qs"].tolist() == [list(np.frombuffer(q8[2:], np.int8))]


def test_mmapped_data_is_zero_copy_and_outlives_close(tmp_path):
    raw, f32, _ = _two_tensor_file()
    p = tmp_path / "t.gguf"
    p.write_bytes(raw)
    f = read_gguf(p)
    view = f.tensors["w.f32"].data
    assert view.base is not None and not view.flags.writeable and not view.flags.owndata
    with f:
        pass
    assert f.closed
    assert view.tobytes() == f32  # the mapping lives as long as a view of it
    with pytest.raises(BadArgument, match="closed"):
        f.tensors["w.f32"].data


# --- real files, against gguf-py -------------------------------------------------------------
def _gguf_py_value(field):
    import gguf
    v = field.contents()
    if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.BOOL:
        v = [bool(x) for x in v]
    return v


@pytest.mark.realfile
def test_real_file_matches_gguf_py(smollm2_file):
    # gguf-py's reader parses every string eagerly (~40 s for Gemma's 262k vocabulary on a busy
    # machine), so the oracle runs on SmolLM2; Gemma is checked structurally below.
    import gguf
    path = smollm2_file
    ref = gguf.GGUFReader(path)
    with read_gguf(path) as f:
        assert f.version == 3 and f.alignment == ref.alignment
        assert f.data_offset == ref.data_offset
        ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == ref_keys
        for k in ref_keys:
            rf = ref.fields[k]
            fld = f.metadata.field(k)
            assert [fld.type] + ([fld.elem_type] if fld.elem_type is not None else []) == \
                [VT(int(t)) for t in rf.types], k
            ours = f.metadata[k]
            ours = ours.tolist() if isinstance(ours, np.ndarray) else ours
            assert ours == _gguf_py_value(rf), k
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t, r in zip(f.tensors.values(), ref.tensors):
            assert t.qtype == r.tensor_type.name
            assert t.dims == tuple(int(d) for d in r.shape)
            assert (t.offset, t.nbytes) == (r.data_offset, r.n_bytes)
        # zero-copy: the biggest tensor's view points into the same bytes gguf-py maps
        big = max(f.tensors.values(), key=lambda t: t.nbytes)
        rbig = next(r for r in ref.tensors if r.name == big.name)
        assert np.array_equal(big.data, rbig.data.reshape(-1).view(np.uint8))


@pytest.mark.realfile
def test_opening_gemma_does_not_decode_the_vocabulary(gemma3_file):
    with read_gguf(gemma3_file) as f:
        assert len(f.tensors) == 236
        assert f.metadata._cache == {}  # nothing decoded by opening
        fld = f.metadata.field("tokenizer.ggml.tokens")
        assert (fld.label, fld.count) == ("ARRAY[STRING]", 262144)
        toks = f.metadata["tokenizer.ggml.tokens"]
        assert len(toks) == 262144 and toks[2] == "<bos>"
        assert f.metadata["tokenizer.ggml.tokens"] is toks  # cached
        assert f.metadata["general.file_type"] == 15


@pytest.mark.realfile
def test_gemma_tensor_table(gemma3_file):
    from collections import Counter
    with read_gguf(gemma3_file) as f:
        counts = Counter(t.qtype for t in f.tensors.values())
        assert counts == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
        emb = f.tensors["token_embd.weight"]
        assert (emb.qtype, emb.shape) == ("Q8_0", (262144, 640))
        assert emb.nbytes == 262144 * 640 // 32 * 34
        # llama.cpp's layout: each tensor at the next aligned offset after the previous one
        expect = f.data_offset
        for t in f.tensors.values():
            assert t.offset == expect, t.name
            expect += -(-t.nbytes // f.alignment) * f.alignment
        assert expect == f.size
