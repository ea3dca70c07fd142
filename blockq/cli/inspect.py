"""``blockq inspect FILE``: header, metadata, tensor table, totals; one block; value stats."""
from __future__ import annotations

import json

import click

from ..gguf.reader import read_gguf
from ..gguf import summary
from .run import _model_arg


@click.command("inspect")
@_model_arg(name="file", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the same content as JSON.")
@click.option("--tensor", "tensor_name", metavar="NAME", help="Show only this tensor.")
@click.option("--block", "block_index", type=int, metavar="I",
              help="With --tensor: decode block I (scales, mins, quantized values).")
@click.option("--stats", is_flag=True,
              help="Add min/max/mean/std of each tensor's dequantized values (slow).")
@click.option("--items", default=5, show_default=True, metavar="N",
              help="How many items of each metadata array to show.")
def inspect_cmd(file, as_json, tensor_name, block_index, stats, items):
    """Show what a GGUF FILE holds."""
    if block_index is not None and tensor_name is None:
        raise click.UsageError("--block needs --tensor NAME")
    with read_gguf(file) as f:
        if block_index is not None:
            out = summary.block(summary.find_tensor(f, tensor_name), block_index)
            if as_json:
                click.echo(json.dumps(out, indent=1))
            else:
                _print_block(out)
            return
        info = summary.describe(f, n_items=items)
        if tensor_name is not None:
            t = summary.find_tensor(f, tensor_name)
            info["tensors"] = [d for d in info["tensors"] if d["name"] == t.name]
        if stats:
            for d in info["tensors"]:
                d["stats"] = summary.tensor_stats(f.tensors[d["name"]])
    if as_json:
        click.echo(json.dumps(info, indent=1))
    elif tensor_name is not None:
        _print_tensors(_console(), info["tensors"], stats)
    else:
        _print_all(info, stats)


def _console():
    from rich.console import Console

    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=200)
    return c


def _value_text(d: dict, max_len: int = 80) -> str:
    v = d["value"]
    if "count" in d:
        shown = ", ".join(_short(x, 24) for x in v)
        more = ", ..." if d["count"] > len(v) else ""
        return f"[{d['count']}] {shown}{more}"
    return _short(v, max_len)


def _short(v, n: int) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[:n - 3] + "..."


def _print_all(info: dict, stats: bool) -> None:
    from rich.table import Table

    c = _console()
    c.print(f"[bold]{info['file']}[/bold]: GGUF v{info['version']}, {info['size']:,} bytes, "
            f"{info['metadata_count']} metadata keys, {info['tensor_count']} tensors, "
            f"alignment {info['alignment']}, data at offset {info['data_offset']:,}")
    meta = Table(title="metadata", title_justify="left")
    meta.add_column("key", no_wrap=True)
    meta.add_column("type", no_wrap=True)
    meta.add_column("value", overflow="fold")
    for d in info["metadata"]:
        meta.add_row(d["key"], d["type"], _value_text(d))
    c.print(meta)
    _print_tensors(c, info["tensors"], stats)
    tot = Table(title="totals per type", title_justify="left")
    for col in ("type", "tensors", "weights", "bytes", "bits/weight"):
        tot.add_column(col, justify="left" if col == "type" else "right")
    for d in info["totals"]:
        tot.add_row(d["type"], str(d["tensors"]), f"{d['weights']:,}", f"{d['bytes']:,}",
                    f"{d['bits_per_weight']:.4f}")
    c.print(tot)
    if info["weights"]:
        c.print(f"{info['weights']:,} weights in {info['tensor_bytes']:,} tensor bytes: "
                f"{info['tensor_bits_per_weight']:.4f} bits per weight; whole file "
                f"{info['bits_per_weight']:.4f} bits per weight")


def _print_tensors(c, tensors: list[dict], stats: bool) -> None:
    from rich.table import Table

    t = Table(title="tensors (shape in numpy order, outermost first)", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("name", no_wrap=True)
    t.add_column("type")
    t.add_column("shape", no_wrap=True)
    for col in ("offset", "bytes", "bits/weight"):
        t.add_column(col, justify="right")
    if stats:
        for col in ("min", "max", "mean", "std"):
            t.add_column(col, justify="right")
    for i, d in enumerate(tensors):
        row = [str(i), d["name"], d["type"], str(tuple(d["shape"])),
               f"{d['offset']:,}", f"{d['bytes']:,}", f"{d['bits_per_weight']:.4f}"]
        if stats:
            s = d["stats"]
            row += (["-"] * 4 if s is None else
                    [f"{s['min']:.5g}", f"{s['max']:.5g}", f"{s['mean']:.5g}", f"{s['std']:.5g}"])
        t.add_row(*row)
    c.print(t)


def _print_block(out: dict) -> None:
    c = _console()
    c.print(f"[bold]{out['tensor']}[/bold] block {out['block']} ({out['type']}, "
            f"{out['weights_per_block']} weights in {out['bytes_per_block']} bytes at offset "
            f"{out['offset']:,})")
    skip = {"tensor", "block", "type", "offset", "weights_per_block", "bytes_per_block"}
    for key, v in out.items():
        if key in skip:
            continue
        if isinstance(v, list):
            width = 8 if any(isinstance(x, float) for x in v) else 32
            c.print(f"{key} [{len(v)}]:")
            for i in range(0, len(v), width):
                c.print("  " + " ".join(_num(x) for x in v[i:i + width]))
        else:
            c.print(f"{key}: {_num(v)}")


def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)
