"""Check blockq's k-quant matmul (``KQuantDot``) against ggml's own mul_mat, bit for bit.

For each of Q2_K..Q6_K: random matrices quantized by blockq, raw random blocks (every code,
scale and f16 exponent), all-zero super-blocks, Q6_K blocks built to push the integer lanes past
2^24, and the real ``ffn_down`` matrices of SmolLM2's k-mix file; activations are 40 rows mixing
gaussian, heavy-tailed, saturated, all-zero-block, huge (1e20) and subnormal (1e-39) rows, with
ties for round-half-even.  Prints the number of differing outputs per case and n (every prefix
n of the 40 rows in ``NS``: n < 8 runs ggml's vec_dot kernels, n >= 8 its tiled kernel), and
checks ``quantize_q8_k`` against ggml's Q8_K quantizer.

    python tools/check_llama_dots_kquant.py           # check, exit 1 on any mismatch
    python tools/check_llama_dots_kquant.py --record  # and write tests/data/llama_dots_kquant.npz

Needs ``llama_cpp`` (tools/ggml_lib.py); the tests only read the recorded npz.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ggml_lib  # noqa: E402
from blockq.fetch import cache_dir  # noqa: E402
from blockq.kernels.cpu_matvec import QMatrix  # noqa: E402
from blockq.kernels.cpu_q8_kquant import TYPES, KQuantDot, quantize_q8_k  # noqa: E402
from blockq.quantize import quantize  # noqa: E402
from blockq.testing import random_blocks  # noqa: E402
from blockq.types import QK_K, qtype  # noqa: E402

RECORD = ROOT / "tests" / "data" / "llama_dots_kquant.npz"
KMIX = "SmolLM2-135M-Instruct.kmix.gguf"
NS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 40)
N_MAX = max(NS)
# recorded (small) versions of the cases: weight rows kept, activation rows kept per width
REC_ROWS, REC_N = 8, {256: 40, 512: 12, 1536: 9}


def activations(cols: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, cols) float32: special rows first, then gaussian rows of random magnitude."""
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x *= np.exp(rng.uniform(-6, 6, (n, 1))).astype(np.float32)
    special = [
        rng.standard_normal(cols),  # plain
        rng.standard_t(3, cols),  # heavy tails (like swiglu outputs)
        np.where(np.arange(cols) < QK_K, 0, rng.standard_normal(cols)),  # zero super-block
        np.sign(rng.standard_normal(cols)),  # every code +-127
        rng.standard_normal(cols) * 1e20,  # huge
        np.where(np.arange(cols) < QK_K, rng.standard_normal(cols) * 1e-39,  # subnormal block
                 rng.standard_normal(cols)),
        # ties: max 127 so iscale = -1, halves round to even
        np.where(np.arange(cols) % QK_K == 0, 127.0, rng.integers(-250, 250, cols) / 2),
        # lane 0 of each 32 large, sub-blocks 0 and 1 summing to ~0 (Q6_K lanes past 2^24)
        np.where(np.arange(cols) % QK_K < 32, np.where(np.arange(cols) % 2, 1.0, -1.0), 1.0),
    ]
    for i, row in enumerate(special[:n]):
        x[i] = row
    return x


def q6_big_lanes(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Q6_K blocks with codes 48..63 and scales +-127/-128: integer lanes beyond 2^24."""
    b = random_blocks("Q6_K", rows * cols // QK_K, rng, scales=0.01)
    rec = b.view(qtype("Q6_K").dtype)[:, 0]
    rec["qh"] |= 0xAA  # the high bit of every 2-bit high part: codes >= 32 ... 63
    rec["scales"] = rng.choice(np.array([127, -128, 127, 126], np.int8), rec["scales"].shape)
    return b.reshape(rows, -1)


@lru_cache(None)
def real_ffn_down() -> tuple:
    """(type, "smollm2_blkI_ffn_down", blocks, shape): the first ffn_down of each k-quant type
    in SmolLM2's k-mix file (all 576 x 1536)."""
    path = cache_dir() / KMIX
    if not path.exists():
        print(f"(no {path}: real rows skipped)")
        return ()
    from blockq.model import Model

    found = {}
    for i, blk in enumerate(Model.load(path).blk):
        w = blk.ffn_down.weight
        found.setdefault(w.qtype, (w.qtype, f"smollm2_blk{i}_ffn_down", np.array(w.data),
                                   w.shape))
    return tuple(found.values())


def matrices(t: str, rng: np.random.Generator) -> list[tuple[str, np.ndarray, tuple]]:
    """(case name, blocks (rows, row_bytes), shape) for type t."""
    out = []
    for rows, cols in ((8, 256), (40, 512), (24, 1536)):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        out.append((f"gauss{cols}", quantize(w, t), (rows, cols)))
    rows, cols = 16, 512
    out.append(("rawbits512", random_blocks(t, rows * cols // QK_K, rng).reshape(rows, -1),
                (rows, cols)))
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 1e3
    w[::3] = 0  # zero rows
    w[:, QK_K:2 * QK_K] = 0  # a zero super-block in every row
    out.append(("zeros512", quantize(w, t), (rows, cols)))
    if t == "Q6_K":
        out.append(("biglanes512", q6_big_lanes(rows, cols, rng), (rows, cols)))
    out += [case for qt, *case in real_ffn_down() if qt == t]
    return out


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def check_q8_k(xs: dict[int, np.ndarray]) -> int:
    bad = 0
    for cols, x in xs.items():
        for row in x:
            raw = ggml_lib.from_float("Q8_K", row).view(qtype("Q8_K").dtype)
            q, d, bs = quantize_q8_k(row[None])
            live = raw["d"] != 0  # ggml leaves an all-zero block's bsums unwritten
            bad += int((bits(raw["d"]) != bits(d[0])).sum() + (raw["qs"] != q[0]).sum()
                       + (raw["bsums"][live] != bs[0][live]).sum())
    print(f"quantize_q8_k vs ggml's Q8_K: {bad} differing fields")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help=f"write {RECORD.relative_to(ROOT)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    xs = {cols: activations(cols, N_MAX, rng) for cols in (256, 512, 1536)}
    total = check_q8_k(xs)
    rec: dict[str, np.ndarray] = {f"x{c}": xs[c][:REC_N[c]] for c in xs}
    for c in xs:
        rec[f"q8k{c}"] = np.stack([ggml_lib.from_float("Q8_K", r) for r in rec[f"x{c}"]])
    print(f"{'type':5} {'case':24} {'shape':>11}  mismatches for n = " + " ".join(map(str, NS)))
    for t in TYPES:
        for name, blocks, shape in matrices(t, rng):
            rows, cols = shape
            x = xs[cols]
            dot = KQuantDot(QMatrix(t, blocks, shape))
            counts = []
            for n in NS:
                want = ggml_lib.mul_mat(t, blocks, shape, x[:n])
                counts.append(int((bits(dot(x[:n])) != bits(want)).sum()))
            total += sum(counts)
            t0 = time.perf_counter()
            dot(x[:1])
            ms = (time.perf_counter() - t0) * 1e3
            print(f"{t:5} {name:24} {rows:>5}x{cols:<5}  {' '.join(map(str, counts))}"
                  f"   (n=1: {ms:.1f} ms)")
            # recorded: REC_ROWS rows spread over the matrix; "vec": each activation row alone
            # (n = 1, the vec_dot kernels), "tiled": all REC_N rows at once (n >= 8)
            keep = np.linspace(0, rows - 1, min(rows, REC_ROWS)).round().astype(int)
            small, xr = np.ascontiguousarray(blocks[keep]), x[:REC_N[cols]]
            rec[f"{t}.{name}.blocks"] = small
            rec[f"{t}.{name}.vec"] = np.concatenate(
                [ggml_lib.mul_mat(t, small, (len(keep), cols), r[None]) for r in xr])
            rec[f"{t}.{name}.tiled"] = ggml_lib.mul_mat(t, small, (len(keep), cols), xr)
    print(f"total mismatches: {total}")
    if args.record:
        np.savez_compressed(RECORD, **rec)
        print(f"wrote {RECORD} ({RECORD.stat().st_size / 1024:.0f} KiB, {len(rec)} arrays)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
