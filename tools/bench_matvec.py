#!/usr/bin/env python
"""CPU quantized products (blockq.kernels.cpu_matvec): validate every kernel, then benchmark.

Like llm.c's dev/cuda harnesses: first every type's matvec, matmul and row decoding is checked
against the reference (gguf-py's numpy dequantization, products in float64); then, per type and
shape, it times

  matvec   ours: QMatrix.matvec; GB/s = quantized weight bytes read per second.
           "hot": the same matrix again and again (it may sit in L2/L3);
           "cold": a ring of copies larger than the last-level cache, so weights stream from DRAM
           as they do when decoding with a whole model.
           peer: numpy, dequantize (gguf.quants) then ``W @ x``; also float32 BLAS ``W @ x`` on a
           pre-dequantized W (what an unquantized model would do).
  matmul   ours: QMatrix.matmul with n tokens (default 128); GFLOP/s = 2 n rows cols / time.
           peer: float32 BLAS ``W @ X.T`` with W dequantized beforehand, BLAS limited to the
           same number of threads (OpenBLAS bundled with numpy, set through ctypes).

Ratios are ours / peer measured in the same run.  ``--compile`` instead measures first-call
compile time per type in a fresh Numba cache (one process) and the same calls in a second
process that loads the cache.

    python tools/bench_matvec.py [--types Q4_K,Q6_K,Q4_1,Q8_0,Q5_0] [--shapes 4096x4096,...]
                                 [--threads 1,2] [--n 128] [--json]
    python tools/bench_matvec.py --compile [--types all]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
             "Q5_K", "Q6_K", "Q8_K")
LLC_BYTES = 32 << 20  # last-level cache of the machine these figures were taken on (32 MiB L3)


def _rows_of_blocks(name: str, rows: int, cols: int, rng) -> np.ndarray:
    """(rows, row_bytes) random blocks with modest finite scales."""
    from blockq.testing import random_blocks
    from blockq.types import qtype
    return random_blocks(name, rows * cols // qtype(name).block_size, rng, 0.02).reshape(rows, -1)


def reference_dequantize(name: str, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """float32 (rows, cols) from gguf-py (Q8_K, which gguf-py lacks, from its one-line formula)."""
    import gguf
    from gguf import quants

    from blockq.types import qtype
    if name == "Q8_K":
        b = data.reshape(-1).view(qtype(name).dtype)
        return (b["d"][:, None] * b["qs"].astype(np.float32)).reshape(rows, cols)
    if name == "F32":
        return data.view(np.float32).reshape(rows, cols).copy()
    if name == "F16":
        return data.view(np.float16).astype(np.float32).reshape(rows, cols)
    return quants.dequantize(data, gguf.GGMLQuantizationType[name]).reshape(rows, cols)


def _blas_threads(n: int) -> bool:
    """Limit numpy's bundled OpenBLAS to n threads (best effort; True when it worked)."""
    import ctypes
    import glob
    libs = glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "*openblas*"))
    for lib in libs:
        dll = ctypes.CDLL(lib)
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                    "openblas_set_num_threads"):
            if hasattr(dll, sym):
                getattr(dll, sym)(ctypes.c_int(n))
                return True
    return False


def _best(fn, reps: int, min_time: float = 0.0) -> tuple[float, float]:
    """(best, median) seconds per call over ``reps`` calls (more while under ``min_time``)."""
    time.sleep(0.02)  # let the other thread pool (Numba's or BLAS's) stop spinning first
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def validate(types, rng) -> bool:
    from blockq.kernels.cpu_matvec import QMatrix
    ok = True
    print("validation against gguf-py (float64 products); bound: |err| <= 1e-5 * (|W| @ |x|)")
    for name in types:
        rows, cols = 67, (768 if name not in ("F32", "F16", "BF16") else 771)
        data = _rows_of_blocks(name, rows, cols, rng)
        w = reference_dequantize(name, data, rows, cols)  # (rows, cols)
        m = QMatrix(name, data, (rows, cols))
        x = rng.standard_normal(cols).astype(np.float32)
        X = rng.standard_normal((9, cols)).astype(np.float32)
        w64 = w.astype(np.float64)
        e_mv = np.max(np.abs(m.matvec(x) - w64 @ x) / (np.abs(w64) @ np.abs(x)))
        e_mm = np.max(np.abs(m.matmul(X) - X @ w64.T) / (np.abs(X) @ np.abs(w64).T))
        exact = np.array_equal(m.take_rows(np.arange(rows)), w)
        good = e_mv <= 1e-5 and e_mm <= 1e-5 and exact
        ok &= good
        print(f"  {name:5} matvec {e_mv:.1e}  matmul {e_mm:.1e}  rows bit-exact {exact}  "
              f"{'ok' if good else 'WRONG'}")
    return ok


def bench(types, shapes, threads, n_tok, reps, min_time, rng):
    import numba

    from blockq.kernels.cpu_matvec import QMatrix
    from blockq.types import qtype
    out = []
    hdr = (f"{'type':5} {'shape':>10} {'thr':>3} | {'hot GB/s':>8} {'cold GB/s':>9} "
           f"{'us':>7} | {'np deq+@ us':>11} {'x':>6} | {'f32 gemv us':>11} {'x':>5} | "
           f"{'mm GF/s':>7} {'BLAS GF/s':>9} {'ratio':>5}")
    print(hdr)
    for name in types:
        for rows, cols in shapes:
            if cols % qtype(name).block_size:
                print(f"{name:5} {rows:>5}x{cols:<5}     (rows of {cols} are not whole blocks)")
                continue
            data = _rows_of_blocks(name, rows, cols, rng)
            m = QMatrix(name, data, (rows, cols))
            w = reference_dequantize(name, data, rows, cols)  # (rows, cols)
            x = rng.standard_normal(cols).astype(np.float32)
            X = rng.standard_normal((n_tok, cols)).astype(np.float32)
            ring = [QMatrix(name, data.copy(), (rows, cols))
                    for _ in range(max(2, 3 * LLC_BYTES // max(1, m.nbytes)))]
            for nt in threads:
                numba.set_num_threads(nt)
                _blas_threads(nt)
                hot, _ = _best(lambda: m.matvec(x), reps, min_time)
                it = iter(range(1 << 62))
                cold, _ = _best(lambda: ring[next(it) % len(ring)].matvec(x), reps, min_time)
                peer_np, _ = _best(lambda: reference_dequantize(name, data, rows, cols) @ x, 2)
                peer_gemv, _ = _best(lambda: w @ x, reps, 0.1)
                mm, _ = _best(lambda: m.matmul(X), 3, min_time)
                blas, _ = _best(lambda: w @ X.T, 3, min_time)
                flops = 2.0 * n_tok * rows * cols
                r = dict(type=name, rows=rows, cols=cols, threads=nt, nbytes=m.nbytes,
                         hot_GBps=m.nbytes / hot / 1e9, cold_GBps=m.nbytes / cold / 1e9,
                         matvec_us=hot * 1e6, numpy_deq_matvec_us=peer_np * 1e6,
                         f32_gemv_us=peer_gemv * 1e6, matmul_GFLOPs=flops / mm / 1e9,
                         blas_GFLOPs=flops / blas / 1e9, n=n_tok)
                out.append(r)
                print(f"{name:5} {rows:>5}x{cols:<5}{nt:>3} | {r['hot_GBps']:8.2f} "
                      f"{r['cold_GBps']:9.2f} {hot * 1e6:7.0f} | {peer_np * 1e6:11.0f} "
                      f"{peer_np / hot:6.0f} | {peer_gemv * 1e6:11.0f} {peer_gemv / hot:5.1f} | "
                      f"{r['matmul_GFLOPs']:7.1f} {r['blas_GFLOPs']:9.1f} "
                      f"{r['matmul_GFLOPs'] / r['blas_GFLOPs']:5.2f}", flush=True)
    return out


_COMPILE_CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from blockq.kernels.cpu_matvec import QMatrix
import numba
res = {"import_s": time.perf_counter() - t0}
sys.path.insert(0, sys.argv[2])
from bench_matvec import random_blocks
rng = np.random.default_rng(0)
for name in sys.argv[1].split(","):
    cols = 256
    small = QMatrix(name, _rows_of_blocks(name, 8, cols, rng), (8, cols))
    big = QMatrix(name, _rows_of_blocks(name, 512, cols, rng), (512, cols))
    x = np.ones(cols, np.float32)
    t = time.perf_counter()
    small.matvec(x); small.take_rows(np.arange(8))
    t1 = time.perf_counter()
    big.matvec(x); big.take_rows(np.arange(512))  # the parallel drivers (first type only)
    big.matmul(np.ones((4, cols), np.float32))
    res[name] = (t1 - t, time.perf_counter() - t1)
print(json.dumps(res))
"""


def compile_times(types):
    """First-call times in a fresh Numba cache, then again in a second process using the cache."""
    tools = str(Path(__file__).resolve().parent)
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, ",".join(types), tools],
                               env=env, capture_output=True, text=True, check=True)
            runs.append((time.perf_counter() - t0, json.loads(p.stdout)))
    (wall1, cold), (wall2, warm) = runs
    print("first calls: matvec + take_rows on 8 rows (the type's two kernels), then on 512 rows\n"
          "and a 4-token matmul (the three parallel drivers and the tile GEMM, compiled once)")
    print(f"{'type':5} {'kernels, fresh cache s':>22} {'drivers s':>9} {'from cache s':>12}")
    for name in types:
        print(f"{name:5} {cold[name][0]:22.2f} {cold[name][1]:9.2f} "
              f"{warm[name][0] + warm[name][1]:12.3f}")
    print(f"whole process: fresh cache {wall1:.1f} s (import {cold['import_s']:.2f} s), "
          f"second start {wall2:.1f} s (import {warm['import_s']:.2f} s)")
    return dict(fresh=cold, cached=warm, fresh_wall_s=wall1, cached_wall_s=wall2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_K,Q6_K,Q4_1,Q8_0,Q5_0",
                    help="comma list, or 'all'")
    ap.add_argument("--shapes", default="4096x4096,5632x2048,576x1536,1536x576")
    ap.add_argument("--threads", default=None, help="comma list (default: Numba's default)")
    ap.add_argument("--n", type=int, default=128, help="tokens for matmul")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds to keep timing each of ours (the best call counts)")
    ap.add_argument("--compile", action="store_true", help="measure compile times instead")
    ap.add_argument("--skip-validate", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)
    types = ALL_TYPES if a.types == "all" else tuple(a.types.split(","))
    if a.compile:
        res = compile_times(types)
    else:
        import numba
        rng = np.random.default_rng(0)
        if not a.skip_validate and not validate(ALL_TYPES, rng):
            print("validation FAILED: not benchmarking", file=sys.stderr)
            return 1
        shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
        threads = ([int(t) for t in a.threads.split(",")] if a.threads
                   else [numba.get_num_threads()])
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; times are the "
              f"best of >= {a.reps} calls (>= {a.min_time} s for ours)")
        res = bench(types, shapes, threads, a.n, a.reps, a.min_time, rng)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
