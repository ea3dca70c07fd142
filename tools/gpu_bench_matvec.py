#!/usr/bin/env python
"""GPU decode matvec: validate every kernel version against the CPU reference, then benchmark.

Like llm.c's dev/cuda: the reference is numpy (blockq.dequantize + float64 matvec); versions are
  v0  dequantize the whole matrix to float32 on the GPU, then cuBLAS (CuPy) matvec
  v1  blockq's fused kernel (one warp per row, 8 weights per lane per step; blockq/gpu/kernels.cu)
Every version is checked first; then each is timed with CUDA events and the achieved bandwidth
(weight bytes + x + y per second) is printed next to a device-to-device copy measured in the same
run (bytes read + written), which is the practical ceiling.

    python tools/gpu_bench_matvec.py [--types Q4_K,Q6_K] [--shapes 4096x4096,5632x2048] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _time(fn, reps=50):
    import cupy
    fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps  # seconds per call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_K,Q6_K,Q4_0,Q8_0,Q5_K,Q3_K,Q2_K")
    ap.add_argument("--shapes", default="4096x4096,5632x2048")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from blockq.gpu import gpu_status
    ok, why = gpu_status()
    if not ok:
        print(f"no GPU: {why}", file=sys.stderr)
        return 2
    import cupy

    import blockq
    from blockq.gpu.matrix import GPUQMatrix

    rng = np.random.default_rng(0)
    # ceiling: a device-to-device copy of 256 MiB, bytes read + written
    src = cupy.empty(1 << 28, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    t_copy = _time(lambda: dst.__setitem__(Ellipsis, src), reps=20)
    copy_gbs = 2 * src.nbytes / t_copy / 1e9
    results = {"device": why, "copy_GBps": copy_gbs, "rows": []}
    print(f"device: {why}\ndevice-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'type':6} {'shape':>11} {'version':8} {'max rel err':>11} {'us':>8} {'GB/s':>8} {'% copy':>7}")
    for name in a.types.split(","):
        for shp in a.shapes.split(","):
            rows, cols = map(int, shp.split("x"))
            w32 = rng.standard_normal((rows, cols)).astype(np.float32)
            data = blockq.quantize(w32, name)
            w = blockq.dequantize(data, name, (rows, cols)).astype(np.float64)
            x = rng.standard_normal(cols).astype(np.float32)
            ref = w @ x
            scale = np.abs(w) @ np.abs(x)
            m = GPUQMatrix(name, data, (rows, cols))
            xd = cupy.asarray(x)
            wdev = m.dequantize_rows(0, rows)
            versions = {"v0": lambda: wdev @ xd, "v1": lambda: m.matvec(xd)}
            nbytes = m.nbytes + 4 * (rows + cols)
            for v, fn in versions.items():
                err = float(np.max(np.abs(cupy.asnumpy(fn()) - ref) / (scale + 1e-30)))
                if err > 1e-4:
                    print(f"{name} {shp} {v}: WRONG (max relative error {err:.2e})")
                    return 1
                t = _time(fn)
                gbs = (nbytes if v == "v1" else 4 * rows * cols) / t / 1e9
                row = {"type": name, "shape": shp, "version": v, "err": err, "us": t * 1e6,
                       "GBps": gbs, "pct_copy": 100 * gbs / copy_gbs}
                results["rows"].append(row)
                print(f"{name:6} {shp:>11} {v:8} {err:11.1e} {t*1e6:8.1f} {gbs:8.0f} {row['pct_copy']:6.0f}%")
    if a.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
