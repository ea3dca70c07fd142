"""Fuzz blockq above the container: metadata values of a tiny valid model through
``Model.load`` + tokenizer + one token, and config.json / safetensors headers of a tiny HF
folder through ``convert``; then ``kill -9`` at random points of convert runs.

    ulimit -v 4000000; python tools/fuzz_model.py --models 10000 --hf 2000 --kills 20

Every case runs in a worker process limited to 4 GB of address space (RLIMIT_AS); a case may
end in a blockq error (expected) or succeed.  Counted as failures: an exception that is not a
BlockqError (MemoryError included: more than 4 GB), a worker killed by a signal, a case running
past --timeout seconds, and any file left in the output folder by a failed or killed convert.
Cases are drawn from --seed, so a failure is reproduced by its number.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
LIMIT_BYTES = 4_000_000 * 1024  # ulimit -v 4000000 (KiB)

# --- mutations ---------------------------------------------------------------------------------
MODEL_KEYS = [
    "general.architecture", "{a}.context_length", "{a}.embedding_length", "{a}.block_count",
    "{a}.feed_forward_length", "{a}.attention.head_count", "{a}.attention.head_count_kv",
    "{a}.attention.layer_norm_rms_epsilon", "{a}.rope.freq_base", "{a}.rope.dimension_count",
    "{a}.rope.scaling.type", "{a}.rope.scaling.factor", "{a}.attention.key_length",
    "{a}.attention.value_length", "{a}.vocab_size", "{a}.attention.scale",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
    "general.alignment",
]


def _values(rng: random.Random, old):
    """A hostile replacement for a metadata value (plain Python or a typed Value)."""
    import numpy as np

    from blockq.gguf.constants import ValueType as VT
    from blockq.gguf.reader import Value

    n = old if isinstance(old, int) and not isinstance(old, bool) else 64
    choices = [
        lambda: Value(VT.UINT32, 0), lambda: Value(VT.INT32, -1), lambda: Value(VT.INT32, -2**31),
        lambda: Value(VT.UINT32, 2**32 - 1), lambda: Value(VT.UINT64, 2**40),
        lambda: Value(VT.UINT64, 2**64 - 1), lambda: Value(VT.INT64, -2**63),
        lambda: Value(VT.UINT32, max(0, n + rng.choice([-1, 1, 2]))),
        lambda: Value(VT.UINT32, n * rng.choice([2, 3, 7, 1000])),
        lambda: Value(VT.UINT32, max(1, n // rng.choice([2, 3, 7]))),
        lambda: Value(VT.FLOAT32, float("nan")), lambda: Value(VT.FLOAT32, float("inf")),
        lambda: Value(VT.FLOAT32, -1.0), lambda: Value(VT.FLOAT32, 0.0),
        lambda: Value(VT.FLOAT32, 1e-45), lambda: Value(VT.FLOAT64, 1e308),
        lambda: Value(VT.FLOAT32, float(n)), lambda: Value(VT.BOOL, True),
        lambda: "llama", lambda: "qwen2", lambda: "", lambda: "x" * rng.choice([1, 1000]),
        lambda: str(n), lambda: "gpt2", lambda: "{{ 1/0 }}",
        lambda: ["llama"], lambda: [], lambda: Value(VT.ARRAY, [], VT.STRING),
        lambda: np.arange(rng.choice([0, 1, 3, 300]), dtype=np.uint32),
        lambda: np.full(rng.choice([1, 2, 5]), n, dtype=np.int32),
        lambda: ["a", "b"] * rng.choice([1, 200]), lambda: np.array([np.nan], np.float32),
    ]
    return rng.choice(choices)()


def model_case(seed: int, i: int, base_md: dict) -> dict:
    rng = random.Random(seed * 1_000_003 + i)
    md = dict(base_md)
    arch = md["general.architecture"].value  # base_md holds typed Values
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        key = rng.choice(MODEL_KEYS).format(a=arch)
        if rng.random() < 0.12:
            md.pop(key, None)
        else:
            md[key] = _values(rng, md.get(key))
    return md


HF_KEYS = ["architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
           "rms_norm_eps", "rope_theta", "tie_word_embeddings", "head_dim", "rope_scaling",
           "bos_token_id", "eos_token_id", "torch_dtype", "num_local_experts"]


def _json_value(rng: random.Random, old):
    n = old if isinstance(old, int) and not isinstance(old, bool) else 64
    return rng.choice([
        0, -1, -2**31, 2**31, 2**63, 10**30, n + 1, n - 1, n * 2, max(1, n // 2), n * 1000,
        1e-300, -1e-5, float("nan"), float("inf"), 1.5, True, False, None, "", str(n), "linear",
        [], [n], [{}], {}, {"rope_type": "linear", "factor": rng.choice([0, -1, 1e-30, 2])},
        {"rope_type": "llama3", "factor": 8, "low_freq_factor": rng.choice([0, 4, 1]),
         "high_freq_factor": rng.choice([0, 1, 4])},
        ["LlamaForCausalLM"], ["Qwen2ForCausalLM"], ["MistralForCausalLM"], "LlamaForCausalLM",
        [[[[[]]]]],
    ])


def hf_case(seed: int, i: int, folder: Path) -> str:
    """Mutate the HF folder in place; returns a short description."""
    rng = random.Random(seed * 1_000_033 + i)
    what = rng.random()
    cfg_path = folder / "config.json"
    if what < 0.6:  # config.json values
        cfg = json.loads(cfg_path.read_text())
        for _ in range(rng.choice([1, 1, 2, 3])):
            k = rng.choice(HF_KEYS)
            if rng.random() < 0.1:
                cfg.pop(k, None)
            else:
                cfg[k] = _json_value(rng, cfg.get(k))
        cfg_path.write_text(json.dumps(cfg, allow_nan=True))
        return "config"
    if what < 0.7:  # config.json text
        cfg_path.write_text(rng.choice([
            "[]", "null", "1", '"x"', "{", "[" * 100_000 + "]" * 100_000,
            '{"a":' * 50_000 + "1" + "}" * 50_000, "\xff\xfe", "{}"]))
        return "config-text"
    st = folder / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    if what < 0.78:  # header length field
        n2 = rng.choice([0, 1, 7, n - 1, n + 1, len(raw), 2**63, 2**64 - 1])
        st.write_bytes(n2.to_bytes(8, "little") + raw[8:])
        return "st-length"
    if what < 0.85:  # whole header
        h = rng.choice([[], None, 1, "x", {"__metadata__": 5}, [[[]]] * 3,
                        {k: 0 for k in header}])
        hb = json.dumps(h).encode()
    else:  # entries
        names = [k for k in header if k != "__metadata__"]
        for _ in range(rng.choice([1, 2])):
            e = header[rng.choice(names)]
            field = rng.choice(["dtype", "shape", "data_offsets"])
            off = e["data_offsets"] if isinstance(e.get("data_offsets"), list) and \
                len(e["data_offsets"]) == 2 else [0, 0]
            shape = e["shape"] if isinstance(e.get("shape"), list) and e["shape"] else [1]
            e[field] = rng.choice([
                None, "F64", "I8", "BF16", "F16", ["F32"], [], [0], [-1, 64], ["64", 64],
                [2**40, 2**40], [0, 2**63], [1.5, 3], [off[1], off[0]],
                [0, 0, 0, 0, 0, 1], {}, 7, [[1]], [shape[0] * 2] + shape[1:]])
        hb = json.dumps(header).encode()
    st.write_bytes(len(hb).to_bytes(8, "little") + hb + body)
    return "st-header"


# --- the worker: one process, many cases, under RLIMIT_AS --------------------------------------
def worker(kind: str, seed: int, work: Path) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))
    import numpy as np

    import blockq
    from blockq.convert import convert
    from blockq.errors import BlockqError
    from blockq.model import Model
    from blockq.tokenizer import Tokenizer

    if kind == "model":
        with blockq.read_gguf(work / "base.gguf") as f:
            base_md = {k: f.metadata.typed(k) for k in f.metadata}
            tensors = [(n, t.qtype, t.shape, np.array(t.data)) for n, t in f.tensors.items()]
    for line in sys.stdin:
        i = int(line)
        out = {"i": i}
        try:
            if kind == "model":
                path = work / "case.gguf"
                blockq.write_gguf(path, model_case(seed, i, base_md), tensors)
                with Model.load(path) as m:
                    tok = Tokenizer.from_metadata(m.metadata)
                    ids = tok.encode("hello", add_special=True) or [0]
                    m.forward([ids[-1] % m.args.n_vocab], m.new_cache())
            else:
                src = work / f"hf{i % 2}"
                shutil.rmtree(src, ignore_errors=True)
                shutil.copytree(work / "hf", src)
                out["what"] = hf_case(seed, i, src)
                o = work / "out"
                convert(src, o / "out.gguf", "Q8_0", warn=lambda s: None)
                (o / "out.gguf").unlink()
            out["result"] = "ok"
        except BlockqError as e:
            out["result"] = "error"
            out["message"] = str(e)[:200]
        except BaseException as e:  # noqa: BLE001 (counted and reported: the point of the tool)
            out["result"] = "uncaught"
            out["message"] = f"{type(e).__name__}: {e}"[:300]
            out["trace"] = traceback.format_exc()[-1500:]
        if kind == "hf":
            left = sorted(p.name for p in (work / "out").iterdir())
            if left:
                out["left"] = left
                for p in (work / "out").iterdir():
                    p.unlink()
        out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(out), flush=True)


class Pool:
    """Feeds case numbers to a worker; restarts it (and records the case) when it dies."""

    def __init__(self, kind, seed, work, timeout):
        self.args = [sys.executable, __file__, "--worker", kind, "--seed", str(seed),
                     "--work", str(work)]
        self.timeout = timeout
        self.p = None

    def _start(self):
        # one Numba thread: a tiny model's parallel regions only pay thread start-up
        env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
        self.p = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)

    def run(self, i: int) -> dict:
        if self.p is None or self.p.poll() is not None:
            self._start()
        self.p.stdin.write(f"{i}\n")
        self.p.stdin.flush()
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        if not sel.select(self.timeout):
            self.p.kill()
            self.p.wait()
            self.p = None
            return {"i": i, "result": "timeout"}
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait()
            self.p = None
            return {"i": i, "result": "signal" if rc < 0 else "died", "rc": rc}
        return json.loads(line)

    def close(self):
        if self.p is not None:
            self.p.stdin.close()
            self.p.wait()


def fuzz(kind: str, n: int, seed: int, work: Path, timeout: float) -> dict:
    pool = Pool(kind, seed, work, timeout)
    counts: dict[str, int] = {}
    bad = []
    maxrss = 0
    t0 = time.time()
    try:
        for i in range(n):
            r = pool.run(i)
            res = r["result"]
            if r.get("left"):
                res = "left files"
            counts[res] = counts.get(res, 0) + 1
            maxrss = max(maxrss, r.get("maxrss_kb", 0))
            if res not in ("ok", "error"):
                bad.append(r)
                print(f"  case {i}: {res}: {r.get('message', '')} {r.get('left', '')}",
                      file=sys.stderr)
            if (i + 1) % 500 == 0:
                print(f"  {kind}: {i + 1}/{n} {counts} ({time.time() - t0:.0f} s)",
                      file=sys.stderr)
    finally:
        pool.close()
    return {"cases": n, "counts": counts, "failures": bad[:20], "peak_rss_mib":
            round(maxrss / 1024, 1), "seconds": round(time.time() - t0, 1)}


def kills(n: int, seed: int, work: Path) -> dict:
    """kill -9 at a random moment of ``n`` CLI converts (requantizing SmolLM2); the folder must
    then hold only the old target, unchanged."""
    from blockq import fetch

    src = fetch.smollm2_path()
    rng = random.Random(seed)
    out_dir = work / "kill"
    out_dir.mkdir()
    target = out_dir / "out.gguf"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t_full = None
    results = []
    for k in range(n):
        target.write_bytes(b"the old target")
        p = subprocess.Popen([sys.executable, "-m", "blockq", "convert", str(src), str(target),
                              "--type", "Q4_0", "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if t_full is None:  # the first run measures a whole convert
            t0 = time.time()
            p.wait()
            t_full = time.time() - t0
            full_size = target.stat().st_size
            target.write_bytes(b"the old target")
            p = subprocess.Popen(p.args, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.05, t_full * 0.98)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        names = sorted(x.name for x in out_dir.iterdir())
        ok = names == ["out.gguf"] and (target.read_bytes() == b"the old target" or
                                        target.stat().st_size == full_size)
        # (a kill after the rename, while the process exits, leaves the new file whole)
        results.append({"run": k, "kill_after_s": round(delay, 2), "rc": p.returncode,
                        "files": names, "ok": ok})
        print(f"  kill {k}: after {delay:.2f} s of ~{t_full:.1f}: {names} "
              f"{'ok' if ok else 'LEFT FILES'}", file=sys.stderr)
    return {"runs": n, "full_convert_s": round(t_full, 1),
            "clean": sum(r["ok"] for r in results), "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--hf", type=int, default=2_000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--worker", choices=["model", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.seed, a.work)
        return
    from test_convert import make_hf
    from tiny_model import write_tiny

    report = {"seed": a.seed, "limit_kib": LIMIT_BYTES // 1024}
    with tempfile.TemporaryDirectory(prefix="blockq-fuzz-") as tmp:
        work = Path(tmp)
        if a.models:
            write_tiny(work / "base.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)
            report["models"] = fuzz("model", a.models, a.seed, work, a.timeout)
        if a.hf:
            make_hf(work / "hf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)
            (work / "out").mkdir()
            report["hf"] = fuzz("hf", a.hf, a.seed, work, a.timeout)
        if a.kills:
            report["kills"] = kills(a.kills, a.seed, work)
    text = json.dumps(report, indent=1)
    if a.json:
        a.json.write_text(text)
    summary = {k: (v if not isinstance(v, dict) else
                   {kk: vv for kk, vv in v.items() if kk not in ("failures", "results")})
               for k, v in report.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
