"""Benchmark blockq's dequantize per block type against gguf-py (and llama.cpp's C, if present).

For each type: random blocks with valid f16 scales for a ``rows x cols`` tensor (default
4096 x 4096); every implementation is first checked bit-exact against blockq's numpy reference on
the same blocks, then timed warm (best of ``--repeat`` after one untimed call):

- ``blockq``      ``blockq.dequantize(data, type, shape)``: a fresh output array each call
- ``blockq out=`` the same into a preallocated array (no page faults on the output)
- ``gguf``        ``gguf.quants.dequantize`` (numpy), the ratio column is blockq / gguf (none
                  for F32, where gguf-py returns a view of the input, and Q8_K, which it lacks)
- ``llama.cpp``   ggml's ``to_float`` (scalar C, one thread), with ``--llama-cpp``

GB/s counts the bytes read (blocks) plus written (4 per weight) by blockq.  The last line is
Q4_K quantization speed through ``blockq.quantize`` (``--quant-rows`` rows of ``cols``).

    python tools/bench_dequant.py [--types Q4_K,Q6_K] [--rows 4096 --cols 4096] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numba  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from gguf import quants as gq  # noqa: E402

import blockq  # noqa: E402
from blockq.dequantize import dequantize, dequantize_blocks_ref  # noqa: E402
from blockq.testing import random_blocks  # noqa: E402
from blockq.types import ALL, qtype  # noqa: E402


def best_time(fn, repeat: int) -> float:
    fn()  # warm: compile, caches
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_type(name: str, rows: int, cols: int, repeat: int, llama: bool, rng) -> dict:
    t = qtype(name)
    n_w = rows * cols
    blocks = random_blocks(name, n_w // t.block_size, rng, 0.01 if t.is_quantized else 1.0)
    shape = (rows, cols)
    check = slice(0, min(len(blocks), 4096))  # validate on the first blocks
    want = dequantize_blocks_ref(blocks[check], name).view(np.uint32)
    impls = {"blockq": lambda: dequantize(blocks, name, shape)}
    out = np.empty(shape, np.float32)
    impls["blockq out="] = lambda: dequantize(blocks, name, shape, out=out)
    try:
        gq.dequantize(blocks[:1], GGMLQuantizationType[name])
        if name != "F32":  # gguf-py returns a zero-copy view for F32: nothing to compare
            impls["gguf"] = lambda: gq.dequantize(blocks, GGMLQuantizationType[name])
    except NotImplementedError:  # Q8_K
        pass
    if llama:
        from make_vectors import ggml_dequantizer
        ggml = ggml_dequantizer(name)
        if ggml is not None:
            impls["llama.cpp"] = lambda: ggml(blocks)
    row = {"type": name, "weights": n_w, "bytes": int(blocks.nbytes)}
    for label, fn in impls.items():
        got = np.asarray(fn(), np.float32).reshape(-1, t.block_size)[check]
        if not np.array_equal(got.view(np.uint32), want):
            raise SystemExit(f"{name}: {label} is not bit-exact with the numpy reference")
        reps = repeat if label.startswith("blockq") else max(1, repeat // 3)
        row[label] = n_w / best_time(fn, reps)  # weights per second
    row["GB/s"] = row["blockq"] * (t.type_size / t.block_size + 4) / 1e9
    row["GB/s out="] = row["blockq out="] * (t.type_size / t.block_size + 4) / 1e9
    if "gguf" in row:
        row["ratio_vs_gguf"] = row["blockq"] / row["gguf"]
    if "llama.cpp" in row:
        row["ratio_vs_llama_cpp"] = row["blockq"] / row["llama.cpp"]
    return row


def bench_quantize(rows: int, cols: int, repeat: int, rng) -> dict:
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    t0 = time.perf_counter()
    blockq.quantize(x[:1], "Q4_K")  # compile
    first = time.perf_counter() - t0
    wps = rows * cols / best_time(lambda: blockq.quantize(x, "Q4_K"), repeat)
    return {"type": "Q4_K", "weights": rows * cols, "quantize": wps, "first_call_s": first}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(t.name for t in ALL if t.has("dequantize")))
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quant-rows", type=int, default=256)
    ap.add_argument("--no-quantize", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp's to_float")
    ap.add_argument("--threads", type=int, help="Numba threads (default: all cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    types = [qtype(n).name for n in args.types.split(",") if n]
    result = {"threads": numba.get_num_threads(), "shape": [args.rows, args.cols],
              "dequantize": [bench_type(n, args.rows, args.cols, args.repeat, args.llama_cpp,
                                        rng) for n in types]}
    if not args.no_quantize:
        result["quantize"] = bench_quantize(args.quant_rows, args.cols, args.repeat, rng)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"dequantize {args.rows}x{args.cols}, {result['threads']} threads; "
          "weights/s (G), best of warm runs")
    cols = ["blockq", "blockq out=", "gguf", "llama.cpp"]
    print(f"{'type':5} " + " ".join(f"{c:>11}" for c in cols)
          + f" {'x gguf':>7} {'GB/s':>6} {'GB/s out=':>9}")
    for r in result["dequantize"]:
        cells = " ".join(f"{r[c] / 1e9:11.3f}" if c in r else f"{'-':>11}" for c in cols)
        ratio = f"{r['ratio_vs_gguf']:7.1f}" if "ratio_vs_gguf" in r else f"{'-':>7}"
        print(f"{r['type']:5} {cells} {ratio} {r['GB/s']:6.2f} {r['GB/s out=']:9.2f}")
    if "quantize" in result:
        q = result["quantize"]
        print(f"Q4_K quantize ({args.quant_rows}x{args.cols}): {q['quantize'] / 1e6:.2f} M "
              f"weights/s (first call {q['first_call_s']:.1f} s)")


if __name__ == "__main__":
    main()
