"""``blockq generate / chat / perplexity / bench``: running a model, in llama.cpp users' terms.

``generate`` writes only the generated text to stdout; timings and diagnostics go to stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import BadArgument
from .progress import ChunkProgress

DEFAULT_CTX = 4096  # llama.cpp's default -c, capped at the model's training context


# -- shared options ---------------------------------------------------------------------------

def _model_arg(f):
    return click.argument("model", required=False,
                          type=click.Path(exists=True, dir_okay=False, path_type=Path))(f)


def _threads_opt(f):
    return click.option("-t", "--threads", type=int, default=None,
                        help="CPU threads for the kernels (default: all cores numba sees).")(f)


def _gpu_opt(f):
    return click.option("-ngl", "--gpu-layers", default=None,
                        help="Blocks to offload to the GPU, the last ones first: N, 'all' or "
                             "'auto' (needs CuPy and a CUDA device; default: none).")(f)


def _numerics_opt(f):
    return click.option("--numerics", type=click.Choice(["default", "llama"]), default="default",
                        show_default=True,
                        help="'llama': reproduce llama.cpp's CPU arithmetic bit for bit (8-bit "
                             "activations; llama models in Q4_0..Q8_0 and Q2_K..Q6_K; slow, for "
                             "comparisons).")(f)


def _ctx_opts(f):
    f = click.option("--cache-type", type=click.Choice(["f16", "f32"]), default="f16",
                     show_default=True, help="KV cache precision (llama.cpp: -ctk/-ctv).")(f)
    return click.option("-c", "--ctx-size", "n_ctx", type=int, default=DEFAULT_CTX,
                        show_default=True,
                        help="Context size in tokens (capped at the model's own).")(f)


def _sampling_opts(f):
    opts = [
        click.option("--temp", type=float, default=0.8, show_default=True,
                     help="Temperature; 0 = greedy."),
        click.option("--top-k", type=int, default=40, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="1 = off."),
        click.option("--min-p", type=float, default=0.05, show_default=True, help="0 = off."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                     help="1 = off."),
        click.option("--repeat-last-n", type=int, default=64, show_default=True,
                     help="Tokens the repeat penalty looks back over."),
        click.option("-s", "--seed", type=int, default=-1, show_default=True,
                     help="RNG seed; -1 = random."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def set_threads(threads: int | None) -> int:
    """Set the kernels' thread count (``-t``; None: Numba's default, every core).

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


def open_model(path: Path | None, threads: int | None = None, gpu_layers=None,
               n_ctx: int = DEFAULT_CTX, numerics: str = "default"):
    """(model, tokenizer) for a GGUF path, or for the default SmolLM2 file when None; the last
    ``gpu_layers`` blocks are offloaded to the GPU (``--gpu-layers``)."""
    from ..model import Model
    from ..tokenizer import Tokenizer

    set_threads(threads)
    if path is None:
        from ..fetch import smollm2_path
        path = smollm2_path()
    model = Model.load(path, numerics=numerics)
    apply_gpu_layers(model, gpu_layers, _ctx(model, n_ctx))
    return model, Tokenizer.from_metadata(model.metadata)


def apply_gpu_layers(model, gpu_layers, n_ctx: int) -> int:
    """Offload per ``--gpu-layers`` (N, 'all', 'auto'); returns the number of blocks offloaded."""
    from ..gpu.offload import auto_layers, parse_gpu_layers

    n = parse_gpu_layers(gpu_layers, model.args.n_layer)
    if n == 0:
        model.offload(0)
        return 0
    from ..gpu import require_gpu

    device = require_gpu()
    if n == "auto":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        n = auto_layers(model, n_ctx, free)
        _err(f"--gpu-layers auto: {n} of {model.args.n_layer} blocks on the GPU ({device})")
    model.offload(n)
    return n


def make_sampler(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed):
    from ..sampling import Sampler

    return Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                   seed=None if seed < 0 else seed)


def _ctx(model, n_ctx: int) -> int:
    if n_ctx <= 0:
        return model.args.n_ctx_train
    return min(n_ctx, model.args.n_ctx_train)


def _eog(tok) -> frozenset[int]:
    return frozenset(tok.eog_ids)


def _err(msg: str) -> None:
    click.echo(msg, err=True)


# -- generate ---------------------------------------------------------------------------------

@click.command()
@_model_arg
@click.option("-p", "--prompt", default=None, help="Prompt text (special tokens are parsed).")
@click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False,
                                                               path_type=Path),
              help="Read the prompt from a file.")
@click.option("-n", "--n-predict", type=int, default=-1, show_default=True,
              help="Tokens to generate; -1 = until end of generation or a full context.")
@_sampling_opts
@_threads_opt
@_ctx_opts
@_gpu_opt
@_numerics_opt
def generate(model, prompt, prompt_file, n_predict, temp, top_k, top_p, min_p, repeat_penalty,
             repeat_last_n, seed, threads, n_ctx, cache_type, gpu_layers, numerics):
    """Continue PROMPT with MODEL (a GGUF file; default: SmolLM2-135M-Instruct).

    Only the generated text goes to stdout; timings go to stderr.
    """
    from .. import generate as gen

    if prompt is not None and prompt_file is not None:
        raise BadArgument("give the prompt with -p or -f, not both")
    text = prompt_file.read_text(encoding="utf-8") if prompt_file else (prompt or "")
    m, tok = open_model(model, threads, gpu_layers, n_ctx, numerics)
    ids = tok.encode(text, add_special=True, parse_special=True)
    if not ids:
        ids = [tok.bos_id]
    cache = m.new_cache(_ctx(m, n_ctx), cache_type)
    sampler = make_sampler(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    timings = gen.Timings()
    stream = gen.generate(m, ids, n_predict=n_predict, sample=sampler, cache=cache,
                          eog=_eog(tok), timings=timings)
    out = sys.stdout
    for piece in gen.stream_text(tok, stream):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    _err(timings.summary())


# -- chat -------------------------------------------------------------------------------------

@click.command()
@_model_arg
@click.option("-sys", "--system-prompt", "system", default=None, help="System message.")
@click.option("-n", "--n-predict", type=int, default=-1, show_default=True,
              help="Most tokens per reply; -1 = until end of generation.")
@_sampling_opts
@_threads_opt
@_ctx_opts
@_gpu_opt
def chat(model, system, n_predict, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
         seed, threads, n_ctx, cache_type, gpu_layers):
    """Talk with MODEL through its chat template: one message per line on stdin.

    The conversation is kept (and its cached keys/values reused); /exit or end of input ends it.
    """
    from .. import generate as gen

    m, tok = open_model(model, threads, gpu_layers, n_ctx)
    session = ChatSession(m, tok, system=system, n_ctx=_ctx(m, n_ctx), cache_type=cache_type,
                          sampler=make_sampler(temp, top_k, top_p, min_p, repeat_penalty,
                                               repeat_last_n, seed))
    interactive = sys.stdin.isatty()
    if interactive:
        _err("chat: type a message and press enter; /exit or Ctrl-D ends.")
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if not line:
            continue
        timings = gen.Timings()
        for piece in session.reply(line, n_predict=n_predict, timings=timings):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interactive:
            _err(timings.summary())


class ChatSession:
    """A conversation: messages, their rendering through the model's template, and the cache."""

    def __init__(self, model, tokenizer, *, system=None, n_ctx=4096, cache_type="f16",
                 sampler=None, template=None):
        from ..generate import greedy

        self.model = model
        self.tok = tokenizer
        self.template = template or model.metadata.get("tokenizer.chat_template")
        if not self.template:
            raise BadArgument(f"{getattr(model, 'path', 'the model')} has no "
                              "tokenizer.chat_template; chat needs one")
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = model.new_cache(n_ctx, cache_type)
        self.sample = sampler or greedy

    def prompt_ids(self) -> list[int]:
        from ..chat import render_chat

        bos = self.tok.token_text(self.tok.bos_id)
        text = render_chat(self.template, self.messages, add_generation_prompt=True,
                           bos_token=bos, eos_token=self.tok.token_text(self.tok.eos_id))
        # a template that writes {{ bos_token }} itself must not get a second one
        add_special = not (bos and text.startswith(bos))
        return self.tok.encode(text, add_special=add_special, parse_special=True)

    def reply(self, message: str, n_predict: int = -1, timings=None):
        """Add a user message; yield the reply's text pieces; keep the reply in the history."""
        from .. import generate as gen

        self.messages.append({"role": "user", "content": message})
        ids = self.prompt_ids()
        if len(ids) >= self.cache.n_ctx:
            self.messages.pop()
            raise BadArgument(f"the conversation needs {len(ids)} tokens, the context holds "
                              f"{self.cache.n_ctx} (raise -c)")
        stream = gen.generate(self.model, ids, n_predict=n_predict, sample=self.sample,
                              cache=self.cache, eog=frozenset(self.tok.eog_ids), timings=timings)
        parts = []
        for piece in gen.stream_text(self.tok, stream):
            parts.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(parts)})


# -- perplexity -------------------------------------------------------------------------------

@click.command()
@_model_arg
@click.option("-f", "--file", "text_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text to score (e.g. wiki.test.raw).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True,
              help="Tokens per chunk.")
@click.option("--chunks", type=int, default=-1, show_default=True,
              help="Most chunks to score; -1 = all.")
@click.option("--cache-type", type=click.Choice(["f16", "f32"]), default="f16",
              show_default=True, help="KV cache precision.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_threads_opt
@_gpu_opt
@_numerics_opt
def perplexity(model, text_file, n_ctx, chunks, cache_type, as_json, threads, gpu_layers,
               numerics):
    """Perplexity of MODEL on a text file, by llama-perplexity's protocol.

    Non-overlapping chunks of -c tokens; each starts from an empty cache (first token replaced
    by BOS when the model adds one); the second half of each chunk is scored.
    """
    from ..generate import perplexity as ppl_fn

    m, tok = open_model(model, threads, gpu_layers, n_ctx, numerics)
    ids = tok.encode(text_file.read_text(encoding="utf-8"), add_special=True)
    bos = tok.bos_id if tok.add_bos else None
    with ChunkProgress("perplexity", "PPL") as bar:
        res = ppl_fn(m, ids, n_ctx=n_ctx, n_chunks=chunks, bos_id=bos, cache_type=cache_type,
                     progress=bar)
    if as_json:
        click.echo(json.dumps(res.as_dict()))
    else:
        _err(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(res.running)))
        click.echo(f"PPL = {res.ppl:.4f} +/- {res.stderr:.5f}")


# -- bench ------------------------------------------------------------------------------------

@click.command()
@_model_arg
@click.option("-p", "--n-prompt", type=int, default=128, show_default=True,
              help="Prompt tokens (pp test).")
@click.option("-n", "--n-gen", type=int, default=64, show_default=True,
              help="Generated tokens (tg test).")
@click.option("-r", "--repetitions", "reps", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list of them "
              "when several --gpu-layers values are given).")
@_threads_opt
@click.option("-ngl", "--gpu-layers", default="0", show_default=True,
              help="Blocks on the GPU; several comma-separated values (e.g. 0,8,all) bench each.")
def bench(model, n_prompt, n_gen, reps, as_json, threads, gpu_layers):
    """Prompt and decode throughput of MODEL, like llama-bench's pp/tg tests."""
    from ..generate import bench as bench_fn

    m, _ = open_model(model, threads)
    results = []
    for value in gpu_layers.split(","):
        n_gpu = apply_gpu_layers(m, value, max(n_prompt, n_gen, 1))
        results.append((n_gpu, bench_fn(m, n_prompt=n_prompt, n_gen=n_gen, reps=reps)))
    if as_json:
        rows = [dict(res.as_dict(), gpu_layers=n_gpu) for n_gpu, res in results]
        click.echo(json.dumps(rows[0] if len(rows) == 1 else rows))
        return
    name = getattr(m, "path", Path("model")).name
    size = m.nbytes / 2**20
    click.echo("| model | size | threads | ngl | test | t/s |")
    click.echo("| --- | ---: | ---: | ---: | --- | ---: |")
    for n_gpu, res in results:
        if n_prompt:
            click.echo(f"| {name} | {size:.1f} MiB | {res.threads} | {n_gpu} | pp{n_prompt} | "
                       f"{res.pp_tps:.2f} ± {res.pp_std:.2f} |")
        if n_gen:
            click.echo(f"| {name} | {size:.1f} MiB | {res.threads} | {n_gpu} | tg{n_gen} | "
                       f"{res.tg_tps:.2f} ± {res.tg_std:.2f} |")
