"""blockq.imatrix: llama.cpp's GGUF and legacy .dat imatrix formats, the accumulator, the
calibration run over a tiny model, and the KL-divergence comparison.

Files "as llama-imatrix writes them" are built here independently: the GGUF one with gguf-py's
writer (keys, types and shapes from tools/imatrix/imatrix.cpp), the .dat one byte by byte.
"""
import struct

import numpy as np
import pytest

from blockq import FormatError
from blockq.imatrix import (Collector, Entry, Imatrix, chunks, compute_imatrix, kl_divergence,
                            read_imatrix, vectors_for, write_imatrix)
from tiny_model import write_tiny

RNG = np.random.default_rng(7)


def _sample() -> Imatrix:
    return Imatrix({"blk.0.attn_q.weight": Entry(RNG.random((1, 64), np.float32) * 50,
                                                 np.array([1024])),
                    "blk.0.ffn_down.weight": Entry(RNG.random((1, 128), np.float32) * 9,
                                                   np.array([1024]))},
                   ["calib.txt"], chunk_count=2, chunk_size=512)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_round_trip_keeps_the_importance(tmp_path, fmt):
    im = _sample()
    back = read_imatrix(write_imatrix(tmp_path / f"im.{fmt}", im))
    assert back.legacy == (fmt == "dat")
    assert back.datasets == ["calib.txt"] and back.chunk_count == 2
    assert back.chunk_size == (512 if fmt == "gguf" else 0)  # .dat does not store it
    for name in im.entries:
        np.testing.assert_allclose(back.importance(name), im.importance(name), rtol=1e-6)
        np.testing.assert_allclose(im.importance(name), im.entries[name].in_sum2[0] / 1024,
                                   rtol=1e-6)


def test_gguf_layout_is_llama_imatrix_s(tmp_path):
    gguf = pytest.importorskip("gguf")
    write_imatrix(tmp_path / "im.gguf", _sample())
    r = gguf.GGUFReader(tmp_path / "im.gguf")
    V = gguf.GGUFValueType
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].types == [V.ARRAY, V.STRING]
    assert r.fields["imatrix.chunk_count"].types == [V.UINT32]
    assert r.fields["imatrix.chunk_size"].types == [V.UINT32]
    got = [(t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in r.tensors]
    assert got == [("blk.0.attn_q.weight.in_sum2", "F32", [64, 1]),
                   ("blk.0.attn_q.weight.counts", "F32", [1, 1]),
                   ("blk.0.ffn_down.weight.in_sum2", "F32", [128, 1]),
                   ("blk.0.ffn_down.weight.counts", "F32", [1, 1])]


def test_reads_a_gguf_imatrix_written_by_another_writer(tmp_path):
    """Two experts, one of which saw no token: llama-quantize gives that one importance 1."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["a.txt", "b.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = np.arange(16, dtype=np.float32).reshape(2, 8)
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[4.0], [0.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(tmp_path / "x.gguf")
    assert im.datasets == ["a.txt", "b.txt"] and im.chunk_count == 3
    np.testing.assert_array_equal(im.importance("blk.0.ffn_up_exps.weight"),
                                  np.concatenate([np.arange(8) / 4, np.ones(8)]))


def test_reads_legacy_dat_bytes(tmp_path):
    vals = np.array([2.0, 4.0, 6.0], "<f4")
    raw = (struct.pack("<i", 1) + struct.pack("<i", 11) + b"blk.0.abc.w" + struct.pack("<ii", 2, 3)
           + vals.tobytes() + struct.pack("<i", 2) + struct.pack("<i", 5) + b"d.txt")
    (tmp_path / "x.dat").write_bytes(raw)
    im = read_imatrix(tmp_path / "x.dat")
    assert im.legacy and im.datasets == ["d.txt"] and im.chunk_count == 2
    np.testing.assert_array_equal(im.importance("blk.0.abc.w"), [1.0, 2.0, 3.0])  # / ncall
    # and we write exactly those bytes back
    assert write_imatrix(tmp_path / "y.dat", im).read_bytes() == raw


@pytest.mark.parametrize("content,text", [
    (b"", "truncated"),
    (struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 4), "truncated"),
    (struct.pack("<i", 0), "entries"),
    (struct.pack("<i", 1) + struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 1)
     + np.array([np.nan], "<f4").tobytes(), "non-finite"),
])
def test_bad_dat_files(tmp_path, content, text):
    (tmp_path / "x.dat").write_bytes(content)
    with pytest.raises(FormatError, match=text):
        read_imatrix(tmp_path / "x.dat")


def test_model_file_is_not_an_imatrix(tmp_path):
    p = write_tiny(tmp_path / "m.gguf", n_layer=1)
    with pytest.raises(FormatError, match="imatrix"):
        read_imatrix(p)


def test_collector_sums_squares_like_llama_imatrix():
    c = Collector(chunk_size=32)
    xs = [RNG.standard_normal((32, 8)).astype(np.float32) for _ in range(3)]
    for x in xs:
        c.add("blk.3.ffn_up.weight", x)
    c.add("blk.3.ffn_up.weight", np.ones((15, 8), np.float32))  # < 16 tokens: ignored
    c.add("output.weight", xs[0])  # only with process_output
    c.add("token_embd.weight", xs[0])  # never
    im = c.result(["t.txt"])
    assert list(im.entries) == ["blk.3.ffn_up.weight"] and im.chunk_count == 3
    e = im.entries["blk.3.ffn_up.weight"]
    np.testing.assert_allclose(e.in_sum2[0], sum((x.astype(np.float64) ** 2).sum(0) for x in xs),
                               rtol=1e-6)
    assert e.counts.tolist() == [96]


def test_vectors_for_reports_missing_and_wrong_length():
    im = _sample()
    got, warnings = vectors_for(im, {"blk.0.attn_q.weight": 64, "blk.0.ffn_down.weight": 256,
                                     "blk.0.attn_k.weight": 64})
    assert list(got) == ["blk.0.attn_q.weight"]
    assert len(warnings) == 2 and "attn_k" in warnings[0] and "ffn_down" in warnings[1]


def test_chunks_replace_the_first_token_with_bos():
    assert chunks(list(range(10)), 4, None, bos=99) == [[99, 1, 2, 3], [99, 5, 6, 7]]
    assert chunks(list(range(10)), 4, 1, bos=None) == [[0, 1, 2, 3]]


class _Tok:
    """A stand-in tokenizer: the text is already token ids."""
    add_bos, bos_id = False, None

    def encode(self, text, add_special=True):
        return [int(t) for t in text.split()]


def test_compute_imatrix_on_a_tiny_model(tmp_path):
    from blockq.model import Model
    import blockq

    path = write_tiny(tmp_path / "m.gguf", n_layer=2)
    m = Model.load(path)
    toks = RNG.integers(0, 260, 64)
    im = compute_imatrix(m, _Tok(), " ".join(map(str, toks)), n_ctx=32)
    assert im.chunk_count == 2 and im.chunk_size == 32
    assert len(im.entries) == 14 and all(e.counts.tolist() == [64] for e in im.entries.values())
    # q, k, v read the same normalized input; check it from the file's own weights
    with blockq.read_gguf(path) as f:
        emb = np.array(f.tensors["token_embd.weight"].data).view("<f4").reshape(-1, 256)
        g = np.array(f.tensors["blk.0.attn_norm.weight"].data).view("<f4")
    x = emb[toks].astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g
    for kind in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(im.entries[f"blk.0.{kind}.weight"].in_sum2[0],
                                   (h * h).sum(0), rtol=1e-4)
    assert im.entries["blk.1.ffn_down.weight"].n_cols == 512
    assert m.blk[0].attn_q.__class__.__name__ == "Linear"  # the observers are gone again


def test_kl_divergence_is_zero_for_the_same_model_and_positive_after_quantizing(tmp_path):
    from blockq.generate import perplexity
    from blockq.model import Model

    base = Model.load(write_tiny(tmp_path / "a.gguf", n_layer=2, tied=False))
    quant = Model.load(write_tiny(tmp_path / "b.gguf", n_layer=2, tied=False, qtype="Q4_0"))
    toks = RNG.integers(0, 260, 96).tolist()
    same = kl_divergence(base, base, toks, n_ctx=32)
    assert abs(same.kld) < 1e-9 and same.same_top == 1.0 and same.ppl_base == same.ppl_quant
    assert same.chunks == 3 and same.tokens == 3 * 15
    res = kl_divergence(base, quant, toks, n_ctx=32)
    assert res.kld > 1e-4 and res.same_top < 1.0
    ppl = perplexity(base, toks, n_ctx=32)
    assert res.ppl_base == pytest.approx(ppl.ppl, rel=1e-3)
    assert set(res.as_dict()) >= {"kld", "same_top", "ppl_base", "ppl_quant", "chunks"}


def test_cli_imatrix_then_kld(tmp_path, capsys):
    import json

    from blockq.cli import main

    write_tiny(tmp_path / "a.gguf", n_layer=1, tied=False)
    write_tiny(tmp_path / "b.gguf", n_layer=1, tied=False, qtype="Q8_0")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 6)
    main(["imatrix", str(tmp_path / "a.gguf"), "-f", str(text), "-o", str(tmp_path / "im.dat"),
          "-c", "64"])
    im = read_imatrix(tmp_path / "im.dat")
    assert im.legacy and len(im.entries) == 7 and im.datasets == [str(text)]
    capsys.readouterr()
    main(["kld", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "-f", str(text), "-c", "64",
          "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["chunks"] == 3 and 0 < res["kld"] < 0.05 and res["same_top"] > 0.8
