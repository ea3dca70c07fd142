"""Error-compensated rounding on the non-uniform 4-bit grids IQ4_NL and IQ4_XS.

- the grid view ``a * v[q] + b`` and the code packer invert blockq's reference dequantizer;
- GPTQ lowers the output error under H below plain quantization on the same grid;
- with a diagonal H (nothing to propagate) every weight gets its nearest table value on the
  scales plain quantization picks, each code in its place;
- the fp16 scale refit keeps every code and sub-block scale and never raises a row's error;
- optimized IQ4 files read back in gguf-py (the oracle) as blockq decodes them.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

import blockq
from blockq.calibrate import calibrate
from blockq.convert import convert
from blockq.dequantize import dequantize_blocks_ref, iq4_xs_scales
from blockq.errors import BadArgument
from blockq.model import Model
from blockq.quantize.codes import (code_range, codes_of, decode_codes, affine, expand,
                                   pack_codes, supported, values)
from blockq.quantize.gptq import gptq_quantize, output_error, refit_scales
from blockq.types import qtype

from test_gptq import _correlated
from test_imatrix import _Tok
from tiny_model import write_tiny

IQ4 = ["IQ4_NL", "IQ4_XS"]
RNG = np.random.default_rng(11)


def _layer(rows: int, n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random weights (rows, 512) and the float32 Hessian of correlated inputs (512, 512)."""
    X = _correlated(n_tokens, 512, seed=seed)
    return RNG.standard_normal((rows, 512)).astype(np.float32), (X.T @ X / len(X)).astype(
        np.float32)


def test_the_tables_are_the_iq4_values_in_ascending_order():
    for name in IQ4:
        v = values(name)
        assert supported(name) and code_range(name) == (0, 15) and v.dtype == np.float32
        assert (np.diff(v) > 0).all() and v[0] == -127 and v[-1] == 113
    np.testing.assert_array_equal(values("Q4_0"), np.arange(-8, 8))  # identity on integers
    assert not supported("MXFP4") and not supported("IQ3_S")


@pytest.mark.parametrize("name", IQ4)
def test_grid_view_and_packer_invert_the_reference(name):
    t = qtype(name)
    # arbitrary bytes (every code and sub-scale pattern) with finite fp16 scales d
    b = RNG.integers(0, 256, (40, t.type_size), dtype=np.uint8)
    b[:, :2] = RNG.uniform(-0.05, 0.05, (40, 1)).astype(np.float16).view(np.uint8)
    q = codes_of(b, name)
    assert q.shape == (len(b), t.block_size) and 0 <= q.min() and q.max() <= 15
    assert np.array_equal(pack_codes(b, name, q), b)  # exact inverse of codes_of
    a, off = affine(b, name)
    assert not off.any()
    np.testing.assert_array_equal(expand(a, t) * decode_codes(name, q) + expand(off, t),
                                  dequantize_blocks_ref(b, name))
    r = RNG.integers(0, 16, size=q.shape)
    p = pack_codes(b, name, r)
    assert np.array_equal(codes_of(p, name), r)
    # the scales are untouched, and gguf-py decodes the new codes at their places
    np.testing.assert_array_equal(affine(p, name)[0], a)
    np.testing.assert_array_equal(
        gguf_dequantize(p, t.id).reshape(q.shape), expand(a, t) * values(name)[r])
    with pytest.raises(BadArgument, match="codes must lie in 0..15"):
        pack_codes(b, name, np.full(q.shape, 16))


@pytest.mark.parametrize("name", IQ4)
def test_gptq_lowers_the_output_error_below_plain_quantization(name):
    W, H = _layer(64, 2048, seed=5)
    imp = np.diag(H).astype(np.float32)
    plain = blockq.dequantize(blockq.quantize(W, name, imatrix=imp), name, W.shape)
    e_plain = output_error(W, plain, H)
    for refit in (False, True):
        g = gptq_quantize(W, name, H, refit=refit)
        assert g.shape == (64, qtype(name).row_bytes(512)) and g.dtype == np.uint8
        e = output_error(W, blockq.dequantize(g, name, W.shape), H)
        assert e < 0.7 * e_plain, (name, refit, e / e_plain)


@pytest.mark.parametrize("name", IQ4)
def test_a_diagonal_hessian_gives_nearest_values_on_plain_scales(name):
    """Nothing to propagate: each block gets plain quantization's scales (diag H as the
    importance) and every weight its nearest table value on them, so a misplaced code, a
    wrong table or a broken bisection shows here."""
    t = qtype(name)
    B = t.block_size
    d = np.exp(RNG.standard_normal(512))
    W = RNG.standard_normal((8, 512)).astype(np.float32)
    g = gptq_quantize(W, name, np.diag(d), damp=0.0, refit=False).reshape(-1, t.type_size)
    imp = (d / d.mean()).astype(np.float32)  # as gptq_quantize scales it
    p = np.concatenate([blockq.quantize(W[:, c:c + B], name, imatrix=imp[c:c + B])
                        for c in range(0, 512, B)], axis=1).reshape(-1, t.type_size)
    a = expand(affine(p, name)[0], t)
    np.testing.assert_array_equal(expand(affine(g, name)[0], t), a)  # the same scales
    v = values(name)
    x = W.reshape(a.shape)
    ok = a != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        near = np.abs((a * v[:, None, None]).transpose(1, 2, 0) - x[..., None]).argmin(-1)
    qg = codes_of(g, name)
    assert (qg[ok] == near[ok]).mean() > 0.999, name  # ties of x/a against |a*v - x| aside
    err_g = np.abs(a * v[qg] - x)[ok]
    assert (err_g <= np.abs(a * v[near] - x)[ok] * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("name", IQ4)
def test_scale_refit_moves_only_d_and_never_raises_the_error(name):
    t = qtype(name)
    W, H = _layer(32, 1024, seed=3)
    g = gptq_quantize(W, name, H, refit=False)
    q = codes_of(g.reshape(-1, t.type_size), name).reshape(32, 512)
    r = refit_scales(g, t, W, H, q)
    assert r.shape == g.shape and r.dtype == np.uint8
    rb, gb = r.reshape(-1, t.type_size), g.reshape(-1, t.type_size)
    assert np.array_equal(codes_of(rb, name), codes_of(gb, name))  # codes kept
    assert np.array_equal(rb[:, 2:], gb[:, 2:])  # every byte but the fp16 d
    if name == "IQ4_XS":
        rec = lambda b: b.view(t.dtype)[:, 0]  # noqa: E731
        np.testing.assert_array_equal(iq4_xs_scales(rec(rb)), iq4_xs_scales(rec(gb)))
    assert (rb[:, :2] != gb[:, :2]).any(axis=1).mean() > 0.5  # most d did move
    def per_row(blocks):  # each row's output error under H
        D = W.astype(np.float64) - blockq.dequantize(blocks, name, W.shape)
        return np.einsum("ij,jk,ik->i", D, H.astype(np.float64), D)

    before, after = per_row(g), per_row(r)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < before.sum(), (name, after.sum() / before.sum())


def optimize_tiny(tmp_path, monkeypatch, preset):
    """``convert --optimize`` of a one-layer tiny model (rows of 256 and 512) at ``preset`` on
    Hessians from a short text; returns (source, output, Result, text, names gptq_quantize was
    called with)."""
    import importlib

    from blockq.optimize import convert_optimized

    gq = importlib.import_module("blockq.quantize.gptq")
    seen = []
    real = gq.gptq_quantize
    monkeypatch.setattr(gq, "gptq_quantize",
                        lambda W, t, *a, **k: seen.append(qtype(t).name) or real(W, t, *a, **k))
    src = write_tiny(tmp_path / "m.gguf", n_layer=1, n_embd=256, n_ff=512, tied=False)
    text = " ".join(map(str, RNG.integers(0, 260, 256)))
    h = calibrate(Model.load(src), _Tok(), text, n_ctx=64)
    out = tmp_path / "o.gguf"
    res = convert_optimized(src, out, preset, hessians=h, note=lambda s: None,
                            warn=lambda s: None)
    return src, out, res, text, seen


@pytest.mark.parametrize("preset", IQ4)
def test_optimized_iq4_files_read_back_in_gguf_py(tmp_path, monkeypatch, preset):
    src, out, res, _, seen = optimize_tiny(tmp_path, monkeypatch, preset)
    plain = convert(src, tmp_path / "p.gguf", preset, warn=lambda s: None)
    assert res.types == plain.types and res.nbytes == plain.nbytes
    # every IQ4 matrix product went through GPTQ (the embedding is a lookup: no Hessian)
    iq = [n for n, ty in res.types.items() if ty in IQ4 and n != "token_embd.weight"]
    assert iq and seen.count(preset) >= len(iq)
    r = GGUFReader(out)
    oracle = {t.name: gguf_dequantize(t.data, t.tensor_type) for t in r.tensors}
    rp = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "p.gguf").tensors}
    with blockq.read_gguf(out) as f:
        for name in iq:
            t = f.tensors[name]
            np.testing.assert_array_equal(
                blockq.dequantize(t.data, t.qtype, t.shape).reshape(-1),
                np.asarray(oracle[name], np.float32).reshape(-1))
            assert not np.array_equal(np.asarray(t.data).reshape(-1), rp[name].reshape(-1))
    # the runtime's own matrices (float numerics): a one-hot input reads one column exactly
    with Model.load(out, numerics="float") as m:
        lins = dict(m.linears())
        for name in iq:
            Wo = np.asarray(oracle[name], np.float32)  # (rows, cols)
            for c in RNG.integers(0, Wo.shape[1], 4):
                e = np.zeros(Wo.shape[1], np.float32)
                e[c] = 1.0
                np.testing.assert_array_equal(lins[name].weight.matvec(e), Wo[:, c])
