"""``blockq generate / chat / perplexity / bench``: running a model, in llama.cpp users' terms.

``generate`` writes only the generated text to stdout; timings and diagnostics go to stderr.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from ..api import DEFAULT_CTX, ChatSession, apply_gpu_layers, load, set_threads  # noqa: F401
from ..errors import BadArgument, BlockqError
from .progress import ChunkProgress


# -- shared options ---------------------------------------------------------------------------

_MODEL_PATH = click.Path(exists=True, dir_okay=False, path_type=Path)


def _model_arg(f=None, *, name: str = "model", required: bool = False):
    """NAME (default MODEL) as a positional argument or with -m/--model (llama.cpp's spelling);
    ``required``: one of them must be given (else None: the command's default model)."""
    if f is None:
        return functools.partial(_model_arg, name=name, required=required)

    @functools.wraps(f)
    def merged(*args, model_opt=None, **kw):
        model = kw.pop(name, None)
        if model is not None and model_opt is not None and model != model_opt:
            raise BadArgument(f"two models given ({model} and -m {model_opt}): give one")
        model = model if model is not None else model_opt
        if model is None and required:
            raise click.UsageError(f"Missing argument '{name.upper()}' (or -m {name.upper()}).")
        return f(*args, **{name: model}, **kw)

    merged = click.option("-m", "--model", "model_opt", type=_MODEL_PATH, default=None,
                          help=f"The GGUF file (the same as {name.upper()}).")(merged)
    return click.argument(name, required=False, type=_MODEL_PATH)(merged)


def model_pair(names: tuple[str, str], positional, first_opt, model_opt) -> tuple:
    """Two models from positional arguments, ``--NAME0`` (``first_opt``, put first) and
    -m/--model (``model_opt``, put last), as ``kld BASE QUANT`` or ``kld --base BASE -m QUANT``."""
    paths = list(positional)
    if first_opt is not None:
        paths.insert(0, first_opt)
    if model_opt is not None:
        paths.append(model_opt)
    if len(paths) != 2:
        a, b = (n.upper() for n in names)
        raise click.UsageError(f"give two models, {a} and {b} ({a} {b}, or --{names[0]} {a} -m "
                               f"{b}); got {len(paths)}")
    return tuple(paths)


def _threads_opt(f):
    return click.option("-t", "--threads", type=int, default=None,
                        help="CPU threads for the kernels (default: all cores numba sees).")(f)


def _gpu_opt(f):
    return click.option("-ngl", "--gpu-layers", default=None,
                        help="Blocks to offload to the GPU, the last ones first: N (more than "
                             "the model has = all), 'all' or 'auto' (needs CuPy and a CUDA "
                             "device; default: none).")(f)


def _numerics_opt(f):
    return click.option("--numerics", type=click.Choice(["default", "float", "llama"]),
                        default="default", show_default=True,
                        help="'default': 8-bit activations dotted with the weights' integer "
                             "codes, as llama.cpp (float32 where the CPU lacks AVX2); 'float': "
                             "float32 activations times decoded weights; 'llama': reproduce "
                             "llama.cpp's CPU arithmetic bit for bit (llama models in Q4_0..Q8_0 "
                             "and Q2_K..Q6_K; slow, for comparisons).")(f)


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
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
                     help="0 = off."),
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


def _stop_opts(f):
    f = click.option("--ignore-eos", is_flag=True,
                     help="Keep generating past end-of-generation tokens.")(f)
    return click.option("-r", "--stop", "--reverse-prompt", "stop", multiple=True,
                        help="Stop when the text contains this string (repeatable; the string "
                             "itself is not printed).")(f)


def sampling_kwargs(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed) -> dict:
    """The CLI's sampling options under the API's (OpenAI's) names."""
    return dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                seed=None if seed < 0 else seed)


def load_llm(path: Path | None, threads: int | None = None, gpu_layers=None,
             n_ctx: int = DEFAULT_CTX, numerics: str = "default", cache_type: str = "f16",
             announce: bool = False):
    """:func:`blockq.load` with the CLI's notices on stderr: which model, and (``announce``) a
    warm-up run that says so when the kernels are being compiled for the first time."""
    llm = load(path, n_ctx=n_ctx, gpu_layers=gpu_layers, threads=threads, numerics=numerics,
               cache_type=cache_type, notice=_err)
    if announce:
        _err(llm.describe())
        llm.warmup(notice=_err)
    return llm


def open_model(path: Path | None, threads: int | None = None, gpu_layers=None,
               n_ctx: int = DEFAULT_CTX, numerics: str = "default"):
    """(model, tokenizer) for a GGUF path, or for the default SmolLM2 file when None."""
    llm = load_llm(path, threads, gpu_layers, n_ctx, numerics)
    return llm.model, llm.tokenizer


def _err(msg: str) -> None:
    click.echo(msg, err=True)


# -- generate ---------------------------------------------------------------------------------

@click.command()
@_model_arg
@click.option("-p", "--prompt", default=None, help="Prompt text (special tokens are parsed).")
@click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False,
                                                               path_type=Path),
              help="Read the prompt from a file.")
@click.option("-sys", "--system-prompt", "system", default=None,
              help="System message: the prompt becomes a chat turn through the model's chat "
                   "template.")
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=-1,
              show_default=True,
              help="Tokens to generate; -1 = until end of generation or a full context "
                   "(without a prompt: at most 256).")
@_stop_opts
@_sampling_opts
@_threads_opt
@_ctx_opts
@_gpu_opt
@_numerics_opt
def generate(model, prompt, prompt_file, system, n_predict, stop, ignore_eos, temp, top_k, top_p,
             min_p, repeat_penalty, repeat_last_n, seed, threads, n_ctx, cache_type, gpu_layers,
             numerics):
    """Continue PROMPT with MODEL (a GGUF file; default: SmolLM2-135M-Instruct).

    Only the generated text goes to stdout; the model used and the timings go to stderr.
    """
    if prompt is not None and prompt_file is not None:
        raise BadArgument("give the prompt with -p or -f, not both")
    text = prompt_file.read_text(encoding="utf-8", errors="replace") if prompt_file else \
        (prompt or "")
    llm = load_llm(model, threads, gpu_layers, n_ctx, numerics, cache_type, announce=True)
    if system is not None:
        ids = llm.chat_prompt_ids([{"role": "system", "content": system},
                                   {"role": "user", "content": text}])
    elif text:
        ids = llm._prompt_ids(text)
    else:
        ids = [_start_token(llm)]
        if n_predict < 0:
            n_predict = NO_PROMPT_LIMIT
        _err(f"no prompt: generating from {llm.piece(ids[0])!r} until end of generation or "
             f"{n_predict} tokens (-n)")
    run = llm.run(ids, max_tokens=n_predict, stop=list(stop), ignore_eos=ignore_eos,
                  **sampling_kwargs(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                    seed))
    out = sys.stdout
    for piece, _ in run:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    _err(run.summary() + f" | stopped: {_FINISH[run.finish_reason]}")


NO_PROMPT_LIMIT = 256  # -n -1 without a prompt: a model left to itself may never write EOS

_FINISH = {"stop": "end of generation or a stop string", "length": "token limit or full context",
           "cancelled": "interrupted"}


def _start_token(llm) -> int:
    tok = llm.tokenizer
    if tok.bos_id is None:
        raise BadArgument(f"{llm.name} has no BOS token to start from: give a prompt (-p)")
    return tok.bos_id


# -- chat -------------------------------------------------------------------------------------

@click.command()
@_model_arg
@click.option("-sys", "--system-prompt", "system", default=None, help="System message.")
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=-1,
              show_default=True,
              help="Most tokens per reply; -1 = until end of generation.")
@_stop_opts
@_sampling_opts
@_threads_opt
@_ctx_opts
@_gpu_opt
def chat(model, system, n_predict, stop, ignore_eos, temp, top_k, top_p, min_p, repeat_penalty,
         repeat_last_n, seed, threads, n_ctx, cache_type, gpu_layers):
    """Talk with MODEL through its chat template.

    One message per line (end a line with \\ to continue it on the next); /clear forgets the
    conversation, /exit or Ctrl-D ends it.  Ctrl-C stops a reply and keeps the conversation; a
    second Ctrl-C at an empty prompt exits.  When the context is full the oldest turns are
    dropped.
    """
    interactive = sys.stdin.isatty()
    llm = load_llm(model, threads, gpu_layers, n_ctx, cache_type=cache_type,
                   announce=interactive)
    session = ChatSession(llm, system=system,
                          on_shift=lambda n: _err(f"[context full: the oldest {n} messages were "
                                                  "dropped]"),
                          **sampling_kwargs(temp, top_k, top_p, min_p, repeat_penalty,
                                            repeat_last_n, seed))
    read = _Reader(interactive)
    if interactive:
        _err("chat: type a message and press enter (end a line with \\ to go on); "
             "/clear, /exit or Ctrl-D; Ctrl-C stops a reply.")
    while True:
        line = read()
        if line is None:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/clear":
            session.clear()
            _err("[conversation cleared]")
            continue
        if not line:
            continue
        reply = session.reply(line, max_tokens=n_predict, stop=list(stop),
                              ignore_eos=ignore_eos)
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except BlockqError as e:  # e.g. one message longer than the whole context
            _err(f"error: {e}")
            continue
        except KeyboardInterrupt:
            reply.close()
            sys.stdout.write("\n")
            _err("[reply stopped; the conversation goes on]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interactive and session.last is not None:
            _err(session.last.summary())


class _Reader:
    """Messages from stdin: readline editing and history on a terminal, a trailing backslash
    continues a message on the next line, Ctrl-C at an empty prompt twice in a row exits."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        if interactive:
            try:
                import readline  # noqa: F401  (input() then edits lines and keeps history)
            except ImportError:
                pass

    def _line(self, prompt: str) -> str | None:
        if not self.interactive:
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        try:
            return input(prompt)
        except EOFError:
            return None

    def __call__(self) -> str | None:
        interrupted = False
        while True:
            try:
                parts = []
                line = self._line("> ")
                while line is not None and line.endswith("\\"):
                    parts.append(line[:-1])
                    line = self._line("... ")
                if line is None and not parts:
                    return None
                parts.append(line or "")
                return "\n".join(parts).strip()
            except KeyboardInterrupt:
                if interrupted:
                    click.echo("", err=True)
                    return None
                interrupted = True
                _err("\n[Ctrl-C again to exit, or type a message]")


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
    ids = tok.encode(text_file.read_text(encoding="utf-8", errors="replace"), add_special=True)
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
