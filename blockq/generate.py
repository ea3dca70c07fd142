"""Running a model: token generation (a generator), perplexity (llama-perplexity's protocol) and
a prompt/decode throughput benchmark (llama-bench's pp/tg tests).

Everything here works on token ids; text in and out is the tokenizer's business (see
:func:`stream_text` for turning a stream of ids into a stream of text).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import BadArgument
from .model import KVCache, Model
from .validate import check_chunks

N_BATCH = 512  # prompt tokens per forward pass (llama.cpp's default n_ubatch)

Sample = Callable[[np.ndarray, Sequence[int]], int]  # (logits (n_vocab,), history) -> id


def greedy(logits: np.ndarray, history: Sequence[int] = ()) -> int:
    return int(np.argmax(logits))


@dataclass
class Timings:
    """Filled in by :func:`generate` as it runs (seconds, token counts)."""
    n_prompt: int = 0  # prompt tokens evaluated (not counting a reused cached prefix)
    t_prompt: float = 0.0
    n_gen: int = 0  # tokens decoded one at a time
    t_gen: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else float("nan")

    @property
    def gen_tps(self) -> float:
        return self.n_gen / self.t_gen if self.t_gen > 0 else float("nan")

    def summary(self) -> str:
        return (f"prompt: {self.n_prompt} tokens in {self.t_prompt:.2f} s "
                f"({self.prompt_tps:.1f} tok/s) | generation: {self.n_gen} tokens in "
                f"{self.t_gen:.2f} s ({self.gen_tps:.1f} tok/s)")


def prefill(model: Model, tokens: Sequence[int], cache: KVCache,
            n_batch: int = N_BATCH) -> np.ndarray:
    """Evaluate ``tokens`` after what ``cache`` holds, n_batch at a time; logits of the last."""
    logits = None
    for i in range(0, len(tokens), n_batch):
        logits = model.forward(tokens[i:i + n_batch], cache, "last")
    return logits[0]  # (n_vocab,)


def generate(model: Model, prompt: Sequence[int], *, n_predict: int = -1,
             sample: Sample = greedy, cache: KVCache | None = None,
             eog: Iterable[int] = (), timings: Timings | None = None,
             n_batch: int = N_BATCH) -> Iterator[int]:
    """Yield the token ids the model writes after ``prompt``.

    The prompt goes through in batches, then one token at a time.  Generation stops after
    ``n_predict`` tokens (-1: no limit), at an end-of-generation id in ``eog`` (not yielded),
    or when the cache is full.  A ``cache`` that already holds a prefix of ``prompt`` (the
    previous turns of a chat) is reused: only the new tokens are evaluated.
    """
    if not len(prompt):
        raise BadArgument("the prompt is empty: give at least one token (e.g. BOS)")
    if cache is None:
        cache = model.new_cache(min(model.args.n_ctx_train,
                                    len(prompt) + (n_predict if n_predict >= 0 else 512)))
    if len(prompt) > cache.n_ctx:
        raise BadArgument(f"the prompt has {len(prompt)} tokens, more than the context of "
                          f"{cache.n_ctx} (raise -c)")
    eog = frozenset(int(t) for t in eog)
    timings = timings if timings is not None else Timings()

    # reuse the longest cached prefix, but always evaluate at least the last prompt token
    keep = 0
    for a, b in zip(cache.tokens, prompt[:-1]):
        if a != b:
            break
        keep += 1
    cache.truncate(keep)

    t0 = time.perf_counter()
    logits = prefill(model, list(prompt[keep:]), cache, n_batch)
    timings.n_prompt += len(prompt) - keep
    timings.t_prompt += time.perf_counter() - t0

    n = 0
    while n_predict < 0 or n < n_predict:
        tok = int(sample(logits, cache.tokens))
        if tok in eog:
            return
        n += 1
        yield tok
        if n == n_predict or cache.n_past >= cache.n_ctx:
            return
        t0 = time.perf_counter()
        logits = model.forward([tok], cache, "last")[0]
        timings.n_gen += 1
        timings.t_gen += time.perf_counter() - t0


def stream_text(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of ids into a stream of text pieces (whole UTF-8 characters only)."""
    dec = tokenizer.stream()
    for t in ids:
        piece = dec.push(t)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


# ---------------------------------------------------------------------------------------------
# perplexity


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float  # standard error of the PPL estimate (llama-perplexity's "+/-")
    chunks: int  # chunks of n_ctx tokens evaluated
    tokens: int  # tokens scored (second half of each chunk, minus its last)
    running: tuple[float, ...] = field(default=(), repr=False)  # PPL after each chunk

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "stderr": self.stderr, "chunks": self.chunks,
                "tokens": self.tokens}


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits, float64 (n,).

    NOTE: llama-perplexity's log_softmax: exp of (logit - max) in float, summed in double.
    """
    m = logits.max(axis=1, keepdims=True)  # (n, 1)
    sum_exp = np.exp(logits - m).sum(axis=1, dtype=np.float64)  # (n,)
    picked = np.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return (m[:, 0].astype(np.float64) + np.log(sum_exp)) - picked.astype(np.float64)


def perplexity(model: Model, tokens: Sequence[int], n_ctx: int = 512, n_chunks: int = -1,
               bos_id: int | None = None, cache_type: str = "f16",
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``tokens`` by llama-perplexity's protocol.

    The text is cut into non-overlapping chunks of ``n_ctx`` tokens; each chunk is evaluated
    from an empty cache, its first token replaced by ``bos_id`` when given (models that add a
    BOS), and only the second half is scored: logits at positions n_ctx/2 .. n_ctx-2 against the
    next token.  PPL = exp(mean NLL); the error is exp(mean) * sqrt(var / (count - 1)).
    ``progress(i, n, ppl_so_far)`` is called after each chunk.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    check_chunks(n_chunks)
    if n_ctx < 4:
        raise BadArgument(f"perplexity context must be at least 4 tokens, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise BadArgument(f"perplexity with a context of {n_ctx} needs at least {2 * n_ctx} "
                          f"tokens; the text has only {len(tokens)} (use a longer text or "
                          "a smaller -c)")
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks < 0 else min(n_chunks, n_max)
    first = n_ctx // 2
    out_rows = np.arange(first, n_ctx - 1)
    cache = model.new_cache(n_ctx, cache_type)
    nll = nll2 = 0.0
    count = 0
    running = []
    for i in range(n):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos_id is not None:
            chunk[0] = bos_id
        cache.clear()
        logits = None
        parts = []
        for j in range(0, n_ctx, N_BATCH):  # batches, as llama.cpp's n_batch
            rows = out_rows[(out_rows >= j) & (out_rows < j + N_BATCH)] - j
            piece = chunk[j:j + N_BATCH]
            if len(rows):
                parts.append(model.forward(piece, cache, rows))
            else:
                model.forward(piece, cache, np.array([len(piece) - 1]))
        logits = np.concatenate(parts)  # (n_ctx - 1 - first, n_vocab)
        v = chunk_nll(logits, tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += len(v)
        running.append(math.exp(nll / count))
        if progress is not None:
            progress(i + 1, n, running[-1])
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    stderr = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl, stderr, n, count, tuple(running))


# ---------------------------------------------------------------------------------------------
# benchmark


@dataclass(frozen=True)
class BenchResult:
    pp_tps: float  # prompt tokens per second (one batch of n_prompt from an empty cache)
    tg_tps: float  # decoded tokens per second (n_gen tokens one at a time from an empty cache)
    threads: int
    n_prompt: int
    n_gen: int
    reps: int
    pp_std: float = 0.0
    tg_std: float = 0.0

    def as_dict(self) -> dict:
        return {"pp_tps": self.pp_tps, "tg_tps": self.tg_tps, "threads": self.threads,
                "n_prompt": self.n_prompt, "n_gen": self.n_gen, "reps": self.reps,
                "pp_std": self.pp_std, "tg_std": self.tg_std}


def bench(model: Model, n_prompt: int = 128, n_gen: int = 64, reps: int = 3,
          warmup: bool = True, seed: int = 0) -> BenchResult:
    """llama-bench's pp and tg tests: random tokens, a warm-up run, then ``reps`` timed runs."""
    import numba

    if n_prompt < 0 or n_gen < 0 or reps < 1 or n_prompt + n_gen == 0:
        raise BadArgument(f"bench needs n_prompt, n_gen >= 0 (not both 0) and reps >= 1; got "
                          f"{n_prompt}, {n_gen}, {reps}")
    if max(n_prompt, n_gen) > model.args.n_ctx_train:
        raise BadArgument(f"bench of {n_prompt} prompt / {n_gen} generated tokens: the model's "
                          f"context is {model.args.n_ctx_train:,} tokens")
    rng = np.random.default_rng(seed)
    n_vocab = model.args.n_vocab
    cache = model.new_cache(max(n_prompt, n_gen, 1))

    def run_pp() -> float:
        cache.clear()
        toks = rng.integers(0, n_vocab, n_prompt)
        t0 = time.perf_counter()
        prefill(model, toks, cache)
        return time.perf_counter() - t0

    def run_tg() -> float:
        cache.clear()
        tok = int(rng.integers(0, n_vocab))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(model.forward([tok], cache, "last")[0]))
        return time.perf_counter() - t0

    def rates(run, n) -> tuple[float, float]:
        if n == 0:
            return float("nan"), 0.0
        if warmup:
            run()
        tps = np.array([n / run() for _ in range(reps)])
        return float(tps.mean()), float(tps.std())

    pp, pp_std = rates(run_pp, n_prompt)
    tg, tg_std = rates(run_tg, n_gen)
    return BenchResult(pp, tg, numba.get_num_threads(), n_prompt, n_gen, reps, pp_std, tg_std)
