"""The int8 tiled prompt matmul (blockq.kernels.cpu_int8_gemm) against the numpy reference.

Reference and tolerance as ``tests/test_int8.py``: :func:`blockq.testing.int8_reference`
(``dequantize(W) @ dequantize(Q8(x))`` in float64, Q4_1 / Q5_1 with Q8_1's f16 block sum), every
output within ``1e-5 * (|W| @ |x|)``.  Token counts include ones that are not a multiple of the
four tokens a pass takes, row counts ones that are not a multiple of the tile.
"""
import os
import sys

import numba
import numpy as np
import pytest

from blockq.kernels import cpu_isa
from blockq.testing import filled_blocks, int8_reference, random_blocks
from blockq.types import BY_NAME

pytestmark = pytest.mark.skipif(cpu_isa.isa() == "float",
                                reason="this CPU runs the float kernels only (no AVX2+FMA+F16C)")

RTOL = 1e-5
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


def _gemm():
    from blockq.kernels import cpu_int8_gemm
    return cpu_int8_gemm


def _variants():
    """The k-quant tile builds this machine can run: "ymm"; "zmm" with AVX-512 F + BW; "vnni"
    (zmm vpdpbusd, lane-order tiles) where the process runs the avx512vnni variant."""
    from blockq.kernels.cpu_isa import host_features
    f = host_features()
    zmm = bool(f.get("avx512f") and f.get("avx512bw"))
    return ["ymm"] + (["zmm"] if zmm else []) + \
        (["vnni"] if zmm and cpu_isa.isa() == "avx512vnni" else [])


@pytest.fixture(params=_variants() if cpu_isa.isa() != "float" else ["ymm"])
def variant(request, monkeypatch):
    monkeypatch.setattr(_gemm(), "ZMM", request.param != "ymm")
    monkeypatch.setattr(_gemm(), "VNNI512", request.param == "vnni")
    return request.param


def check_gemm(name, w, X, threads=1):
    w = np.ascontiguousarray(w).view()  # (rows, row_bytes)
    w.flags.writeable = False
    X = np.ascontiguousarray(X, np.float32)
    out = np.full((X.shape[0], w.shape[0]), np.nan, np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _gemm().product(name, w, X, out)
    finally:
        numba.set_num_threads(old)
    ref, bound = int8_reference(name, w, X)
    err = np.abs(out - ref)
    worst = np.unravel_index(np.argmax(err - RTOL * bound), err.shape)
    assert np.all(err <= RTOL * bound + 1e-30), \
        f"{name}: output {worst} is {out[worst]}, reference {ref[worst]}"
    return out


def test_zmm_only_where_the_host_has_it(monkeypatch):
    """The zmm tiles are chosen only with AVX-512 F + BW, and never when another variant is
    forced (BLOCKQ_ISA=avx2 times the 32-byte kernels alone)."""
    g = _gemm()
    avx512 = dict(avx2=True, fma=True, f16c=True, avx512f=True, avx512bw=True)
    for feats, forced, want in [(avx512, "", True), (avx512, "avx2", False),
                                (dict(avx512, avx512bw=False), "", False)]:
        monkeypatch.setattr(g, "host_features", lambda feats=feats: feats)
        monkeypatch.setenv("BLOCKQ_ISA", forced)
        assert g._zmm_ok() is want, (feats, forced)


def test_covers_every_int8_type():
    from blockq.kernels import cpu_int8
    # every type of the int8 table: IQ4_NL in every tile build (a signed type, as Q8_0), IQ4_XS
    # in the VNNI k-quant tile only
    assert set(_gemm().UNPACK) == set(TYPES) | {"IQ4_XS"} == set(cpu_int8.KERNELS)
    want = set(TYPES) | ({"IQ4_XS"} if _gemm().VNNI512 else set())
    assert _gemm().PROMPT_TYPES == want


needs_vnni = pytest.mark.skipif("vnni" not in (_variants() if cpu_isa.isa() != "float" else []),
                                reason="the IQ4_XS prompt tile needs the avx512vnni variant")


@needs_vnni
@pytest.mark.parametrize("rows, cols, n, threads", [
    (1, 256, 4, 1), (37, 512, 5, 1), (16, 768, 8, 1), (70, 512, 13, 2), (33, 256, 130, 2)])
def test_gemm_iq4_xs_random_blocks(rows, cols, n, threads, rng):
    """IQ4_XS in the VNNI k-quant tile: grid values + 128 as unsigned codes, offset 128."""
    w = random_blocks("IQ4_XS", rows * cols // 256, rng, scales=0.05).reshape(rows, -1)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    X[1, :256] = 0
    check_gemm("IQ4_XS", w, X, threads)


@needs_vnni
def test_gemm_iq4_xs_extreme_codes(rng):
    """Every index at the grid's ends (-127, 113) and every scale at its ends, times
    activations at +-127: the int32 sums stay exact."""
    t = BY_NAME["IQ4_XS"]
    for fill in (0xFF, 0x00, 0x80, 0x7F, 0xF0):
        w = filled_blocks(t, 19, fill)
        X = np.where(rng.random((6, 512)) < 0.5, -1.0, 1.0).astype(np.float32)
        check_gemm("IQ4_XS", w, X)
        check_gemm("IQ4_XS", w, np.abs(X))


def test_iq4_xs_prompt_tile_only_with_vnni(monkeypatch, rng):
    """Without the VNNI tile, IQ4_XS is not a prompt type and product refuses it in one line
    (the vpmaddubsw tiles would saturate on its unsigned codes)."""
    g = _gemm()
    monkeypatch.setattr(g, "VNNI512", False)
    w = random_blocks("IQ4_XS", 2, rng, scales=0.05).reshape(2, -1)
    w.flags.writeable = False
    with pytest.raises(ValueError, match="IQ4_XS prompt tiles need AVX-512 VNNI"):
        g.product("IQ4_XS", w, np.ones((4, 256), np.float32), np.empty((4, 2), np.float32))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows, cols, n, threads", [
    (1, 256, 4, 1), (37, 512, 5, 1), (16, 768, 8, 1), (70, 512, 13, 2), (33, 256, 130, 2)])
def test_gemm_random_blocks(name, rows, cols, n, threads, rng, variant):
    t = BY_NAME[name]
    w = random_blocks(name, rows * cols // t.block_size, rng, scales=0.05).reshape(rows, -1)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    X[1, :256] = 0  # an all-zero activation block
    check_gemm(name, w, X, threads)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"])
@pytest.mark.parametrize("cols", [32, 96, 608])
def test_gemm_legacy_odd_block_counts(name, cols, rng, variant):
    """Rows of an odd number of 32-weight blocks: the VNNI tiles pair blocks into 64-byte
    chunks, so the last one is padded; the padding must add nothing."""
    t = BY_NAME[name]
    w = random_blocks(name, 19 * cols // t.block_size, rng, scales=0.05).reshape(19, -1)
    check_gemm(name, w, rng.standard_normal((6, cols)).astype(np.float32), 2)


@pytest.mark.parametrize("name", TYPES)
def test_gemm_extreme_codes(name, rng, variant):
    """All-ones, all-zero and half bytes (largest codes: Q8_0 -1 / -128, Q6_K 63, Q3_K's
    offset, ...) against activations at +-127: no int16 saturation anywhere."""
    t = BY_NAME[name]
    for fill in (0xFF, 0x00, 0x80, 0x7F):
        w = filled_blocks(t, 19, fill)
        X = np.where(rng.random((6, 512)) < 0.5, -1.0, 1.0).astype(np.float32)
        check_gemm(name, w, X)
        check_gemm(name, w, np.abs(X))  # every code at +127: the largest pair sums


@pytest.mark.parametrize("name, fill", [("Q8_0", 0x00), ("Q4_0", 0x88), ("Q4_K", 0x00)])
def test_gemm_zero_weights_give_zero(name, fill):
    """Rows of zero weights with nonzero scales (codes at the offset, or zero codes and zero
    mins) give exactly 0: the sign trick and the min terms are exact in integers."""
    t = BY_NAME[name]
    w = np.full((5, 2 * t.type_size), fill, np.uint8)
    rec = w.reshape(-1, t.type_size).view(t.dtype)
    for f, dt, _ in t.fields:
        if dt == "<f2":
            rec[f] = np.float16(0.75)
    X = np.random.default_rng(3).standard_normal((7, 2 * t.block_size)).astype(np.float32)
    out = check_gemm(name, w, X)
    assert np.all(out == 0), out


@pytest.mark.realfile
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_1"])
def test_gemm_real_rows(name, smollm2_file, gemma3_file, variant):
    """80 rows of every real tensor of this type in both files, times real token embeddings."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_int8 import _embeddings

    from blockq.gguf.reader import read_gguf

    seen = 0
    for path in (smollm2_file, gemma3_file):
        with read_gguf(path) as f:
            for t in f.tensors.values():
                if t.qtype == name and len(t.shape) == 2:
                    w = np.array(t.data).reshape(t.shape[0], -1)[:80]
                    X = _embeddings(path, [17, 4242, 5, 99, 30000, 7], t.shape[1])
                    check_gemm(name, w, X, threads=2)
                    seen += 1
    assert seen


@pytest.mark.parametrize("name", ["Q5_0", "Q6_K"])
def test_qmatrix_prompts_take_the_tiles(name, rng, monkeypatch):
    """QMatrix.matmul of >= 4 tokens equals the tile kernel's output for the types it sends
    there, and stays within the bound either way."""
    from blockq.kernels.cpu_matvec import QMatrix

    t = BY_NAME[name]
    w = random_blocks(name, 40 * 512 // t.block_size, rng, scales=0.05)
    m = QMatrix(name, w, (40, 512))
    X = rng.standard_normal((9, 512)).astype(np.float32)
    ref, bound = int8_reference(name, m.data, X)
    for types in (frozenset(TYPES), frozenset()):
        monkeypatch.setattr(_gemm(), "PROMPT_TYPES", types)
        got = m.matmul(X)
        assert np.all(np.abs(got - ref) <= RTOL * bound)
        if types:
            out = np.empty_like(got)
            _gemm().product(name, m.data, X, out)
            assert np.array_equal(got, out)


@pytest.mark.parametrize("qtype, out_qtype", [("Q4_K", "Q6_K"), ("Q5_0", "Q8_0")])
def test_tiny_model_prompt_equals_token_by_token(tmp_path, qtype, out_qtype):
    """A 13-token prompt in one forward (int8 tiles) against the same tokens decoded one by one
    (int8 row dots): the same greedy tokens, logits within what 8-bit rounding allows (a
    last-bit difference may flip an activation code a layer later; bound as test_int8's)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_model import write_tiny

    from blockq.model import Model

    path = write_tiny(tmp_path / "t.gguf", qtype=qtype, tied=False, out_qtype=out_qtype)
    m = Model.load(path)
    assert m.blk[0].attn_q.weight.int8
    toks = [1, 5, 9, 30, 2, 77, 100, 3, 42, 8, 11, 200, 6]
    a = m.forward(toks, m.new_cache(32), "all")  # (13, n_vocab)
    cache = m.new_cache(32)
    b = np.concatenate([m.forward([t], cache) for t in toks])
    np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * np.abs(b).max())
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 12 / 13
