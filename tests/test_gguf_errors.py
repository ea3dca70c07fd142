"""Every malformed-file case raises FormatError naming the file, the byte offset and the problem.

Files are built by hand in memory (``gguf_bytes`` from test_gguf_reader); each row gives the
bytes, a fragment the message must contain, and the offset the error must point at.
"""
import numpy as np
import pytest

from blockq import FormatError, read_gguf
from blockq.gguf import ValueType as VT
from test_gguf_reader import arr, gguf_bytes, gstr, kv, ti, u32, u64

K = 24  # first metadata record: key length at 24, key "k" at 32, type at 33, value at 37
F32_ROW = np.zeros(32, "<f4").tobytes()  # 128 bytes: an F32 tensor of shape (32,)


CASES = [
    # (id, file bytes, message fragment, offset)
    ("bad magic", gguf_bytes(magic=b"GGUX"), "bad magic b'GGUX' at offset 0", 0),
    ("too short", b"GGUF\x03\x00", "shorter than the 24-byte GGUF header", 0),
    ("version 1", gguf_bytes(version=1), "GGUF version 1 at offset 4 is not supported", 4),
    ("version 4", gguf_bytes(version=4), "blockq reads versions 2 and 3", 4),
    ("big endian", gguf_bytes(version=3 << 24), "big-endian GGUF v3", 4),
    ("kv count", gguf_bytes(n_kv=10**6), "metadata count 1000000 at offset 16 cannot fit", 16),
    ("tensor count", gguf_bytes(n_tensors=2**64 - 1), "tensor count 18446744073709551615 at "
                                                       "offset 8 cannot fit", 8),
    ("key length", gguf_bytes([u64(1000) + b"k" + u32(4) + u32(1)]),
     "key of metadata record 0 at offset 24 claims 1000 bytes", K),
    ("empty key", gguf_bytes([kv("", VT.UINT8, b"\x01")]), "has an empty key", K),
    ("key utf8", gguf_bytes([kv(b"\xff\xfe", VT.UINT8, b"\x01")]), "is not valid UTF-8", K),
    ("value type", gguf_bytes([kv("k", 13, u32(0))]),
     "value type of k at offset 33 is 13, not a GGUF value type", 33),
    ("string past end", gguf_bytes([kv("k", VT.STRING, u64(500) + b"abc")]),
     "string value of k at offset 37 claims 500 bytes", 37),
    ("scalar past end", gguf_bytes([kv("k", VT.UINT64, b"\x01\x02")], alignment=1),
     "UINT64 value of k needs 8 bytes at offset 37 but the file ends at 39", 37),
    ("array elem type", gguf_bytes([kv("k", VT.ARRAY, arr(99, 1, b"\0"))]),
     "element type of array k at offset 37 is 99", 37),
    ("array count", gguf_bytes([kv("k", VT.ARRAY, arr(VT.UINT32, 10**6, u32(1)))]),
     "array k at offset 37 claims 1000000 UINT32 elements", 37),
    ("string array past end", gguf_bytes([kv("k", VT.ARRAY,
                                             arr(VT.STRING, 2, gstr("ab") + u64(40) + b"x"))]),
     "string k[1] at offset 59 claims 40 bytes", 59),
    ("nesting", gguf_bytes([kv("k", VT.ARRAY, arr(VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(
        VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(
            VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(VT.UINT8, 1, b"\0")))))))))))]),
     "nests deeper than 8 levels", 37 + 8 * 12),
    ("duplicate key", gguf_bytes([kv("k", VT.UINT8, b"\x01"), kv("k", VT.UINT8, b"\x02")]),
     "duplicate metadata key 'k' at offset 38 (first at offset 24)", 38),
    ("alignment type", gguf_bytes([kv("general.alignment", VT.INT32, u32(32))]),
     "general.alignment at offset 24 is INT32; it must be UINT32", K),
    ("alignment value", gguf_bytes([kv("general.alignment", VT.UINT32, u32(48))]),
     "general.alignment at offset 53 is 48; it must be a power of two", 53),
    ("zero dimension", gguf_bytes(tis=[ti("t", [32, 0], 0, 0)], data=F32_ROW),
     "tensor t dimension 1 at offset 45 is 0", 45),
    ("dimension over int64", gguf_bytes(tis=[ti("t", [2**63], 0, 0)], data=F32_ROW),
     "tensor t dimension 0 at offset 37 is 9223372036854775808", 37),
    ("too many dims", gguf_bytes(tis=[ti("t", [1, 1, 1, 1, 1], 0, 0)], data=F32_ROW),
     "tensor t at offset 24 has 5 dimensions at offset 33", 33),
    ("no dims", gguf_bytes(tis=[gstr("t") + u32(0) + u32(0) + u64(0) + u64(0)], data=F32_ROW),
     "has 0 dimensions", 33),
    ("product overflow", gguf_bytes(tis=[ti("t", [2**32, 2**32], 0, 0)], data=F32_ROW),
     "at offset 37 have a product 18446744073709551616 that overflows int64", 37),
    ("partial block", gguf_bytes(tis=[ti("t", [33], 2, 0)], data=F32_ROW),
     "rows of 33 weights; Q4_0 needs a multiple of 32", K),
    ("misaligned", gguf_bytes(tis=[ti("t", [32], 0, 16)], data=F32_ROW * 2),
     "tensor t data offset 16 (stored at offset 49) is not a multiple of the alignment 32", 49),
    ("duplicate tensor", gguf_bytes(tis=[ti("t", [32], 0, 0), ti("t", [32], 0, 128)],
                                    data=F32_ROW * 2),
     "duplicate tensor name 't' at offset 57 (first at offset 24)", 57),
    ("overlap", gguf_bytes(tis=[ti("a", [32], 0, 0), ti("b", [32], 0, 96)], data=F32_ROW * 2),
     "tensor b at offset 192 overlaps tensor a (bytes 96..224)", 192),
    ("data past end", gguf_bytes(tis=[ti("blk.3.ffn_up.weight", [64, 2], 0, 0)],
                                 data=F32_ROW),
     "tensor blk.3.ffn_up.weight needs 512 bytes at offset 96 but the file ends at 224: "
     "truncated download?", 96),
    ("truncated infos", gguf_bytes(tis=[ti("t", [32], 0, 0)])[:56],
     "data offset of tensor t needs 8 bytes at offset 49 but the file ends at 56", 49),
]


@pytest.mark.parametrize("raw,fragment,offset", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_file(raw, fragment, offset):
    with pytest.raises(FormatError) as e:
        read_gguf(raw)
    msg = str(e.value)
    assert msg.startswith("<memory>: ") and fragment in msg, msg
    assert e.value.offset == offset and f"offset {offset}" in msg, msg


def test_error_names_the_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(gguf_bytes(version=7))
    with pytest.raises(FormatError, match=rf"^{p}: GGUF version 7 at offset 4"):
        read_gguf(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match=rf"^{empty}: file is 0 bytes"):
        read_gguf(empty)


def test_invalid_utf8_value_is_reported_on_access():
    f = read_gguf(gguf_bytes([kv("k", VT.STRING, gstr(b"ok\xff")),
                              kv("s", VT.ARRAY, arr(VT.STRING, 2, gstr("a") + gstr(b"\xc3")))]))
    with pytest.raises(FormatError, match="string k at offset 45 is not valid UTF-8"):
        f.metadata["k"]
    with pytest.raises(FormatError, match=r"string s\[1\] at offset \d+ is not valid UTF-8"):
        f.metadata["s"]


def test_counts_are_checked_before_allocating():
    # a 40-byte file claiming 2^60 array elements must fail fast, not try to allocate
    raw = gguf_bytes([kv("k", VT.ARRAY, arr(VT.STRING, 2**60, b""))], alignment=1)
    with pytest.raises(FormatError, match="claims 1152921504606846976 STRING elements"):
        read_gguf(raw)
    raw = gguf_bytes([kv("k", VT.ARRAY, arr(VT.ARRAY, 2**62, b""))], alignment=1)
    with pytest.raises(FormatError, match="claims 4611686018427387904 ARRAY elements"):
        read_gguf(raw)


@pytest.mark.realfile
def test_truncated_real_file(smollm2_file, tmp_path):
    cut = 50_000_000
    p = tmp_path / "cut.gguf"
    with open(smollm2_file, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(cut))
    with pytest.raises(FormatError) as e:
        read_gguf(p)
    assert str(e.value).startswith(f"{p}: tensor ")
    assert f"but the file ends at {cut}: truncated download?" in str(e.value)
    assert e.value.offset + 1 > 0
