"""Write benchmark models through blockq's own writer and quantizers.

    python tools/make_synthetic.py [--out DIR] [--skip-f32]

- ``synthetic-0.56B-F32.gguf`` and ``synthetic-0.56B-Q4_K_M.gguf``: a random llama of about
  0.56 B parameters (hidden 2048, 16 heads, 4 KV heads, feed-forward 5632, 8 layers, vocabulary
  49152, separate output head), tokenizer metadata copied from the SmolLM2 file.  The Q4_K_M
  file takes llama.cpp's per-tensor types from :func:`blockq.presets.plan`.
- :func:`requantize` (used by the other tools): a real file's weights, dequantized and
  quantized again to a preset or to per-tensor types.

Random weights make the text meaningless; these files measure speed and memory, not quality.
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockq import fetch  # noqa: E402
from blockq.dequantize import dequantize  # noqa: E402
from blockq.gguf.reader import read_gguf  # noqa: E402
from blockq.gguf.writer import write_gguf  # noqa: E402
from blockq.presets import plan, preset  # noqa: E402
from blockq.quantize import quantize  # noqa: E402

SYNTH = dict(n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_layer=8, n_vocab=49152)


def synthetic_tensors(n_embd, n_head, n_head_kv, n_ff, n_layer, n_vocab):
    """(name, numpy-order shape) of a llama with a separate output head, in llama.cpp's order."""
    hd = n_embd // n_head
    out = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,)),
           ("output.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (n_embd,)), (p + "attn_q.weight", (n_head * hd, n_embd)),
                (p + "attn_k.weight", (n_head_kv * hd, n_embd)),
                (p + "attn_v.weight", (n_head_kv * hd, n_embd)),
                (p + "attn_output.weight", (n_embd, n_head * hd)),
                (p + "ffn_norm.weight", (n_embd,)), (p + "ffn_gate.weight", (n_ff, n_embd)),
                (p + "ffn_up.weight", (n_ff, n_embd)), (p + "ffn_down.weight", (n_embd, n_ff))]
    return out


def synthetic_metadata(tokenizer_md, n_embd, n_head, n_head_kv, n_ff, n_layer, n_vocab):
    md = {
        "general.architecture": "llama",
        "general.name": "blockq synthetic llama 0.56B (random weights)",
        "llama.context_length": 4096,
        "llama.embedding_length": n_embd,
        "llama.block_count": n_layer,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5),
        "llama.rope.freq_base": np.float32(10000.0),
        "llama.rope.dimension_count": n_embd // n_head,
        "llama.vocab_size": n_vocab,
    }
    md.update(tokenizer_md)
    return md


def write_synthetic(path: Path, preset_name: str, seed: int = 0) -> Path:
    """Write the synthetic model quantized by ``preset_name`` (F32, Q4_K_M, ...)."""
    with read_gguf(fetch.smollm2_path()) as src:
        tok_md = {k: src.metadata.typed(k) for k in src.metadata if k.startswith("tokenizer.")}
    shapes = synthetic_tensors(**SYNTH)
    types = plan([(n, s, "F32") for n, s in shapes], preset_name, n_layer=SYNTH["n_layer"],
                 n_head=SYNTH["n_head"], n_head_kv=SYNTH["n_head_kv"])

    def make(name, shape, qt) -> Callable[[], np.ndarray]:
        def data():
            # a seed per tensor: the F32 and the quantized file hold the same weights
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            if len(shape) == 1:
                return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(shape[1]) if name != "token_embd.weight" else 1.0)
            return w if qt == "F32" else quantize(w, qt)
        return data

    items = [(n, types[n], s, make(n, s, types[n])) for n, s in shapes]
    md = synthetic_metadata(tok_md, **SYNTH)
    return write_gguf(path, md, items, file_type=preset(preset_name).ftype)


def requantize(src: Path, dst: Path, preset_name: str | None = None,
               types: Callable[[str, tuple], str] | None = None) -> Path:
    """Rewrite ``src`` with its 2-D weights dequantized and quantized again.

    Either ``preset_name`` (llama.cpp's per-tensor rules via presets.plan) or ``types(name,
    shape) -> type name or None`` (None keeps the tensor as it is).
    """
    with read_gguf(src) as r:
        md = r.metadata
        arch = md["general.architecture"]
        infos = list(r.tensors.values())
        if preset_name is not None:
            chosen = plan([(t.name, t.shape, t.qtype) for t in infos], preset_name,
                          n_layer=md[f"{arch}.block_count"],
                          n_head=md[f"{arch}.attention.head_count"],
                          n_head_kv=md[f"{arch}.attention.head_count_kv"], arch=arch)
        else:
            chosen = {t.name: (types(t.name, t.shape) or t.qtype) for t in infos}

        def data(t, qt):
            if qt == t.qtype:
                return lambda: t.data
            return lambda: quantize(dequantize(t.data, t.qtype, t.shape)
                                    .reshape(-1, t.shape[-1]), qt)

        fields = md.fields()
        fields.pop("general.file_type", None)
        ftype = preset(preset_name).ftype if preset_name else None
        items = [(t.name, chosen[t.name], t.shape, data(t, chosen[t.name])) for t in infos]
        return write_gguf(dst, fields, items, file_type=ftype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=fetch.cache_dir())
    ap.add_argument("--skip-f32", action="store_true", help="only write the Q4_K_M file")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (["Q4_K_M"] if args.skip_f32 else ["F32", "Q4_K_M"]):
        path = args.out / f"synthetic-0.56B-{name}.gguf"
        t0 = time.perf_counter()
        write_synthetic(path, name)
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB in "
              f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
