"""Error-compensated rounding, calibration Hessians and the size-budgeted allocation.

- the affine view and code packer of every grid against blockq's reference dequantizer;
- GPTQ lowers the output error under H below plain rounding on the same grid, for every grid;
- the Hessian collector equals X^T X on a tiny model (q/k/v share one input);
- the allocator never exceeds its budget and gives bits to the more sensitive matrix;
- optimized and calibrated files read back in gguf-py; bad Hessians give one-line errors;
  an interrupted conversion leaves nothing behind.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

import blockq
from blockq.convert import convert
from blockq.model import Model
from blockq.calibrate import (HessianCollector, Hessians, calibrate, read_hessians,
                              write_hessians)
from blockq.dequantize import dequantize_blocks_ref, quant_ints
from blockq.errors import BadArgument, FormatError
from blockq.optimize import Curve, allocate, budget_of_plan, candidates, measure, parse_size
from blockq.quantize.codes import RANGES, affine, expand, pack_codes
from blockq.quantize.gptq import (DATA_FREE_DAMP, DEFAULT_DAMP, column_order, gptq_quantize,
                                  inverse_cholesky, output_error, refit_scales)
from blockq.types import qtype

from test_imatrix import _Tok
from tiny_model import write_tiny

GRIDS = list(RANGES)
RNG = np.random.default_rng(7)


def _correlated(n_tokens: int, cols: int, seed: int = 0) -> np.ndarray:
    """Inputs with correlated columns and a few loud channels, like a norm's output."""
    rng = np.random.default_rng(seed)
    A = np.eye(cols) + 0.15 * rng.standard_normal((cols, cols))
    X = rng.standard_normal((n_tokens, cols)) @ A
    return X * np.exp(0.7 * rng.standard_normal(cols))[None, :]


@pytest.mark.parametrize("name", GRIDS)
def test_affine_view_and_packer_invert_the_reference(name):
    t = qtype(name)
    x = RNG.standard_normal((6, 512)).astype(np.float32) * np.linspace(0.1, 3, 512)[None]
    b = blockq.quantize(x, name).reshape(-1, t.type_size)
    q = quant_ints(b, name)
    assert np.array_equal(pack_codes(b, name, q), b)  # exact inverse of quant_ints
    a, off = affine(b, name)
    np.testing.assert_array_equal(expand(a, t) * q + expand(off, t), dequantize_blocks_ref(b, name))
    lo, hi = RANGES[name]
    r = RNG.integers(lo, hi + 1, size=q.shape)
    assert np.array_equal(quant_ints(pack_codes(b, name, r), name), r)
    with pytest.raises(BadArgument, match="codes must lie in"):
        pack_codes(b, name, np.full(q.shape, hi + 1))


@pytest.mark.parametrize("name", GRIDS)
def test_gptq_lowers_the_output_error_below_plain_rounding(name):
    X = _correlated(2048, 256)
    H = X.T @ X / len(X)
    W = RNG.standard_normal((64, 256)).astype(np.float32)
    imp = np.diag(H).astype(np.float32)
    plain = blockq.dequantize(blockq.quantize(W, name, imatrix=imp), name, W.shape)
    g = gptq_quantize(W, name, H)
    assert g.shape == (64, qtype(name).row_bytes(256)) and g.dtype == np.uint8
    comp = blockq.dequantize(g, name, W.shape)
    e_plain, e_comp = output_error(W, plain, H), output_error(W, comp, H)
    assert e_comp < 0.85 * e_plain, (name, e_comp / e_plain)


def test_gptq_with_an_identity_hessian_is_plain_rounding_on_the_same_scales():
    W = RNG.standard_normal((16, 256)).astype(np.float32)
    g = gptq_quantize(W, "Q4_0", np.eye(256), damp=0.0, refit=False).reshape(-1, 18)
    # NOTE: each block's scale search sees that block only (its sigma^2 is the block's)
    one = np.ones(32, np.float32)
    p = np.concatenate([blockq.quantize(W[:, c:c + 32], "Q4_0", imatrix=one)
                        for c in range(0, 256, 32)], axis=1).reshape(-1, 18)
    assert np.array_equal(g[:, :2], p[:, :2])  # the same scales
    qg, qp = quant_ints(g, "Q4_0"), quant_ints(p, "Q4_0")
    # the same integers, but for ties that x/d and x*(1/d) round apart
    assert np.abs(qg - qp).max() <= 1 and (qg == qp).mean() > 0.995


def test_act_order_keeps_blocks_together_and_packs_each_code_in_its_place():
    d = np.exp(RNG.standard_normal(512))
    order = column_order(np.diag(d), 32)
    assert sorted(order) == list(range(512))
    blocks = order.reshape(16, 32) // 32
    assert (blocks == blocks[:, :1]).all()  # each run of 32 is one block of the file
    sums = d.reshape(16, 32).sum(1)[blocks[:, 0]]
    assert (np.diff(sums) <= 0).all() and (np.diff(d[order].reshape(16, 32), axis=1) <= 0).all()
    # a diagonal H propagates nothing: in any rounding order every block gets plain
    # rounding's scales (diag(H) as the importance) and each weight its nearest code on them,
    # so a misplaced code or scale would show here
    W = RNG.standard_normal((8, 512)).astype(np.float32)
    for name in ("Q4_1", "Q6_K"):
        t = qtype(name)
        g = gptq_quantize(W, name, np.diag(d), damp=0.0, refit=False).reshape(-1, t.type_size)
        imp = (d / d.mean()).astype(np.float32)  # as gptq_quantize scales it
        B = t.block_size  # each block's search sees that block only (as in the identity test)
        p = np.concatenate([blockq.quantize(W[:, c:c + B], name, imatrix=imp[c:c + B])
                            for c in range(0, 512, B)], axis=1).reshape(-1, t.type_size)
        a, b = affine(p, name)
        a, b = expand(a, t), expand(b, t)
        assert np.array_equal(a, expand(affine(g, name)[0], t))  # the same scales
        lo, hi = RANGES[name]
        with np.errstate(divide="ignore", invalid="ignore"):
            near = np.clip(np.rint((W.reshape(a.shape) - b) / a), lo, hi)
        qg = quant_ints(g, name)
        ok = a != 0
        assert (qg[ok] == near[ok]).mean() > 0.999, name  # ties of x/d against x*(1/d) aside


@pytest.mark.parametrize("name", GRIDS)
def test_scale_refit_changes_only_the_fp16_fields_and_never_raises_the_error(name):
    t = qtype(name)
    X = _correlated(1024, 256, seed=3)
    H = (X.T @ X / len(X)).astype(np.float32)
    W = RNG.standard_normal((32, 256)).astype(np.float32)
    g = gptq_quantize(W, name, H, refit=False)
    q = quant_ints(g.reshape(-1, t.type_size), name).reshape(32, 256).astype(np.float32)
    r = refit_scales(g, t, W, H, q)
    assert r.shape == g.shape and r.dtype == np.uint8
    # the codes and the sub-block scale codes are kept: only d (and dmin / m) move
    assert np.array_equal(quant_ints(r.reshape(-1, t.type_size), name).reshape(q.shape), q)
    a0, _ = affine(g.reshape(-1, t.type_size), name)
    a1, _ = affine(r.reshape(-1, t.type_size), name)
    assert np.array_equal(a0 == 0, a1 == 0)
    e0 = output_error(W, blockq.dequantize(g, name, W.shape), H)
    e1 = output_error(W, blockq.dequantize(r, name, W.shape), H)
    assert e1 < e0, (name, e1 / e0)  # row by row never worse, here better overall
    rows0 = [output_error(W[i:i + 1], blockq.dequantize(g[i:i + 1], name, (1, 256)), H)
             for i in range(32)]
    rows1 = [output_error(W[i:i + 1], blockq.dequantize(r[i:i + 1], name, (1, 256)), H)
             for i in range(32)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(rows0, rows1))


def test_data_free_statistics_get_the_heavier_damping_and_no_refit(tmp_path, monkeypatch):
    import importlib

    from blockq.calibrate import calibrate_random
    from blockq.optimize import convert_optimized

    gq = importlib.import_module("blockq.quantize.gptq")
    src = write_tiny(tmp_path / "m.gguf", n_layer=1, n_embd=256, n_ff=512, tied=False)
    seen = []
    real = gq.gptq_quantize
    monkeypatch.setattr(gq, "gptq_quantize", lambda *a, **k: seen.append(k) or real(*a, **k))
    m = Model.load(src)
    hr = calibrate_random(m, _Tok(), n_ctx=64, n_chunks=2)
    ht = calibrate(m, _Tok(), " ".join(map(str, RNG.integers(0, 260, 256))), n_ctx=64)
    assert hr.data_free and not ht.data_free
    write_hessians(tmp_path / "r.gguf", hr)
    assert read_hessians(tmp_path / "r.gguf").data_free  # the side file keeps it
    for h, damp, refit in ((hr, DATA_FREE_DAMP, False), (ht, DEFAULT_DAMP, True)):
        seen.clear()
        convert_optimized(src, tmp_path / "o.gguf", "Q4_K_M", hessians=h, note=lambda s: None,
                          warn=lambda s: None)
        assert seen and all(k["damp"] == damp and k["refit"] == refit for k in seen)


def test_bad_hessians_are_refused_in_one_line():
    W = np.ones((4, 32), np.float32)
    H = np.eye(32)
    H[3, 5] = np.nan
    with pytest.raises(BadArgument, match="NaN/inf"):
        gptq_quantize(W, "Q8_0", H)
    with pytest.raises(BadArgument, match=r"needs \(32, 32\)"):
        gptq_quantize(W, "Q8_0", np.eye(16))
    v = np.ones((32, 1))
    with pytest.raises(BadArgument, match="not positive definite"):
        inverse_cholesky(v @ v.T, damp=0.0)  # rank 1: singular without damping
    assert np.isfinite(inverse_cholesky(v @ v.T)).all()  # the default damping makes it usable
    neg = -np.eye(32)
    with pytest.raises(BadArgument, match="negative diagonal"):
        gptq_quantize(W, "Q8_0", neg)


def test_hessian_collector_sums_xtx_once_per_shared_input():
    col = HessianCollector(chunk_size=32)
    x1, x2, y = (RNG.standard_normal((32, 8)).astype(np.float32) for _ in range(3))
    for x in (x1, x2):
        col.add("blk.0.attn_q.weight", x)
        col.add("blk.0.attn_k.weight", x)  # same array: the same input
        col.add("blk.0.attn_output.weight", y)
    h = col.result()
    assert h.users["blk.0.attn_q.weight"] == ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]
    np.testing.assert_allclose(h.sums["blk.0.attn_q.weight"], x1.T @ x1 + x2.T @ x2, rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(h.sums["blk.0.attn_output.weight"], 2 * y.T @ y, rtol=1e-5,
                               atol=1e-4)
    assert h.counts["blk.0.attn_q.weight"] == 64
    np.testing.assert_allclose(h.importance("blk.0.attn_k.weight"),
                               (x1 * x1 + x2 * x2).sum(0) / 64, rtol=1e-5)


def test_calibration_equals_xtx_on_a_tiny_model_and_round_trips(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", n_layer=2)
    m = Model.load(path)
    toks = RNG.integers(0, 260, 64)
    h = calibrate(m, _Tok(), " ".join(map(str, toks)), n_ctx=32)
    assert h.chunk_count == 2
    assert h.users["blk.0.attn_q.weight"] == ["blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                              "blk.0.attn_v.weight"]
    assert h.users["blk.1.ffn_gate.weight"] == ["blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    with blockq.read_gguf(path) as f:
        emb = np.array(f.tensors["token_embd.weight"].data).view("<f4").reshape(-1, 256)
        g = np.array(f.tensors["blk.0.attn_norm.weight"].data).view("<f4")
    x = emb[toks].astype(np.float64)
    hn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g  # (64, 256)
    np.testing.assert_allclose(h.sums["blk.0.attn_q.weight"], hn.T @ hn, rtol=2e-4, atol=1e-3)
    write_hessians(tmp_path / "h.gguf", h)
    back = read_hessians(tmp_path / "h.gguf")
    assert back.users == h.users and back.counts == h.counts
    assert all(np.array_equal(back.sums[k], h.sums[k]) for k in h.sums)


def test_layer_by_layer_calibration_equals_whole_forwards_and_holds_one_block(tmp_path,
                                                                                monkeypatch):
    """The layer-wise pass gives the very sums of whole forward passes with a hook on every
    matrix (blockq.imatrix.run_observed), while memory never holds sums of two blocks."""
    from blockq import calibrate as cal
    from blockq.imatrix import run_observed

    path = write_tiny(tmp_path / "m.gguf", n_layer=3)
    m = Model.load(path)
    work = [RNG.integers(0, 260, 32).tolist() for _ in range(3)]
    whole = cal.HessianCollector(32)
    run_observed(m, work, whole.add)
    layers_seen = []
    add = cal.HessianCollector.add

    def spy(self, name, x):
        add(self, name, x)
        layers_seen.append({g.split(".")[1] for g in self.sums})
    monkeypatch.setattr(cal.HessianCollector, "add", spy)
    calls = []
    h = cal._run(m, work, 32, ["t"], lambda *a: calls.append(a))
    assert max(len(s) for s in layers_seen) == 1  # never two blocks' sums in memory
    assert isinstance(h.sums, cal.SpilledSums) and set(h.sums) == set(whole.sums)
    for g in whole.sums:
        np.testing.assert_array_equal(h.sums[g], whole.sums[g])
        assert h.counts[g] == whole.counts[g] and h.users[g] == whole.users[g]
        np.testing.assert_array_equal(h.importance(g), whole.result().importance(g))
    assert [c[:2] for c in calls] == [(i, 12) for i in range(1, 13)]
    assert all(np.isnan(c[2]) for c in calls[:9]) and np.isfinite(calls[-1][2])
    assert h.nbytes() == sum(a.nbytes for a in whole.sums.values())
    folder = os.path.dirname(h.sums._where[next(iter(h.sums))][0])
    h.sums.close()
    assert not os.path.exists(folder)  # the spilled sums are removed with their owner


def test_calibration_head_in_slabs_matches_whole_chunks(tmp_path):
    """Chunks longer than the head's slab of rows: the head's sums and the perplexity still
    equal those of whole forward passes (to float summation order)."""
    from blockq import calibrate as cal
    from blockq.imatrix import run_observed

    m = Model.load(write_tiny(tmp_path / "m.gguf", n_layer=1))
    n = cal.HEAD_ROWS + cal.MIN_BATCH + 3  # two slabs, the second just long enough
    work = [RNG.integers(0, 260, n).tolist() for _ in range(2)]
    whole, ppl_whole = cal.HessianCollector(n), []
    run_observed(m, work, whole.add, lambda i, k, p: ppl_whole.append(p))
    ppl = []
    h = cal._run(m, work, n, [], lambda i, k, p: ppl.append(p))
    np.testing.assert_allclose(h.sums["output.weight"], whole.sums["output.weight"], rtol=1e-5,
                               atol=1e-3)
    assert h.counts["output.weight"] == whole.counts["output.weight"] == 2 * n
    assert np.log(ppl[-1]) == pytest.approx(np.log(ppl_whole[-1]), rel=1e-6)


def test_side_file_sums_are_read_when_asked_for(tmp_path):
    g = "blk.0.attn_q.weight"
    a = RNG.standard_normal((6, 6)).astype(np.float32)
    h = Hessians({g: a @ a.T}, {g: 10}, {g: [g]})
    write_hessians(tmp_path / "h.gguf", h)
    back = read_hessians(tmp_path / "h.gguf")
    np.testing.assert_array_equal(back.sums[g], a @ a.T)
    assert back.sums[g] is not back.sums[g]  # a fresh read each time, nothing kept
    np.testing.assert_allclose(back.importance(g), np.diag(a @ a.T) / 10, rtol=1e-6)
    os.truncate(tmp_path / "h.gguf", back.sums._where[g][1] + 10)  # inside the tensor
    with pytest.raises(FormatError, match="cut short"):
        back.sums[g]


def test_a_damaged_side_file_is_refused(tmp_path):
    h = Hessians({"blk.0.attn_q.weight": np.full((4, 4), np.nan, np.float32)},
                 {"blk.0.attn_q.weight": 10}, {"blk.0.attn_q.weight": ["blk.0.attn_q.weight"]})
    write_hessians(tmp_path / "bad.gguf", h)
    with pytest.raises(FormatError, match="NaN/inf"):
        read_hessians(tmp_path / "bad.gguf")
    imatrix_like = write_tiny(tmp_path / "m.gguf", n_layer=1)
    with pytest.raises(FormatError, match="not 'hessian'"):
        read_hessians(imatrix_like)


def test_allocation_fits_the_budget_and_prefers_the_sensitive_matrix():
    def curve(name, weight):
        opts = {"Q4_0": (4500, 0.04), "Q5_0": (5500, 0.01), "Q8_0": (8500, 0.0001)}
        return Curve(name, 1, 8000, opts, weight)

    loud, quiet = curve("a", 10.0), curve("b", 1.0)
    plan = allocate([quiet, loud], budget=14080)
    assert plan.used <= 14080
    assert plan.types == {"a": "Q8_0", "b": "Q5_0"} or plan.types == {"a": "Q8_0", "b": "Q4_0"}
    assert plan.types["a"] != "Q4_0"
    tight = allocate([curve("a", 10.0), curve("b", 1.0)], budget=10048)
    assert tight.used <= 10048 and tight.types["a"] == "Q5_0" and tight.types["b"] == "Q4_0"
    with pytest.raises(BadArgument, match="below the smallest possible file"):
        allocate([curve("a", 1.0)], budget=100)
    assert budget_of_plan({"a": "Q4_0"}, {"a": (2, 64)}) == 96  # 2 x 2 blocks x 18 B -> 96
    assert parse_size("1.5MiB") == 1572864 and parse_size("100") == 100
    with pytest.raises(BadArgument, match="--size"):
        parse_size("-3GB")
    assert candidates(576) == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def test_measure_ranks_types_by_bits():
    W = RNG.standard_normal((8, 256)).astype(np.float32)
    X = _correlated(512, 256)
    e = measure(W, ["Q2_K", "Q4_K", "Q6_K", "Q8_0"], H=X.T @ X / 512)
    assert e["Q2_K"] > e["Q4_K"] > e["Q6_K"] > e["Q8_0"] > 0


def _read_all(path):
    r = GGUFReader(path)
    return {t.name: gguf_dequantize(t.data, t.tensor_type) for t in r.tensors}


def test_optimized_and_calibrated_files_read_back_in_gguf_py(tmp_path):
    from blockq.optimize import convert_optimized

    src = write_tiny(tmp_path / "m.gguf", n_layer=2, n_embd=256, n_ff=512, tied=False)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(map(str, RNG.integers(0, 260, 256))))
    h = calibrate(Model.load(src), _Tok(), text.read_text(), n_ctx=64)
    out = tmp_path / "o.gguf"
    res = convert_optimized(src, out, "Q4_K_M", hessians=h, note=lambda s: None,
                            warn=lambda s: None)
    plain = convert(src, tmp_path / "p.gguf", "Q4_K_M", warn=lambda s: None)
    assert res.nbytes <= plain.nbytes
    assert res.types == plain.types  # --optimize keeps the preset's types
    budget = tmp_path / "b.gguf"
    alloc = convert_optimized(src, budget, "Q4_K_M", hessians=h, bpw=5.0, note=lambda s: None,
                              warn=lambda s: None)
    assert sum(alloc.types[n] != plain.types[n] for n in plain.types) > 0
    with blockq.read_gguf(budget) as f:
        assert len(f.metadata["quantize.blockq.allocation"]) == 16  # every matrix, head too
    ours = _read_all(out)
    with blockq.read_gguf(out) as f:
        for name, t in f.tensors.items():
            np.testing.assert_array_equal(
                blockq.dequantize(t.data, t.qtype, t.shape).reshape(-1),
                np.asarray(ours[name], np.float32).reshape(-1))


def test_an_interrupted_conversion_leaves_no_file(tmp_path, monkeypatch):
    import importlib

    gq = importlib.import_module("blockq.quantize.gptq")
    from blockq.optimize import convert_optimized

    src = write_tiny(tmp_path / "m.gguf", n_layer=1, tied=False)
    h = calibrate(Model.load(src), _Tok(),
                  " ".join(map(str, RNG.integers(0, 260, 128))), n_ctx=64)
    calls = {"n": 0}
    real = gq.gptq_quantize

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gq, "gptq_quantize", flaky)
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert_optimized(src, out, "Q4_K_M", hessians=h, optimize=False, note=lambda s: None,
                          warn=lambda s: None)
    assert calls["n"] == 3 and list(out.parent.iterdir()) == []
