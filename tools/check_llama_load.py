"""Check that a GGUF written by blockq loads and runs in llama.cpp (via llama-cpp-python).

The source model's metadata is decoded to plain Python values (so every key goes through
blockq's type table, not copied as stored), ``general.file_type`` and
``general.quantization_version`` are dropped (so the writer must set them: the preset passed as
``file_type=``, the version by itself), F32 tensors are
passed as float arrays and the rest as their mapped bytes; the result is written with
``write_gguf``, loaded by llama.cpp, and its n_vocab, n_ctx_train, file type and the logits of
one prompt are compared with the original file's.

    python tools/check_llama_load.py                     # SmolLM2-135M Q4_1 from the cache
    python tools/check_llama_load.py MODEL.gguf --prompt "The capital of France is"

Needs ``llama_cpp`` (not a test dependency).  Exit status 1 if anything differs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockq import fetch, read_gguf, write_gguf  # noqa: E402
from blockq.gguf import Keys  # noqa: E402
from blockq.gguf.writer import guess_file_type  # noqa: E402


def rewrite(src: Path, dst: Path) -> None:
    with read_gguf(src) as f:
        meta = {k: v for k, v in f.metadata.items()
                if k not in (Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION)}
        tensors = [(t.name, t.qtype, t.shape,
                    (lambda t=t: t.data.view(np.float32).reshape(t.shape)) if t.qtype == "F32"
                    else (lambda t=t: t.data))
                   for t in f.tensors.values()]
        # The preset (e.g. Q4_K_M) cannot be recovered from the tensor types alone, so pass the
        # original's, as a quantizer would; show what the writer would have guessed.
        preset = f.metadata.get(Keys.General.FILE_TYPE)
        guess = guess_file_type((t.qtype, t.shape) for t in f.tensors.values())
        print(f"general.file_type: original {preset}, writer's guess from tensor types {guess}")
        write_gguf(dst, meta, tensors, file_type=preset)


def run(path: Path, prompt: str) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=False, verbose=False)
    toks = llm.tokenize(prompt.encode(), add_bos=True)
    llm.eval(toks)
    last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # logits after the last prompt token
    logits = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).copy()
    desc = llama_cpp.ctypes.create_string_buffer(128)
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))
    out = {"n_vocab": llm.n_vocab(), "n_ctx_train": llama_cpp.llama_model_n_ctx_train(llm.model),
           "tokens": toks, "file_type": llm.metadata.get(Keys.General.FILE_TYPE),
           "logits": logits, "desc": desc.value.decode(),
           "next": llm.detokenize([int(np.argmax(logits))]).decode(errors="replace")}
    llm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="source GGUF (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args(argv)
    src = Path(args.model) if args.model else fetch.smollm2_path()
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "blockq-written.gguf"
        rewrite(src, dst)
        with read_gguf(dst) as f:
            print(f"blockq wrote {dst.name}: {f.size:,} bytes, {len(f.metadata)} keys, "
                  f"{len(f.tensors)} tensors; general.file_type="
                  f"{f.metadata[Keys.General.FILE_TYPE]} general.quantization_version="
                  f"{f.metadata[Keys.General.QUANTIZATION_VERSION]}")
        ours = run(dst, args.prompt)
        ref = run(src, args.prompt)
    ok = True
    for name, r in (("original", ref), ("blockq", ours)):
        top = int(np.argmax(r["logits"]))
        print(f"{name:8s}: {r['desc']}, n_vocab={r['n_vocab']} n_ctx_train={r['n_ctx_train']} "
              f"file_type={r['file_type']} prompt tokens={r['tokens']} logit[0]="
              f"{r['logits'][0]:.6f} argmax={top} {r['next']!r} ({r['logits'][top]:.6f})")
    for k in ("n_vocab", "n_ctx_train", "tokens", "file_type"):
        if ours[k] != ref[k]:
            print(f"MISMATCH {k}: blockq {ours[k]} vs original {ref[k]}")
            ok = False
    diff = float(np.max(np.abs(ours["logits"] - ref["logits"])))
    print(f"max |logit difference| over {ours['logits'].size} logits: {diff}")
    ok = ok and diff == 0.0
    print("OK: llama.cpp loads the blockq-written file and computes identical logits" if ok
          else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
