"""llama.cpp's outputs on tiny random models of every architecture blockq runs, for
tests/test_archs_llama_cpp.py.

    python tools/record_tiny_archs.py [-t THREADS]

Each case is written by blockq's writer in llama.cpp's layout (tests/tiny_model.py's
``write_tiny``, fixed seed), loaded by llama.cpp (llama-cpp-python), and fed 5 prompts of random
token ids: the last position's logits and 32 greedy tokens (prompt in one batch, then one token
at a time, logits of the last token only) are saved to tests/data/llama_cpp_tiny_archs.json with
the file's sha256, so the test can check it rebuilt the same file before replaying.
llama-cpp-python is needed here only, never by the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_model import N_VOCAB, write_tiny  # noqa: E402

# name -> write_tiny arguments; the same table is read back by the test
# (untied outputs where llama.cpp allows them: a random tied model just repeats its last token)
CASES = {
    "llama": dict(arch="llama", n_layer=2, tied=False),
    "qwen2": dict(arch="qwen2", n_layer=2, biases=True, tied=False),
    "qwen3": dict(arch="qwen3", n_layer=2, head_dim=96, tied=False),
    # every other layer local, with a window shorter than prompt + continuation (Gemma 2's
    # output is always the embedding table)
    "gemma2": dict(arch="gemma2", n_layer=2, sliding_window=8),
    # 7 layers: 6 local ones with a window shorter than prompt + continuation, 1 global
    "gemma3": dict(arch="gemma3", n_layer=7, n_head_kv=1, sliding_window=8, tied=False),
}
N_PROMPTS, PROMPT_LEN, N_GREEDY = 5, 6, 32


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(0, 256, PROMPT_LEN)] for _ in range(N_PROMPTS)]


def llama_cpp_run(path: Path, prompt: list[int], threads: int) -> tuple[np.ndarray, list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=False, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def last() -> np.ndarray:
        p = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(llm.n_vocab(),)).copy()

    llm.eval(prompt)
    logits = last()
    out = []
    for _ in range(N_GREEDY):
        out.append(int(np.argmax(last())))
        llm.eval([out[-1]])
    return logits, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=1)
    a = ap.parse_args(argv)
    rec = {"note": "llama.cpp on blockq-written tiny models (tools/record_tiny_archs.py)",
           "n_vocab": N_VOCAB, "cases": {}}
    with tempfile.TemporaryDirectory() as d:
        for name, kw in CASES.items():
            path = write_tiny(Path(d) / f"{name}.gguf", **kw)
            runs = []
            for p in prompts():
                logits, greedy = llama_cpp_run(path, p, a.threads)
                runs.append({"prompt_ids": p, "last_logits": [float(x) for x in logits],
                             "greedy": greedy})
            rec["cases"][name] = {"write_tiny": kw, "runs": runs,
                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            print(f"{name}: greedy {[r['greedy'][:8] for r in runs]}")
    out = ROOT / "tests" / "data" / "llama_cpp_tiny_archs.json"
    out.write_text(json.dumps(rec))
    print(f"recorded {out}")


if __name__ == "__main__":
    main()
