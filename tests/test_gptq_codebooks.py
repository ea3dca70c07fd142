"""Error-compensated rounding on the codebook i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S,
IQ1_S, IQ1_M): groups of 8 weights share one code.

- the code view ``a * v`` and the packer invert the reference dequantizer, and gguf-py decodes
  packed codes at their places;
- the group search is exhaustive: it finds the brute-force optimum over every allowed codeword,
  sign pattern (even parity where only 7 bits are stored) and delta;
- GPTQ lowers the output error under H well below plain quantization on the same type;
- with a diagonal H each group gets, on plain quantization's scales, a code at least as good
  under H as plain quantization's own;
- the fp16 refit moves only d and never raises a row's error;
- optimized files read back in gguf-py as blockq decodes them, and llama.cpp's file layout
  (sizes, types) is kept.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

import blockq
from blockq import codebooks
from blockq.convert import convert
from blockq.dequantize import dequantize_blocks_ref
from blockq.errors import BadArgument
from blockq.imatrix import compute_imatrix
from blockq.model import Model
from blockq.quantize import vcodes
from blockq.quantize.gptq import (_SCALE_FIELDS, column_order, compensable, gptq_quantize,
                                  output_error, refit_scales)
from blockq.types import qtype

from test_gptq import _correlated
from test_gptq_iq4 import optimize_tiny
from test_imatrix import _Tok

BOOKS = list(vcodes.SPEC)
RNG = np.random.default_rng(23)


def _layer(rows: int, n_tokens: int, seed: int, cols: int = 512):
    X = _correlated(n_tokens, cols, seed=seed)
    return RNG.standard_normal((rows, cols)).astype(np.float32), (X.T @ X / len(X)).astype(
        np.float32)


def _random_blocks(name: str, n: int) -> np.ndarray:
    """Arbitrary bytes (every code and scale pattern) with small finite fp16 scales."""
    t = qtype(name)
    b = RNG.integers(0, 256, (n, t.type_size), dtype=np.uint8)
    d = RNG.uniform(0.001, 0.05, (n, 1)).astype(np.float16).view(np.uint8)
    if name == "IQ1_M":  # d lives in the top nibbles of the four scale words (bytes 48..55)
        sc = b[:, 48:56].copy().view("<u2")
        u = d.view("<u2")[:, 0]
        for k in range(4):
            sc[:, k] = (sc[:, k] & 0x0FFF) | (((u >> (4 * k)) & 0xF) << 12)
        b[:, 48:56] = sc.view(np.uint8)
    else:
        b[:, :2] = d
    return b


@pytest.mark.parametrize("name", BOOKS)
def test_code_view_and_packer_invert_the_reference(name):
    t = qtype(name)
    for b in (_random_blocks(name, 24),
              blockq.quantize(RNG.standard_normal((4, 512)).astype(np.float32), name,
                              imatrix=np.ones(512, np.float32)).reshape(-1, t.type_size)):
        idx, signs, neg = vcodes.codes_of(b, name)
        assert np.array_equal(vcodes.pack_codes(b, name, idx, signs, neg), b)  # exact inverse
        np.testing.assert_array_equal(vcodes.weight_scales(b, name)
                                      * vcodes.group_values(name, idx, signs, neg),
                                      dequantize_blocks_ref(b, name))
    part, signed, parity, mode = vcodes.SPEC[name]
    n = len(b)
    size = len(codebooks.grid(name))
    idx = RNG.integers(0, size, (n, 32, 8 // part))
    signs = (codebooks.KSIGNS[RNG.integers(0, 128, (n, 32))] if parity
             else RNG.integers(0, 256, (n, 32))).astype(np.uint8) if signed \
        else np.zeros((n, 32), np.uint8)
    neg = RNG.integers(0, 2, (n, 32)).astype(np.uint8) if mode == "group" \
        else vcodes.codes_of(b, name)[2]  # IQ1_S: the delta sign belongs to the scale
    p = vcodes.pack_codes(b, name, idx, signs, neg)
    got = vcodes.codes_of(p, name)
    assert np.array_equal(got[0], idx) and np.array_equal(got[1], signs) \
        and np.array_equal(got[2], neg)
    # scales untouched, and the oracle decodes the new codes at their places
    a = vcodes.weight_scales(b, name)
    np.testing.assert_array_equal(vcodes.weight_scales(p, name), a)
    np.testing.assert_array_equal(gguf_dequantize(p, t.id).reshape(n, 256),
                                  a * vcodes.group_values(name, idx, signs, neg))
    with pytest.raises(BadArgument, match="codeword indices must lie in"):
        vcodes.pack_codes(b, name, np.full_like(idx, size), signs, neg)
    if parity:
        with pytest.raises(BadArgument, match="even number of negative weights"):
            vcodes.pack_codes(b, name, idx, np.ones_like(signs), neg)


def _candidates(name, mags):
    """Every allowed value vector of a group (numpy, exhaustive)."""
    part, signed, parity, _ = vcodes.SPEC[name]
    if not signed:
        return np.concatenate([mags + d for d in vcodes.delta_choices(name)])
    words = mags if part == 8 else np.array(
        [np.concatenate(p) for p in itertools.product(mags, mags)])
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    if parity:
        bits = bits[bits.sum(1) % 2 == 0]
    s = np.where(bits == 1, -1.0, 1.0)
    return (words[:, None, :] * s[None]).reshape(-1, 8)


def _cost(vals, x, M):
    D = vals - x
    return np.einsum("ij,jk,ik->i", D, M, D)


@pytest.mark.parametrize("name", BOOKS)
def test_group_search_finds_the_brute_force_optimum(name):
    """Under a diagonal loss the search is exhaustive; under a full one it re-ranks its best
    candidates, so it is never worse than the diagonal's choice, and exact where the candidates
    are all the values there are (IQ1: no signs)."""
    part, signed, parity, _ = vcodes.SPEC[name]
    full = vcodes.grid(name)
    v = np.empty(8)
    code = np.empty(4, np.int64)
    deltas = vcodes.delta_choices(name)
    for trial in range(40):
        # a subset keeps brute force small; on IQ1 (2 deltas) its 16 values are all re-ranked
        mags = full[RNG.choice(len(full), 10 if signed else vcodes.TOP_K // 2, replace=False)]
        x = RNG.standard_normal(8) * (20 if signed else 1)
        vals = _candidates(name, mags.astype(np.float64))
        Md = np.diag(np.exp(RNG.standard_normal(8)))
        c = vcodes.best_group(x, Md, mags, part, signed, parity, deltas, v, code)
        assert c == pytest.approx(_cost(vals, x, Md).min(), rel=1e-9, abs=1e-9), (name, trial)
        assert _cost(v[None], x, Md)[0] == pytest.approx(c, rel=1e-9, abs=1e-9)
        if signed:  # the reported sign byte is the one of v, with even parity where required
            bits = np.unpackbits(np.uint8(code[2]), bitorder="little")
            assert np.array_equal(bits == 1, v < 0)
            assert not parity or bits.sum() % 2 == 0
        A = RNG.standard_normal((8, 8))
        M = A @ A.T + 0.5 * np.eye(8)  # a full positive-definite loss
        v_diag = v.copy()
        vcodes.best_group(x, np.diag(np.diag(M)), mags, part, signed, parity, deltas, v_diag,
                          code)
        c = vcodes.best_group(x, M, mags, part, signed, parity, deltas, v, code)
        assert _cost(v[None], x, M)[0] == pytest.approx(c, rel=1e-9)
        assert c <= _cost(v_diag[None], x, M)[0] * (1 + 1e-12)
        if not signed:
            assert c == pytest.approx(_cost(vals, x, M).min(), rel=1e-9), (name, trial)


def test_codebook_rounding_order_keeps_each_group_together():
    d = np.exp(RNG.standard_normal(512))
    o = column_order(np.diag(d), 256, 8)
    assert sorted(o) == list(range(512))
    g = o.reshape(-1, 8)
    assert (np.diff(g, axis=1) == 1).all() and (g[:, 0] % 8 == 0).all()
    assert set(o[:256] // 256) == {o[0] // 256}  # whole blocks first
    energy = d.reshape(-1, 8).sum(1)[g[:32, 0] // 8]
    assert (np.diff(energy) <= 0).all()  # groups of a block by falling energy


@pytest.mark.parametrize("name", BOOKS)
def test_gptq_lowers_the_output_error_below_plain_quantization(name):
    assert compensable(name)
    W, H = _layer(48, 2048, seed=5)
    plain = blockq.dequantize(blockq.quantize(W, name, imatrix=np.diag(H).astype(np.float32)),
                              name, W.shape)
    e_plain = output_error(W, plain, H)
    for refit in (False, True):
        g = gptq_quantize(W, name, H, refit=refit)
        assert g.shape == (48, qtype(name).row_bytes(512)) and g.dtype == np.uint8
        e = output_error(W, blockq.dequantize(g, name, W.shape), H)
        assert e < 0.75 * e_plain, (name, refit, e / e_plain)


@pytest.mark.parametrize("name", BOOKS)
def test_a_diagonal_hessian_gives_each_group_a_code_at_least_as_good(name):
    """Nothing to propagate: every block gets plain quantization's scales, and each group's code
    must be at least as good under H as the plain quantizer's code on those scales."""
    t = qtype(name)
    h = np.exp(RNG.standard_normal(512))
    W = RNG.standard_normal((8, 512)).astype(np.float32)
    g = gptq_quantize(W, name, np.diag(h), damp=0.0, refit=False).reshape(-1, t.type_size)
    imp = (h / h.mean()).astype(np.float32)
    p = np.concatenate([blockq.quantize(W[:, c:c + 256], name, imatrix=imp[c:c + 256])
                        for c in (0, 256)], axis=1).reshape(-1, t.type_size)
    a = vcodes.weight_scales(p, name)
    np.testing.assert_array_equal(vcodes.weight_scales(g, name), a)  # the same scales
    x = W.reshape(8, 2, 256).reshape(16, 256)
    hw = np.tile(h.reshape(2, 256), (8, 1))
    def group_err(blocks):
        D = x.astype(np.float64) - dequantize_blocks_ref(blocks, name)
        return (hw * D * D).reshape(16, 32, 8).sum(-1)

    eg, ep = group_err(g), group_err(p)
    assert (eg <= ep * (1 + 1e-5) + 1e-12).all(), name
    assert eg.sum() < ep.sum(), name


@pytest.mark.parametrize("name", [n for n in BOOKS if n in _SCALE_FIELDS])
def test_scale_refit_moves_only_d_and_never_raises_the_error(name):
    t = qtype(name)
    W, H = _layer(24, 1024, seed=3)
    g = gptq_quantize(W, name, H, refit=False)
    r = refit_scales(g, t, W, H, None)
    rb, gb = r.reshape(-1, t.type_size), g.reshape(-1, t.type_size)
    assert np.array_equal(rb[:, 2:], gb[:, 2:])  # every byte but the fp16 d
    assert (rb[:, :2] != gb[:, :2]).any(axis=1).mean() > 0.5  # most d did move
    def per_row(blocks):
        D = W.astype(np.float64) - blockq.dequantize(blocks, name, W.shape)
        return np.einsum("ij,jk,ik->i", D, H.astype(np.float64), D)

    before, after = per_row(g), per_row(r)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < before.sum()


def test_iq1_m_has_no_refit_and_gptq_keeps_its_sub_scales():
    assert "IQ1_M" not in _SCALE_FIELDS  # its f16 d is spread over four scale words
    W, H = _layer(16, 1024, seed=4)
    a = gptq_quantize(W, "IQ1_M", H, refit=True)
    b = gptq_quantize(W, "IQ1_M", H, refit=False)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("preset", ["IQ2_M", "IQ2_XXS", "IQ1_M"])
def test_optimized_codebook_files_read_back_in_gguf_py(tmp_path, monkeypatch, preset):
    src, out, res, text, seen = optimize_tiny(tmp_path, monkeypatch, preset)
    im = compute_imatrix(Model.load(src), _Tok(), text, n_ctx=64)
    plain = convert(src, tmp_path / "p.gguf", preset, imatrix=im, warn=lambda s: None)
    assert res.types == plain.types  # llama-quantize's types (metadata keys differ)
    size = lambda path: {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}  # noqa: E731
    assert size(out) == size(tmp_path / "p.gguf")
    books = [n for n, ty in res.types.items() if ty in vcodes.SPEC and n != "token_embd.weight"]
    assert books and all(res.types[n] in seen for n in books)
    oracle = {t.name: gguf_dequantize(t.data, t.tensor_type) for t in GGUFReader(out).tensors}
    with blockq.read_gguf(out) as f:
        for name in books:
            t = f.tensors[name]
            np.testing.assert_array_equal(
                blockq.dequantize(t.data, t.qtype, t.shape).reshape(-1),
                np.asarray(oracle[name], np.float32).reshape(-1))
