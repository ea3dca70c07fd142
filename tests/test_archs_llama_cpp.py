"""Every architecture against llama.cpp: tiny random models written by blockq's writer in
llama.cpp's layout, replayed against llama.cpp's recorded outputs (tools/record_tiny_archs.py):
last-position logits within a stated tolerance and identical greedy continuations of 5 prompts,
with the KV cache, without it (each step recomputes the whole sequence), and with the last
blocks on a stand-in "GPU" (numpy)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from blockq.model import Model
from tiny_model import greedy_ids, write_tiny

REC = json.loads((Path(__file__).parent / "data" / "llama_cpp_tiny_archs.json").read_text())
CASES = sorted(REC["cases"])
# llama.cpp rounds attention's q to f16 and (Gemma) GELU through an f16 table; blockq computes
# in float32: the logits differ by a small share of their spread
LOGIT_TOL = 2e-2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    out = {}
    for name in CASES:
        case = REC["cases"][name]
        path = write_tiny(d / f"{name}.gguf", **case["write_tiny"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"], \
            f"{name}: the tiny model no longer comes out byte-identical to the recorded one"
        out[name] = path
    return out


def test_every_architecture_is_covered():
    from blockq.models import ARCHITECTURES
    assert {REC["cases"][c]["write_tiny"]["arch"] for c in CASES} == set(ARCHITECTURES)


@pytest.mark.parametrize("name, long", [("phi3", True), ("phi3-short", False)])
def test_phi3_rope_factors_follow_the_context(files, name, long):
    """Long factors beyond the original context (rounded up to 256 as llama.cpp), else short."""
    model = Model.load(files[name])
    assert (model.ropes_for(64) is model.ropes_long) == long
    assert model.ropes_for(64)[0].freq_factors is not None


@pytest.mark.parametrize("name", CASES)
def test_last_logits_match_llama_cpp(files, name):
    model = Model.load(files[name])
    for run in REC["cases"][name]["runs"]:
        want = np.array(run["last_logits"], dtype=np.float32)
        got = model.forward(run["prompt_ids"], model.new_cache(64), "last")[0]
        err = float(np.abs(got - want).max() / want.std())
        assert err < LOGIT_TOL, f"{name}: max logit difference {err:.2e} of the spread"


def _greedy_no_cache(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(model.forward(seq, model.new_cache(64), "last")[0])))
    return seq[len(prompt):]


@pytest.mark.parametrize("how", ["cache", "no-cache", "offload"])
@pytest.mark.parametrize("name", CASES)
def test_greedy_continuations_match_llama_cpp(files, name, how):
    model = Model.load(files[name])
    if how == "offload":
        model.offload(model.args.n_layer // 2 + 1, xp=np, to_device=lambda q: q)
    runs = REC["cases"][name]["runs"]
    for run in runs if how != "no-cache" else runs[:2]:  # no cache: quadratic, two prompts
        n = len(run["greedy"])
        got = (_greedy_no_cache(model, run["prompt_ids"], n) if how == "no-cache"
               else greedy_ids(model, run["prompt_ids"], n))
        assert got == run["greedy"], f"{name} ({how}): prompt {run['prompt_ids']}"
