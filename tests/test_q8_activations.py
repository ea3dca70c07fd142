"""numerics="llama": llama.cpp's 8-bit activations and f16 attention (blockq.kernels.cpu_q8)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blockq.dequantize import dequantize
from blockq.errors import BadArgument, UnsupportedModel
from blockq.kernels import cpu_q8
from blockq.kernels.cpu_matvec import QMatrix
from blockq.model import Model
from blockq.quantize import quantize
from tiny_model import greedy_ids, reference_logits, write_tiny

DATA = Path(__file__).parent / "data"
TOKENS = [5, 200, 17, 88, 260, 3, 141, 99, 12, 250, 7, 64]


@pytest.mark.parametrize("block, codes", [
    ([127.0] + [0.0] * 31, [127] + [0] * 31),
    ([-2.0, 1.0, 0.5, -0.25] * 8, [-127, 64, 32, -16] * 8),  # 63.5 rounds to even: 64
    ([0.0] * 32, [0] * 32),
])
def test_quantize_q8_blocks(block, codes):
    x = np.array([block], np.float32)
    q, d, s = cpu_q8.quantize_q8(x)
    amax = np.abs(x).max()
    assert q[0, 0].tolist() == codes
    assert d[0, 0] == np.float32(np.float16(amax / np.float32(127)))
    assert s[0, 0] == np.float32(np.float16(np.float32(amax / np.float32(127)) * sum(codes)))


def test_v_expf_is_exp_to_float_precision():
    x = np.linspace(-87, 88, 200001).astype(np.float32)
    rel = np.abs(cpu_q8.v_expf(x) / np.exp(x.astype(np.float64)) - 1)
    assert rel.max() < 3e-7
    assert cpu_q8.v_expf(np.array([-200.0, -1e30], np.float32)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("qt", ["Q4_1", "Q8_0"])
def test_q8dot_matches_its_definition(qt):
    """sum over blocks of d_w * d_a * (codes . codes) (+ m_w * s_a), in float64."""
    rng = np.random.default_rng(1)
    rows, cols = 24, 128
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = (rng.standard_normal((3, cols)) * 4).astype(np.float32)
    wm = QMatrix(qt, quantize(w, qt), (rows, cols))
    got = cpu_q8.Q8Dot(wm)(x)
    q, d, s = cpu_q8.quantize_q8(x)
    xq = (q * d[..., None]).reshape(3, cols).astype(np.float64)  # the activations as dotted
    wd = np.asarray(dequantize(wm.data, qt, (rows, cols)), np.float64)
    want = xq @ wd.T
    if qt == "Q4_1":  # s is f16(d_f32 * sum q), not d_f16 * sum q
        m = wm.data.view(np.uint8).reshape(rows, -1, 20)[:, :, 2:4].copy().view(np.float16)
        want += (s - d * q.sum(-1)).astype(np.float64) @ m[..., 0].astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_f16_dot_orders_agree_with_float64():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5, 77)).astype(np.float16).astype(np.float32)
    b = rng.standard_normal((5, 77)).astype(np.float16).astype(np.float32)
    want = (a.astype(np.float64) * b).sum(-1)
    for batch in (True, False):
        np.testing.assert_allclose(cpu_q8.f16_dot(a, b, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qt, rows, repackable, kind", [
    ("Q4_0", 16, True, "RepackDot"),    # rows % 8 == 0: llama.cpp's CPU_REPACK buffer
    ("Q4_0", 12, True, "LegacyDot"),
    ("Q4_0", 16, False, "LegacyDot"),   # a tied output stays in the ordinary buffer
    ("Q4_K", 8, True, "RepackDot"),
    ("Q4_K", 4, True, "KQuantDot"),
    ("Q4_K", 8, False, "KQuantDot"),
    ("Q4_1", 8, True, "Q8Dot"),
    ("Q8_0", 8, True, "Q8Dot"),
    ("Q5_0", 8, True, "LegacyDot"),
    ("Q5_1", 8, True, "LegacyDot"),
    ("Q2_K", 8, True, "KQuantDot"),
    ("Q3_K", 8, True, "KQuantDot"),
    ("Q5_K", 8, True, "KQuantDot"),
    ("Q6_K", 8, True, "KQuantDot"),
])
def test_llama_dot_takes_llama_cpps_path(qt, rows, repackable, kind):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((rows, 256)).astype(np.float32)
    dot = cpu_q8.llama_dot(QMatrix(qt, quantize(w, qt), w.shape), repackable=repackable)
    assert type(dot).__name__ == kind
    x = rng.standard_normal((3, 256)).astype(np.float32)
    want = x @ dequantize(quantize(w, qt), qt, w.shape).T
    np.testing.assert_allclose(dot(x), want, rtol=0, atol=0.05 * np.abs(want).max())


@pytest.mark.parametrize("qt", ["F16", "BF16", "F32"])
def test_llama_dot_refuses_float_matrices(qt):
    w = np.ones((8, 64), np.float32)
    with pytest.raises(UnsupportedModel, match=f"{qt} matrix"):
        cpu_q8.llama_dot(QMatrix(qt, quantize(w, qt), w.shape))


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    d = tmp_path_factory.mktemp("q8")
    return {qt: write_tiny(d / f"{qt}.gguf", qtype=qt, seed=3) for qt in ("Q4_1", "Q8_0")}


@pytest.mark.parametrize("qt", ["Q4_1", "Q8_0"])
def test_llama_numerics_tiny_model(tiny_q, qt):
    """Runs, stays near the float64 reference (8-bit activations cost ~1%), and a batch gives
    the logits of the same tokens one at a time to f16 rounding of the attention orders."""
    path = tiny_q[qt]
    ref = reference_logits(path, TOKENS)
    fm = Model.load(path, numerics="float")
    default = fm.forward(TOKENS, fm.new_cache(32), "all")
    model = Model.load(path, numerics="llama")
    got = model.forward(TOKENS, model.new_cache(32), "all")
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = np.sqrt(((got - ref) ** 2).mean()) / ref.std()
    err_default = np.sqrt(((default - ref) ** 2).mean()) / ref.std()
    assert 0 < err < 0.05, f"{qt}: RMS error {err:.3g} of the logits' spread"
    assert err > err_default  # it does round more than the float kernels
    cache = model.new_cache(32)
    split = [model.forward(TOKENS[:4], cache, "all")]
    split += [model.forward([t], cache) for t in TOKENS[4:]]
    np.testing.assert_allclose(np.concatenate(split), got, atol=0.02 * ref.std(), rtol=0)


def test_llama_numerics_refusals(tiny_q, tmp_path):
    with pytest.raises(BadArgument, match="numerics 'fast'"):
        Model.load(tiny_q["Q8_0"], numerics="fast")
    model = Model.load(tiny_q["Q8_0"], numerics="llama")
    with pytest.raises(BadArgument, match="f16 KV cache"):
        model.forward(TOKENS, model.new_cache(32, "f32"))
    with pytest.raises(UnsupportedModel, match="F32"):
        Model.load(write_tiny(tmp_path / "f32.gguf"), numerics="llama")


@pytest.mark.realfile
def test_smollm2_llama_numerics_greedy_is_llama_cpps(smollm2_file):
    """Bit-level reproduction: the recorded llama.cpp continuation, token for token (the
    default kernels agree on 4 tokens of 4 prompts out of 5; see test_model.py)."""
    case = json.loads((DATA / "llama_cpp_greedy.json").read_text())["prompts"][2]
    model = Model.load(smollm2_file, numerics="llama")
    want = case["llama_cpp"][:10]
    assert greedy_ids(model, case["prompt_ids"], len(want)) == want


@pytest.mark.realfile
def test_q4_k_m_llama_numerics_greedy_is_llama_cpps(smollm2_file, tmp_path):
    """SmolLM2 through ``blockq convert`` with the Q4_K_M preset (Q5_0, Q8_0, repacked Q4_K,
    Q6_K; prompts of >= 8 tokens take the tiled k-quant kernel): llama.cpp's recorded greedy
    continuation, token for token."""
    import hashlib

    from blockq.convert import convert

    rec = json.loads((DATA / "llama_cpp_greedy_q4_k_m.json").read_text())
    path = tmp_path / "q4km.gguf"
    convert(smollm2_file, path, "Q4_K_M", warn=lambda msg: None)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"]
    model = Model.load(path, numerics="llama")
    case = rec["prompts"][0]
    assert len(case["prompt_ids"]) >= 8
    assert greedy_ids(model, case["prompt_ids"], len(case["llama_cpp"])) == case["llama_cpp"]
