"""The AVX-512 VNNI prompt tiles against the pmaddubsw tiles they replaced, per product.

    python tools/bench_vnni_tiles.py [-t 1] [-n 128]

Real matrices of SmolLM2 Q4_K_M (Q5_0, Q8_0, Q4_K, Q6_K) and of the synthetic 0.56 B Q4_K_M /
Q6_K files (tools/bench_runtime.py makes them), ``cpu_int8_gemm.product`` with ``VNNI512`` on and
off in one process, interleaved, best of 7; prints ms and GMAC/s (multiply-adds per second) and
the largest difference between the two outputs relative to their largest value.  Where
llama-cpp-python is installed, ggml's own ``mul_mat`` of the same matrix and activations
(tools/ggml_lib.py: a one-node graph on one thread, so its figure includes the graph's set-up
and the copies in and out) is timed in the same loop, and the ratio printed; so is ggml's time
less that of the same call with one token (its fixed cost, plus one token's work), a bound on
its compute from below, and the ratio to that.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def matrices():
    from bench_runtime import smollm2_q4km, synthetic
    from blockq.gguf.reader import read_gguf

    want = [(smollm2_q4km, ("Q5_0", 1536), ("Q8_0", 192), ("Q4_K", 576), ("Q6_K", 576)),
            (lambda: synthetic("Q4_K_M"), ("Q4_K", 5632)), (lambda: synthetic("Q6_K"),
                                                            ("Q6_K", 5632))]
    for path, *picks in want:
        r = read_gguf(path()).__enter__()
        for qtype, rows in picks:
            t = next(t for t in r.tensors.values() if t.qtype == qtype and t.shape[0] == rows)
            yield f"{path().name.split('.')[0]} {qtype} {t.shape[0]}x{t.shape[1]}", qtype, \
                np.asarray(t.data).view(np.uint8).reshape(t.shape[0], -1), t.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-n", "--tokens", type=int, default=128)
    a = ap.parse_args()
    from blockq.kernels import cpu_int8_gemm as G

    if not G.ZMM or G.k8.VARIANT != "avx512vnni":
        sys.exit("this CPU does not run the avx512vnni variant: nothing to compare")
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    try:
        import ggml_lib
        ggml_lib.libs()
    except (ImportError, OSError):
        ggml_lib = None
    print(f"-t {a.threads}, {a.tokens} tokens, best of 7"
          + ("" if ggml_lib else " (no llama-cpp-python: no ggml column)"))
    for label, qtype, w, cols in matrices():
        X = rng.standard_normal((a.tokens, cols)).astype(np.float32)
        outs, best, peer, fixed = {}, {True: 1e9, False: 1e9}, 1e9, 1e9
        for _ in range(7):
            if ggml_lib:
                t0 = time.perf_counter()
                ggml_lib.mul_mat(qtype, w, (w.shape[0], cols), X, threads=a.threads)
                peer = min(peer, time.perf_counter() - t0)
                t0 = time.perf_counter()
                ggml_lib.mul_mat(qtype, w, (w.shape[0], cols), X[:1], threads=a.threads)
                fixed = min(fixed, time.perf_counter() - t0)
            for vnni in (False, True):
                G.VNNI512 = vnni
                o = np.empty((a.tokens, w.shape[0]), np.float32)
                G.product(qtype, w, X, o)
                t0 = time.perf_counter()
                G.product(qtype, w, X, o)
                best[vnni] = min(best[vnni], time.perf_counter() - t0)
                outs[vnni] = o
        G.VNNI512 = True
        macs = a.tokens * w.shape[0] * cols
        diff = np.abs(outs[True] - outs[False]).max() / np.abs(outs[False]).max()
        print(f"{label:32s} pmaddubsw {best[False] * 1e3:7.2f} ms {macs / best[False] / 1e9:6.1f}"
              f" GMAC/s | vpdpbusd {best[True] * 1e3:7.2f} ms {macs / best[True] / 1e9:6.1f} "
              f"GMAC/s | {best[False] / best[True]:.2f}x | max rel diff {diff:.1e}"
              + (f" | ggml {peer * 1e3:7.2f} ms {macs / peer / 1e9:6.1f} GMAC/s, vpdpbusd / "
                 f"ggml {peer / best[True]:.2f}x; less its 1-token call {fixed * 1e3:.2f} ms: "
                 f"{macs / (peer - fixed) / 1e9:6.1f} GMAC/s, "
                 f"{(peer - fixed) / best[True]:.2f}x" if ggml_lib else ""))


if __name__ == "__main__":
    main()
