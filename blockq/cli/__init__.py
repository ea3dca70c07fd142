"""The ``blockq`` command line.  Commands are thin: parse, call the library, print.

Each command lives in a module of this package and is imported only when it runs, so
``blockq --help`` stays fast and one command's dependencies never slow another down.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from ..errors import BlockqError

# command name -> (module, attribute)
COMMANDS = {
    "demo": ("blockq.cli.demo", "demo"),
    "inspect": ("blockq.cli.inspect", "inspect_cmd"),
    "generate": ("blockq.cli.run", "generate"),
    "chat": ("blockq.cli.run", "chat"),
    "perplexity": ("blockq.cli.run", "perplexity"),
    "bench": ("blockq.cli.run", "bench"),
    "serve": ("blockq.cli.serve", "serve"),
    "convert": ("blockq.cli.convert", "convert"),
    "imatrix": ("blockq.cli.convert", "imatrix"),
    "calibrate": ("blockq.cli.convert", "calibrate"),
    "kld": ("blockq.cli.convert", "kld"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n, (m, _) in COMMANDS.items() if importlib.util.find_spec(m) is not None]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr = COMMANDS[name]
        try:
            return getattr(importlib.import_module(mod), attr)
        except ModuleNotFoundError as e:
            if e.name == mod:
                return None
            raise


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blockq")
def cli():
    """blockq: block-quantized (GGUF k-quant) language models in Python."""


def _skip_numba_blas() -> None:
    """Keep Numba from loading SciPy's BLAS, which no blockq kernel calls.

    NOTE: Numba's array lowering, set up at the first kernel call, imports
    scipy.linalg.cython_blas where SciPy is installed (for np.dot in JIT code): 16 MiB resident
    (SciPy and its own OpenBLAS) in every generate / chat / serve.  Only in a process the CLI
    starts, and only while neither is loaded yet: a program that imports blockq keeps its SciPy.
    """
    if "numba.np.arraymath" not in sys.modules and "scipy.linalg.cython_blas" not in sys.modules:
        sys.modules["scipy.linalg.cython_blas"] = None  # type: ignore[assignment]


def main(argv=None):
    """Entry point: blockq's own errors become one clear line on stderr and exit code 1."""
    if argv is None:  # the command line itself (``blockq ...``), not a caller passing arguments
        _skip_numba_blas()
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 typed or piped in: U+FFFD, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BlockqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # a file blockq was not the first to fail on (read-only, full...)
        if isinstance(e, BrokenPipeError):
            sys.exit(141)
        from ..outfile import file_error
        click.echo(f"error: {file_error(e.filename or 'file', e, 'use it')}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
