"""Write blockq/data/iq_grids.npz: the i-quant codebooks, taken from llama.cpp's ggml-common.h.

    python tools/make_iq_grids.py PATH/TO/ggml-common.h

Each grid table of ggml-common.h (``GGML_TABLE_BEGIN(uint64_t, iq2xxs_grid, 256)``...) holds one
codeword per integer, its bytes the codeword's entries in little-endian order.  The file stores
them as int8 arrays ``(n_codewords, 8)`` (uint64 tables) or ``(n_codewords, 4)`` (uint32).
``tests/test_iq_grids.py`` checks the stored grids against gguf-py's independent copies.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "blockq" / "data" / "iq_grids.npz"
GRIDS = ("iq2xxs_grid", "iq2xs_grid", "iq2s_grid", "iq3xxs_grid", "iq3s_grid", "iq1s_grid")
_TABLE = re.compile(r"GGML_TABLE_BEGIN\((u?int\d+)_t,\s*(\w+),\s*(\w+)\)(.*?)GGML_TABLE_END",
                    re.S)
_DEFINE = re.compile(r"#define\s+(\w+)\s+(\d+)\b")


def parse(text: str) -> dict[str, np.ndarray]:
    out = {}
    defines = dict(_DEFINE.findall(text))  # sizes given by name: NGRID_IQ1S
    for ctype, name, count, body in _TABLE.findall(text):
        if name not in GRIDS:
            continue
        count = defines.get(count, count)
        words = [int(w, 0) for w in re.findall(r"0x[0-9a-fA-F]+|\b\d+\b", body)]
        if len(words) != int(count):
            raise SystemExit(f"{name}: {len(words)} entries, the header says {count}")
        width = {"uint64": 8, "uint32": 4}[ctype]
        raw = np.array(words, dtype=np.uint64 if width == 8 else np.uint32).astype(f"<u{width}")
        out[name] = raw.view(np.int8).reshape(int(count), width)
    missing = set(GRIDS) - set(out)
    if missing:
        raise SystemExit(f"tables not found: {sorted(missing)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("header", type=Path, help="ggml/src/ggml-common.h of a llama.cpp checkout")
    args = ap.parse_args(argv)
    grids = parse(args.header.read_text())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **grids)
    for k, v in grids.items():
        print(f"{k}: {v.shape[0]} codewords of {v.shape[1]}")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
