"""Choosing the next token from logits: small pure filters and a ``Sampler`` chaining them.

Every filter takes a logits vector ``(n_vocab,)`` and returns a new float32 one in which the
tokens it rules out are ``-inf`` (inputs are never modified), so they compose freely:

    x = apply_repetition_penalty(logits, history[-64:], 1.1)
    x = temperature(min_p(top_p(top_k(x, 40), 0.95), 0.05), 0.8)
    token = sample_dist(x, rng)

``Sampler`` runs llama.cpp's default chain in llama.cpp's order:
penalties -> top_k -> top_p -> min_p -> temperature -> dist.  ``temp == 0`` is greedy: the
highest (penalized) logit, ties going to the lowest id.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import BadArgument


def _logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise BadArgument(f"logits must be a non-empty vector (n_vocab,), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise BadArgument(f"logits must be floats, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=True)
    if np.isnan(x).any():
        raise BadArgument(f"logits hold NaN at ids {np.flatnonzero(np.isnan(x))[:8].tolist()}")
    return x


def _number(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadArgument(f"{name} must be a number, got {value!r}") from None
    bad_lo = v <= lo if lo_open else v < lo
    if math.isnan(v) or bad_lo or v > hi:
        lo_txt = f"> {lo}" if lo_open else f">= {lo}"
        hi_txt = "" if hi == math.inf else f" and <= {hi}"
        raise BadArgument(f"{name} = {value!r}: must be {lo_txt}{hi_txt}")
    return v


def _integer(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadArgument(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise BadArgument(f"{name} = {value}: must be >= {lo}")
    return int(value)


def _ruled_out(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.full_like(x, -np.inf)
    out[keep] = x[keep]
    return out


def _sorted_candidates(x: np.ndarray) -> np.ndarray:
    """Ids of the finite logits, best first, ties by lower id."""
    ids = np.flatnonzero(np.isfinite(x))
    return ids[np.lexsort((ids, -x[ids]))]


def apply_repetition_penalty(logits, recent_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Make tokens seen in ``recent_ids`` less likely (llama.cpp's ``penalty_repeat``).

    Each distinct recent token's logit is divided by ``penalty`` when positive and multiplied
    by it when zero or negative, once however often the token occurs.  1.0 changes nothing.
    """
    x = _logits(logits)
    penalty = _number("repeat penalty", penalty, 0.0, lo_open=True)
    ids = np.unique(np.asarray(list(recent_ids), dtype=np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= x.size):
        bad = ids[(ids < 0) | (ids >= x.size)][0]
        raise BadArgument(f"recent id {bad} is outside the vocabulary (0..{x.size - 1})")
    if penalty == 1.0 or not ids.size:
        return x
    sel = x[ids]
    x[ids] = np.where(sel <= 0, sel * np.float32(penalty), sel / np.float32(penalty))
    return x


def apply_presence_frequency_penalty(logits, recent_ids: Sequence[int], presence: float,
                                     frequency: float) -> np.ndarray:
    """OpenAI's presence / frequency penalties (llama.cpp's ``penalty_present``/``penalty_freq``):
    a token seen c > 0 times in ``recent_ids`` loses ``c * frequency + presence`` from its logit.
    """
    x = _logits(logits)
    presence = _number("presence_penalty", presence, -2.0, 2.0)
    frequency = _number("frequency_penalty", frequency, -2.0, 2.0)
    ids, counts = np.unique(np.asarray(list(recent_ids), dtype=np.int64), return_counts=True)
    if ids.size and (ids[0] < 0 or ids[-1] >= x.size):
        bad = ids[(ids < 0) | (ids >= x.size)][0]
        raise BadArgument(f"recent id {bad} is outside the vocabulary (0..{x.size - 1})")
    if (presence == 0.0 and frequency == 0.0) or not ids.size:
        return x
    x[ids] -= (counts * np.float32(frequency) + np.float32(presence)).astype(np.float32)
    return x


def top_k(logits, k: int) -> np.ndarray:
    """Keep the ``k`` highest logits (ties at the edge: lower ids); ``k <= 0`` keeps all."""
    x = _logits(logits)
    k = _integer("top_k", k, -(2 ** 31))
    if k <= 0 or k >= x.size:
        return x
    kth = np.partition(x, x.size - k)[x.size - k]  # the k-th highest value
    keep = x > kth
    ties = np.flatnonzero(x == kth)[: k - int(keep.sum())]
    keep[ties] = True
    return _ruled_out(x, keep)


def softmax(logits) -> np.ndarray:
    """Probabilities (float64) of the logits; ``-inf`` entries get 0."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p(logits, p: float, min_keep: int = 1) -> np.ndarray:
    """Keep the most likely tokens whose probabilities first add up to ``p`` (nucleus).

    ``p >= 1`` keeps all.  At least ``min_keep`` tokens stay.
    """
    x = _logits(logits)
    p = _number("top_p", p, 0.0, 1.0)
    min_keep = _integer("min_keep", min_keep, 0)
    if p >= 1.0:
        return x
    order = _sorted_candidates(x)
    probs = softmax(x[order])
    cum = np.cumsum(probs)
    # first position where the running sum reaches p with at least min_keep tokens in
    reached = np.flatnonzero((cum >= p) & (np.arange(1, order.size + 1) >= min_keep))
    n = int(reached[0]) + 1 if reached.size else order.size
    keep = np.zeros(x.size, bool)
    keep[order[:n]] = True
    return _ruled_out(x, keep)


def min_p(logits, p: float, min_keep: int = 1) -> np.ndarray:
    """Keep tokens at least ``p`` times as likely as the most likely one; ``p <= 0`` keeps all."""
    x = _logits(logits)
    p = _number("min_p", p, 0.0, 1.0)
    min_keep = _integer("min_keep", min_keep, 0)
    if p <= 0.0:
        return x
    floor = np.float32(x.max() + math.log(p))  # p_i >= p * p_max  <=>  l_i >= l_max + log p
    keep = x >= floor
    if keep.sum() < min_keep:
        keep[_sorted_candidates(x)[:min_keep]] = True
    return _ruled_out(x, keep)


def temperature(logits, temp: float) -> np.ndarray:
    """Divide logits by ``temp``; ``temp == 0`` keeps only the best token (lowest id on ties)."""
    x = _logits(logits)
    temp = _number("temperature", temp, 0.0)
    if temp == 0.0:
        keep = np.zeros(x.size, bool)
        keep[int(np.argmax(x))] = True
        return _ruled_out(x, keep)
    return x / np.float32(temp)


def greedy(logits) -> int:
    """The id of the highest logit (the lowest such id on ties)."""
    return int(np.argmax(_logits(logits)))


def sample_dist(logits, rng: np.random.Generator) -> int:
    """Draw one id with probability softmax(logits); ``-inf`` entries are never drawn."""
    x = _logits(logits)
    if not np.isfinite(x).any():
        raise BadArgument("every logit is -inf: the filters left no token to sample")
    ids = np.flatnonzero(np.isfinite(x))
    cum = np.cumsum(np.exp(x[ids].astype(np.float64) - x[ids].max()))
    # first id whose running sum reaches the target (llama.cpp's dist sampler walks the same way)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="left"))
    return int(ids[min(i, ids.size - 1)])


class Sampler:
    """llama.cpp's default sampling chain with its default settings; call it with the logits.

        sample = Sampler(temp=0.8, seed=42)
        token = sample(logits, history)     # history: ids so far (prompt included)

    ``repeat_last_n``: how many of the latest ids the penalties look at (0: none, -1: all of
    ``history``); ``presence_penalty`` / ``frequency_penalty`` as OpenAI's (0 = off).
    """

    def __init__(self, temp: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0):
        self.temp = _number("temperature", temp, 0.0)
        self.top_k = _integer("top_k", top_k, -(2 ** 31))
        self.top_p = _number("top_p", top_p, 0.0, 1.0)
        self.min_p = _number("min_p", min_p, 0.0, 1.0)
        self.repeat_penalty = _number("repeat penalty", repeat_penalty, 0.0, lo_open=True)
        self.repeat_last_n = _integer("repeat_last_n", repeat_last_n, -1)
        self.presence_penalty = _number("presence_penalty", presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _number("frequency_penalty", frequency_penalty, -2.0, 2.0)
        if seed is not None:
            seed = _integer("seed", seed, 0)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits, history: Sequence[int] = ()) -> int:
        x = logits
        penalize = self.repeat_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        if penalize and self.repeat_last_n != 0:
            recent = list(history)
            if self.repeat_last_n > 0:
                recent = recent[-self.repeat_last_n:]
            x = apply_repetition_penalty(x, recent, self.repeat_penalty)
            x = apply_presence_frequency_penalty(x, recent, self.presence_penalty,
                                                 self.frequency_penalty)
        if self.temp == 0.0:
            return greedy(x)
        x = top_k(x, self.top_k)
        x = top_p(x, self.top_p)
        x = min_p(x, self.min_p)
        x = temperature(x, self.temp)
        return sample_dist(x, self.rng)

    def __repr__(self) -> str:
        return (f"Sampler(temp={self.temp}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}, repeat_penalty={self.repeat_penalty}, "
                f"repeat_last_n={self.repeat_last_n}, presence_penalty={self.presence_penalty}, "
                f"frequency_penalty={self.frequency_penalty}, seed={self.seed})")
