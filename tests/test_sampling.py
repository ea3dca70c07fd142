"""Sampling filters on tiny hand-checked logits, and the Sampler chain."""
import math

import numpy as np
import pytest

from blockq.errors import BadArgument
from blockq.sampling import (Sampler, apply_presence_frequency_penalty, apply_repetition_penalty,
                             greedy, min_p, sample_dist, softmax,
                             temperature, top_k, top_p)

NEG = -np.inf
P4 = np.log(np.array([0.5, 0.3, 0.15, 0.05]))  # logits of known probabilities


def kept(x):
    return np.flatnonzero(np.isfinite(x)).tolist()


def test_repetition_penalty_divides_positive_multiplies_negative():
    x = np.array([2.0, -2.0, 0.0, 1.0], np.float32)
    out = apply_repetition_penalty(x, [0, 1, 2, 0, 0], 2.0)  # repeats count once
    assert out.tolist() == [1.0, -4.0, 0.0, 1.0]
    assert x.tolist() == [2.0, -2.0, 0.0, 1.0]  # input untouched
    assert apply_repetition_penalty(x, [], 2.0).tolist() == x.tolist()
    assert apply_repetition_penalty(x, [0, 1], 1.0).tolist() == x.tolist()


def test_presence_frequency_penalty_subtracts_per_count():
    x = np.array([2.0, -2.0, 0.0, 1.0], np.float32)
    out = apply_presence_frequency_penalty(x, [0, 1, 0, 0], presence=0.5, frequency=0.25)
    assert out.tolist() == [2.0 - 3 * 0.25 - 0.5, -2.0 - 0.25 - 0.5, 0.0, 1.0]
    assert x.tolist() == [2.0, -2.0, 0.0, 1.0]  # input untouched
    assert apply_presence_frequency_penalty(x, [0], 0.0, 0.0).tolist() == x.tolist()
    with pytest.raises(BadArgument, match="presence_penalty"):
        apply_presence_frequency_penalty(x, [0], 3.0, 0.0)
    # in the chain: 1 and 2 lose 0.5 each, so 3 (1.9) wins
    assert Sampler(temp=0, presence_penalty=0.5)(np.array([0.5, 2.0, 2.0, 1.9], np.float32),
                                                 [1, 2]) == 3


@pytest.mark.parametrize("k,expected", [
    (1, [1]),            # tie between ids 1 and 2: the lower id stays
    (2, [1, 2]),
    (3, [1, 2, 3]),
    (0, [0, 1, 2, 3, 4]),   # disabled
    (-1, [0, 1, 2, 3, 4]),
    (99, [0, 1, 2, 3, 4]),
])
def test_top_k(k, expected):
    x = np.array([1.0, 3.0, 3.0, 2.0, 0.0])
    out = top_k(x, k)
    assert kept(out) == expected
    assert np.array_equal(out[expected], x[expected])


@pytest.mark.parametrize("p,expected", [
    (0.4, [0]), (0.5, [0]), (0.75, [0, 1]), (0.9, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3]),
])
def test_top_p(p, expected):
    assert kept(top_p(P4, p)) == expected


def test_top_p_min_keep_and_order():
    assert kept(top_p(P4, 0.1, min_keep=3)) == [0, 1, 2]
    shuffled = P4[[2, 0, 3, 1]]  # probabilities .15 .5 .05 .3 -> keep ids 1 and 3
    assert kept(top_p(shuffled, 0.75)) == [1, 3]
    # ruled-out tokens stay out and do not count
    assert kept(top_p(np.array([NEG, 0.0, 0.0]), 0.5)) == [1]


@pytest.mark.parametrize("p,expected", [
    (0.0, [0, 1, 2, 3]), (0.05, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (0.7, [0]),
])
def test_min_p(p, expected):
    assert kept(min_p(P4, p)) == expected  # keeps p_i >= p * p_max (p_max = 0.5)


def test_temperature():
    x = np.array([1.0, 4.0, 4.0, -2.0])
    assert temperature(x, 2.0).tolist() == [0.5, 2.0, 2.0, -1.0]
    assert kept(temperature(x, 0.0)) == [1]  # greedy: best logit, lowest id on ties
    assert greedy(x) == 1
    # a lower temperature sharpens the distribution
    assert softmax(temperature(x, 0.5))[1] > softmax(x)[1]


def test_sample_dist_frequencies_and_exclusions():
    rng = np.random.default_rng(0)
    x = np.log(np.array([0.6, 0.3, 0.1, 0.0001]))
    x[3] = NEG
    draws = np.bincount([sample_dist(x, rng) for _ in range(3000)], minlength=4) / 3000
    assert draws[3] == 0
    assert np.allclose(draws[:3], [0.6, 0.3, 0.1], atol=0.04)


def test_sampler_greedy_and_penalty():
    x = np.array([0.5, 2.0, 2.0, 1.9], np.float32)
    assert Sampler(temp=0)(x, []) == 1
    # penalizing 1 and 2 (2.0 -> 1.0) leaves 3 (1.9) on top
    assert Sampler(temp=0, repeat_penalty=2.0)(x, [1, 2]) == 3
    # the penalty looks only at the last repeat_last_n ids
    assert Sampler(temp=0, repeat_penalty=2.0, repeat_last_n=1)(x, [1, 2]) == 1
    assert Sampler(temp=0, repeat_penalty=2.0, repeat_last_n=0)(x, [1, 2]) == 1
    assert Sampler(temp=0, repeat_penalty=2.0, repeat_last_n=-1)(x, [2, 1, 0, 0]) == 3


def test_sampler_chain_is_seeded_and_filters():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=1000).astype(np.float32) * 3
    top5 = set(np.argsort(-logits)[:5].tolist())
    a = [Sampler(temp=1.0, top_k=5, top_p=1.0, min_p=0.0, seed=7)(logits) for _ in range(3)]
    s1, s2 = Sampler(seed=7, top_k=5), Sampler(seed=7, top_k=5)
    seq1 = [s1(logits) for _ in range(50)]
    seq2 = [s2(logits) for _ in range(50)]
    assert seq1 == seq2
    assert set(seq1) <= top5 and set(a) <= top5
    assert len(set(seq1)) > 1  # it does sample, not argmax


@pytest.mark.parametrize("call,match", [
    (lambda: top_k(np.zeros((2, 3)), 1), "vector"),
    (lambda: top_k(np.array([], np.float32), 1), "vector"),
    (lambda: top_k(np.array([1, 2]), 1), "floats"),
    (lambda: top_k(np.array([1.0, math.nan]), 1), "NaN"),
    (lambda: top_k(np.zeros(3), 1.5), "integer"),
    (lambda: top_p(np.zeros(3), 1.5), "top_p"),
    (lambda: min_p(np.zeros(3), -0.1), "min_p"),
    (lambda: temperature(np.zeros(3), -1), "temperature"),
    (lambda: apply_repetition_penalty(np.zeros(3), [3], 1.1), "outside the vocabulary"),
    (lambda: apply_repetition_penalty(np.zeros(3), [0], 0.0), "repeat penalty"),
    (lambda: sample_dist(np.full(3, NEG), np.random.default_rng()), "no token"),
    (lambda: Sampler(temp="hot"), "number"),
    (lambda: Sampler(repeat_last_n=-2), "repeat_last_n"),
    (lambda: Sampler(seed=-1), "seed"),
])
def test_bad_arguments(call, match):
    with pytest.raises(BadArgument, match=match):
        call()
