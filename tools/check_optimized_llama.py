"""llama.cpp loads blockq's optimized files, and agrees with blockq's runtime on them as closely as
on llama-quantize's own files.

For every ``blockq-opt-<tag>.gguf`` in the work folder of ``tools/quality_table.py`` beside its
``llama-<tag>.gguf``: both files are loaded by llama.cpp (llama-cpp-python) and by blockq's
runtime (default numerics), the same ``-n`` tokens of held-out text are evaluated from an empty
cache, and the table shows, per file, the RMS difference of the two engines' logits and how often
their top tokens agree.  Exit status 1 if llama.cpp refuses a file or an optimized file's
agreement is clearly worse than llama-quantize's (RMS more than 1.5x, or top-1 agreement more
than 3 points lower).

    python tools/check_optimized_llama.py [--work /tmp/quality] [-n 512] [-t 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from compare_llama_cpp import LlamaCpp  # noqa: E402

from blockq.model import Model  # noqa: E402
from blockq.tokenizer import Tokenizer  # noqa: E402


def agreement(path: Path, ids: list[int], threads: int) -> dict:
    lc = LlamaCpp(path, n_ctx=len(ids), threads=threads)
    ref = lc.logits(ids)
    with Model.load(path) as m:
        got = m.forward(ids, m.new_cache(len(ids)), "all")
    return {"rms": float(np.sqrt(((got - ref) ** 2).mean())),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality"))
    ap.add_argument("-n", "--tokens", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args(argv)
    pairs = sorted((p, a.work / p.name.replace("blockq-opt-", "llama-"))
                   for p in a.work.glob("blockq-opt-*.gguf"))
    # llama-quantize refuses some presets without an imatrix: then only blockq's file is checked
    pairs = [(b, l_ if l_.exists() else None) for b, l_ in pairs]
    if not pairs:
        sys.exit(f"no blockq-opt-*.gguf beside llama-*.gguf in {a.work}: run "
                 "tools/quality_table.py first")
    text = (a.work / "licenses.txt").read_text()
    with Model.load(pairs[0][0]) as m:
        tok = Tokenizer.from_metadata(m.metadata)
    ids = tok.encode(text, add_special=True)
    ids = [ids[0]] + ids[-a.tokens + 1:]  # the end of the text: no calibration chunk
    bad = 0
    print(f"{'file':28s} {'llama-quantize rms':>18s} {'top1 %':>7s} {'blockq rms':>11s} "
          f"{'top1 %':>7s}")
    for b, l_ in pairs:
        try:
            rl = agreement(l_, ids, a.threads) if l_ else None
            rb = agreement(b, ids, a.threads)
        except Exception as e:  # noqa: BLE001 - a refused file is the finding
            print(f"{b.name}: {type(e).__name__}: {e}")
            bad += 1
            continue
        worse = rl is not None and (rb["rms"] > 1.5 * rl["rms"] or rb["top1"] < rl["top1"] - 0.03)
        bad += worse
        ref = (f"{rl['rms']:18.4f} {100 * rl['top1']:7.2f}" if rl
               else f"{'(refused by llama)':>18s} {'':7s}")
        print(f"{b.name[len('blockq-opt-'):-5]:28s} {ref} "
              f"{rb['rms']:11.4f} {100 * rb['top1']:7.2f}{'  WORSE' if worse else ''}")
    print(f"{len(pairs)} optimized files loaded by llama.cpp; {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
