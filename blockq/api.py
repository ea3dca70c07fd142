"""The high-level Python API: load a model once, then generate text, chat, tokenize, and get
OpenAI-shaped completions.  ``blockq generate``, ``chat`` and ``serve`` are thin layers over it.

    m = blockq.load()                                  # SmolLM2 from PyPI, or a GGUF path
    for piece in m.generate("The capital of France is", max_tokens=16, temperature=0):
        print(piece, end="")
    r = m.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=32)
    r["choices"][0]["message"]["content"], r["usage"]

Sampling keywords (OpenAI's and llama.cpp's names): ``temperature`` (0 = greedy), ``top_k``,
``top_p``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``, ``presence_penalty``,
``frequency_penalty``, ``seed``.  Generation keywords: ``max_tokens`` (None/-1: until the end of
generation or a full context), ``stop`` (a string or a list), ``ignore_eos``, ``logprobs``,
``response_format`` (``{"type": "json_object"}``: the output is one JSON object).
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadArgument

DEFAULT_CTX = 4096  # llama.cpp's default -c, capped at the model's training context
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                repeat_last_n=64, presence_penalty=0.0, frequency_penalty=0.0, seed=None)


# -- loading ----------------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """Set the kernels' thread count (None: Numba's default, every core).

    OpenBLAS (numpy's matmul in the prompt path's attention) always gets one thread: its idle
    workers spin for a while after each call and took the cores from Numba's kernels, which
    halved prompt speed at 2 threads (pp128 on SmolLM2 Q4_K_M: 108 tok/s with both pools at 2,
    285 with OpenBLAS at 1).
    """
    import numba

    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise BadArgument(f"-t {threads}: this machine runs 1..{numba.config.NUMBA_NUM_THREADS}"
                              " threads (set NUMBA_NUM_THREADS to allow more)")
        numba.set_num_threads(threads)
    _set_blas_threads(1)
    return numba.get_num_threads()


def _set_blas_threads(n: int) -> None:
    """Best effort: numpy's bundled OpenBLAS, found among the loaded libraries (as threadpoolctl
    does); other BLAS builds keep their own setting (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break


def apply_gpu_layers(model, gpu_layers, n_ctx: int, notice=None) -> int:
    """Offload per ``gpu_layers`` (N, 'all', 'auto'; N above the layer count means all, as
    llama.cpp's -ngl 99); returns the number of blocks offloaded."""
    from .gpu.offload import auto_layers, parse_gpu_layers

    n = parse_gpu_layers(gpu_layers, model.args.n_layer)
    if n == 0:
        model.offload(0)
        return 0
    from .gpu import require_gpu

    device = require_gpu()
    if n == "auto":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        n = auto_layers(model, n_ctx, free)
        if notice:
            notice(f"--gpu-layers auto: {n} of {model.args.n_layer} blocks on the GPU ({device})")
    model.offload(n)
    return n


def context_size(model, n_ctx: int | None) -> int:
    """``n_ctx`` capped at the model's training context (None or <= 0: the model's own)."""
    if not n_ctx or n_ctx <= 0:
        return model.args.n_ctx_train
    return min(n_ctx, model.args.n_ctx_train)


def load(path: "str | Path | None" = None, *, n_ctx: int | None = DEFAULT_CTX,
         gpu_layers: "int | str | None" = None, threads: int | None = None,
         numerics: str = "default", cache_type: str = "f16", notice=None) -> "LLM":
    """Open a GGUF model (None: the SmolLM2-135M-Instruct file, fetched from PyPI once).

    ``n_ctx``: context of each cache (capped at the model's own; None: the model's own);
    ``gpu_layers``: blocks to offload (N, 'all', 'auto'); ``threads``: CPU kernel threads;
    ``notice``: called with one-line messages worth showing a user (e.g. an 'auto' choice).
    """
    from .model import Model
    from .tokenizer import Tokenizer

    set_threads(threads)
    if path is None:
        from .fetch import smollm2_path
        path = smollm2_path()
    path = Path(path)
    if not path.is_file():
        raise BadArgument(f"{path}: no such model file")
    model = Model.load(path, numerics=numerics)
    n = context_size(model, n_ctx)
    apply_gpu_layers(model, gpu_layers, n, notice)
    return LLM(model, Tokenizer.from_metadata(model.metadata), n_ctx=n, cache_type=cache_type)


def make_sampler(**sampling):
    """A :class:`blockq.sampling.Sampler` from OpenAI-named keywords (see ``SAMPLING``)."""
    from .sampling import Sampler

    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise BadArgument(f"unknown sampling option(s) {sorted(unknown)}; use {sorted(SAMPLING)}")
    s = {**SAMPLING, **{k: v for k, v in sampling.items() if v is not None}}
    seed = s["seed"]
    if seed is not None and not isinstance(seed, bool) and isinstance(seed, int) and seed < 0:
        seed = None  # -1: random, as llama.cpp
    return Sampler(temp=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"],
                   repeat_penalty=s["repeat_penalty"], repeat_last_n=s["repeat_last_n"],
                   presence_penalty=s["presence_penalty"],
                   frequency_penalty=s["frequency_penalty"], seed=seed)


RESPONSE_FORMATS = ("text", "json_object")


def wants_json(response_format) -> bool:
    """Whether an OpenAI ``response_format`` asks for a JSON object (None or ``{"type":
    "text"}``: no)."""
    if response_format is None:
        return False
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind not in RESPONSE_FORMATS:
        raise BadArgument(f"response_format {response_format!r:.80}: use {{'type': 'text'}} or "
                          "{'type': 'json_object'} (json_schema is not supported)")
    return kind == "json_object"


def _split_kwargs(kw: Mapping) -> tuple[dict, dict]:
    sampling = {k: v for k, v in kw.items() if k in SAMPLING}
    rest = {k: v for k, v in kw.items() if k not in SAMPLING}
    return sampling, rest


# -- one run of generation --------------------------------------------------------------------

@dataclass
class TokenInfo:
    """One generated token: its id, its text (as the vocabulary spells it) and, when asked for,
    its log-probability under the model and the ``top`` most likely alternatives."""
    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


def _stop_list(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise BadArgument(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(s for s in stop if s)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Run:
    """Generation after one prompt: iterate for ``(text, tokens)`` steps; afterwards
    ``finish_reason`` ("stop": end of generation or a stop string, "length": max_tokens or a
    full context), ``n_prompt`` / ``n_cached`` / ``n_gen`` token counts and timings are set.

    Each model step runs under the ``LLM``'s lock, so runs on several caches interleave token by
    token.  Closing the iterator early (a client gone, Ctrl-C) leaves the cache consistent.
    """

    def __init__(self, llm: "LLM", prompt_ids: Sequence[int], cache, *, max_tokens=None,
                 stop=None, ignore_eos=False, logprobs: int | None = None, sampler=None,
                 response_format: Mapping | None = None, **sampling):
        if not prompt_ids:
            raise BadArgument("the prompt is empty: give at least one token")
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int)):
            raise BadArgument(f"max_tokens must be an integer, got {max_tokens!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise BadArgument(f"logprobs / top_logprobs = {logprobs!r}: use an integer 0..20")
        if len(prompt_ids) >= cache.n_ctx:
            raise BadArgument(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                              f"{cache.n_ctx} (raise -c / n_ctx, or shorten the prompt)")
        self.llm = llm
        self.prompt_ids = list(prompt_ids)
        self.cache = cache
        self.max_tokens = -1 if max_tokens is None or max_tokens < 0 else max_tokens
        self.stops = _stop_list(stop)
        self.ignore_eos = ignore_eos
        self.logprobs = logprobs
        self.sampler = sampler if sampler is not None else make_sampler(**sampling)
        self.wants_json = wants_json(response_format)
        self.json = None  # its JsonObject, once iterating (the vocabulary's trie is built then)
        self.finish_reason: str | None = None
        self.n_prompt = len(self.prompt_ids)
        self.n_cached = 0  # prompt tokens reused from the cache
        self.n_gen = 0
        self.t_prompt = 0.0
        self.t_gen = 0.0
        self.text = ""  # everything released so far

    def _sample(self, logits, history):
        tok = int(self.sampler(logits, history))
        if self.json is not None:
            # as llama.cpp: keep the sampled token if the JSON allows it, else sample again
            # from the allowed ones (the same token when greedy)
            budget = self._budget()
            if not self.json.allows(tok, budget):
                masked = np.where(self.json.mask(budget), logits, np.float32(-np.inf))
                tok = int(self.sampler(masked.astype(np.float32), history))
            self.json.advance(tok)
        if self.logprobs is not None:
            x = logits.astype(np.float64)
            lse = x.max() + math.log(np.exp(x - x.max()).sum())
            self._lp = float(x[tok] - lse)
            k = self.logprobs
            top = np.argsort(-x, kind="stable")[:k] if k else []
            self._top = [(self.llm.piece(int(i)), float(x[i] - lse)) for i in top]
        return tok

    def _budget(self) -> int:
        """Tokens this run may still sample, the one being sampled included."""
        left = self.cache.n_ctx - self.cache.n_past + 1
        return min(left, self.max_tokens - self.n_gen) if self.max_tokens >= 0 else left

    def __iter__(self) -> Iterator[tuple[str, list[TokenInfo]]]:
        from .generate import Timings, generate

        llm, tok = self.llm, self.llm.tokenizer
        self.n_cached = _common_prefix(self.cache.tokens, self.prompt_ids[:-1])
        eog = () if self.ignore_eos else frozenset(tok.eog_ids)
        timings = Timings()
        if self.wants_json:
            from .json_constraint import JsonObject
            self.json = JsonObject(llm.json_vocab())
        ids = generate(llm.model, self.prompt_ids, n_predict=self.max_tokens,
                       sample=self._sample, cache=self.cache, eog=eog, timings=timings)
        dec = tok.stream()
        pending = ""  # decoded text not yet released (it may begin a stop string)
        infos: list[TokenInfo] = []
        t_first = None
        hit = None
        try:
            while True:
                t0 = time.perf_counter()
                with llm.lock:
                    t = next(ids, None)
                if t is None:
                    self.finish_reason = "length" if self.n_gen == self.max_tokens or \
                        self.cache.n_past >= self.cache.n_ctx else "stop"
                    break
                if t_first is None:
                    t_first = time.perf_counter()
                    self.t_prompt = timings.t_prompt
                    self.t_gen += t_first - t0 - timings.t_prompt
                else:
                    self.t_gen += time.perf_counter() - t0
                self.n_gen += 1
                info = TokenInfo(t, llm.piece(t))
                if self.logprobs is not None:
                    info.logprob, info.top = self._lp, self._top
                infos.append(info)
                pending += dec.push(t)
                hit = self._find_stop(pending)
                if hit is not None:
                    self.finish_reason = "stop"
                    pending = pending[:hit]
                    break
                if self.json is not None and self.json.done:  # the object is closed
                    self.finish_reason = "stop"
                    break
                if self.max_tokens >= 0 and self.n_gen >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                keep = _held_back(pending, self.stops)
                out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                if out or infos:
                    self.text += out
                    yield out, infos
                    infos = []
            if hit is None:  # what the decoder still holds belongs to the text
                pending += dec.flush()
                hit = self._find_stop(pending)
                if hit is not None:
                    self.finish_reason, pending = "stop", pending[:hit]
            if pending or infos:
                self.text += pending
                yield pending, infos
        finally:
            ids.close()
            if self.finish_reason is None:
                self.finish_reason = "cancelled"

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def summary(self) -> str:
        """One line for stderr, as llama.cpp's timings (first-run compilation is not in it when
        the model was warmed up first)."""
        n_eval = self.n_prompt - self.n_cached
        pp = n_eval / self.t_prompt if self.t_prompt > 0 else float("nan")
        tg = self.n_gen / self.t_gen if self.t_gen > 0 else float("nan")
        cached = f" (+{self.n_cached} cached)" if self.n_cached else ""
        return (f"prompt: {n_eval} tokens{cached} in {self.t_prompt:.2f} s ({pp:.1f} tok/s) | "
                f"generation: {self.n_gen} tokens in {self.t_gen:.2f} s ({tg:.1f} tok/s)")


def _kernels_cached() -> bool:
    """Whether Numba's on-disk cache already holds compiled blockq kernels."""
    import os

    from . import kernels

    here = Path(kernels.__file__).parent
    roots = [here / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        roots.append(Path(os.environ["NUMBA_CACHE_DIR"]))
    return any(next(r.rglob("*.nbi"), None) is not None for r in roots if r.is_dir())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- the loaded model -------------------------------------------------------------------------

class LLM:
    """A loaded model with its tokenizer and a default cache (whose prompt prefix is reused
    from one call to the next).  Build it with :func:`load`."""

    def __init__(self, model, tokenizer, *, n_ctx: int = DEFAULT_CTX, cache_type: str = "f16"):
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.cache_type = cache_type
        self.lock = threading.RLock()  # one model step at a time, whatever the thread
        self.cache = self.new_cache()
        path = getattr(model, "path", None)
        self.path = Path(path) if path else None
        self.name = self.path.name if self.path else "model"
        self.chat_template = model.metadata.get("tokenizer.chat_template")
        self._json_vocab = None

    def json_vocab(self):
        """The vocabulary's token bytes for JSON-constrained sampling, built on first use."""
        with self.lock:
            if self._json_vocab is None:
                from .json_constraint import JsonVocab
                self._json_vocab = JsonVocab.from_tokenizer(self.tokenizer)
            return self._json_vocab

    def new_cache(self, n_ctx: int | None = None):
        return self.model.new_cache(n_ctx or self.n_ctx, self.cache_type)

    def describe(self) -> str:
        """One line naming the model: file, architecture, size, layers, context."""
        a = self.model.args
        md = self.model.metadata
        name = md.get("general.name")
        label = f"{self.name} ({name})" if name else self.name
        return (f"model: {label}, {a.arch}, {self.model.nbytes / 2**20:.1f} MiB of weights, "
                f"{a.n_layer} layers, context {self.n_ctx} of {a.n_ctx_train}")

    def warmup(self, notice=None, after_s: float = 3.0) -> float:
        """Run the kernels once on a scratch cache so their first-run compilation (Numba, cached
        on disk afterwards) is not counted in a generation's timings.  ``notice`` is told at
        once when Numba's cache holds no blockq kernels yet, else only if the warm-up takes
        longer than ``after_s`` (a kernel this model's types need for the first time).
        Returns the seconds it took."""
        timer = None
        if notice and not _kernels_cached():
            notice("compiling the kernels (first run, about half a minute; Numba caches them "
                   "for the next runs) ...")
        elif notice:
            timer = threading.Timer(after_s, notice, ["warming up the kernels (compiling the "
                                                      "ones this model needs first) ..."])
            timer.daemon = True
            timer.start()
        t0 = time.perf_counter()
        try:
            with self.lock:
                scratch = self.model.new_cache(4, self.cache_type)
                t = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0
                self.model.forward([t, t], scratch, "last")  # the prompt path
                self.model.forward([t], scratch, "last")  # the one-token path
        finally:
            if timer:
                timer.cancel()
        return time.perf_counter() - t0

    # -- tokens --------------------------------------------------------------------------
    def tokenize(self, text: "str | bytes", add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadArgument(f"text is not valid UTF-8 ({e})") from None
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    def piece(self, token_id: int) -> str:
        """The text of one token (special tokens shown)."""
        return self.tokenizer.token_to_piece(int(token_id), special=True).decode(
            "utf-8", errors="replace")

    def chat_prompt_ids(self, messages: Sequence[Mapping], template: str | None = None
                        ) -> list[int]:
        """Token ids of ``messages`` rendered through the model's chat template, ending with
        the opening of the assistant's turn."""
        from .chat import render_chat

        template = template or self.chat_template
        if not template:
            raise BadArgument(f"{self.name} has no tokenizer.chat_template; chat needs one")
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id)
        text = render_chat(template, messages, add_generation_prompt=True, bos_token=bos,
                           eos_token=tok.token_text(tok.eos_id))
        # a template that writes {{ bos_token }} itself must not get a second one
        add_special = not (bos and text.startswith(bos))
        return tok.encode(text, add_special=add_special, parse_special=True)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_special=True, parse_special=True)
            return ids or ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else [])
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            for t in prompt:
                self.tokenizer._check_id(t)
            return list(prompt)
        raise BadArgument(f"prompt must be a non-empty string or list of token ids, "
                          f"got {prompt!r:.60}")

    # -- text ----------------------------------------------------------------------------
    def run(self, prompt_ids: Sequence[int], cache=None, **kw) -> Run:
        """A :class:`Run` (iterate it) on ``cache`` (default: this object's own)."""
        return Run(self, prompt_ids, self.cache if cache is None else cache, **kw)

    def generate(self, prompt: "str | Sequence[int]", **kw) -> Iterator[str]:
        """Yield the text pieces written after ``prompt`` (special tokens parsed)."""
        for text, _ in self.run(self._prompt_ids(prompt), **kw):
            if text:
                yield text

    def chat(self, messages: Sequence[Mapping], **kw) -> Iterator[str]:
        """Yield the assistant's reply to ``messages`` ([{"role", "content"}, ...])."""
        for text, _ in self.run(self.chat_prompt_ids(messages), **kw):
            if text:
                yield text

    # -- OpenAI-shaped -------------------------------------------------------------------
    def create_completion(self, prompt, *, max_tokens: int | None = 16, stream: bool = False,
                          logprobs: int | None = None, echo: bool = False, cache=None,
                          model: str | None = None, **kw):
        """An OpenAI ``text_completion`` dict, or with ``stream=True`` an iterator of chunks
        (the last one carries ``finish_reason`` and ``usage``)."""
        ids = self._prompt_ids(prompt)
        run = self.run(ids, cache, max_tokens=max_tokens, logprobs=logprobs, **kw)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model or self.name}
        chunks = self._completion_chunks(run, head, self.detokenize(ids) if echo else "")
        return chunks if stream else collect_completion(chunks)

    def _completion_chunks(self, run: Run, head: dict, prefix: str):
        offset = len(prefix)
        if prefix:
            yield {**head, "choices": [{"index": 0, "text": prefix, "logprobs": None,
                                        "finish_reason": None}]}
        for text, infos in run:
            if not text and run.logprobs is None:
                continue  # a token whose text is still held back (UTF-8, a stop string)
            lp = None
            if run.logprobs is not None:
                acc = _CompletionLogprobs()
                acc.add(infos, offset)
                lp = acc.as_dict()
            offset += len(text)
            yield {**head, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                        "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": run.finish_reason}], "usage": _usage(run)}

    def create_chat_completion(self, messages: Sequence[Mapping], *,
                               max_tokens: int | None = None, stream: bool = False,
                               logprobs: bool = False, top_logprobs: int | None = None,
                               cache=None, model: str | None = None, **kw):
        """An OpenAI ``chat.completion`` dict, or with ``stream=True`` an iterator of
        ``chat.completion.chunk`` dicts (the last one carries ``finish_reason`` and ``usage``)."""
        if top_logprobs is not None and not logprobs:
            raise BadArgument("top_logprobs needs logprobs: true")
        ids = self.chat_prompt_ids(messages)
        k = (top_logprobs or 0) if logprobs else None
        run = self.run(ids, cache, max_tokens=max_tokens, logprobs=k, **kw)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model or self.name}
        chunks = self._chat_chunks(run, head)
        return chunks if stream else collect_chat(chunks)

    def _chat_chunks(self, run: Run, head: dict):
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
        for text, infos in run:
            if not text and run.logprobs is None:
                continue
            lp = {"content": [_chat_logprob(i) for i in infos]} \
                if run.logprobs is not None else None
            yield {**head, "choices": [{"index": 0, "delta": {"content": text},
                                        "logprobs": lp, "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": run.finish_reason}], "usage": _usage(run)}

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, n_ctx={self.n_ctx})"


def collect_completion(chunks) -> dict:
    """The ``text_completion`` dict that a stream of completion chunks adds up to."""
    text, lp, last = [], None, None
    for last in chunks:
        c = last["choices"][0]
        text.append(c["text"])
        if c["logprobs"] is not None:
            lp = lp or {k: [] for k in c["logprobs"]}
            for k, v in c["logprobs"].items():
                lp[k].extend(v)
    choice = {"index": 0, "text": "".join(text), "logprobs": lp,
              "finish_reason": last["choices"][0]["finish_reason"]}
    return {**{k: last[k] for k in ("id", "object", "created", "model")}, "choices": [choice],
            "usage": last["usage"]}


def collect_chat(chunks) -> dict:
    """The ``chat.completion`` dict that a stream of ``chat.completion.chunk`` adds up to."""
    text, lp, last = [], None, None
    for last in chunks:
        c = last["choices"][0]
        text.append(c["delta"].get("content", ""))
        if c["logprobs"] is not None:
            lp = lp or {"content": []}
            lp["content"].extend(c["logprobs"]["content"])
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
              "logprobs": lp, "finish_reason": last["choices"][0]["finish_reason"]}
    return {"id": last["id"], "object": "chat.completion", "created": last["created"],
            "model": last["model"], "choices": [choice], "usage": last["usage"]}


def _usage(run: Run) -> dict:
    return {"prompt_tokens": run.n_prompt, "completion_tokens": run.n_gen,
            "total_tokens": run.n_prompt + run.n_gen}


def _chat_logprob(info: TokenInfo) -> dict:
    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {**entry(info.text, info.logprob), "top_logprobs": [entry(t, lp) for t, lp in info.top]}


class _CompletionLogprobs:
    """The legacy completions ``logprobs`` object (parallel lists)."""

    def __init__(self):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, infos: Sequence[TokenInfo], offset: int) -> int:
        for i in infos:
            self.tokens.append(i.text)
            self.token_logprobs.append(i.logprob)
            self.top_logprobs.append(dict(i.top))
            self.text_offset.append(offset)
            offset += len(i.text)
        return offset

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


# -- a conversation ---------------------------------------------------------------------------

class ChatSession:
    """A conversation: its messages, rendered through the model's chat template, and its own
    cache (each turn reuses the cached keys/values of the turns before it).

    When a new turn would not fit the context, the oldest user/assistant turns are dropped
    (the system message stays) and ``on_shift(n_messages_dropped)`` is called: llama.cpp's
    context shift, done at turn boundaries.  Interrupting a reply (closing its iterator, e.g. on
    Ctrl-C) keeps what was written so far in the history.
    """

    def __init__(self, llm: LLM, *, system: str | None = None, n_ctx: int | None = None,
                 on_shift=None, **kw):
        """``kw``: sampling keywords (one sampler, so one seed, for the whole conversation) and
        defaults for every reply (``stop``, ``ignore_eos``, ``max_tokens``)."""
        sampling, self.defaults = _split_kwargs(kw)
        self.llm = llm
        self.system = system
        self.cache = llm.new_cache(n_ctx)
        self.sampler = make_sampler(**sampling)
        self.on_shift = on_shift
        self.messages: list[dict] = []
        self.clear()
        llm.chat_prompt_ids(self.messages or [{"role": "user", "content": ""}])  # has a template
        self.last: Run | None = None

    def clear(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.clear()

    def prompt_ids(self) -> list[int]:
        return self.llm.chat_prompt_ids(self.messages)

    def _fit(self, max_tokens: int | None) -> list[int]:
        n_ctx = self.cache.n_ctx
        room = max_tokens if max_tokens and max_tokens > 0 else n_ctx // 4
        first = 1 if self.system else 0
        dropped = 0
        ids = self.prompt_ids()
        while len(ids) + min(room, n_ctx // 2) > n_ctx and len(self.messages) - first > 1:
            # drop the oldest turn: a user message and the assistant reply after it
            n = 2 if len(self.messages) - first > 2 and \
                self.messages[first + 1]["role"] == "assistant" else 1
            del self.messages[first:first + n]
            dropped += n
            ids = self.prompt_ids()
        if dropped and self.on_shift:
            self.on_shift(dropped)
        if len(ids) >= n_ctx:
            self.messages.pop()
            raise BadArgument(f"this message needs {len(ids)} tokens with the system prompt; "
                              f"the context holds {n_ctx} (raise -c)")
        return ids

    def reply(self, message: str, **kw) -> Iterator[str]:
        """Add a user message; yield the reply's text pieces; keep the reply in the history."""
        kw = {**self.defaults, **kw}
        self.messages.append({"role": "user", "content": message})
        ids = self._fit(kw.get("max_tokens"))
        self.last = run = self.llm.run(ids, self.cache, sampler=self.sampler, **kw)
        try:
            for text, _ in run:
                if text:
                    yield text
        finally:
            self.messages.append({"role": "assistant", "content": run.text})
