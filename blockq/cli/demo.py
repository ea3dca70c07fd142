"""``blockq demo``: the main job in one command.

Fetch SmolLM2-135M-Instruct (when no model is given), quantize one of its real weight matrices
to Q4_K and Q6_K and print the error against the original, then let the model answer a question
through its chat template.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from .run import _model_arg

QUESTION = "What is the capital of France? Answer in one sentence."
DEMO_TENSOR = "blk.0.ffn_down.weight"
DEMO_TYPES = ("Q4_K", "Q6_K")


def quantization_errors(path: Path, name: str = DEMO_TENSOR, types=DEMO_TYPES) -> dict:
    """RMSE of ``name`` (dequantized from the file) after a round trip through each type."""
    from ..dequantize import dequantize
    from ..gguf.reader import read_gguf
    from ..quantize import quantize

    with read_gguf(path) as r:
        if name not in r.tensors:
            name = next(n for n, t in r.tensors.items() if len(t.shape) == 2
                        and t.shape[-1] % 256 == 0)
        t = r.tensors[name]
        w = dequantize(t.data, t.qtype, t.shape).reshape(t.shape)  # (rows, cols) float32
        src = t.qtype
    out = {"tensor": name, "shape": tuple(w.shape), "source_type": src,
           "rms": float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))}
    for qt in types:
        back = dequantize(quantize(w, qt), qt, w.shape).reshape(w.shape)
        out[qt] = float(np.sqrt(np.mean((back.astype(np.float64) - w) ** 2)))
    return out


@click.command()
@_model_arg
@click.option("-n", "--n-predict", type=int, default=48, show_default=True,
              help="Most tokens in the answer.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads for the kernels.")
def demo(model, n_predict, threads):
    """Quantize a real tensor (Q4_K, Q6_K) and chat with MODEL (default: SmolLM2-135M)."""
    from .run import ChatSession, load_llm

    if model is None:
        from ..fetch import smollm2_path
        model = smollm2_path()
    click.echo(f"model: {model}")
    e = quantization_errors(model)
    click.echo(f"{e['tensor']} {e['shape']} (stored {e['source_type']}, RMS {e['rms']:.5f}) "
               "quantized again:")
    for qt in DEMO_TYPES:
        click.echo(f"  {qt}: RMSE {e[qt]:.6f} ({100 * e[qt] / e['rms']:.2f}% of RMS)")
    if e["source_type"] not in ("F32", "F16", "BF16"):
        click.echo(f"  (the stored {e['source_type']} values already sit on a coarse grid, "
                   "which neither type reproduces exactly)")

    llm = load_llm(model, threads, n_ctx=512)
    session = ChatSession(llm, temperature=0)  # greedy: the same answer on every run
    click.echo(f"user: {QUESTION}")
    click.echo("assistant: ", nl=False)
    t0 = time.perf_counter()
    for piece in session.reply(QUESTION, max_tokens=n_predict):
        click.echo(piece, nl=False)
    click.echo()
    click.echo(f"({session.last.summary()}; {time.perf_counter() - t0:.1f} s in all)", err=True)
