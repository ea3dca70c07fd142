"""blockq's runtime against llama.cpp (llama-cpp-python): same file, same threads, one run.

    python tools/bench_runtime.py [-t 1,2] [-p 128] [-n 64] [-r 3] [--files F ...] [--json-out F]
                                  [--isa avx512vnni,avxvnni,avx2,float]

For each file (default: SmolLM2-135M requantized to Q4_K_M, the synthetic 0.56 B of
tools/make_synthetic.py at Q4_K_M, Q6_K and Q2_K, and the Gemma-3-270M Q4_K_M file of the test
extra) and each thread count:

- prompt (pp) and decode (tg) tokens/s of both engines, llama-bench style (random tokens, an
  empty cache, one warm-up, then ``-r`` repetitions, the engines interleaved so that load on
  the machine hits both alike); the median is reported with blockq/llama.cpp ratios.
  Bars: decode >= 1.0x, prompt >= 1.0x.  Before timing, every int8 kernel the file uses is
  checked against the numpy reference; the kernel variant (``BLOCKQ_ISA``) is printed, and
  decode's GB/s of weights beside a read bandwidth measured in the same run.
- ``--isa V1,V2,...``: the speed runs once per int8 variant, each in its own process with
  ``BLOCKQ_ISA`` forcing it and ``NUMBA_CPU_FEATURES`` making Numba compile as for a CPU whose
  best variant it is (``cpu_isa.numba_features_for``: for ``avx2`` no AVX-512 or VNNI at all,
  so LLVM cannot use them on its own either), so that every variant this machine has, the
  AVX2-only one included, is timed against llama.cpp; memory and start-up are then skipped.
- start-up: wall time of a fresh process that loads the model and decodes one token, with an
  empty Numba cache (first run: every kernel compiles) and with the cache filled (warm).
- resident memory while generating (VmRSS after the tg run, VmHWM peak) against the file size
  plus the KV cache of the positions used; and the peak RSS of ``blockq generate`` and of
  llama.cpp generating the same greedy tokens at llama.cpp's default context (-c 4096), against
  file + the KV cache llama.cpp allocates for that context + 150 MB.

llama-cpp-python is needed here only, never by the tests.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from blockq import fetch  # noqa: E402

STARTUP = """
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from blockq.model import Model
m = Model.load({path!r})
c = m.new_cache(64)
m.forward([1, 2, 3, 4], c)
t1 = time.perf_counter()
m.forward([5], c)
t2 = time.perf_counter()
print(json.dumps({{"load_and_prompt_s": t1 - t0, "first_decode_s": t2 - t1, "total_s": t2 - t0}}))
"""


def smollm2_q4km() -> Path:
    from make_synthetic import requantize

    dst = fetch.cache_dir() / "SmolLM2-135M-Instruct.Q4_K_M.requant.gguf"
    if not dst.exists():
        requantize(fetch.smollm2_path(), dst, preset_name="Q4_K_M")
    return dst


def synthetic(preset: str = "Q4_K_M") -> Path:
    from make_synthetic import write_synthetic

    dst = fetch.cache_dir() / f"synthetic-0.56B-{preset}.gguf"
    if not dst.exists():
        write_synthetic(dst, preset)
    return dst


def synthetic_q4km() -> Path:
    return synthetic("Q4_K_M")


def read_bandwidth(threads: int, mib: int = 512, reps: int = 5) -> float:
    """GB/s of a plain parallel sum over a buffer far larger than the caches (best of reps), on
    the same threads: what reading the weights once per token can reach at most."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def total(a):
        s = 0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    numba.set_num_threads(threads)
    a = np.ones(mib << 17, np.int64)  # (mib MiB,)
    total(a)
    best = min(_timed(lambda: total(a)) for _ in range(reps))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def validate_kernels(model) -> str:
    """Every int8 kernel the model runs, against the numpy reference, before anything is timed
    (16 rows of the first matrix of each type, two random tokens); raises on a mismatch."""
    from blockq.kernels.cpu_isa import isa
    from blockq.testing import int8_reference

    seen = {}
    for _, lin in model.linears():
        m = lin.weight
        if m.int8 and m.qtype not in seen:
            seen[m.qtype] = m
    worst = 0.0
    rng = np.random.default_rng(0)
    for name, m in seen.items():
        from blockq.kernels.cpu_matvec import QMatrix
        sub = QMatrix(name, m.data[:16], (min(16, m.shape[0]), m.shape[1]))
        X = rng.standard_normal((2, m.shape[1])).astype(np.float32)
        ref, bound = int8_reference(name, sub.data, X)
        err = float((np.abs(sub.matmul(X) - ref) / bound).max())
        if err > 1e-5:
            raise RuntimeError(f"{name} int8 kernel ({isa()}) is off the reference: {err:.2e}")
        worst = max(worst, err)
    return (f"isa {isa()}: int8 kernels {', '.join(seen) or 'none'} validated against the numpy "
            f"reference (max error {worst:.1e} of |W|@|x|)")


def proc_status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def startup_times(path: Path, threads: int) -> dict:
    """Fresh-process start-up with an empty Numba cache, then with the cache it left behind."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    code = STARTUP.format(root=str(ROOT), path=str(path))
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache
        for label in ("first_run", "warm"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            d = json.loads(r.stdout.strip().splitlines()[-1])
            d["process_s"] = time.perf_counter() - t0
            out[label] = {k: round(v, 2) for k, v in d.items()}
    return out


def bench_file(path: Path, threads: int, n_prompt: int, n_gen: int, reps: int,
               blockq_only: bool = False) -> dict:
    from blockq.cli.run import set_threads
    from blockq.kernels.cpu_isa import isa
    from blockq.model import Model

    set_threads(threads)
    rng = np.random.default_rng(0)
    model = Model.load(path)
    checked = validate_kernels(model)
    bandwidth = read_bandwidth(threads)
    set_threads(threads)
    n_vocab = model.args.n_vocab
    n_ctx = max(n_prompt, n_gen) + 8
    llm = None
    if not blockq_only:
        import llama_cpp
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=max(n_prompt, 1),
                              n_ubatch=max(n_prompt, 1), n_threads=threads,
                              n_threads_batch=threads, verbose=False)
    cache = model.new_cache(n_ctx)

    def bq_pp():
        cache.clear()
        toks = rng.integers(0, n_vocab, n_prompt)
        t0 = time.perf_counter()
        model.forward(toks, cache, "last")
        return n_prompt / (time.perf_counter() - t0)

    def bq_tg():
        cache.clear()
        tok = int(rng.integers(0, n_vocab))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(model.forward([tok], cache, "last")[0]))
        return n_gen / (time.perf_counter() - t0)

    def lc_pp():
        llm.reset()
        toks = [int(t) for t in rng.integers(0, n_vocab, n_prompt)]
        t0 = time.perf_counter()
        llm.eval(toks)
        return n_prompt / (time.perf_counter() - t0)

    def lc_tg():
        llm.reset()
        tok = int(rng.integers(0, n_vocab))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return n_gen / (time.perf_counter() - t0)

    runs = {"blockq_pp": bq_pp, "llama_cpp_pp": lc_pp, "blockq_tg": bq_tg, "llama_cpp_tg": lc_tg}
    if blockq_only:
        runs = {"blockq_pp": bq_pp, "blockq_tg": bq_tg}
    for f in runs.values():  # warm-up (compiles, faults the weights in)
        f()
    got = {k: [] for k in runs}
    for _ in range(reps):  # interleaved, so background load hits both engines alike
        for k, f in runs.items():
            got[k].append(f())
    mem = proc_status()  # after blockq's and llama.cpp's tg runs: both engines' pages
    med = {k: float(np.median(v)) for k, v in got.items()}
    a = model.args
    kv_nominal = 2 * a.n_layer * a.n_head_kv * a.head_dim * n_ctx * 2  # f16, as llama.cpp's
    kv_ours = cache.k.nbytes + cache.v.nbytes  # float32 storage of f16-rounded values
    del llm
    ratio = (lambda k: None) if blockq_only else \
        (lambda k: round(med[f"blockq_{k}"] / med[f"llama_cpp_{k}"], 3))
    return {
        "file": path.name, "size_mib": round(path.stat().st_size / 2**20, 1),
        "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
        **{k: round(v, 2) for k, v in med.items()},
        "pp_ratio": ratio("pp"), "tg_ratio": ratio("tg"),
        "all_runs": {k: [round(x, 2) for x in v] for k, v in got.items()},
        "gbps_blockq_tg": round(model.nbytes * med["blockq_tg"] / 1e9, 2),
        "read_bandwidth_gbps": round(bandwidth, 2), "validated": checked, "isa": isa(),
        "kv_cache_mib_f16": round(kv_nominal / 2**20, 2),
        "kv_cache_mib_blockq": round(kv_ours / 2**20, 2),
        "rss_mib_both_engines": round(mem.get("VmRSS", 0) / 2**20, 1),
    }


MEMORY = {
    "blockq": """
from blockq.model import Model
m = Model.load(PATH)
mem["after_load"] = proc_status()["VmRSS"]
c = m.new_cache(N_CTX)
tok = 1
for i in range(N_GEN):
    tok = int(np.argmax(m.forward([tok], c)[0]))
    if i == 0:
        mem["after_first_token"] = proc_status()["VmRSS"]
a = m.args
kv_used = 2 * a.n_layer * a.n_head_kv * a.head_dim * c.n_past * 2  # as f16, llama.cpp's size
""",
    "llama_cpp": """
import llama_cpp
llm = llama_cpp.Llama(str(PATH), n_ctx=N_CTX, n_threads=THREADS, verbose=False)
mem["after_load"] = proc_status()["VmRSS"]
tok = 1
for i in range(N_GEN):
    llm.eval([tok])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    if i == 0:
        mem["after_first_token"] = proc_status()["VmRSS"]
kv_used = 0
""",
}


def engine_memory(engine: str, path: Path, threads: int, n_ctx: int, n_gen: int) -> dict:
    """Resident memory of a process running one engine alone: after loading the model, after
    the first token, and while generating (after n_gen tokens); MiB."""
    code = f"""
import sys, json, numpy as np
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tools')!r})
from bench_runtime import proc_status
PATH, N_CTX, N_GEN, THREADS = {str(path)!r}, {n_ctx}, {n_gen}, {threads}
mem = {{"start": proc_status()["VmRSS"]}}
{MEMORY[engine]}
s = proc_status()
mem.update(generating=s["VmRSS"], peak=s["VmHWM"], kv_used=kv_used)
print(json.dumps(mem))
"""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: round(v / 2**20, 1) for k, v in d.items()}


CLI_PROMPT = "Write a short story about a lighthouse keeper."
LLAMA_CLI = """
import sys, llama_cpp
path, n_ctx, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, verbose=False)
llm.create_completion(sys.argv[5], max_tokens=n_gen, temperature=0)
"""


PEAK = """
import atexit, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    print(f"PEAK_KB {kb}", file=sys.stderr)
atexit.register(_peak)
"""


def peak_rss_mib(code: str, args: list[str], env: dict) -> float:
    """Peak resident set (VmHWM at exit) of ``python -c code args``, MiB.  (Not the child's
    rusage: ru_maxrss also counts the moments after fork when the child still shares this big
    process's pages.)"""
    r = subprocess.run([sys.executable, "-c", PEAK + code, *args], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{args[:2]} failed: {r.stderr[-2000:]}")
    kb = next(int(l.split()[1]) for l in r.stderr.splitlines() if l.startswith("PEAK_KB"))
    return round(kb / 1024, 1)


def cli_memory(path: Path, threads: int, n_gen: int, n_ctx: int = 4096) -> dict:
    """Peak RSS of ``blockq generate`` and of llama.cpp generating the same greedy tokens, both
    at llama.cpp's default context (4096), with the KV cache llama.cpp allocates for it."""
    from blockq.gguf.reader import read_gguf
    from blockq.model import ModelArgs

    with read_gguf(path) as r:
        args = ModelArgs.from_metadata(r.metadata)
    n_ctx = min(n_ctx, args.n_ctx_train)
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    ours = peak_rss_mib("from blockq.cli import main; main()",
                        ["generate", str(path), "-p", CLI_PROMPT, "-n", str(n_gen), "--temp",
                         "0", "-c", str(n_ctx), "-t", str(threads)], env)
    theirs = peak_rss_mib(LLAMA_CLI, [str(path), str(n_ctx), str(n_gen), str(threads),
                                      CLI_PROMPT], env)
    kv = 2 * args.n_layer * args.n_embd_kv * n_ctx * 2 / 2**20  # f16 K and V, all positions
    return {"n_ctx": n_ctx, "blockq_peak": ours, "llama_cpp_peak": theirs,
            "kv_cache_mib": round(kv, 1)}


def per_variant(a, argv: list[str]) -> None:
    """Run this tool's speed part once per variant of ``--isa``, each in a fresh process with the
    variant forced and Numba compiling for a CPU that has no better one; print a summary."""
    from blockq.kernels.cpu_isa import REQUIRES, host_features, numba_features_for, supported

    host = host_features()
    rest, skip = [], False
    for arg in argv:  # this command line without --isa (and its value)
        if skip:
            skip = False
        elif arg == "--isa":
            skip = True
        elif not arg.startswith("--isa="):
            rest.append(arg)
    summary = []
    for variant in [v.strip().lower() for v in a.isa.split(",") if v.strip()]:
        if variant not in REQUIRES or variant not in supported(host):
            why = "unknown" if variant not in REQUIRES else "this CPU cannot run it"
            print(f"--isa {variant}: {why} (this CPU runs {', '.join(supported(host))}); "
                  "skipped", flush=True)
            continue
        out = Path(tempfile.mkdtemp()) / "run.json"
        env = dict(os.environ, BLOCKQ_ISA=variant,
                   NUMBA_CPU_FEATURES=numba_features_for(variant, host))
        print(f"== {variant} " + ("(the float kernels, compiled for this CPU)" if variant == "float"
                                 else f"(compiled as for a CPU whose best variant is {variant})"),
              flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--skip-memory",
               "--json-out", str(out)]
        if subprocess.run(cmd, env=env).returncode:
            raise SystemExit(f"the {variant} run failed")
        summary += json.loads(out.read_text())["results"]
    print("summary (decode tg / prompt pp tokens/s, blockq vs llama.cpp in the same process):")
    for r in summary:
        lc = "" if r.get("tg_ratio") is None else \
            (f" vs {r['llama_cpp_tg']:.1f} = {r['tg_ratio']:.2f}x | pp {r['blockq_pp']:.1f} vs "
             f"{r['llama_cpp_pp']:.1f} = {r['pp_ratio']:.2f}x")
        print(f"  {r['isa']:10s} {r['file']} -t {r['threads']}: tg {r['blockq_tg']:.1f}{lc}")
    if a.json_out:
        a.json_out.write_text(json.dumps({"results": summary}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--files", nargs="*", type=Path)
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--skip-memory", action="store_true",
                    help="only the speed runs (no memory or start-up measurements)")
    ap.add_argument("--skip-speed", action="store_true",
                    help="only the memory and start-up measurements (no speed runs)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--blockq-only", action="store_true",
                    help="prompt and decode speed of blockq alone (no llama-cpp-python needed)")
    ap.add_argument("--isa", help="comma-separated kernel variants to time one after the other, "
                    "each forced in its own process (e.g. avx512vnni,avxvnni,avx2,float)")
    a = ap.parse_args(argv)
    if a.isa:
        return per_variant(a, argv if argv is not None else sys.argv[1:])
    files = a.files or [smollm2_q4km()] + [synthetic(p) for p in ("Q4_K_M", "Q6_K", "Q2_K")] \
        + [fetch.gemma3_path()]
    threads = [int(t) for t in a.threads.split(",")]
    report = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "results": [],
              "memory": [], "startup": []}
    from blockq.kernels.cpu_isa import isa
    report["isa"] = isa()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start, kernels: "
          f"{isa()} (BLOCKQ_ISA forces one)")
    for f in files:
        for t in ([] if a.skip_speed else threads):
            r = bench_file(f, t, a.n_prompt, a.n_gen, a.reps, a.blockq_only)
            report["results"].append(r)
            print(f"{r['file']} -t {t}: {r['validated']}", flush=True)
            if a.blockq_only:
                print(f"{r['file']} -t {t} [{r['isa']}]: pp{a.n_prompt} blockq "
                      f"{r['blockq_pp']:.1f} tok/s "
                      f"{r['all_runs']['blockq_pp']} | tg{a.n_gen} blockq {r['blockq_tg']:.1f} "
                      f"tok/s {r['all_runs']['blockq_tg']} | decode reads {r['gbps_blockq_tg']} "
                      f"GB/s of weights (read bandwidth {r['read_bandwidth_gbps']} GB/s)",
                      flush=True)
                continue
            print(f"{r['file']} ({r['size_mib']} MiB) -t {t} [{r['isa']}]: "
                  f"pp{a.n_prompt} blockq {r['blockq_pp']:.1f} vs llama.cpp "
                  f"{r['llama_cpp_pp']:.1f} tok/s = {r['pp_ratio']:.2f}x "
                  f"[{'ok' if r['pp_ratio'] >= 1.0 else 'FAIL'} >= 1.0] | "
                  f"tg{a.n_gen} blockq {r['blockq_tg']:.1f} vs llama.cpp "
                  f"{r['llama_cpp_tg']:.1f} tok/s = {r['tg_ratio']:.2f}x "
                  f"[{'ok' if r['tg_ratio'] >= 1.0 else 'FAIL'} >= 1.0] | "
                  f"blockq decode reads {r['gbps_blockq_tg']} GB/s of weights (read "
                  f"bandwidth {r['read_bandwidth_gbps']} GB/s)", flush=True)
        if a.blockq_only or a.skip_memory:
            continue
        n_ctx = a.n_gen + 8
        mem = {e: engine_memory(e, f, threads[0], n_ctx, a.n_gen) for e in MEMORY}
        size = round(f.stat().st_size / 2**20, 1)
        report["memory"].append({"file": f.name, "file_mib": size, **mem})
        b, l = mem["blockq"], mem["llama_cpp"]
        print(f"  memory (MiB, one engine per process, {a.n_gen} tokens generated): file {size}"
              f" + KV(f16) {b['kv_used']} | blockq RSS {b['start']} at start -> "
              f"{b['after_load']} loaded -> {b['generating']} generating (+"
              f"{b['generating'] - b['start']:.1f}) | llama.cpp RSS {l['start']} -> "
              f"{l['after_load']} -> {l['generating']} (+{l['generating'] - l['start']:.1f})",
              flush=True)
        c = cli_memory(f, threads[0], a.n_gen)
        report["memory"][-1]["cli"] = c
        bar = size + c["kv_cache_mib"] + 150
        print(f"  generate at -c {c['n_ctx']} (peak RSS, MiB): blockq {c['blockq_peak']} | "
              f"llama.cpp {c['llama_cpp_peak']} | bar file {size} + KV(f16, {c['n_ctx']} "
              f"positions) {c['kv_cache_mib']} + 150 = {bar:.1f} "
              f"[{'ok' if c['blockq_peak'] <= bar else 'FAIL'}]", flush=True)
        if not a.skip_startup:
            s = startup_times(f, threads[0])
            s["file"] = f.name
            report["startup"].append(s)
            print(f"  start-up (load + 4-token prompt + 1 token, fresh process): first run "
                  f"{s['first_run']['process_s']} s (Numba compiles), warm "
                  f"{s['warm']['process_s']} s", flush=True)
    report["load_avg_end"] = os.getloadavg()
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
