"""KL divergence and file size: blockq's quantized SmolLM2 files against llama-quantize's.

Base: the F32 dequantization of the shipped SmolLM2-135M-Instruct Q4_1 file (``blockq convert
--type F32``).  Importance matrix: ``blockq imatrix`` over the first chunks of
/usr/share/common-licenses/* (concatenated).  For each of Q2_K, Q3_K_M, Q4_K_M, Q6_K, with and
without that imatrix, the same base is quantized by blockq (``blockq.convert.convert``) and by
llama.cpp (``llama_cpp.llama_model_quantize`` given the same importance vectors), and every file
is compared with the base by blockq's KL divergence on chunks of the same text *after* the ones
the imatrix saw.  Byte-identical files are evaluated once.  A preset both refuse without an
imatrix (the i-quants below IQ4, but IQ3_S/IQ3_M) gets a "refused" line.

    python tools/kld_table.py [--work /tmp/kld] [--imatrix-chunks 32] [--eval-chunks 8] [--json]
                              [--presets Q2_K,Q3_K_M,Q4_K_M,Q6_K,IQ4_XS,TQ2_0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from record_presets import llama_quantize  # noqa: E402

from blockq import BadArgument, fetch  # noqa: E402
from blockq.convert import convert  # noqa: E402
from blockq.imatrix import (compute_imatrix, kl_divergence_many, read_imatrix,  # noqa: E402
                            write_imatrix)
from blockq.model import Model  # noqa: E402
from blockq.tokenizer import Tokenizer  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K")
LICENSES = Path("/usr/share/common-licenses")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while b := fh.read(1 << 24):
            h.update(b)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kld"))
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("-t", "--threads", type=int, default=0, help="llama.cpp threads (0: all)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    quiet = {"warn": lambda s: None}

    text_path = a.work / "licenses.txt"
    if not text_path.exists():
        text_path.write_text("".join(p.read_text(errors="replace")
                                     for p in sorted(LICENSES.iterdir()) if p.is_file()))
    text = text_path.read_text()

    base_path = a.work / "smol-f32.gguf"
    if not base_path.exists():
        log("base: dequantizing the shipped SmolLM2 Q4_1 file to F32")
        convert(fetch.smollm2_path(), base_path, "F32", **quiet)
    base = Model.load(base_path)
    tok = Tokenizer.from_metadata(base.metadata)
    bos = tok.bos_id if tok.add_bos else None
    ids = tok.encode(text, add_special=True)

    im_path = a.work / f"smol-licenses-{a.imatrix_chunks}.imatrix.gguf"
    if not im_path.exists():
        log(f"imatrix: {a.imatrix_chunks} chunks of {a.ctx} tokens")
        im = compute_imatrix(base, tok, text, n_ctx=a.ctx, n_chunks=a.imatrix_chunks,
                             dataset=str(text_path))
        write_imatrix(im_path, im)
    im = read_imatrix(im_path)
    vectors = {n: im.importance(n) for n in im.entries}
    # the keys llama-quantize's CLI adds for --imatrix (its library leaves them to the caller)
    kv = {"quantize.imatrix.file": str(im_path), "quantize.imatrix.dataset": im.datasets[0],
          "quantize.imatrix.entries_count": len(im.entries),
          "quantize.imatrix.chunks_count": im.chunk_count}

    rows, refused = [], []
    files: dict[str, Path] = {}  # digest -> first path with it
    for preset in a.presets.split(","):
        for use_im in (False, True):
            tag = f"{preset}{'-im' if use_im else ''}"
            bq, lq = a.work / f"blockq-{tag}.gguf", a.work / f"llama-{tag}.gguf"
            t0 = time.perf_counter()
            try:
                convert(base_path, bq, preset, imatrix=im_path if use_im else None, **quiet)
            except BadArgument as e:  # an i-quant preset without an imatrix: llama.cpp too?
                try:
                    llama_quantize(base_path, lq, preset, nthread=a.threads)
                except RuntimeError:
                    log(f"{tag}: refused by both ({e})")
                    refused.append(dict(preset=preset, imatrix=use_im))
                    continue
                raise
            t1 = time.perf_counter()
            llama_quantize(base_path, lq, preset, nthread=a.threads,
                           imatrix=vectors if use_im else None, kv=kv if use_im else None)
            t2 = time.perf_counter()
            db, dl = digest(bq), digest(lq)
            log(f"{tag}: blockq {t1 - t0:.1f} s, llama.cpp {t2 - t1:.1f} s, "
                f"{'identical' if db == dl else 'different'} files")
            files.setdefault(db, bq)
            files.setdefault(dl, lq)
            rows.append(dict(preset=preset, imatrix=use_im, blockq=bq, llama=lq, db=db, dl=dl,
                             identical=db == dl))

    # token ids after the imatrix's chunks: text the imatrix did not see
    held_out = ids[a.imatrix_chunks * a.ctx:]
    uniq = list(files.items())
    log(f"KL divergence of {len(uniq)} distinct files over {a.eval_chunks} held-out chunks")
    models = [Model.load(p) for _, p in uniq]
    results = kl_divergence_many(base, models, held_out, n_ctx=a.ctx, n_chunks=a.eval_chunks,
                                 bos=bos, progress=lambda i, n, k: log(f"  chunk {i}/{n}"))
    by_digest = {d: r for (d, _), r in zip(uniq, results)}

    table = []
    for r in rows:
        kb, kl = by_digest[r["db"]], by_digest[r["dl"]]
        table.append({"preset": r["preset"], "imatrix": r["imatrix"],
                      "identical": r["identical"],
                      "blockq": {"kld": kb.kld, "kld_stderr": kb.kld_stderr,
                                 "same_top": kb.same_top, "ppl": kb.ppl_quant,
                                 "bytes": r["blockq"].stat().st_size},
                      "llama": {"kld": kl.kld, "kld_stderr": kl.kld_stderr,
                                "same_top": kl.same_top, "ppl": kl.ppl_quant,
                                "bytes": r["llama"].stat().st_size}})
    ppl_base = results[0].ppl_base if results else float("nan")
    if a.json:
        print(json.dumps({"ppl_base": ppl_base, "chunks": a.eval_chunks, "ctx": a.ctx,
                          "imatrix_chunks": a.imatrix_chunks, "rows": table,
                          "refused": refused}))
        return
    print(f"SmolLM2-135M-Instruct, base F32 (PPL {ppl_base:.3f}); imatrix: {a.imatrix_chunks} "
          f"x {a.ctx} tokens of common-licenses; KLD over {a.eval_chunks} held-out chunks")
    print(f"{'preset':8s} {'imatrix':7s} {'KLD blockq':>12s} {'KLD llama':>12s} "
          f"{'top1 b/l %':>13s} {'MiB blockq':>10s} {'MiB llama':>10s}  files")
    for t in table:
        b, l_ = t["blockq"], t["llama"]
        print(f"{t['preset']:8s} {'yes' if t['imatrix'] else 'no':7s} {b['kld']:12.5f} "
              f"{l_['kld']:12.5f} {100 * b['same_top']:6.2f}/{100 * l_['same_top']:6.2f} "
              f"{b['bytes'] / 2**20:10.2f} {l_['bytes'] / 2**20:10.2f}  "
              f"{'identical' if t['identical'] else 'differ'}")
    for r in refused:
        print(f"{r['preset']:8s} {'yes' if r['imatrix'] else 'no':7s} refused by both (needs an "
              "importance matrix)")


if __name__ == "__main__":
    main()
