"""LegacyDot (Q4_0 / Q5_0 / Q5_1, blockq.kernels.cpu_q8_legacy) against ggml's own mul_mat.

    python tools/check_llama_dots_legacy.py [--nmax 40] [--threads 2] [--record]

For every case (weight blocks x float32 activations) and every n in 1..nmax it runs ggml's
CPU ``mul_mat`` (tools/ggml_lib.py: n == 1 through ``ggml_vec_dot_*``, n >= 2 through
llamafile's tinyBLAS for Q4_0 / Q5_0) on the first n activation rows and counts the outputs
whose float32 bits differ from ``LegacyDot``'s.  Cases:

- gauss: gaussian rows quantized by blockq (identical to llama.cpp's quantizer),
- raw:   random block bytes with hand-picked scales (0, f16 subnormal, negative, 65504),
- edge:  zero rows / zero blocks / outliers in the weights; activations with zero blocks,
         huge blocks (1e6) and tiny ones whose f16 scale is subnormal or flushes to 0,
- real:  SmolLM2-135M rows (its Q4_1 file, dequantized and requantized to each type) and
         gemma-3-270m's own Q5_0 rows (llama.cpp-written), activations scaled like a
         residual stream.

It also re-checks ``cpu_q8.Q8Dot`` (Q8_0, Q4_1) over the same n range (``--threads`` runs a
second pass with a multi-threaded ggml, where tinyBLAS splits tiles between threads), and
times ``LegacyDot`` on a 576 x 1536 matrix.  ``--record`` writes a subset (small n sets, small
matrices) to tests/data/llama_dots_legacy.npz for tests/test_llama_dots_legacy.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ggml_lib  # noqa: E402
from blockq.dequantize import dequantize  # noqa: E402
from blockq.gguf import read_gguf  # noqa: E402
from blockq.kernels.cpu_matvec import QMatrix  # noqa: E402
from blockq.kernels.cpu_q8 import Q8Dot  # noqa: E402
from blockq.kernels.cpu_q8_legacy import LEGACY, LegacyDot  # noqa: E402
from blockq.quantize import quantize  # noqa: E402
from blockq.types import qtype  # noqa: E402

F32 = np.float32
CACHE = Path.home() / ".cache" / "blockq"
SMOLLM2 = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = CACHE / "gemma-3-270m-Q4_K_M.gguf"
OUT = ROOT / "tests" / "data" / "llama_dots_legacy.npz"
NMAX = 40
# n recorded into the npz: every tinyBLAS tile shape (RM, RN <= 4) and n == 1 (vec_dot)
N_SMALL = (1, 2, 3, 4, 5, 6, 7, 8, 13, 40)
N_REAL = (1, 2, 5, 9)  # real rows: wider activations, fewer n
N_FULL = (1, 2, 3, 4, 5, 8, 17, 40)  # whole matrices (not recorded)


def f16(*v) -> np.ndarray:
    return np.array(v, np.float16)


# ---------------------------------------------------------------------------------------------
# cases: name -> (qtype -> blocks (rows, row_bytes) uint8, activations (nmax, cols))


def activations(rng, n: int, cols: int, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal((n, cols)) * scale).astype(F32)


def edge_activations(rng, n: int, cols: int) -> np.ndarray:
    x = activations(rng, n, cols)
    nb = cols // 32
    for t in range(n):  # cycle one special block per row through the kinds below
        b = t % nb
        kind = t % 6
        blk = x[t, 32 * b:32 * b + 32]
        if kind == 0:
            blk[:] = 0
        elif kind == 1:
            blk *= F32(3e5)  # amax ~1e6: d = f16(amax / 127) still finite
        elif kind == 2:
            blk *= F32(3e-6)  # d is an f16 subnormal
        elif kind == 3:
            blk *= F32(1e-10)  # d flushes to 0 in f16, codes do not
        elif kind == 4:
            blk[:] = 0
            blk[t % 32] = F32(-7.5)  # one value: code -127, the rest 0
        else:
            blk[:] = F32(0.5)  # constant block
    return x


def raw_blocks(rng, qt: str, rows: int, cols: int) -> np.ndarray:
    t = qtype(qt)
    raw = rng.integers(0, 256, (rows, cols // 32 * t.type_size), dtype=np.uint8)
    b = raw.view(t.dtype)  # (rows, nb) blocks
    scales = f16(0.0, 6e-8, -3e-5, 1e-3, -0.02, 0.7, 65504.0, -65504.0)
    b["d"] = rng.choice(scales, b.shape)
    if "m" in t.dtype.names:
        b["m"] = rng.choice(scales, b.shape)
    return raw


def edge_weights(rng, rows: int, cols: int) -> np.ndarray:
    w = rng.standard_normal((rows, cols)).astype(F32)
    w[0] = 0  # all-zero row
    w[1, :64] = 0  # zero blocks
    w[2, 5] = 1e4  # one outlier
    w[3] = 1.0  # constant row
    w[4] = -np.abs(w[4])  # one-signed rows
    w[5] = np.abs(w[5]) * 1e-6  # tiny scale
    return w


def real_rows() -> dict[str, tuple[str, np.ndarray]]:
    """float rows of SmolLM2 (to requantize) and gemma-3's raw Q5_0 rows."""
    out = {}
    if SMOLLM2.exists():
        g = read_gguf(SMOLLM2)
        for name, r in (("blk.3.attn_q.weight", 8), ("blk.10.ffn_gate.weight", 8)):
            t = g.tensors[name]
            rows, cols = t.shape
            data = t.data.reshape(rows, -1)[:r]
            out[f"smollm2:{name}"] = ("float", dequantize(data, t.qtype, (r, cols)))
    if GEMMA3.exists():
        g = read_gguf(GEMMA3)
        for name, r in (("blk.0.ffn_gate.weight", 12), ("blk.5.attn_q.weight", 12)):
            t = g.tensors[name]
            rows, cols = t.shape
            assert t.qtype == "Q5_0", (name, t.qtype)
            out[f"gemma3:{name}"] = ("Q5_0", np.ascontiguousarray(t.data.reshape(rows, -1)[:r]))
    return out


def full_matrices() -> list[tuple[str, str, np.ndarray, tuple[int, int]]]:
    """Whole real matrices: SmolLM2's ffn_down (576 x 1536, requantized), gemma-3's Q5_0."""
    out = []
    if SMOLLM2.exists():
        t = read_gguf(SMOLLM2).tensors["blk.7.ffn_down.weight"]
        w = dequantize(t.data, t.qtype, t.shape)
        out += [("smollm2:blk.7.ffn_down", qt, quantize(w, qt), t.shape) for qt in LEGACY]
    if GEMMA3.exists():
        t = read_gguf(GEMMA3).tensors["blk.0.attn_q.weight"]
        out.append(("gemma3:blk.0.attn_q", t.qtype, t.data.reshape(t.shape[0], -1), t.shape))
    return out


def cases(rng, nmax: int) -> list[tuple[str, str, np.ndarray, tuple[int, int], np.ndarray, tuple]]:
    """(case, qtype, blocks, shape, x (nmax, cols), n recorded)"""
    out = []
    xg, xr, xe = (activations(rng, nmax, 256), activations(rng, nmax, 128),
                  edge_activations(rng, nmax, 256))  # each shared by the three types
    for qt in LEGACY:
        w = rng.standard_normal((33, 256)).astype(F32)
        out.append(("gauss", qt, quantize(w, qt), (33, 256), xg, N_SMALL))
        out.append(("raw", qt, raw_blocks(rng, qt, 12, 128), (12, 128), xr, N_SMALL))
        out.append(("edge", qt, quantize(edge_weights(rng, 9, 256), qt), (9, 256), xe, N_SMALL))
    xs = {}  # real rows: one activation set per model
    for key, (kind, rows_) in real_rows().items():
        shape = rows_.shape if kind == "float" else \
            (rows_.shape[0], rows_.shape[1] // qtype(kind).type_size * 32)
        model = key.split(":")[0]
        if model not in xs:  # gemma-3's residual stream runs large
            xs[model] = activations(rng, nmax, shape[1], 1.0 if model == "smollm2" else 40.0)
        for qt in (LEGACY if kind == "float" else (kind,)):
            blocks = quantize(rows_, qt) if kind == "float" else rows_
            out.append((key, qt, blocks, shape, xs[model], N_REAL))
    return out


# ---------------------------------------------------------------------------------------------


def mismatches(a: np.ndarray, b: np.ndarray) -> int:
    return int((a.view(np.uint32) != b.view(np.uint32)).sum())


def check(dot, qt, blocks, shape, x, nmax: int, threads: int) -> tuple[int, list[int]]:
    total, bad_n = 0, []
    for n in range(1, nmax + 1):
        ref = ggml_lib.mul_mat(qt, blocks, shape, x[:n], threads=threads)
        with np.errstate(over="ignore", invalid="ignore"):  # edge cases reach inf, as ggml
            m = mismatches(ref, dot(x[:n]))
        total += m
        if m:
            bad_n.append(n)
    return total, bad_n


def report(label: str, total: int, bad_n: list[int], outputs: int) -> None:
    where = f"  (n = {bad_n})" if bad_n else ""
    print(f"  {label:<50} {total:>6} / {outputs:<7} mismatches{where}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nmax", type=int, default=NMAX)
    ap.add_argument("--threads", type=int, default=2, help="second ggml pass (0: skip)")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(20240611)
    nmax = max(a.nmax, max(N_SMALL)) if a.record else a.nmax
    all_cases = cases(rng, nmax)
    outputs_per = lambda rows: rows * nmax * (nmax + 1) // 2  # noqa: E731
    grand = 0

    print(f"LegacyDot vs ggml mul_mat, n = 1..{a.nmax}, threads = 1"
          + (f" and {a.threads}" if a.threads > 1 else ""))
    for name, qt, blocks, shape, x, _ in all_cases:
        dot = LegacyDot(QMatrix(qt, blocks, shape))
        for th in (1, a.threads) if a.threads > 1 else (1,):
            total, bad = check(dot, qt, blocks, shape, x, a.nmax, th)
            grand += total
            report(f"{qt} {name} {shape} t={th}", total, bad, outputs_per(shape[0]))

    print(f"LegacyDot on whole matrices, n in {N_FULL}")
    for name, qt, blocks, shape in full_matrices():
        dot = LegacyDot(QMatrix(qt, blocks, shape))
        x = activations(rng, max(N_FULL), shape[1], 1.0 if name.startswith("smollm2") else 40.0)
        total, bad = 0, []
        for n in N_FULL:
            m = mismatches(ggml_lib.mul_mat(qt, blocks, shape, x[:n]), dot(x[:n]))
            total, bad = total + m, bad + ([n] if m else [])
        grand += total
        report(f"{qt} {name} {shape}", total, bad, shape[0] * sum(N_FULL))

    print(f"cpu_q8.Q8Dot (lead's) vs ggml mul_mat, n = 1..{a.nmax}")
    q8 = []
    for rows, cols in ((1, 32), (5, 96), (33, 256), (64, 576)):
        w = rng.standard_normal((rows, cols)).astype(F32)
        q8 += [(f"gauss {(rows, cols)}", qt, quantize(w, qt), (rows, cols),
                activations(rng, a.nmax, cols)) for qt in ("Q8_0", "Q4_1")]
    for qt in ("Q8_0", "Q4_1"):
        q8.append(("edge (9, 256)", qt, quantize(edge_weights(rng, 9, 256), qt), (9, 256),
                   edge_activations(rng, a.nmax, 256)))
    if GEMMA3.exists():
        t = read_gguf(GEMMA3).tensors["blk.1.attn_v.weight"]
        rows, cols = t.shape
        assert t.qtype == "Q8_0", t.qtype
        q8.append(("gemma3 blk.1.attn_v[:24]", "Q8_0", t.data.reshape(rows, -1)[:24], (24, cols),
                   activations(rng, a.nmax, cols, 40.0)))
    for name, qt, blocks, shape, x in q8:
        dot = Q8Dot(QMatrix(qt, blocks, shape))
        for th in (1, a.threads) if a.threads > 1 else (1,):
            total, bad = check(dot, qt, blocks, shape, x, a.nmax, th)
            grand += total
            report(f"{qt} {name} t={th}", total, bad, outputs_per(shape[0]))

    print("timing (LegacyDot.__call__, best of 5)")
    w = rng.standard_normal((576, 1536)).astype(F32)
    for qt in LEGACY:
        dot = LegacyDot(QMatrix(qt, quantize(w, qt), (576, 1536)))
        for n in (1, 8, 40):
            x = activations(rng, n, 1536)
            best = min(_time(dot, x) for _ in range(5))
            print(f"  {qt} 576 x 1536, n = {n:<3} {best * 1e3:7.1f} ms")

    if a.record:
        rec, xkey = {}, {}  # activations are shared between cases: stored once each
        for i, (name, qt, blocks, shape, x, ns) in enumerate(all_cases):
            k = f"{i:02d}"
            if id(x) not in xkey:
                xkey[id(x)] = f"x{len(xkey):02d}"
                rec[xkey[id(x)]] = x[:max(ns)]
            rec[f"{k}.name"] = np.array(f"{qt} {name}")
            rec[f"{k}.qtype"] = np.array(qt)
            rec[f"{k}.blocks"] = np.ascontiguousarray(blocks)
            rec[f"{k}.shape"] = np.array(shape)
            rec[f"{k}.x"] = np.array(xkey[id(x)])
            for n in ns:
                rec[f"{k}.y{n}"] = ggml_lib.mul_mat(qt, blocks, shape, x[:n])
        np.savez_compressed(OUT, **rec)
        print(f"recorded {len(all_cases)} cases to {OUT.relative_to(ROOT)} "
              f"({OUT.stat().st_size // 1024} KB)")
    print(f"total mismatches: {grand}")
    return 1 if grand else 0


def _time(dot, x) -> float:
    t = time.perf_counter()
    dot(x)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
