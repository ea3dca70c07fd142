"""llama.cpp's own blocks for fixed float rows, and the measures the quantizer tests use.

``tests/data/refblocks_{sym,asym}_*.npz`` hold float rows (``x``), importance vectors
(``imatrix``, ``imatrix_sparse``) and the blocks llama.cpp made of them (``<TYPE>``,
``<TYPE>_imatrix``, ...): evenly spaced rows of each ``../shared/refdata`` source, and edge-case
rows (``*_edge.npz``).  ``sym`` and ``nl`` (non-linear, ternary and i-quant types) files are written by
``tools/quant_quality.py --write-test-data sym|nl``, ``asym`` files by
``python tests/test_quantize_asymmetric.py --write-data``.
"""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from blockq.types import qtype

DATA = Path(__file__).parent / "data"

# type, family (data files and module), least share of byte-identical blocks (measured: 1.0
# everywhere), bound on the relative RMSE (rmse / std) of N(0, 1) rows (measured value in the
# comment), whether llama.cpp uses an importance vector for the type
TYPES = [
    ("Q4_0", "sym", 1.0, 0.098, True),  # 0.0853
    ("Q5_0", "sym", 1.0, 0.049, True),  # 0.0425
    ("Q8_0", "sym", 1.0, 0.0061, False),  # 0.00531
    ("Q3_K", "sym", 1.0, 0.174, True),  # 0.151
    ("Q6_K", "sym", 1.0, 0.020, True),  # 0.0176
    ("Q8_K", "sym", 1.0, 0.0079, False),  # 0.00685
    ("Q4_1", "asym", 1.0, 0.090, True),  # 0.0784
    ("Q5_1", "asym", 1.0, 0.044, True),  # 0.0381
    ("Q2_K", "asym", 1.0, 0.34, True),  # 0.293
    ("Q4_K", "asym", 1.0, 0.083, True),  # 0.0716
    ("Q5_K", "asym", 1.0, 0.042, True),  # 0.0361
    ("IQ4_NL", "nl", 1.0, 0.087, True),  # 0.0757
    ("IQ4_XS", "nl", 1.0, 0.088, True),  # 0.0764
    ("MXFP4", "nl", 1.0, 0.13, False),  # 0.115
    ("TQ1_0", "nl", 1.0, 0.91, False),  # 0.793: ternary with the absmax scale (BitNet rows
    ("TQ2_0", "nl", 1.0, 0.91, False),  # are ternary already; Gaussian rows are not)
    ("IQ3_S", "nl", 1.0, 0.19, True),  # 0.166
    ("IQ3_XXS", "nl", 1.0, 0.25, True),  # 0.215
    ("IQ2_XXS", "nl", 1.0, 0.42, True),  # 0.341, with unit importance vectors (required)
    ("IQ2_XS", "nl", 1.0, 0.35, True),  # 0.298, with unit importance vectors (required)
    ("IQ2_S", "nl", 1.0, 0.31, True),  # 0.265
    ("IQ1_S", "nl", 1.0, 0.56, True),  # 0.488, with unit importance vectors (required)
    ("IQ1_M", "nl", 1.0, 0.68, True),  # 0.586 (weights x^2 without importance vectors)
]
BOUND = {t: b for t, _, _, b, _ in TYPES}


def names(family: str) -> list[str]:
    return [t for t, fam, _, _, _ in TYPES if fam == family]


def edge_file(family: str) -> Path:
    return DATA / f"refblocks_{family}_edge.npz"


def source_files(family: str) -> list[Path]:
    """The reference-source files of a family (edge cases excluded)."""
    return sorted(p for p in DATA.glob(f"refblocks_{family}_*.npz") if p != edge_file(family))


def all_files(family: str) -> list[Path]:
    return source_files(family) + [edge_file(family)] * edge_file(family).exists()


def dequantize(name, blocks, cols):
    """Float rows of ``blocks``: gguf-py is the oracle; it has no Q8_K (d f32 * qs int8)."""
    if name == "Q8_K":
        b = blocks.reshape(-1).view(qtype("Q8_K").dtype)
        return (b["d"][:, None] * b["qs"].astype(np.float32)).reshape(blocks.shape[0], cols)
    return gguf_dequantize(blocks, GGMLQuantizationType[name]).reshape(blocks.shape[0], cols)


def rmse(x, y, w=None):
    """RMSE, weighted per column by ``w`` when given."""
    e2 = (x.astype(np.float64) - y) ** 2
    if w is None:
        return np.sqrt(e2.mean())
    w = np.broadcast_to(w.astype(np.float64), e2.shape)
    return np.sqrt((w * e2).sum() / w.sum())


def identical(a, b, type_size):
    """Share of blocks that are byte-identical."""
    return (a.reshape(-1, type_size) == b.reshape(-1, type_size)).all(1).mean()
