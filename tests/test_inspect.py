"""``blockq inspect``: plain and --json output on both real files, one block, stats, bad files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from blockq import read_gguf
from blockq.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    r = CliRunner().invoke(cli, ["inspect", *map(str, args)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.realfile
@pytest.mark.parametrize("which", ["smollm2_file", "gemma3_file"])
def test_json_matches_the_file(which, request):
    path = request.getfixturevalue(which)
    info = json.loads(_run(path, "--json"))
    with read_gguf(path) as f:
        assert (info["version"], info["alignment"], info["data_offset"], info["size"]) == \
            (f.version, f.alignment, f.data_offset, os.path.getsize(path))
        assert [m["key"] for m in info["metadata"]] == list(f.metadata)
        toks = next(m for m in info["metadata"] if m["key"] == "tokenizer.ggml.tokens")
        assert toks["type"] == "ARRAY[STRING]" and toks["count"] == len(f.metadata[
            "tokenizer.ggml.tokens"]) and len(toks["value"]) == 5
        assert toks["value"] == f.metadata["tokenizer.ggml.tokens"][:5]
        assert [t["name"] for t in info["tensors"]] == list(f.tensors)
        for d, t in zip(info["tensors"], f.tensors.values()):
            assert (d["type"], tuple(d["shape"]), d["offset"], d["bytes"]) == \
                (t.qtype, t.shape, t.offset, t.nbytes)
        weights = sum(t.n_elements for t in f.tensors.values())
    assert sum(d["bytes"] for d in info["totals"]) == info["tensor_bytes"]
    assert sum(d["weights"] for d in info["totals"]) == info["weights"] == weights
    assert info["bits_per_weight"] == pytest.approx(8 * info["size"] / weights)
    for d in info["totals"]:
        assert d["bits_per_weight"] == pytest.approx(8 * d["bytes"] / d["weights"])


@pytest.mark.realfile
@pytest.mark.parametrize("which,expect", [
    ("smollm2_file", ["general.architecture", "'llama'", "[49152] '<|endoftext|>'",
                      "blk.29.ffn_up.weight", "Q4_1", "(49152, 576)", "totals per type"]),
    ("gemma3_file", ["gemma3.attention.sliding_window", "[262144] '<pad>', '<eos>'",
                     "token_embd.weight", "(262144, 640)", "Q6_K", "6.5625",
                     "bits per weight; whole file"]),
])
def test_plain_output(which, expect, request):
    out = _run(request.getfixturevalue(which))
    for fragment in expect:
        assert fragment in out, fragment


@pytest.mark.realfile
def test_block_fields_of_a_k_quant(gemma3_file):
    from gguf import GGMLQuantizationType, quants
    with read_gguf(gemma3_file) as f:
        t = next(t for t in f.tensors.values() if t.qtype == "Q4_K")
        raw = t.data[7 * 144:8 * 144].copy()
    d = json.loads(_run(gemma3_file, "--tensor", t.name, "--block", 7, "--json"))
    assert (d["tensor"], d["block"], d["type"], d["offset"]) == (t.name, 7, "Q4_K",
                                                                 t.offset + 7 * 144)
    assert len(d["scales"]) == len(d["mins"]) == 8 and len(d["q"]) == 256
    assert all(0 <= s < 64 for s in d["scales"] + d["mins"]) and 0 <= min(d["q"]) <= max(
        d["q"]) <= 15
    assert d["scale_values"] == pytest.approx([d["d"] * s for s in d["scales"]], rel=1e-6)
    ref = quants.dequantize(raw, GGMLQuantizationType.Q4_K).reshape(-1)  # gguf-py oracle
    np.testing.assert_array_equal(np.float32(d["values"]), ref)
    out = _run(gemma3_file, "--tensor", t.name, "--block", 7)
    assert f"{t.name} block 7 (Q4_K, 256 weights in 144 bytes" in out and "mins [8]:" in out


@pytest.mark.realfile
def test_stats(smollm2_file):
    d = json.loads(_run(smollm2_file, "--tensor", "output_norm.weight", "--stats", "--json"))
    (entry,) = d["tensors"]
    with read_gguf(smollm2_file) as f:
        x = f.tensors["output_norm.weight"].data.view(np.float32).astype(np.float64)
    s = entry["stats"]
    assert (s["min"], s["max"]) == (x.min(), x.max())
    assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std())


def _main(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]))
    return subprocess.run([sys.executable, "-c", "from blockq.cli import main; main()",
                           "inspect", *map(str, args)], capture_output=True, text=True, env=env)


def test_bad_file_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x09\x00\x00\x00" + bytes(16))
    r = _main(bad)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"error: {bad}: GGUF version 9 at offset 4 is not supported: blockq " \
                       f"reads versions 2 and 3\n"


def test_unknown_tensor_and_block_out_of_range(tmp_path):
    from blockq.gguf import write_gguf
    p = tmp_path / "t.gguf"
    write_gguf(p, {"general.name": "t"}, [("blk.0.w", "Q8_0", (2, 32), bytes(68))])
    r = _main(p, "--tensor", "blk.0.x", "--block", 0)
    assert r.returncode == 1 and "has no tensor named 'blk.0.x'" in r.stderr
    assert "did you mean blk.0.w" in r.stderr
    r = _main(p, "--tensor", "blk.0.w", "--block", 2)
    assert r.returncode == 1 and "block index 2 is out of range 0..1" in r.stderr
    out = json.loads(_run(p, "--tensor", "blk.0.w", "--block", 1, "--json"))
    assert out["q"] == [0] * 32 and out["d"] == 0.0


def _mixed_file(tmp_path):
    """A hand-built file: an F32 tensor, a removed type (Q4_0_4_4, id 31), an id nobody knows
    (99), and a Q8_0 tensor after them."""
    from test_gguf_reader import gguf_bytes, ti
    tis = [ti("a", [8], 0, 0), ti("packed", [64], 31, 32), ti("future", [16], 99, 96),
           ti("b", [32], 8, 128)]
    data = np.arange(8, dtype=np.float32).tobytes() + bytes(24)  # a, padded to 32
    data += bytes(range(64)) + bytes(range(32)) + bytes(2) + bytes(range(32))
    p = tmp_path / "mixed.gguf"
    p.write_bytes(gguf_bytes(tis=tis, data=data))
    return p


def test_inspect_lists_tensors_of_types_it_cannot_decode(tmp_path):
    p = _mixed_file(tmp_path)
    info = json.loads(_run(p, "--json", "--stats"))
    got = {d["name"]: (d["type"], d["offset"] - info["data_offset"], d["bytes"])
           for d in info["tensors"]}
    assert got == {"a": ("F32", 0, 32), "packed": ("Q4_0_4_4 (id 31, cannot be decoded)", 32, 64),
                   "future": ("id 99 (cannot be decoded)", 96, 32), "b": ("Q8_0", 128, 34)}
    stats = {d["name"]: d["stats"] for d in info["tensors"]}
    assert stats["future"] is None and stats["a"]["max"] == 7.0
    text = _run(p, "--stats")
    assert "Q4_0_4_4 (id 31, cannot be decoded)" in text and "id 99 (cannot be decoded)" in text
    r = _main(p)
    assert r.returncode == 0 and "id 99 (cannot be decoded)" in r.stdout


def test_reading_an_undecodable_tensor_is_one_error(tmp_path):
    p = _mixed_file(tmp_path)
    with read_gguf(p) as f:
        assert not f.tensors["future"].decodable and f.tensors["b"].decodable
        assert f.tensors["a"].data.view(np.float32).tolist() == list(range(8))
        with pytest.raises(Exception, match="tensor future of .* has GGML type id 99 "
                                            r"\(cannot be decoded\), which blockq cannot decode"):
            f.tensors["future"].data
    r = _main(p, "--tensor", "packed", "--block", "0")
    assert r.returncode == 1 and r.stdout == ""
    assert "tensor packed" in r.stderr and "cannot decode" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
