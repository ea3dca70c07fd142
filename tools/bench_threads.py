"""Decode speed against the threading limit of the int8 products (``cpu_int8.PARALLEL_MIN_BYTES``).

    python tools/bench_threads.py FILE [-t 2] [--limits 16384,131072,2097152] [-r 4] [-n 48]

One process: for each repetition, every limit in turn (the products below it run on the calling
thread, the others on all threads), ``-n`` greedy tokens after an 8-token prompt; prints the best
tokens/s of each limit over the repetitions, alternating so that drift in the machine's speed
hits every limit alike.  This is how the 128 KiB default was chosen.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--limits", default="16384,65536,131072,262144,2097152")
    ap.add_argument("-r", "--reps", type=int, default=4)
    ap.add_argument("-n", "--tokens", type=int, default=48)
    a = ap.parse_args(argv)
    import numba

    from blockq.cli.run import set_threads
    from blockq.kernels import cpu_int8
    from blockq.kernels.cpu_matvec import QMatrix
    from blockq.model import Model

    set_threads(a.threads)
    model = Model.load(a.file)
    cache = model.new_cache(a.tokens + 16)
    prompt = np.random.default_rng(0).integers(0, model.args.n_vocab, 8)
    limits = [int(v) for v in a.limits.split(",")]
    best = dict.fromkeys(limits, 0.0)
    default = cpu_int8.PARALLEL_MIN_BYTES
    try:
        for _ in range(a.reps):
            for limit in limits:
                cpu_int8.PARALLEL_MIN_BYTES = limit
                for o in gc.get_objects():  # the prepared q/k/v and gate/up groups read it once
                    if isinstance(o, QMatrix):
                        o._shared.clear()
                cache.clear()
                model.forward(prompt, cache, "last")
                tok = int(prompt[-1])
                for _ in range(3):
                    model.forward([tok], cache, "last")
                t0 = time.perf_counter()
                for _ in range(a.tokens):
                    model.forward([tok], cache, "last")
                best[limit] = max(best[limit], a.tokens / (time.perf_counter() - t0))
    finally:
        cpu_int8.PARALLEL_MIN_BYTES = default
    print(f"{a.file.name} -t {a.threads} ({numba.threading_layer()} threads), best of {a.reps}, "
          f"tokens/s by limit:")
    for limit, r in best.items():
        mark = " (default)" if limit == default else ""
        print(f"  {limit >> 10:6d} KiB  {r:7.1f}{mark}")


if __name__ == "__main__":
    main()
