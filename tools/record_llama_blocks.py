"""Record llama.cpp-quantized blocks of every non-k-quant type into tests/data/llama_blocks_iq.npz.

For IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and
MXFP4: rows of real weights (``../shared/refdata``'s MiniLM layer-0 rows) and Gaussian rows are
quantized by llama.cpp's ``ggml_quantize_chunk`` with the file's importance vector (the lowest
types require one), and dequantized by llama.cpp's own ``to_float``.  The file holds, per type,
``<TYPE>`` (uint8 blocks, rows x row bytes) and ``<TYPE>_f32`` (llama.cpp's floats, rows x
1536), and
``tests/test_dequantize.py`` checks that blockq (reference and kernels) and gguf-py give exactly
those floats.

    python tools/record_llama_blocks.py [--refdata DIR]

Needs libggml-base (llama-cpp-python, or $GGML_BASE_LIB).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_vectors import ggml_dequantizer  # noqa: E402
from quant_quality import Llama, gaussian_rows  # noqa: E402

from blockq.types import qtype  # noqa: E402

TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
         "TQ1_0", "TQ2_0", "MXFP4")
OUT = ROOT / "tests" / "data" / "llama_blocks_iq.npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refdata", type=Path, default=ROOT.parent / "shared" / "refdata")
    a = ap.parse_args(argv)
    llama = Llama()
    d = np.load(a.refdata / "minilm_layer0_output_dense.npz")
    im = d["imatrix"]
    x = np.concatenate([d["x"][:6], gaussian_rows(4, d["x"].shape[1], seed=7)])  # (10, 1536)
    arrays = {}
    for t in TYPES:
        blocks = llama.quantize(t, x, im)
        floats = ggml_dequantizer(t)(blocks).reshape(x.shape)
        arrays[t], arrays[t + "_f32"] = blocks, floats
        print(f"{t:8s} {blocks.shape[1] // qtype(t).type_size * x.shape[0]} blocks, "
              f"rmse {np.sqrt(((x - floats) ** 2).mean()):.3e}")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
