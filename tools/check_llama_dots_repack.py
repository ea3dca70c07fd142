"""RepackDot (blockq/kernels/cpu_q8_repack.py) against ggml's repacked mul_mat, bit for bit.

    python tools/check_llama_dots_repack.py [--nmax 40] [--threads 1] [--no-real] [--record]

The oracle is ``ggml_lib.mul_mat_repacked``: the weight goes into llama.cpp's CPU_REPACK buffer
(q4_0_8x8 / q4_K_8x8) and the product runs through ggml-backend, exactly as llama.cpp runs a
model's Q4_0 / Q4_K matrices with rows % 8 == 0 on this machine.  For every case and every n in
1..nmax it prints the number of outputs whose bits differ (NaN counts as equal to NaN).  Cases:

- quantized Gaussian rows (blockq's quantizer, identical to llama.cpp's), several shapes;
- random block bytes (every f16 scale finite: subnormals, 65504...), zero blocks, activations
  with zero blocks, huge and tiny activations;
- Q4_K built so that a superblock's int32 sum passes 2^24 (float conversion rounds);
- real rows: SmolLM2-135M kmix (Q4_0 attn_q / ffn_up, Q4_K ffn_down) and Q4_K_M.requant.

Also times one call of RepackDot on the SmolLM2 matrices (n = 1 and n = 32).
``--record`` writes tests/data/llama_dots_repack.npz (small cases, a few n each) for
tests/test_llama_dots_repack.py.  Needs llama-cpp-python; tests never import this file.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ggml_lib  # noqa: E402
from blockq.kernels.cpu_matvec import QMatrix  # noqa: E402
from blockq.kernels.cpu_q8_repack import RepackDot  # noqa: E402
from blockq.quantize import quantize  # noqa: E402
from blockq.testing import random_blocks  # noqa: E402
from blockq.types import qtype  # noqa: E402

F32 = np.float32
OUT = ROOT / "tests" / "data" / "llama_dots_repack.npz"
RECORD_NS = (1, 2, 3, 4, 5, 7, 8, 11)  # n recorded per case: gemv only, gemm only, mixed
RECORD_N_LONG = 33  # 8 gemm groups + 1 gemv row, recorded for the first case of each type
RECORD_LONG = ("Q4_0_8x32_gauss_gauss", "Q4_K_8x256_gauss_gauss")
RECORD_SKIP = ("max_gauss", "max_ties")  # kept out of the npz (< 300 KB); max_positive is in
REAL = (("SmolLM2-135M-Instruct.kmix.gguf", 0, "attn_q"),     # Q4_0 576 x 576
        ("SmolLM2-135M-Instruct.kmix.gguf", 0, "ffn_up"),     # Q4_0 1536 x 576
        ("SmolLM2-135M-Instruct.kmix.gguf", 1, "ffn_down"),   # Q4_K 576 x 1536
        ("SmolLM2-135M-Instruct.Q4_K_M.requant.gguf", 10, "ffn_down"))  # Q4_K 576 x 1536

_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


@_LOG
def _quiet_log(level, text, _user):  # drop ggml's per-call "repack: repack tensor" debug line
    if level >= 3:  # GGML_LOG_LEVEL_WARN and up
        sys.stderr.write(text.decode(errors="replace"))


def quiet_ggml() -> None:
    base = ggml_lib.libs()[0]
    base.ggml_log_set.argtypes = [_LOG, ctypes.c_void_p]
    base.ggml_log_set(_quiet_log, None)


# ---------------------------------------------------------------------------------------------
# cases: (name, qtype, blocks (rows, row_bytes) uint8, (rows, cols), activations (nmax, cols))


def _acts(rng, n, cols, kind="gauss"):
    x = rng.standard_normal((n, cols)).astype(F32)
    if kind == "outliers":  # a few large channels, as LLM activations have
        x[:, rng.choice(cols, 3, replace=False)] *= 60
    elif kind == "zeros":  # whole 32- and 256-blocks of zeros
        x[:, :32] = 0
        x[1::2, 256:512] = 0
        x[0] = 0
    elif kind == "huge":
        x *= F32(3e4)
    elif kind == "tiny":  # Q8_0's d becomes an f16 subnormal
        x *= F32(1e-3)
    elif kind == "positive":  # one sign: Q4_K superblock sums reach 2^24
        x = (F32(1) + F32(0.1) * np.abs(x)).astype(F32)
    elif kind == "ties":  # +amax and -amax in one block (Q8_K's sign rule), repeated values
        x = np.round(x * 4).astype(F32)
        x[:, 5], x[:, 9] = -100, 100  # -amax before +amax in every block 0
    return x


def _weights(rng, qt, rows, cols, kind):
    t = qtype(qt)
    nb = cols // t.block_size
    if kind == "gauss":
        return quantize(rng.standard_normal((rows, cols)).astype(F32), qt)
    if kind == "bytes":  # every f16 scale finite
        return random_blocks(qt, rows * nb, rng, "finite").reshape(rows, -1)
    if kind == "bytes1":  # random codes and 6-bit scales, modest d / dmin
        return random_blocks(qt, rows * nb, rng, 1.0).reshape(rows, -1)
    if kind == "zeroblocks":
        b = quantize(rng.standard_normal((rows, cols)).astype(F32), qt)
        b[::3, : t.type_size] = 0  # first block of every third row: d = 0, codes 0
        b[1] = 0  # one all-zero row
        return b
    if kind == "max":  # Q4_K: codes 12..15, scales / mins 63: superblock sums past 2^24
        b = random_blocks(qt, rows * nb, rng, 1.0).reshape(rows * nb, -1)
        rec = b.view(t.dtype)[:, 0]
        half = rows * nb // 2
        rec["qs"][half:] = 0xCC | rng.integers(0, 256, rec["qs"][half:].shape, dtype=np.uint8)
        rec["scales"][half:] = 0xFF
        return b.reshape(rows, -1)
    raise ValueError(kind)


def synthetic_cases(rng, nmax):
    spec = (  # qtype, rows, cols, weight kind, activation kind
        ("Q4_0", 8, 32, "gauss", "gauss"),
        ("Q4_0", 16, 96, "gauss", "outliers"),
        ("Q4_0", 24, 256, "bytes", "gauss"),
        ("Q4_0", 16, 512, "zeroblocks", "zeros"),
        ("Q4_0", 8, 128, "gauss", "huge"),
        ("Q4_0", 8, 128, "bytes1", "tiny"),
        ("Q4_0", 8, 64, "gauss", "ties"),
        ("Q4_0", 16, 256, "bytes1", "positive"),
        ("Q4_K", 8, 256, "gauss", "gauss"),
        ("Q4_K", 16, 768, "gauss", "outliers"),
        ("Q4_K", 16, 512, "bytes", "gauss"),
        ("Q4_K", 16, 512, "bytes1", "gauss"),
        ("Q4_K", 16, 512, "zeroblocks", "zeros"),
        ("Q4_K", 8, 256, "bytes1", "huge"),
        ("Q4_K", 8, 256, "bytes1", "tiny"),
        ("Q4_K", 16, 512, "max", "gauss"),
        ("Q4_K", 16, 512, "max", "ties"),
        ("Q4_K", 16, 512, "max", "positive"),
    )
    for qt, rows, cols, wk, xk in spec:
        name = f"{qt}_{rows}x{cols}_{wk}_{xk}"
        yield name, qt, _weights(rng, qt, rows, cols, wk), (rows, cols), _acts(rng, nmax, cols, xk)


def real_cases(rng, nmax):
    from blockq import fetch
    from blockq.model import Model

    for fname, layer, which in REAL:
        m = Model.load(fetch.cache_dir() / fname)
        w = getattr(m.blk[layer], which).weight
        yield (f"{fname.split('.')[1]}_blk{layer}_{which}", w.qtype, np.asarray(w.data),
               w.shape, _acts(rng, nmax, w.shape[1], "outliers"))


# ---------------------------------------------------------------------------------------------


def mismatches(a: np.ndarray, b: np.ndarray) -> int:
    same = (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))
    return int((~same).sum())


def check(cases, ns, threads):
    total = 0
    for name, qt, blocks, shape, x in cases:
        dot = RepackDot(QMatrix(qt, blocks, shape))
        bad = {}
        for n in ns:
            ref = ggml_lib.mul_mat_repacked(qt, blocks, shape, x[:n], threads)
            got = dot(x[:n])
            k = mismatches(ref, got)
            if k:
                bad[n] = k
            total += k
        print(f"{name:44s} {qt} {shape[0]:5d}x{shape[1]:<5d} n=1..{max(ns)}: "
              + ("all bit-identical" if not bad else f"MISMATCH {bad}"))
    return total


def timing(cases):
    for name, qt, blocks, shape, x in cases:
        dot = RepackDot(QMatrix(qt, blocks, shape))
        for n in (1, 32):
            dot(x[:n])
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                dot(x[:n])
            ms = (time.perf_counter() - t0) / reps * 1e3
            t0 = time.perf_counter()
            for _ in range(reps):
                ggml_lib.mul_mat_repacked(qt, blocks, shape, x[:n])
            ms_g = (time.perf_counter() - t0) / reps * 1e3
            print(f"  time {name:40s} n={n:2d}: RepackDot {ms:7.2f} ms, ggml (incl. repack) "
                  f"{ms_g:6.2f} ms")


def record(rng, nmax):
    arrays = {}
    names = []
    for name, qt, blocks, shape, x in synthetic_cases(rng, nmax):
        if shape[1] > 512 or name.endswith(RECORD_SKIP):
            continue
        ns = RECORD_NS + ((RECORD_N_LONG,) if name in RECORD_LONG else ())
        names.append(name)
        arrays[f"{name}.qtype"] = np.array(qt)
        arrays[f"{name}.shape"] = np.array(shape, np.int64)
        arrays[f"{name}.blocks"] = blocks
        arrays[f"{name}.x"] = x[:max(ns)]
        for n in ns:
            arrays[f"{name}.out{n}"] = ggml_lib.mul_mat_repacked(qt, blocks, shape, x[:n])
    arrays["cases"] = np.array(names)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KB, {len(names)} cases, "
          f"n in {RECORD_NS}, {RECORD_N_LONG} for {RECORD_LONG})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nmax", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="ggml threads (must not matter)")
    ap.add_argument("--no-real", action="store_true", help="skip the SmolLM2 matrices")
    ap.add_argument("--record", action="store_true", help=f"write {OUT.name}")
    args = ap.parse_args()
    quiet_ggml()
    ns = range(1, args.nmax + 1)
    total = check(synthetic_cases(np.random.default_rng(0), args.nmax), ns, args.threads)
    if not args.no_real:
        real = list(real_cases(np.random.default_rng(1), args.nmax))
        total += check(real, ns, args.threads)
        timing(real)
    print("TOTAL mismatching outputs:", total)
    if args.record:
        record(np.random.default_rng(0), RECORD_N_LONG)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
