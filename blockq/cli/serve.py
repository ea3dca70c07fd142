"""``blockq serve``: an OpenAI-compatible HTTP server (see :mod:`blockq.server`)."""
from __future__ import annotations

import importlib.util

import click

from ..errors import BadArgument
from .run import DEFAULT_CTX, _ctx_opts, _err, _gpu_opt, _model_arg, _threads_opt, load_llm


@click.command()
@_model_arg
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("-np", "--parallel", type=int, default=1, show_default=True,
              help="Requests served at once, each in its own slot with its own KV cache of -c "
                   "tokens; more wait in a queue.")
@click.option("--alias", default=None, help="Model name in responses (default: the file name).")
@_threads_opt
@_ctx_opts
@_gpu_opt
def serve(model, host, port, parallel, alias, threads, n_ctx, cache_type, gpu_layers):
    """Serve MODEL over an OpenAI-compatible HTTP API (default: SmolLM2-135M-Instruct).

    POST /v1/chat/completions and /v1/completions (stream: true as server-sent events),
    GET /v1/models and /health.
    """
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadArgument(f"blockq serve needs {' and '.join(missing)}: pip install -e "
                          "'.[serve]' in the blockq checkout")
    if parallel < 1:
        raise BadArgument(f"--parallel {parallel}: use 1 or more")
    if not 0 <= port <= 65535:
        raise BadArgument(f"--port {port}: use 0..65535")
    from ..server import serve as run_server

    llm = load_llm(model, threads, gpu_layers, n_ctx or DEFAULT_CTX, cache_type=cache_type,
                   announce=True)
    run_server(llm, host=host, port=port, parallel=parallel, model_name=alias,
               ready=lambda url: _err(f"listening on {url} ({parallel} slot"
                                      f"{'s' if parallel > 1 else ''}, context {llm.n_ctx} "
                                      "each); Ctrl-C stops"))
