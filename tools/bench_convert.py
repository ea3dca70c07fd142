"""Convert the synthetic 0.56B F32 llama to Q4_K_M with blockq and with llama-quantize.

The model (n_embd 2048, 16 heads, 4 KV heads, ff 5632, 8 layers, vocab 49152, untied output;
random weights, 2.2 GB of F32) is written once to ``--work``.  Each quantizer then runs in its own
process with the same thread count (``blockq convert -t N`` and ``llama_cpp.llama_model_quantize``
with ``nthread = N``); the table gives wall time, the ratio (bar: blockq <= 1.5x llama.cpp) and
each process's peak resident memory (bar for blockq: < 700 MB), and whether the two files are
byte-identical.

    python tools/bench_convert.py [--work /tmp/bench] [-t THREADS] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SHAPE = dict(n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_layer=8, n_vocab=49152)


def write_model(path: Path) -> None:
    """Random F32 weights (std 0.02, norms near 1), one tensor in memory at a time."""
    from blockq.gguf.writer import write_gguf

    s = SHAPE
    hd = s["n_embd"] // s["n_head"]
    a = "llama"
    md = {"general.architecture": a, "general.name": "synthetic-0.56B",
          f"{a}.block_count": s["n_layer"], f"{a}.context_length": 4096,
          f"{a}.embedding_length": s["n_embd"], f"{a}.feed_forward_length": s["n_ff"],
          f"{a}.attention.head_count": s["n_head"], f"{a}.attention.head_count_kv": s["n_head_kv"],
          f"{a}.rope.freq_base": 10000.0, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.rope.dimension_count": hd, f"{a}.vocab_size": s["n_vocab"],
          "general.file_type": 0}
    e, kv, ff, v = s["n_embd"], s["n_head_kv"] * hd, s["n_ff"], s["n_vocab"]
    shapes = [("token_embd.weight", (v, e)), ("output_norm.weight", (e,)),
              ("output.weight", (v, e))]
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (e,)), (b + "attn_q.weight", (e, e)),
                   (b + "attn_k.weight", (kv, e)), (b + "attn_v.weight", (kv, e)),
                   (b + "attn_output.weight", (e, e)), (b + "ffn_norm.weight", (e,)),
                   (b + "ffn_gate.weight", (ff, e)), (b + "ffn_up.weight", (ff, e)),
                   (b + "ffn_down.weight", (e, ff))]

    def data(i, shape):
        def make():
            rng = np.random.default_rng(i)
            if len(shape) == 1:
                return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            return (0.02 * rng.standard_normal(shape, dtype=np.float32)).view(np.uint8)
        return make

    write_gguf(path, md, [(n, "F32", sh, data(i, sh)) for i, (n, sh) in enumerate(shapes)])


def run(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process.

    NOTE: the child is started by /usr/bin/time, not forked from this (large) process: Linux
    carries a forked parent's peak RSS into the child's ru_maxrss across exec.
    """
    import tempfile
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-o", tf.name, "-f", "%M", *cmd],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t0
        lines = [ln for ln in open(tf.name).read().split() if ln.isdigit()]
    if p.returncode:
        print(p.stderr.decode(errors="replace")[-2000:], file=sys.stderr)
    return wall, int(lines[-1]) * 1024 if lines else 0, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.work / "synthetic-0.56B-F32.gguf"
    if not src.exists():
        print(f"writing {src} ...", file=sys.stderr)
        write_model(src)
    with open(src, "rb") as fh:  # warm the page cache for both runs alike
        while fh.read(1 << 26):
            pass
    out_b, out_l = a.work / f"blockq-{a.preset}.gguf", a.work / f"llama-{a.preset}.gguf"
    # one untimed blockq run compiles/caches the Numba kernels this preset needs
    tiny = a.work / "warm.gguf"
    if not tiny.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import write_tiny
        write_tiny(tiny, n_layer=1, n_embd=256, n_ff=512)
    run([sys.executable, "-c", "from blockq.cli import main; main()", "convert", str(tiny),
         str(a.work / "warm-q.gguf"),
         "--type", a.preset, "--quiet", "-t", str(a.threads)])

    tb, rss_b, cb = run([sys.executable, "-c", "from blockq.cli import main; main()", "convert",
                         str(src), str(out_b), "--type", a.preset, "-t", str(a.threads),
                         "--quiet"])
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); "
            f"from record_presets import llama_quantize; "
            f"llama_quantize({str(src)!r}, {str(out_l)!r}, {a.preset!r}, nthread={a.threads})")
    tl, rss_l, cl = run([sys.executable, "-c", code])
    if cb or cl:
        sys.exit(f"a run failed (blockq {cb}, llama.cpp {cl})")
    same = out_b.read_bytes() == out_l.read_bytes()
    res = {"preset": a.preset, "threads": a.threads, "source_bytes": src.stat().st_size,
           "blockq_s": tb, "llama_s": tl, "ratio": tb / tl, "blockq_peak_rss": rss_b,
           "llama_peak_rss": rss_l, "identical": same}
    if a.json:
        print(json.dumps(res))
        return
    gb = src.stat().st_size / 1e9
    print(f"synthetic 0.56B F32 ({gb:.2f} GB) -> {a.preset}, {a.threads} threads")
    print(f"  llama.cpp  {tl:7.1f} s  {gb / tl:5.2f} GB/s  peak RSS {rss_l / 2**20:6.0f} MiB")
    print(f"  blockq     {tb:7.1f} s  {gb / tb:5.2f} GB/s  peak RSS {rss_b / 2**20:6.0f} MiB")
    print(f"  ratio blockq/llama.cpp {tb / tl:.2f}x (bar <= 1.5x); files "
          f"{'byte-identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
