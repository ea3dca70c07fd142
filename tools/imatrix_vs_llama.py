#!/usr/bin/env python
"""blockq's importance matrix against llama-imatrix's on the same model and text.

The reference vectors are llama-imatrix's (in_sum2 / counts) for three SmolLM2-135M matrices,
computed over /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0} and stored in
``../shared/refdata/blk_*.npz`` (array ``imatrix``).  blockq computes its own over the same text
with llama-imatrix's defaults (chunks of 512 tokens) and prints, per matrix, the mean and median
relative difference per column and the correlation.

    python tools/imatrix_vs_llama.py [--refdata ../shared/refdata] [--chunks N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockq.fetch import smollm2_path  # noqa: E402
from blockq.imatrix import compute_imatrix  # noqa: E402
from blockq.model import Model  # noqa: E402
from blockq.tokenizer import Tokenizer  # noqa: E402

TEXTS = ("GPL-3", "Apache-2.0", "MPL-2.0")
MATRICES = {"blk_3_ffn_down_weight": "blk.3.ffn_down.weight",
            "blk_3_attn_q_weight": "blk.3.attn_q.weight",
            "blk_17_ffn_gate_weight": "blk.17.ffn_gate.weight"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refdata", type=Path, default=ROOT.parent / "shared" / "refdata")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1, help="-1: all (llama-imatrix's default)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    text = "".join(Path("/usr/share/common-licenses", t).read_text() for t in TEXTS)
    model = Model.load(smollm2_path())
    tok = Tokenizer.from_metadata(model.metadata)
    im = compute_imatrix(model, tok, text, n_ctx=a.ctx, n_chunks=a.chunks,
                         dataset="common-licenses")
    results = {"chunks": im.chunk_count, "matrices": {}}
    for npz, name in MATRICES.items():
        ref = np.load(a.refdata / f"{npz}.npz")["imatrix"].astype(np.float64)
        ours = im.importance(name).astype(np.float64)  # in_sum2 / counts, as quantize gets it
        rel = np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)
        results["matrices"][name] = {
            "columns": int(ref.size), "mean_rel_diff": float(rel.mean()),
            "median_rel_diff": float(np.median(rel)), "max_rel_diff": float(rel.max()),
            "corr": float(np.corrcoef(ours, ref)[0, 1])}
    if a.json:
        print(json.dumps(results))
    else:
        print(f"blockq imatrix over {'+'.join(TEXTS)}: {im.chunk_count} chunks of {a.ctx} tokens")
        print(f"{'matrix':26} {'cols':>5} {'mean rel diff':>14} {'median':>8} {'max':>8} {'corr':>8}")
        for name, r in results["matrices"].items():
            print(f"{name:26} {r['columns']:5d} {100 * r['mean_rel_diff']:13.4f}% "
                  f"{100 * r['median_rel_diff']:7.4f}% {100 * r['max_rel_diff']:7.3f}% "
                  f"{r['corr']:8.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
