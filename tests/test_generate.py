"""Generation (the generator, EOG, prefix reuse, sampling), perplexity and bench on a tiny model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from blockq.errors import BadArgument
from blockq.generate import (Timings, bench, chunk_nll, generate, greedy, perplexity,
                             stream_text)
from blockq.model import Model
from blockq.sampling import Sampler
from blockq.tokenizer import Tokenizer
from tiny_model import N_VOCAB, write_tiny

PROMPT = [5, 200, 17, 88, 260, 3]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return Model.load(write_tiny(tmp_path_factory.mktemp("gen") / "tiny.gguf", qtype="Q8_0",
                                 tied=False))


def _naive_greedy(model, prompt, n):
    """Argmax decoding that recomputes the whole sequence each step (no cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        logits = model.forward(seq, model.new_cache(len(seq)), "last")[0]
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def test_greedy_generation_matches_recomputation(model):
    got = list(generate(model, PROMPT, n_predict=8))
    assert got == _naive_greedy(model, PROMPT, 8)


def test_stops_at_eog_without_yielding_it(model):
    want = _naive_greedy(model, PROMPT, 8)
    k = next(i for i in range(1, 8) if want[i] not in want[:i])  # first new id after the 1st
    got = list(generate(model, PROMPT, n_predict=20, eog={want[k]}))
    assert got == want[:k]


def test_stops_when_the_cache_is_full(model):
    cache = model.new_cache(len(PROMPT) + 3)
    got = list(generate(model, PROMPT, n_predict=-1, cache=cache))
    assert len(got) == 4 and cache.n_past == cache.n_ctx


def test_prefix_reuse_evaluates_only_new_tokens(model):
    cache = model.new_cache(64)
    first = list(generate(model, PROMPT, n_predict=3, cache=cache))
    longer = PROMPT + first + [42, 7]
    t = Timings()
    again = list(generate(model, longer, n_predict=4, cache=cache, timings=t))
    # the first turn's last generated token was never evaluated, so 1 + 2 new tokens
    assert t.n_prompt == 3
    assert again == list(generate(model, longer, n_predict=4))


def test_seeded_sampling_repeats_and_temp0_is_greedy(model):
    a = list(generate(model, PROMPT, n_predict=10, sample=Sampler(temp=1.5, seed=3)))
    b = list(generate(model, PROMPT, n_predict=10, sample=Sampler(temp=1.5, seed=3)))
    assert a == b and all(0 <= t < N_VOCAB for t in a)
    g = list(generate(model, PROMPT, n_predict=10, sample=Sampler(temp=0.0)))
    assert g == list(generate(model, PROMPT, n_predict=10, sample=greedy))


def test_repeat_penalty_changes_the_choice(model):
    plain = list(generate(model, PROMPT, n_predict=40))
    penal = list(generate(model, PROMPT, n_predict=40,
                          sample=Sampler(temp=0.0, repeat_penalty=50.0, repeat_last_n=64)))
    assert len(set(plain)) < 40  # plain greedy repeats itself...
    assert len(set(penal)) == 40 and not set(penal) & set(PROMPT)  # ...the penalty does not


def test_empty_prompt_is_refused(model):
    with pytest.raises(BadArgument, match="empty"):
        next(generate(model, [], n_predict=1))


def test_stream_text_holds_back_split_characters(model):
    tok = Tokenizer.from_metadata(model.metadata)
    ids = tok.encode("né €x", add_special=False)  # multi-byte characters: several byte tokens
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == "né €x"
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------------------------------------
# perplexity


def _manual_ppl(model, tokens, n_ctx, bos=None):
    nll = []
    for i in range(len(tokens) // n_ctx):
        chunk = np.array(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        logits = model.forward(chunk, model.new_cache(n_ctx), "all").astype(np.float64)
        lp = logits - logits.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        for j in range(n_ctx // 2, n_ctx - 1):
            nll.append(-lp[j, tokens[i * n_ctx + j + 1]])
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (len(nll) - 1)), len(nll)


@pytest.mark.parametrize("bos", [None, 258])
def test_perplexity_protocol(model, bos):
    tokens = list(np.random.default_rng(0).integers(0, N_VOCAB, 100))
    seen = []
    r = perplexity(model, tokens, n_ctx=32, bos_id=bos, progress=lambda i, n, p: seen.append(i))
    ppl, err, count = _manual_ppl(model, tokens, 32, bos)
    assert r.chunks == 3 and seen == [1, 2, 3]
    assert r.tokens == count == 3 * 15
    assert r.ppl == pytest.approx(ppl, rel=1e-4)
    assert r.stderr == pytest.approx(err, rel=1e-3)
    assert r.running[-1] == pytest.approx(r.ppl)


def test_perplexity_chunk_limit_and_short_text(model):
    tokens = list(range(1, 129))
    assert perplexity(model, tokens, n_ctx=32, n_chunks=2).chunks == 2
    with pytest.raises(BadArgument, match="at least 64"):
        perplexity(model, tokens[:63], n_ctx=32)


def test_chunk_nll_is_log_softmax():
    logits = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, -1.0]], np.float32)
    got = chunk_nll(logits, np.array([2, 0]))
    want = [-(2 - math.log(1 + math.e + math.e ** 2)),
            -(5 - math.log(2 * math.exp(5) + math.exp(-1)))]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bench_reports_rates(model):
    r = bench(model, n_prompt=16, n_gen=4, reps=1, warmup=False)
    assert r.pp_tps > 0 and r.tg_tps > 0 and r.threads >= 1
    assert set(r.as_dict()) >= {"pp_tps", "tg_tps", "threads"}
