"""blockq's prompt path: the int8 tiles (cpu_int8_gemm) against the float tiles they replaced.

    python tools/bench_prompt.py types [-t 1,2] [--types Q4_K,Q5_0,...]
    python tools/bench_prompt.py model FILE [-t 1,2]
    python tools/bench_prompt.py profile FILE [-t 1]

``types``: per block type, pp128-sized products (SmolLM2's and the synthetic 0.56 B model's
shapes) through ``QMatrix.matmul`` with the int8 tiles and with the previous path (activations
rounded to their 8-bit blocks, then cpu_matvec's float tiles), interleaved, best of 5; each type's
int8 output is first checked against the numpy reference.  Prints the float/int8 time ratio
(> 1: the int8 tiles are faster) per shape and in total; ``PROMPT_TYPES`` should list the types
whose total is above 1.

``model``: a whole pp128 forward of FILE with the new prompt path (int8 tiles, threaded
attention) and the previous one (float tiles, BLAS attention) swapped in one process and
interleaved, median of 4.

``profile``: where a pp128 forward of FILE spends its time: each ``ops.CPUOps`` operation and each
matrix product (by type and shape) summed over the layers, the best of 3 forwards (the operations
nest: ``attend`` includes ``rope_store``, ``linear`` / ``linears`` the products).
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

SHAPES = {"legacy": [(1536, 576), (576, 576)],  # SmolLM2's Q5_0 / Q8_0 matrices
          "kquant": [(576, 1536), (5632, 2048), (2048, 5632)]}  # its ffn_down, the 0.56 B's
TYPES = "Q4_K,Q6_K,Q5_0,Q8_0,Q2_K,Q3_K,Q5_K,Q4_0,Q4_1,Q5_1"


def bench_types(types: list[str], threads: list[int], n: int = 128) -> None:
    from blockq.kernels import cpu_int8_gemm as G
    from blockq.kernels.cpu_matvec import QMatrix
    from blockq.testing import int8_reference, random_blocks
    from blockq.types import BY_NAME

    rng = np.random.default_rng(0)
    every = frozenset(G.UNPACK)
    for t in threads:
        numba.set_num_threads(t)
        for name in types:
            size = BY_NAME[name].block_size
            total = {"int8": 0.0, "float": 0.0}
            for rows, cols in SHAPES["kquant" if size == 256 else "legacy"]:
                w = random_blocks(name, rows * cols // size, rng, scales=0.05)
                m = QMatrix(name, w, (rows, cols))
                X = rng.standard_normal((n, cols)).astype(np.float32)
                G.PROMPT_TYPES = every
                ref, bound = int8_reference(name, m.data, X[:8])
                assert np.all(np.abs(m.matmul(X[:8]) - ref) <= 1e-5 * bound), name
                best = {}
                for _ in range(6):  # the first round warms up
                    for path, types_ in (("int8", every), ("float", frozenset())):
                        G.PROMPT_TYPES = types_
                        t0 = time.perf_counter()
                        m.matmul(X)
                        best[path] = min(best.get(path, 1e9), time.perf_counter() - t0)
                G.PROMPT_TYPES = every
                for k in total:
                    total[k] += best[k]
                print(f"-t {t} {name} {rows}x{cols}: int8 {best['int8'] * 1e3:.2f} ms, float "
                      f"{best['float'] * 1e3:.2f} ms, ratio {best['float'] / best['int8']:.2f} "
                      f"({2 * rows * cols * n / best['int8'] / 1e9:.0f} GOP/s)", flush=True)
            print(f"-t {t} {name} total float/int8 {total['float'] / total['int8']:.2f}",
                  flush=True)


def bench_model(path: str, threads: list[int], n: int = 128) -> None:
    from blockq import ops
    from blockq.cli.run import set_threads
    from blockq.kernels import cpu_int8_gemm as G
    from blockq.model import Model

    new_attend = ops.CPUOps._attend_prompt

    def previous():
        G.PROMPT_TYPES = frozenset()
        ops.CPUOps._attend_prompt = ops.ArrayOps.attend

    def current():
        G.PROMPT_TYPES = frozenset(G.UNPACK)
        ops.CPUOps._attend_prompt = new_attend

    for t in threads:
        set_threads(t)
        m = Model.load(path)
        cache = m.new_cache(n + 8)
        toks = np.random.default_rng(0).integers(0, m.args.n_vocab, n)
        paths = {"previous (float tiles, BLAS attention)": previous,
                 "int8 tiles, threaded attention": current}
        got = {k: [] for k in paths}
        for rep in range(5):  # the first round warms up
            for k, f in paths.items():
                f()
                cache.clear()
                t0 = time.perf_counter()
                m.forward(toks, cache, "last")
                if rep:
                    got[k].append(n / (time.perf_counter() - t0))
        current()
        for k, v in got.items():
            print(f"{path} -t {t}: {k}: pp{n} {np.median(v):.1f} tok/s {[round(x) for x in v]}",
                  flush=True)


def profile_model(path: str, threads: list[int]) -> None:
    import collections

    from blockq import ops
    from blockq.cli.run import set_threads
    from blockq.kernels import cpu_matvec
    from blockq.model import Model

    spent = collections.defaultdict(float)

    def timed(key, f):
        def g(*args, **kw):
            t0 = time.perf_counter()
            r = f(*args, **kw)
            spent[key(*args)] += time.perf_counter() - t0
            return r
        return g
    originals = {nm: getattr(ops.CPUOps, nm) for nm in
                 ("rms_norm", "swiglu", "geglu", "attend", "add", "rope_store", "linear",
                  "linears")}
    matmul = cpu_matvec.QMatrix.matmul
    try:
        for nm, f in originals.items():
            setattr(ops.CPUOps, nm, timed(lambda *a, nm=nm: nm, f))
        cpu_matvec.QMatrix.matmul = timed(lambda m, x: f"matmul {m.qtype} {m.shape}", matmul)
        for th in threads:
            set_threads(th)
            model = Model.load(path)
            cache = model.new_cache(136)
            toks = np.random.default_rng(0).integers(0, model.args.n_vocab, 128)
            best = None
            for _ in range(4):  # the first compiles and faults the weights in
                spent.clear()
                cache.clear()
                t0 = time.perf_counter()
                model.forward(toks, cache, "last")
                total = time.perf_counter() - t0
                if best is None or total < best[0]:
                    best = (total, dict(spent))
            total, parts = best
            print(f"{path} -t {th}: pp128 {total * 1e3:.1f} ms = {128 / total:.1f} tok/s")
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"  {k:40s} {v * 1e3:8.1f} ms")
    finally:
        for nm, f in originals.items():
            setattr(ops.CPUOps, nm, f)
        cpu_matvec.QMatrix.matmul = matmul


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["types", "model", "profile"])
    ap.add_argument("file", nargs="?")
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("--types", default=TYPES)
    a = ap.parse_args(argv)
    threads = [int(x) for x in a.threads.split(",")]
    if a.what == "types":
        bench_types(a.types.split(","), threads)
    else:
        if not a.file:
            ap.error(f"{a.what} needs a GGUF file")
        (bench_model if a.what == "model" else profile_model)(a.file, threads)


if __name__ == "__main__":
    main()
