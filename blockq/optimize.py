"""Size-budgeted per-tensor type allocation: the best standard GGUF file under a byte budget.

Every quantizable matrix gets a *measured* error curve: for each candidate block type (every
integer grid whose block length divides the row), the matrix is quantized and its error is
measured — under the input Hessian when calibration statistics exist (the relative output
error ``tr(D H D^T) / tr(W H W^T)``, ``D = W - Q``), else as the relative squared weight error.
The error is multiplied by the tensor's sensitivity weight (:data:`ROLE_WEIGHT`, or weights
measured by the caller) and the sum over tensors is minimised under the budget:

1. Lagrangian relaxation: for a multiplier ``lam`` every tensor independently picks the type
   minimising ``weight * error + lam * bytes``; bisection on ``lam`` finds the cheapest plan
   that fits.
2. Greedy fill: the bytes left under the budget go to the upgrades with the best error drop
   per byte, as long as they fit.

The budget is a number of bytes (``--bpw`` / ``--size``) or a preset's plan
(``budget_of_plan``).  ``convert --optimize`` alone keeps the preset's types (see the NOTE in
:func:`convert_optimized`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from .errors import BadArgument
from .types import qtype as _qtype

# Grids the allocator may pick, cheapest first.  F16/F32 are never chosen for a matrix.
CANDIDATES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
RANDOM_CHUNKS = 8  # chunks of random token ids when --optimize has no calibration text
ALIGN = 32  # GGUF tensor data alignment: every tensor occupies a multiple of this

# NOTE: relative errors of different matrices do not hurt the model equally; these per-role
# weights are where measured sensitivities (the KLD that quantizing one role alone costs, per
# unit of its summed relative error) belong.  They are not fitted yet: all 1.
ROLE_WEIGHT = {"attn_q": 1.0, "attn_k": 1.0, "attn_v": 1.0, "attn_output": 1.0,
               "ffn_gate": 1.0, "ffn_up": 1.0, "ffn_down": 1.0, "output": 1.0,
               "token_embd": 1.0}


def role(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``output.weight`` -> ``output``."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def tensor_bytes(qt: str, rows: int, cols: int) -> int:
    t = _qtype(qt)
    return rows * t.row_bytes(cols) if t.is_quantized else rows * cols * t.type_size


def candidates(cols: int, allowed: Iterable[str] = CANDIDATES) -> list[str]:
    """The grids a row of ``cols`` weights can be stored in."""
    return [c for c in allowed if cols % _qtype(c).block_size == 0]


@dataclass
class Curve:
    """One matrix's measured choices: type -> (bytes on disk, weighted error)."""
    name: str
    rows: int
    cols: int
    options: dict[str, tuple[int, float]]
    weight: float = 1.0
    chosen: str = ""
    why: str = ""

    def cost(self, qt: str) -> float:
        return self.weight * self.options[qt][1]


@dataclass
class Plan:
    types: dict[str, str]  # tensor -> type
    budget: int  # bytes the matrices may take (aligned)
    used: int  # bytes they take
    curves: dict[str, Curve] = field(default_factory=dict)

    def reasons(self) -> dict[str, str]:
        return {n: c.why for n, c in self.curves.items()}


def measure(W: np.ndarray, types: Iterable[str], *, H: np.ndarray | None = None,
            imatrix: np.ndarray | None = None,
            quantizer: Callable[[np.ndarray, str], np.ndarray] | None = None
            ) -> dict[str, float]:
    """Relative error of ``W`` (rows, cols) stored as each of ``types``.

    With ``H`` (cols, cols): ``tr(D H D^T) / tr(W H W^T)``; without: ``|D|^2 / |W|^2``.
    ``quantizer(W, type) -> dequantized W`` defaults to blockq's quantizer with ``imatrix``.
    """
    from .dequantize import dequantize
    from .quantize import quantize

    W = np.asarray(W, dtype=np.float32)
    if quantizer is None:
        def quantizer(x, qt):
            return dequantize(quantize(x, qt, imatrix=imatrix), qt, x.shape)
    if H is not None:
        Hd = np.asarray(H, dtype=np.float64)
        ref = float(np.einsum("ij,ij->", W @ Hd.astype(np.float32), W))
    else:
        ref = float(np.einsum("ij,ij->", W, W, dtype=np.float64))
    ref = ref if ref > 0 else 1.0
    out = {}
    for qt in types:
        D = W - quantizer(W, qt)
        if H is not None:
            e = float(np.einsum("ij,ij->", D @ Hd.astype(np.float32), D))
        else:
            e = float(np.einsum("ij,ij->", D, D, dtype=np.float64))
        out[qt] = max(e, 0.0) / ref
    return out


def allocate(curves: Iterable[Curve], budget: int) -> Plan:
    """Pick one type per curve minimising the summed weighted error within ``budget`` bytes."""
    curves = list(curves)
    if not curves:
        return Plan({}, budget, 0)
    for c in curves:
        if not c.options:
            raise BadArgument(f"{c.name}: no type fits rows of {c.cols} weights")
    floor = sum(min(aligned(b) for b, _ in c.options.values()) for c in curves)
    if floor > budget:
        raise BadArgument(f"a budget of {budget:,} bytes is below the smallest possible file "
                          f"for these matrices ({floor:,} bytes); raise --bpw/--size")

    def pick(lam: float) -> tuple[dict[str, str], int]:
        sel, used = {}, 0
        for c in curves:
            qt = min(c.options, key=lambda t: (c.cost(t) + lam * aligned(c.options[t][0]),
                                               c.options[t][0]))
            sel[c.name] = qt
            used += aligned(c.options[qt][0])
        return sel, used

    lo, hi = 0.0, 1.0
    sel, used = pick(hi)
    while used > budget and hi < 1e30:
        hi *= 16
        sel, used = pick(hi)
    if used > budget:  # every tensor at its smallest type
        sel = {c.name: min(c.options, key=lambda t: c.options[t][0]) for c in curves}
        used = sum(aligned(c.options[sel[c.name]][0]) for c in curves)
    else:
        for _ in range(60):  # smallest multiplier (best quality) whose plan still fits
            mid = (lo + hi) / 2
            s, u = pick(mid)
            if u <= budget:
                hi, sel, used = mid, s, u
            else:
                lo = mid
    # greedy fill: best error drop per extra byte that still fits
    by_name = {c.name: c for c in curves}
    while True:
        best, best_gain = None, 0.0
        for c in curves:
            cur = sel[c.name]
            cb, ce = aligned(c.options[cur][0]), c.cost(cur)
            for qt, (b, _) in c.options.items():
                extra = aligned(b) - cb
                gain = ce - c.cost(qt)
                if extra > 0 and gain > 0 and used + extra <= budget:
                    r = gain / extra
                    if r > best_gain:
                        best, best_gain = (c.name, qt, extra), r
        if best is None:
            break
        n, qt, extra = best
        sel[n] = qt
        used += extra
    for c in curves:
        c.chosen = sel[c.name]
        errs = ", ".join(f"{t} {c.options[t][1]:.2e}" for t in sorted(
            c.options, key=lambda t: c.options[t][0]))
        c.why = f"rel. error {errs}; weight {c.weight:g}"
    return Plan(sel, budget, used, by_name)


def budget_of_plan(plan: Mapping[str, str], shapes: Mapping[str, tuple[int, int]]) -> int:
    """Aligned bytes the given matrices take with the given types (a preset's budget)."""
    return sum(aligned(tensor_bytes(plan[n], *shapes[n])) for n in shapes)


def budget_from_bpw(bpw: float, shapes: Mapping[str, tuple[int, int]]) -> int:
    if not (math.isfinite(bpw) and 1.0 <= bpw <= 32.0):
        raise BadArgument(f"--bpw {bpw}: bits per weight must be between 1 and 32")
    n = sum(r * c for r, c in shapes.values())
    return int(n * bpw / 8)


def parse_size(text: str) -> int:
    """``100MiB``, ``1.5GB``, ``123456`` -> bytes."""
    units = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000 ** 2, "MB": 1000 ** 2,
             "MIB": 1024 ** 2, "G": 1000 ** 3, "GB": 1000 ** 3, "GIB": 1024 ** 3}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        v = float(num)
    except ValueError:
        v = float("nan")
    if unit not in units or not math.isfinite(v) or v <= 0:
        raise BadArgument(f"--size {text!r}: give a positive size like 100MiB, 1.5GB or 123456")
    return int(v * units[unit])


# --- the whole job: statistics, allocation, conversion ----------------------------------------
def calibrate_source(src, text: str | None, *, n_ctx: int = 512, n_chunks: int | None = -1,
                     dataset: str = "", progress=None):
    """Input Hessians of the model ``src`` (GGUF file, or HF folder: converted to a temporary
    F16 GGUF next to nothing the user has) over ``text``; without text, over seeded random
    token ids (:func:`blockq.calibrate.calibrate_random`, ``n_chunks`` of them, default 8)."""
    import gc
    import tempfile
    from pathlib import Path

    from .calibrate import calibrate, calibrate_random
    from .model import Model
    from .tokenizer import Tokenizer

    src = Path(src)
    with tempfile.TemporaryDirectory(prefix="blockq-calib-") as tmp:
        path = src
        if src.is_dir():
            from .convert import convert
            path = Path(tmp) / "source-f16.gguf"
            convert(src, path, "F16", warn=lambda s: None)
        with Model.load(path) as m:
            tok = Tokenizer.from_metadata(m.metadata)
            if text is None:
                n = RANDOM_CHUNKS if n_chunks is None or n_chunks < 1 else n_chunks
                hs = calibrate_random(m, tok, n_ctx=n_ctx, n_chunks=n, progress=progress)
            else:
                hs = calibrate(m, tok, text, n_ctx=n_ctx, n_chunks=n_chunks, dataset=dataset,
                               progress=progress)
        del m
        # the model's layers hold reference cycles: without a collection its ~0.5 GB (SmolLM2
        # F32) stayed alive through the whole conversion that follows
        gc.collect()
        return hs


def plan_budget(src, preset: str, hs=None, *, bpw: float | None = None, size=None,
                overrides=(), note=None) -> Plan:
    """Measure every quantized matrix of ``src`` at every candidate type and allocate within
    the preset's bytes (or ``bpw`` / ``size``)."""
    from .calibrate import for_tensors
    from .convert import open_source, preset_plan
    from .presets import parse_override

    rules = [parse_override(o) for o in overrides]
    with open_source(src) as ck:
        names = [t.name for t in ck.tensors]
        if hs is not None:
            for_tensors(hs, names)
        base = preset_plan(ck, preset, hs is not None, rules)
        forced = {n for n in names if any(__import__("re").search(r, n) for r, _ in rules)}
        curves, shapes = [], {}
        for t in ck.tensors:
            qt = base[t.name]
            if len(t.shape) != 2 or qt not in CANDIDATES or t.name in forced:
                continue
            shapes[t.name] = (t.rows, t.cols)
            W = t.read_rows(0, t.rows)  # (rows, cols) float32
            H = hs.hessian(t.name) if hs is not None else None
            imp = hs.importance(t.name) if hs is not None else None
            cands = candidates(t.cols)
            errs = measure(W, cands, H=H, imatrix=imp)
            curves.append(Curve(t.name, t.rows, t.cols,
                                {c: (tensor_bytes(c, t.rows, t.cols), errs[c]) for c in cands},
                                ROLE_WEIGHT.get(role(t.name), 1.0)))
        if bpw is not None or size is not None:
            fixed = {t.name: (t.rows, t.cols) for t in ck.tensors if t.name not in shapes}
            fixed_bytes = sum(aligned(tensor_bytes(base[n], *rc)) for n, rc in fixed.items()
                              if len(rc) == 2)
            if size is not None:
                total = parse_size(size) if isinstance(size, str) else int(size)
                budget = total - fixed_bytes
            else:
                all_shapes = {t.name: (t.rows, t.cols) for t in ck.tensors}
                budget = budget_from_bpw(bpw, all_shapes) - fixed_bytes
        else:
            budget = budget_of_plan(base, shapes)
    plan = allocate(curves, budget)
    if note is not None:
        moved = [(n, base[n], plan.types[n]) for n in plan.types if plan.types[n] != base[n]]
        note(f"optimize: {len(moved)} of {len(plan.types)} matrices differ from the preset's "
             f"plan; matrices {plan.used / 2**20:.2f} MiB of a budget of "
             f"{plan.budget / 2**20:.2f} MiB")
    return plan


def convert_optimized(src, out, preset: str = "Q4_K_M", *, text=None, hessians=None,
                      optimize: bool = True, bpw: float | None = None, size=None,
                      n_ctx: int = 512, n_chunks: int | None = -1, imatrix=None, overrides=(),
                      calib_progress=None, note=None, warn=None, threads: int | None = None):
    """``blockq convert --calib/--hessians/--optimize/--bpw/--size``: calibration statistics
    (from the text, the side file, or — ``optimize`` without either — seeded random token ids),
    the allocation when a budget (``bpw``/``size``) is given, then the conversion with
    error-compensated rounding.  Returns :class:`blockq.convert.Result`."""
    import sys
    from pathlib import Path

    from .calibrate import Hessians, read_hessians
    from .convert import convert
    from .gguf.constants import ValueType
    from .gguf.reader import Value

    from .outfile import check_output

    note = note or (lambda s: print(s, file=sys.stderr))
    # before any long work: an output that would destroy an input, or an unwritable folder
    out = check_output(out, [src, text, hessians if not isinstance(hessians, Hessians) else None,
                             imatrix if isinstance(imatrix, (str, Path)) else None])
    hs = None
    if hessians is not None:
        hs = hessians if isinstance(hessians, Hessians) else read_hessians(hessians)
    elif text is not None:
        path = Path(text)
        if not path.is_file():
            raise BadArgument(f"calibration text {path} does not exist")
        body = path.read_text(encoding="utf-8", errors="replace")
        hs = calibrate_source(src, body, n_ctx=n_ctx, n_chunks=n_chunks, dataset=str(path),
                              progress=calib_progress)
        note(f"calibrated on {hs.chunk_count} chunks of {n_ctx} tokens of {path.name}")
    elif optimize:
        # no text: the model's own activations on seeded random token ids (data-free)
        hs = calibrate_source(src, None, n_ctx=n_ctx, n_chunks=n_chunks,
                              progress=calib_progress)
        note(f"no calibration text: calibrated on {hs.chunk_count} chunks of {n_ctx} random "
             "token ids (seeded)")
    md = {}
    type_plan = None
    if bpw is not None or size is not None:
        # NOTE: only an explicit budget re-allocates types.  Within the preset's own budget on
        # SmolLM2 the allocator, weighting every matrix's relative error alike (ROLE_WEIGHT is
        # not fitted yet), moved 210 of 211 matrices and left 6.8 of 98.7 MiB unused, starving
        # the large output head; --optimize keeps llama.cpp's types and gains through the
        # rounding alone until the weights are measured.
        plan = plan_budget(src, preset, hs, bpw=bpw, size=size, overrides=overrides, note=note)
        type_plan = plan.types
        md["quantize.blockq.allocation"] = Value(
            ValueType.ARRAY, [f"{n}={t}" for n, t in sorted(plan.types.items())],
            elem_type=ValueType.STRING)
    return convert(src, out, preset, imatrix=imatrix, overrides=overrides, hessians=hs,
                   type_plan=type_plan, extra_metadata=md, warn=warn, threads=threads)
