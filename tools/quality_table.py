"""Quality at equal size: ``blockq convert --optimize [--calib TEXT]`` against llama-quantize.

Base (``--base``): ``smollm2``, SmolLM2-135M-Instruct dequantized to F32 (``blockq convert
--type F32`` of the shipped Q4_1 file); or ``gemma3``, Gemma-3-270M dequantized from the shipped
Q4_K_M file, with seeded Gaussian noise of ``--base-noise`` (default 0.1) times each row's
standard deviation added to every matrix: that file's Q4_K / Q5_0 / Q8_0 / Q6_K tensors are
lattices the same types represent exactly, so requantizing the plain dequantized weights to
those types would measure the lattice, not the quantizer (see the README's Q5_K_M caveat).  Text: /usr/share/common-licenses/* concatenated; its first ``--calib-chunks`` x
``-c`` tokens are the calibration text (written to ``calib.txt``), and KL divergence is measured
on ``--eval-chunks`` chunks *after* it (text neither side saw).

For every preset four files are made from the same base:

- llama-quantize without an imatrix, and with the imatrix of the calibration text (the importance
  vectors of ``blockq imatrix``, equal to llama-imatrix's to 0.001 %, passed to
  ``llama_cpp.llama_model_quantize``).  Without llama-cpp-python installed, blockq's plain
  ``convert`` stands in: its files are byte-identical to llama-quantize's (README), and the
  table says ``stand-in``.
- ``blockq convert BASE OUT --type P --optimize`` (no text) and, with the text,
  ``blockq calibrate BASE -f calib.txt -o H`` once then ``blockq convert BASE OUT --type P
  --optimize --hessians H`` per preset: the same file as ``--optimize --calib calib.txt`` (which
  runs that calibration inside), without recalibrating for every preset.  Each command is timed
  with its peak RSS.

All files are scored by one KLD tool (blockq's ``kl_divergence_many``) against the base, with
``--numerics float`` by default: every weight decoded exactly and float dots, so the figure is
the files' own loss.  The runtime's default numerics round the activations to 8 bits for the
integer dots (as llama.cpp's CPU backend does); that adds the same noise floor to both files
(about 0.005 on SmolLM2) and pulls every ratio towards 1 — ``--numerics default`` shows it.

    python tools/quality_table.py [--work /tmp/quality] [--calib-chunks 32] [--eval-chunks 8]
                                  [--presets Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K] [--json]
                                  [--base smollm2|gemma3] [--base-noise 0.1]

``--presets`` takes any preset of ``blockq.presets``; ``--presets IQ4_XS,IQ3_M,IQ2_M`` measures
i-quant presets, whose IQ4_NL / IQ4_XS and codebook (IQ3_*, IQ2_*, IQ1_*) matrices get
error-compensated rounding too.  llama-quantize refuses the i-quants below IQ4 (but IQ3_S/IQ3_M)
without an imatrix: those rows say ``refused``, while ``--optimize`` without text makes its file
from the statistics of random token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from kld_table import LICENSES, digest, log  # noqa: E402

from blockq import fetch  # noqa: E402
from blockq.convert import convert  # noqa: E402
from blockq.errors import BadArgument  # noqa: E402
from blockq.imatrix import (compute_imatrix, kl_divergence_many, read_imatrix,  # noqa: E402
                            write_imatrix)
from blockq.model import Model  # noqa: E402
from blockq.tokenizer import Tokenizer  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")


def run_blockq(args: list[str]) -> tuple[float, float]:
    """Run ``python -m blockq ARGS``; returns (wall seconds, peak RSS MiB)."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "blockq", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"blockq {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    rss_kb = int(re.findall(r"^(\d+)$", r.stderr, re.M)[-1])
    return wall, rss_kb / 1024


def noisy_f32(src: Path, dst: Path, noise: float, seed: int = 0) -> Path:
    """``src`` with every 2-D weight dequantized to F32 plus Gaussian noise of ``noise`` times
    its row's standard deviation (seeded per tensor); vectors and metadata as they are."""
    import zlib

    import numpy as np

    from blockq.gguf.reader import read_gguf
    from blockq.gguf.writer import write_gguf

    plain = dst.with_suffix(".plain.gguf")
    convert(src, plain, "F32", warn=lambda s: None)  # metadata as blockq's F32 conversion
    try:
        with read_gguf(plain) as f:
            def data(t):
                def load():
                    w = np.array(t.data.view("<f4"), dtype=np.float32).reshape(t.shape)
                    if w.ndim != 2 or noise <= 0:
                        return w
                    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
                    sd = w.std(axis=1, keepdims=True)
                    return w + (noise * sd) * rng.standard_normal(w.shape, dtype=np.float32)
                return load
            items = [(t.name, "F32", tuple(t.shape), data(t)) for t in f.tensors.values()]
            return write_gguf(dst, f.metadata, items)
    finally:
        plain.unlink(missing_ok=True)


def llama_files(base: Path, out: Path, preset: str, vectors, kv, threads: int) -> str:
    """llama-quantize's file, or blockq's byte-identical stand-in; returns which."""
    try:
        from record_presets import llama_quantize
        import llama_cpp  # noqa: F401
    except ImportError:
        convert(base, out, preset, imatrix=vectors, warn=lambda s: None)
        return "stand-in"
    llama_quantize(base, out, preset, nthread=threads,
                   imatrix={n: vectors.importance(n) for n in vectors.entries} if vectors
                   else None, kv=kv if vectors else None)
    return "llama.cpp"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality"))
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=32)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("-t", "--threads", type=int, default=0, help="llama.cpp threads (0: all)")
    ap.add_argument("--numerics", default="float", choices=("float", "default"),
                    help="runtime numerics of the quantized models in the KLD tool")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--base", default="smollm2", choices=("smollm2", "gemma3"))
    ap.add_argument("--base-noise", type=float, default=0.1,
                    help="gemma3 base: noise std per row, as a fraction of the row's std")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    presets = [p.strip().upper() for p in a.presets.split(",") if p.strip()]

    text_path = a.work / "licenses.txt"
    if not text_path.exists():
        text_path.write_text("".join(p.read_text(errors="replace")
                                     for p in sorted(LICENSES.iterdir()) if p.is_file()))
    text = text_path.read_text()
    if a.base == "smollm2":
        base_path = a.work / "smol-f32.gguf"
        if not base_path.exists():
            log("base: dequantizing the shipped SmolLM2 Q4_1 file to F32")
            convert(fetch.smollm2_path(), base_path, "F32", warn=lambda s: None)
    else:
        base_path = a.work / f"gemma3-f32-noise{a.base_noise:g}.gguf"
        if not base_path.exists():
            log(f"base: Gemma-3-270M Q4_K_M dequantized to F32, row noise {a.base_noise:g}")
            noisy_f32(fetch.gemma3_path(), base_path, a.base_noise)
    base = Model.load(base_path)
    tok = Tokenizer.from_metadata(base.metadata)
    bos = tok.bos_id if tok.add_bos else None
    ids = tok.encode(text, add_special=True)
    n_cal = a.calib_chunks * a.ctx
    calib_path = a.work / f"calib-{a.calib_chunks}.txt"
    if not calib_path.exists():
        calib_path.write_text(tok.decode(ids[:n_cal]))
    held_out = ids[n_cal + a.ctx:]  # one chunk of margin: no calibration token is scored

    im_path = a.work / f"imatrix-{a.calib_chunks}.gguf"
    if not im_path.exists():
        log(f"imatrix for llama-quantize: {a.calib_chunks} chunks of {a.ctx} tokens")
        im = compute_imatrix(base, tok, calib_path.read_text(), n_ctx=a.ctx,
                             n_chunks=a.calib_chunks, dataset=str(calib_path))
        write_imatrix(im_path, im)
    im = read_imatrix(im_path)
    kv = {"quantize.imatrix.file": str(im_path), "quantize.imatrix.dataset": im.datasets[0],
          "quantize.imatrix.entries_count": len(im.entries),
          "quantize.imatrix.chunks_count": im.chunk_count}
    hs_path = a.work / f"hessians-{a.calib_chunks}.gguf"

    rows, files, timing = [], {}, {}
    for i, preset in enumerate(presets):
        for calib in (False, True):
            tag = f"{preset}{'-calib' if calib else ''}"
            lq, bq = a.work / f"llama-{tag}.gguf", a.work / f"blockq-opt-{tag}.gguf"
            t0 = time.perf_counter()
            try:
                who = llama_files(base_path, lq, preset, im if calib else None, kv, a.threads)
            except (RuntimeError, BadArgument) as e:  # an i-quant below IQ4, no imatrix
                log(f"{tag}: llama-quantize refused ({e})")
                who, lq = "refused", None
            t_llama = time.perf_counter() - t0
            args = ["convert", str(base_path), str(bq), "--type", preset, "--optimize",
                    "--quiet"]
            if calib:
                if not hs_path.exists():
                    w, r = run_blockq(["calibrate", str(base_path), "-f", str(calib_path), "-o",
                                       str(hs_path), "--chunks", str(a.calib_chunks)])
                    timing["calibrate"] = (preset, w, r)
                wall, rss = run_blockq(args + ["--hessians", str(hs_path)])
                timing.setdefault("convert --hessians", (preset, wall, rss))
            else:
                wall, rss = run_blockq(args)
                timing.setdefault("convert --optimize (no text)", (preset, wall, rss))
            log(f"{tag}: blockq {wall:.1f} s ({rss:.0f} MiB peak), llama ({who}) {t_llama:.1f} s")
            dl, db = (digest(lq) if lq else None), digest(bq)
            if lq:
                files.setdefault(dl, lq)
            files.setdefault(db, bq)
            rows.append(dict(preset=preset, calib=calib, llama=lq, blockq=bq, dl=dl, db=db,
                             who=who))

    uniq = list(files.items())
    log(f"KL divergence of {len(uniq)} files over {a.eval_chunks} held-out chunks")
    results = kl_divergence_many(base, [Model.load(p, numerics=a.numerics) for _, p in uniq],
                                 held_out, n_ctx=a.ctx,
                                 n_chunks=a.eval_chunks, bos=bos,
                                 progress=lambda i, n, k: log(f"  chunk {i}/{n}"))
    by = {d: r for (d, _), r in zip(uniq, results)}
    table = []
    nan = float("nan")
    for r in rows:
        kb, kl = by[r["db"]], by.get(r["dl"])
        table.append({"preset": r["preset"], "calibration": r["calib"], "llama_is": r["who"],
                      "blockq": {"kld": kb.kld, "kld_stderr": kb.kld_stderr,
                                 "same_top": kb.same_top, "bytes": r["blockq"].stat().st_size},
                      "llama": {"kld": kl.kld, "kld_stderr": kl.kld_stderr,
                                "same_top": kl.same_top, "bytes": r["llama"].stat().st_size}
                      if kl else {"kld": nan, "kld_stderr": nan, "same_top": nan, "bytes": 0},
                      "ratio": kb.kld / kl.kld if kl and kl.kld > 0 else nan})
    ppl_base = results[0].ppl_base if results else float("nan")
    if a.json:
        print(json.dumps({"ppl_base": ppl_base, "ctx": a.ctx, "calib_chunks": a.calib_chunks,
                          "numerics": a.numerics,
                          "eval_chunks": a.eval_chunks, "rows": table, "timing": timing}))
        return
    name = "SmolLM2-135M-Instruct" if a.base == "smollm2" else \
        f"Gemma-3-270M (noise {a.base_noise:g})"
    print(f"{name}, base F32 (PPL {ppl_base:.3f}); calibration: "
          f"{a.calib_chunks} x {a.ctx} tokens of common-licenses; KLD over {a.eval_chunks} "
          f"held-out chunks (one KLD tool for all files, numerics {a.numerics})")
    print(f"{'preset':8s} {'text':5s} {'KLD blockq':>11s} {'KLD llama':>11s} {'ratio':>6s} "
          f"{'top1 b/l %':>13s} {'MiB blockq':>10s} {'MiB llama':>10s}  llama file")
    for t in table:
        b, l_ = t["blockq"], t["llama"]
        print(f"{t['preset']:8s} {'yes' if t['calibration'] else 'no':5s} {b['kld']:11.5f} "
              f"{l_['kld']:11.5f} {t['ratio']:6.3f} {100 * b['same_top']:6.2f}/"
              f"{100 * l_['same_top']:6.2f} {b['bytes'] / 2**20:10.3f} "
              f"{l_['bytes'] / 2**20:10.3f}  {t['llama_is']}{' (imatrix)' if t['calibration'] else ''}")
    for what, (preset, wall, rss) in timing.items():
        print(f"time {what} ({preset}): {wall:.1f} s, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
