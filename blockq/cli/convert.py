"""``blockq convert / imatrix / kld``: make quantized GGUF files and measure what they lost.

Thin commands over :func:`blockq.convert.convert`, :func:`blockq.imatrix.compute_imatrix` and
:func:`blockq.imatrix.kl_divergence`; results on stdout, progress and warnings on stderr.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from ..outfile import check_output, signals_as_interrupt
from ..presets import PRESETS
from .progress import ChunkProgress
from .run import _model_arg


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _console():
    from rich.console import Console
    return Console(stderr=True)


def _threads(threads):
    from .run import set_threads
    return set_threads(threads)


# -- convert ------------------------------------------------------------------------------------

def _convert_args(args, model_opt) -> tuple[Path, Path, str | None]:
    """(SRC, OUT, TYPE or None) from ``SRC OUT [TYPE]`` or ``-m SRC OUT [TYPE]``, checked as
    click checks arguments (a Choice for TYPE, as llama-quantize's positional type)."""
    ctx = click.get_current_context()
    if model_opt is not None:
        if not 1 <= len(args) <= 2:
            raise click.UsageError(f"with -m SRC, give OUT [TYPE]; got {' '.join(args) or '-'}")
        args = (model_opt, *args)
    elif not 2 <= len(args) <= 3:
        raise click.UsageError("give SRC OUT [TYPE] (or -m SRC OUT [TYPE])")
    src = click.Path(exists=True, path_type=Path).convert(args[0], None, ctx)
    out = click.Path(dir_okay=False, path_type=Path).convert(args[1], None, ctx)
    kind = None
    if len(args) == 3:
        kind = click.Choice(list(PRESETS), case_sensitive=False).convert(args[2], None, ctx)
    return src, out, kind


@click.command()
@click.argument("args", nargs=-1, metavar="SRC OUT [TYPE]")
@click.option("-m", "--model", "model_opt", type=click.Path(exists=True, path_type=Path),
              help="The model to convert (the same as SRC).")
@click.option("--type", "preset", type=click.Choice(list(PRESETS), case_sensitive=False),
              default=None, help="Quantization preset (llama-quantize's; also the third "
                                 "argument, as llama-quantize takes it).  [default: Q4_K_M]")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Importance matrix: llama-imatrix's GGUF or legacy .dat format.")
@click.option("--tensor-type", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Force a type on tensors whose name matches REGEX (repeatable).")
@click.option("--calib", "calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration text: SRC is run over it and every matrix is quantized with "
                   "error-compensated rounding under its input statistics.")
@click.option("--hessians", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration statistics from 'blockq calibrate' (instead of --calib).")
@click.option("--optimize", is_flag=True,
              help="Lose less at the preset's size (its types, so never larger than "
                   "llama-quantize's file): error-compensated rounding under calibration "
                   "statistics, from --calib/--hessians or, without them, from seeded random "
                   "token ids.")
@click.option("--bpw", type=float, default=None, help="Size budget in bits per weight: types "
                                                       "allocated from measured errors "
                                                       "(implies --optimize).")
@click.option("--size", "size", default=None, help="Size budget of the matrices, e.g. 100MiB "
                                                    "(as --bpw).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True,
              help="Tokens per calibration chunk.")
@click.option("--calib-chunks", type=int, default=-1, show_default=True,
              help="Calibration chunks to use; -1 = all the text gives.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads for quantizing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(args, model_opt, preset, imatrix, overrides, calib, hessians, optimize, bpw, size,
            n_ctx, calib_chunks, threads, as_json, quiet):
    """Convert SRC (a Hugging Face model folder or a GGUF file) to a GGUF file OUT.

    Every tensor gets the type llama-quantize gives it for the preset (TYPE or --type); tensors
    are read, quantized and written one at a time, and OUT appears only once it is complete.
    With --calib/--hessians/--optimize the matrices are rounded with error compensation; with
    --bpw/--size the types are chosen from measured errors within that budget.
    """
    from ..convert import convert as convert_fn
    from ..errors import BadArgument
    from ..optimize import convert_optimized

    src, out, type_arg = _convert_args(args, model_opt)
    if type_arg and preset and type_arg.upper() != preset.upper():
        raise BadArgument(f"two types given ({type_arg} and --type {preset}): give one")
    preset = type_arg or preset or "Q4_K_M"

    _threads(threads)
    if calib is not None and hessians is not None:
        raise BadArgument("give --calib TEXT or --hessians FILE, not both")
    if (calib is not None or hessians is not None) and imatrix is not None:
        raise BadArgument("--calib/--hessians already provide the importance vectors; "
                          "drop --imatrix")
    optimize = optimize or bpw is not None or size is not None
    with signals_as_interrupt():
        if optimize or calib is not None or hessians is not None:
            with ChunkProgress("calibrate", "PPL") as cbar:
                note = cbar.note
                res = convert_optimized(src, out, preset.upper(), text=calib, hessians=hessians,
                                        optimize=optimize, bpw=bpw, size=size, n_ctx=n_ctx,
                                        n_chunks=calib_chunks, imatrix=imatrix,
                                        overrides=overrides, calib_progress=cbar, note=note,
                                        warn=lambda s: note(f"warning: {s}"))
        else:
            with _ConvertBar(quiet) as bar:
                res = convert_fn(src, out, preset.upper(), imatrix=imatrix, overrides=overrides,
                                 progress=bar, warn=bar.warn)
    kinds = Counter(res.types.values())
    if as_json:
        click.echo(json.dumps({"path": str(res.path), "preset": preset.upper(),
                               "bytes": res.nbytes, "params": res.n_params,
                               "bits_per_weight": 8 * res.nbytes / max(res.n_params, 1),
                               "types": dict(kinds), "warnings": res.warnings}))
    else:
        mix = ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
        click.echo(f"wrote {res.path}: {len(res.types)} tensors, {res.nbytes / 2**20:.1f} MiB, "
                   f"{8 * res.nbytes / max(res.n_params, 1):.2f} bits/weight ({mix})")


class _ConvertBar:
    """Progress on stderr: tensors done / total and bytes of the source processed."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._p = None
        self._task = None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
            self._p = Progress(TextColumn("{task.fields[tensors]}"), BarColumn(),
                               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                               TextColumn("{task.description}"), console=_console(),
                               transient=True)
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            return self._p.__exit__(*exc)

    def warn(self, text: str) -> None:
        if self._p is not None:
            self._p.console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)
        else:
            _err(f"warning: {text}")

    def __call__(self, ev) -> None:
        if self._p is None:
            return
        if self._task is None:
            self._task = self._p.add_task("", total=ev.bytes_total, tensors="")
        self._p.update(self._task, completed=ev.bytes_done, description=ev.tensor,
                       tensors=f"[{ev.i_tensor + 1}/{ev.n_tensors}]")


# -- calibrate ----------------------------------------------------------------------------------

def _calibration_opts(default_out: str):
    """MODEL, -f TEXT, -o OUT, -c, --chunks: what calibrate and imatrix both take."""
    def wrap(f):
        for deco in reversed((
                click.command(), _model_arg,
                click.option("-f", "--file", "text_file", required=True,
                             type=click.Path(exists=True, dir_okay=False, path_type=Path),
                             help="Calibration text."),
                click.option("-o", "--output", "out",
                             type=click.Path(dir_okay=False, path_type=Path),
                             default=Path(default_out), show_default=True),
                click.option("-c", "--ctx-size", "n_ctx", type=int, default=512,
                             show_default=True, help="Tokens per chunk."),
                click.option("--chunks", type=int, default=-1, show_default=True,
                             help="Chunks to process; -1 = all the text gives."))):
            f = deco(f)
        return f
    return wrap


@_calibration_opts("calibration.gguf")
@click.option("-t", "--threads", type=int, default=None)
def calibrate(model, text_file, out, n_ctx, chunks, threads):
    """Collect the input Hessians (sums of x x^T) of MODEL's matrices over a text, for
    'blockq convert --hessians' (one calibration serves many conversions)."""
    from ..calibrate import calibrate as calibrate_fn, write_hessians
    from .run import open_model

    out = check_output(out, [model, text_file], "calibration output")
    m, tok = open_model(model, threads, None, n_ctx)
    text = text_file.read_text(encoding="utf-8", errors="replace")
    with signals_as_interrupt(), ChunkProgress("calibrate", "PPL") as bar:
        h = calibrate_fn(m, tok, text, n_ctx=n_ctx, n_chunks=chunks, dataset=str(text_file),
                         progress=bar)
    write_hessians(out, h)
    click.echo(f"wrote {out}: {len(h.sums)} inputs of {len(h.weights)} matrices, "
               f"{h.chunk_count} chunks of {h.chunk_size} tokens, {h.nbytes() / 2**20:.1f} MiB")


# -- imatrix ------------------------------------------------------------------------------------

@_calibration_opts("imatrix.gguf")
@click.option("--output-format", "fmt", type=click.Choice(["gguf", "dat"]), default=None,
              help="File format (default: dat for a .dat name, else gguf).")
@click.option("--process-output", is_flag=True, help="Collect output.weight too.")
@click.option("-t", "--threads", type=int, default=None)
@click.option("-ngl", "--gpu-layers", default=None,
              help="Blocks to offload to the GPU: N, 'all' or 'auto' (needs CuPy and a GPU).")
def imatrix(model, text_file, out, n_ctx, chunks, fmt, process_output, threads, gpu_layers):
    """Compute an importance matrix for MODEL over a calibration text (llama-imatrix's way)."""
    from ..imatrix import compute_imatrix, write_imatrix
    from .run import open_model

    out = check_output(out, [model, text_file], "imatrix output")
    m, tok = open_model(model, threads, gpu_layers, n_ctx)
    text = text_file.read_text(encoding="utf-8", errors="replace")
    with signals_as_interrupt(), ChunkProgress("imatrix", "PPL") as bar:
        im = compute_imatrix(m, tok, text, n_ctx=n_ctx, n_chunks=chunks, dataset=str(text_file),
                             process_output=process_output, progress=bar)
    write_imatrix(out, im, fmt)
    click.echo(f"wrote {out}: {len(im.entries)} matrices, {im.chunk_count} chunks of "
               f"{im.chunk_size} tokens")


# -- kld ----------------------------------------------------------------------------------------

@click.command()
@click.argument("models", nargs=-1, metavar="BASE QUANT",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", "base_opt", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The reference model (the same as BASE).")
@click.option("-m", "--model", "model_opt",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The quantized model (the same as QUANT).")
@click.option("-f", "--file", "text_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True)
@click.option("--chunks", type=int, default=-1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-t", "--threads", type=int, default=None)
def kld(models, base_opt, model_opt, text_file, n_ctx, chunks, as_json, threads):
    """KL divergence of QUANT from BASE over the same text (llama-perplexity --kl-divergence)."""
    from ..imatrix import kl_divergence
    from .run import model_pair, open_model

    base, quant = model_pair(("base", "quant"), models, base_opt, model_opt)

    mb, tok = open_model(base, threads)
    mq, _ = open_model(quant, threads)
    ids = tok.encode(text_file.read_text(encoding="utf-8", errors="replace"), add_special=True)
    bos = tok.bos_id if tok.add_bos else None
    with ChunkProgress("kld", "KLD") as bar:
        res = kl_divergence(mb, mq, ids, n_ctx=n_ctx, n_chunks=chunks, bos=bos, progress=bar)
    if as_json:
        click.echo(json.dumps(res.as_dict()))
    else:
        click.echo(f"chunks {res.chunks} ({res.tokens} scored tokens)")
        click.echo(f"mean KLD      {res.kld:.6f} +/- {res.kld_stderr:.6f}")
        click.echo(f"same top      {100 * res.same_top:.2f} %")
        click.echo(f"PPL base      {res.ppl_base:.4f}")
        click.echo(f"PPL quant     {res.ppl_quant:.4f}  (ratio {res.ppl_ratio:.4f})")
