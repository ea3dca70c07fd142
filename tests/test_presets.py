"""blockq.presets: llama.cpp's per-tensor type choices, checked against llama-quantize's own.

tests/data/presets_*.json hold, for four models (SmolLM2-135M; a synthetic 0.56B llama;
Qwen2-0.5B's shapes; an 80-layer llama that llama.cpp treats as a 70B), the type llama-quantize
gave every tensor at every preset (and with an imatrix, and with --tensor-type overrides);
tools/record_presets.py wrote them.
"""
import json
from pathlib import Path

import pytest

from blockq import BadArgument, presets
from blockq.presets import fallback, order_key, parse_override, plan, use_more_bits

DATA = Path(__file__).parent / "data"
MODELS = ("smollm2", "synth056", "qwen2_05b", "llama80")


def _cases():
    for m in MODELS:
        rec = json.loads((DATA / f"presets_{m}.json").read_text())
        for c in rec["cases"]:
            label = c["preset"] + ("+imatrix" if c["imatrix"] else "") + \
                ("+overrides" if c["overrides"] else "")
            yield pytest.param(rec, c, id=f"{m}-{label}")


def _plan(rec, case):
    tensors = [(n, tuple(s), t) for n, s, t in rec["tensors"]]
    return plan(tensors, case["preset"], n_layer=rec["n_layer"], n_head=rec["n_head"],
                n_head_kv=rec["n_head_kv"], arch=rec["arch"], has_imatrix=case["imatrix"],
                overrides=[parse_override(f"{rx}={t}") for rx, t in case["overrides"]])


@pytest.mark.parametrize("rec,case", list(_cases()))
def test_plan_matches_llama_quantize(rec, case):
    if case.get("refused"):
        # llama-quantize refused: a planned type needs an importance matrix it was not given
        with pytest.raises(BadArgument, match=f"preset {case['preset']} needs an importance"):
            _plan(rec, case)
        return
    tensors = [(n, tuple(s), t) for n, s, t in rec["tensors"]]
    got = _plan(rec, case)
    want = dict(zip((t[0] for t in tensors), case["types"]))
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not wrong, (f"{len(wrong)} tensors differ (blockq, llama.cpp): "
                       f"{dict(list(wrong.items())[:6])}")


def test_recorded_cases_cover_every_preset():
    for m in MODELS:
        rec = json.loads((DATA / f"presets_{m}.json").read_text())
        assert {c["preset"] for c in rec["cases"]} == set(presets.PRESETS)


@pytest.mark.parametrize("n,more", [
    (8, [0, 3, 6, 7]),  # first and last eighth, and every third layer in between
    (30, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]),
])
def test_use_more_bits(n, more):
    assert [i for i in range(n) if use_more_bits(i, n)] == more


@pytest.mark.parametrize("want,cols,got", [
    ("Q4_K", 2048, "Q4_K"), ("Q4_K", 576, "Q5_0"), ("Q5_K", 576, "Q5_1"), ("Q6_K", 576, "Q8_0"),
    ("Q2_K", 576, "Q4_0"), ("Q3_K", 896, "Q4_0"), ("Q6_K", 100, "F16"), ("Q8_0", 48, "F16"),
    ("F16", 7, "F16"),
])
def test_fallback(want, cols, got):
    assert fallback(want, cols) == got


def test_order_key_puts_globals_first_then_layers_numerically():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_k.weight",
             "token_embd.weight"]
    assert sorted(names, key=order_key) == ["output.weight", "token_embd.weight",
                                            "blk.2.attn_k.weight", "blk.2.ffn_up.weight",
                                            "blk.10.attn_q.weight"]


def test_vectors_keep_their_type_and_float_presets_convert_matrices():
    ts = [("output_norm.weight", (64,), "F32"), ("token_embd.weight", (10, 64), "Q8_0")]
    assert plan(ts, "F16", n_layer=1, n_head=1, n_head_kv=1) == {
        "output_norm.weight": "F32", "token_embd.weight": "F16"}


@pytest.mark.parametrize("text", ["attn_q", "=Q4_K", "attn_q=", "attn_q=Q9_K", "[=Q4_K"])
def test_bad_override(text):
    with pytest.raises(BadArgument):
        parse_override(text)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(BadArgument, match="Q4_K_M"):
        presets.preset("Q4_K_X")
