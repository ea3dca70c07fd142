"""Fuzz blockq's GGUF reader: mutate and truncate GGUF files; only FormatError may escape.

Seeds: the header region of each real llama.cpp-written file (everything before the tensor data
plus 4 KiB, so every tensor then runs past the end) and a small valid file written by blockq
holding every value type, nested arrays and a tensor of every block type (so the success path,
lazy decoding and ``inspect``'s summary run too).  A case applies 1-4 mutations: set a byte,
flip a bit, write an interesting u32/u64 over a structural field (lengths, counts, type tags,
dimensions, offsets), truncate, insert or delete bytes.  Positions are drawn from the seed's
structural offsets or anywhere.  Each input is opened from memory; when it opens, every
metadata value is decoded and every tensor's bytes are touched.

    python tools/fuzz_gguf.py --cases 10000            # ~1/3 per seed; prints counts and time
    python tools/fuzz_gguf.py --cases 2000 --seeds synthetic --crash-dir /tmp/crashes

``tests/test_gguf_fuzz.py`` drives the same mutations with hypothesis for a few hundred cases.
Exit status 1 when any input raised something other than FormatError (inputs are saved).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import tracemalloc
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockq import FormatError, fetch  # noqa: E402
from blockq.gguf import Value, ValueType as VT, read_gguf, write_gguf  # noqa: E402
from blockq.gguf.summary import describe  # noqa: E402
from blockq.types import ALL  # noqa: E402

KINDS = ("byte", "flip", "u32", "u64", "truncate", "insert", "delete")
INTERESTING = (0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 63, 64, 255, 256, 0xFFFF,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


# --- seeds ------------------------------------------------------------------------------------
def synthetic_seed() -> bytes:
    """A small valid file: every value type, nested arrays, one tensor of every block type."""
    rng = np.random.default_rng(7)
    md = {
        "general.architecture": "llama", "general.name": "fuzz", "llama.context_length": 64,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.tokens": ["a", "bc", ""],
        "tokenizer.ggml.scores": [0.0, 1.0, 2.0], "tokenizer.ggml.token_type": [1, 1, 3],
        "x.u8": Value(VT.UINT8, 1), "x.i8": Value(VT.INT8, -1), "x.u16": Value(VT.UINT16, 2),
        "x.i16": Value(VT.INT16, -2), "x.i32": -3, "x.u64": 2**40 + 2**63, "x.i64": -2**40,
        "x.f64": np.float64(0.25), "x.bool": True, "x.bools": [True, False],
        "x.nested": [[1, 2], ["s"], [[3]]],
    }
    tensors = []
    for t in ALL:
        cols = t.block_size if t.block_size > 1 else 8
        nbytes = 2 * cols // t.block_size * t.type_size
        tensors.append((f"w.{t.name}", t.name, (2, cols), rng.integers(0, 256, nbytes, np.uint8)))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "seed.gguf"
        write_gguf(p, md, tensors)
        return p.read_bytes()


def header_seed(path: Path) -> bytes:
    """The real file up to its data section plus 4 KiB (a truncated copy)."""
    with read_gguf(path) as f:
        end = f.data_offset + 4096
    with open(path, "rb") as fh:
        return fh.read(end)


def hot_offsets(buf: bytes) -> list[int]:
    """Offsets of the structural fields of a GGUF held in ``buf`` (which may be truncated)."""
    from blockq.gguf.reader import _Parser

    hot = [0, 4, 8, 16]
    p = _Parser(buf, len(buf), "<seed>")
    _, n_tensors, n_kv = p.header()
    fields, pos = p.metadata(None, n_kv)
    for f in fields.values():
        hot += [f.offset, f.value_offset - 4, f.value_offset, f.value_offset + 4,
                f.value_offset + 12, f.end - 1]
    for i in range(n_tensors):  # name length, n_dims, dims, type, offset of each tensor info
        hot.append(pos)
        n = int.from_bytes(buf[pos:pos + 8], "little")
        pos += 8 + n
        nd = int.from_bytes(buf[pos:pos + 4], "little")
        hot += [pos] + [pos + 4 + 8 * j for j in range(nd)]
        pos += 4 + 8 * nd
        hot += [pos, pos + 4]
        pos += 12
    hot += [pos, pos + 31]
    return sorted({h for h in hot if 0 <= h < len(buf)})


def seeds(names) -> dict[str, tuple[bytes, list[int]]]:
    out = {}
    for name in names:
        if name == "synthetic":
            buf = synthetic_seed()
        elif name == "smollm2":
            buf = header_seed(fetch.smollm2_path())
        elif name == "gemma3":
            buf = header_seed(fetch.gemma3_path())
        else:
            raise SystemExit(f"unknown seed {name!r}; use synthetic, smollm2, gemma3")
        out[name] = (buf, hot_offsets(buf))
    return out


# --- mutations --------------------------------------------------------------------------------
def mutate(seed: bytes, hot: list[int], muts) -> bytes:
    """Apply mutations ``(kind, at_hot, where, value)`` in order."""
    b = bytearray(seed)
    for kind, at_hot, where, value in muts:
        n = len(b)
        if n == 0:
            break
        pos = min(hot[where % len(hot)] if at_hot else where % n, n - 1)
        if kind == "byte":
            b[pos] = value & 0xFF
        elif kind == "flip":
            b[pos] ^= 1 << (value % 8)
        elif kind in ("u32", "u64"):
            width = 4 if kind == "u32" else 8
            choices = INTERESTING + (n, n - pos, max(n - pos - 8, 0), n + 1)
            v = choices[value % len(choices)] if value < 1 << 20 else value
            b[pos:pos + width] = (v % (1 << 8 * width)).to_bytes(width, "little")
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes([value & 0xFF]) * (value % 64 + 1)
        elif kind == "delete":
            del b[pos:pos + value % 64 + 1]
    return bytes(b)


def random_mutations(rng: random.Random):
    return [(rng.choice(KINDS), rng.random() < 0.7, rng.getrandbits(32),
             rng.getrandbits(20) if rng.random() < 0.8 else rng.getrandbits(64))
            for _ in range(rng.randint(1, 4))]


def exercise(buf: bytes) -> str:
    """Open and use ``buf``; 'ok' or 'error' (FormatError).  Anything else propagates."""
    try:
        with read_gguf(buf) as f:
            for key in f.metadata:
                f.metadata[key]
                f.metadata.typed(key)
            for t in f.tensors.values():
                if not t.decodable:  # a type id blockq does not know: listed, never read
                    continue
                d = t.data
                if d.size:
                    int(d[0]) + int(d[-1])
            describe(f)
        return "ok"
    except FormatError:
        return "error"


# --- driver -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--seeds", default="synthetic,smollm2,gemma3",
                    help="comma-separated: synthetic, smollm2, gemma3")
    ap.add_argument("--crash-dir", default=".", help="where failing inputs are saved")
    ap.add_argument("--memcheck-every", type=int, default=100,
                    help="trace allocations of every N-th open (0: never)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    pool = seeds(args.seeds.split(","))
    print(f"seeds: " + ", ".join(f"{k} {len(b):,} bytes / {len(h)} hot offsets"
                                 for k, (b, h) in pool.items()) +
          f" ({time.perf_counter() - t0:.1f}s)", flush=True)
    rng = random.Random(args.seed)
    names = list(pool)
    counts = {name: {"ok": 0, "error": 0, "crash": 0} for name in names}
    worst_mem = {name: 0.0 for name in names}  # traced peak / input size, per seed
    crashes = 0
    t0 = time.perf_counter()
    for i in range(args.cases):
        name = names[i % len(names)]
        seed, hot = pool[name]
        buf = mutate(seed, hot, random_mutations(rng))
        trace = args.memcheck_every and i % args.memcheck_every == 0
        if trace:
            tracemalloc.start()
        try:
            outcome = exercise(buf)
        except Exception:  # noqa: BLE001 - that is the point: anything but FormatError
            outcome = "crash"
            crashes += 1
            out = Path(args.crash_dir) / f"fuzz-crash-{args.seed}-{i}.gguf"
            out.write_bytes(buf)
            print(f"case {i} ({name}): {traceback.format_exc().strip().splitlines()[-1]} "
                  f"-> saved {out}", flush=True)
        finally:
            if trace:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                worst_mem[name] = max(worst_mem[name], peak / max(len(buf), 1))
        counts[name][outcome] += 1
        if (i + 1) % 1000 == 0:
            print(f"{i + 1} cases, {time.perf_counter() - t0:.1f}s", flush=True)
    dt = time.perf_counter() - t0
    for name, c in counts.items():
        print(f"{name:10s} ok {c['ok']:6d}  FormatError {c['error']:6d}  other {c['crash']:4d}"
              f"  traced peak <= {worst_mem[name]:.2f} x input size")
    print(f"{args.cases} cases in {dt:.1f}s ({args.cases / dt:.0f}/s); "
          + ("no exception other than FormatError" if not crashes
             else f"{crashes} inputs raised something else"))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
