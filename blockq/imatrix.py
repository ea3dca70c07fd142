"""Importance matrices (llama.cpp's two file formats, the accumulator, the calibration run) and
the KL-divergence comparison of a quantized model with its base over the same calibration chunks.

An importance matrix holds, for every weight matrix ``W`` the model multiplies, the sum over
calibration tokens of each input column squared (``in_sum2``, one row per expert; dense models
have one) and how many tokens went in (``counts``).  The quantizers weigh each column's error by
``in_sum2 / counts``, the mean squared activation (:meth:`Imatrix.importance`).

Files, both read and written:

- GGUF (llama-imatrix's default since 2025): metadata ``general.type = "imatrix"``,
  ``imatrix.datasets`` (ARRAY[STRING]), ``imatrix.chunk_count`` (UINT32), ``imatrix.chunk_size``
  (UINT32); per matrix two F32 tensors, ``<name>.in_sum2`` of numpy shape (n_mat, n_cols) and
  ``<name>.counts`` of shape (n_mat, 1), names sorted.
- legacy ``.dat`` (all little-endian)::

      i32 n_entries
      n_entries x  i32 len | name bytes[len] | i32 ncall | i32 nval | f32 values[nval]
      (optional)   i32 chunk_count | i32 len | dataset bytes[len]

  where ``values = in_sum2 / counts * ncall`` and ``ncall`` is the number of chunks, so the
  importance is ``values / ncall``.
"""
from __future__ import annotations

import contextlib
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import BadArgument, FormatError
from .outfile import write_atomic
from .validate import check_chunks, same_vocabulary

GENERAL_TYPE = "general.type"
DATASETS = "imatrix.datasets"
CHUNK_COUNT = "imatrix.chunk_count"
CHUNK_SIZE = "imatrix.chunk_size"
IN_SUM2 = ".in_sum2"
COUNTS = ".counts"
MIN_BATCH = 16  # NOTE: llama-imatrix ignores matrix products over fewer than 16 tokens
_I32 = struct.Struct("<i")


@dataclass
class Entry:
    """Statistics of one weight matrix."""
    in_sum2: np.ndarray  # float32 (n_mat, n_cols): sum over tokens of x[col]**2
    counts: np.ndarray  # int64 (n_mat,): tokens summed

    @property
    def n_cols(self) -> int:
        return self.in_sum2.shape[1]


@dataclass
class Imatrix:
    """An importance matrix as llama.cpp keeps it, whichever file it came from."""
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: in_sum2 holds mean * ncall, counts ncall

    def importance(self, name: str) -> np.ndarray | None:
        """The per-column importance vector llama-quantize hands the quantizer for ``name``
        (flattened over experts), or None when the file has no entry for it."""
        e = self.entries.get(name)
        if e is None:
            return None
        s = e.in_sum2.astype(np.float32)
        c = e.counts.astype(np.float32)[:, None]
        if self.legacy:
            # NOTE: as llama-quantize: a legacy entry with ncall 0 is used as stored
            out = np.where(c > 0, s / np.where(c > 0, c, 1), s)
        else:
            # NOTE: as llama-quantize: an expert that saw no token gets importance 1 everywhere
            out = np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1.0))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)

    def __len__(self) -> int:
        return len(self.entries)


# --- GGUF format ---------------------------------------------------------------------------
def _is_gguf(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def read_imatrix(path) -> Imatrix:
    """Read an importance matrix in either format (GGUF detected by its magic)."""
    path = Path(path)
    if not path.is_file():
        raise BadArgument(f"imatrix file {path} does not exist")
    return _read_gguf(path) if _is_gguf(path) else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    from .gguf.reader import read_gguf

    with read_gguf(path) as f:
        md = f.metadata
        kind = md.get(GENERAL_TYPE)
        if kind is not None and kind != "imatrix":
            raise FormatError(f"{path}: general.type is {kind!r}, not 'imatrix' (a model file "
                              "given as --imatrix?)")
        missing = [k for k in (DATASETS, CHUNK_COUNT, CHUNK_SIZE) if k not in md]
        if missing:
            raise FormatError(f"{path}: imatrix metadata {', '.join(missing)} missing "
                              "(llama-quantize refuses such a file too)")
        sums: dict[str, object] = {}
        counts: dict[str, object] = {}
        for name, t in f.tensors.items():
            for suffix, into in ((IN_SUM2, sums), (COUNTS, counts)):
                if name.endswith(suffix):
                    into[name[:-len(suffix)]] = t
        if not sums and not counts:
            raise FormatError(f"{path}: no '<tensor>{IN_SUM2}' / '<tensor>{COUNTS}' tensors")
        entries = {}
        for base in sorted(set(sums) | set(counts)):
            s, c = sums.get(base), counts.get(base)
            if s is None or c is None:
                raise FormatError(f"{path}: {base} has {'no ' + IN_SUM2 if s is None else ''}"
                                  f"{'no ' + COUNTS if c is None else ''} tensor; each matrix "
                                  "needs both")
            if s.qtype != "F32" or c.qtype != "F32":
                raise FormatError(f"{path}: {base}: {IN_SUM2} is {s.qtype} and {COUNTS} is "
                                  f"{c.qtype}; both must be F32")
            n_mat = c.n_elements
            if s.n_elements % n_mat:
                raise FormatError(f"{path}: {base}: {s.n_elements} sums do not split into "
                                  f"{n_mat} matrices")
            in_sum2 = np.array(s.data.view("<f4"), dtype=np.float32).reshape(n_mat, -1)
            cnt = np.array(c.data.view("<f4"), dtype=np.float64)
            _check_values(path, base, in_sum2, cnt)
            entries[base] = Entry(in_sum2, np.rint(cnt).astype(np.int64))
        datasets = md[DATASETS]
        return Imatrix(entries, [str(d) for d in datasets], int(md[CHUNK_COUNT]),
                       int(md[CHUNK_SIZE]), legacy=False)


def _check_values(path, name, sums: np.ndarray, counts: np.ndarray) -> None:
    for what, a in (("sums", sums), ("counts", counts)):
        bad = ~np.isfinite(a)
        if bad.any():
            raise FormatError(f"{path}: {name}: {int(bad.sum())} non-finite {what} (an imatrix "
                              "holds finite squared activations)")
        if (a < 0).any():
            raise FormatError(f"{path}: {name}: negative {what} ({float(a.min())}); sums of "
                              "squares and counts are >= 0")


def write_imatrix_gguf(path, im: Imatrix) -> Path:
    """Write ``im`` in llama.cpp's GGUF imatrix format (atomically)."""
    from .gguf.constants import ValueType
    from .gguf.reader import Value
    from .gguf.writer import write_gguf

    md = {GENERAL_TYPE: "imatrix",
          DATASETS: Value(ValueType.ARRAY, list(im.datasets), elem_type=ValueType.STRING),
          CHUNK_COUNT: Value(ValueType.UINT32, int(im.chunk_count)),
          CHUNK_SIZE: Value(ValueType.UINT32, int(im.chunk_size))}
    tensors = []
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat, n_cols = e.in_sum2.shape
        tensors.append((name + IN_SUM2, "F32", (n_mat, n_cols),
                        np.ascontiguousarray(e.in_sum2, dtype=np.float32)))
        tensors.append((name + COUNTS, "F32", (n_mat, 1), e.counts.astype(np.float32)))
    # NOTE: blockq's writer adds general.quantization_version and general.file_type (0),
    # which llama-imatrix leaves out; llama.cpp's loaders ignore them.
    return write_gguf(path, md, tensors)


# --- legacy .dat format ---------------------------------------------------------------------
def _read_dat(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise FormatError(f"{path}: truncated at byte {pos} reading {what} (needs {n} bytes, "
                              f"{len(raw) - pos} left); not an imatrix file?")
        b = raw[pos:pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return _I32.unpack(take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries * 16 > len(raw):
        raise FormatError(f"{path}: {n_entries} entries cannot fit in {len(raw)} bytes; "
                          "not a legacy .dat imatrix (nor GGUF)")
    entries = {}
    for i in range(n_entries):
        n = i32(f"entry {i} name length")
        if not 0 < n <= 4096:
            raise FormatError(f"{path}: entry {i} name length {n} at byte {pos - 4} (1..4096)")
        try:
            name = take(n, f"entry {i} name").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: entry {i} name at byte {pos - n} is not UTF-8") from None
        ncall = i32(f"{name} ncall")
        nval = i32(f"{name} value count")
        if nval < 1:
            raise FormatError(f"{path}: {name}: {nval} values at byte {pos - 4} (needs >= 1)")
        vals = np.frombuffer(take(4 * nval, f"{name} values"), dtype="<f4").astype(np.float32)
        if ncall < 0:
            raise FormatError(f"{path}: {name}: negative ncall {ncall}")
        _check_values(path, name, vals, np.zeros(1))
        entries[name] = Entry(vals.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):  # the trailer is optional
        chunk_count = i32("the chunk count")
        if pos + 4 <= len(raw):
            n = i32("the dataset name length")
            if 0 < n <= len(raw) - pos:
                datasets.append(take(n, "the dataset name").decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def write_imatrix_dat(path, im: Imatrix) -> Path:
    """Write ``im`` in the legacy ``.dat`` format (atomically), as llama-imatrix
    ``--output-format dat`` does: values are mean squares times ncall = ceil(tokens/chunk)."""
    parts = []
    names = []
    for name in sorted(im.entries):
        e = im.entries[name]
        if (e.counts == 0).all():
            print(f"warning: imatrix entry {name} has no data; not stored", file=sys.stderr)
            continue
        names.append(name)
    parts.append(_I32.pack(len(names)))
    for name in names:
        e = im.entries[name]
        if im.legacy:
            ncall = int(e.counts.max())
            vals = e.in_sum2
        else:
            chunk = max(im.chunk_size, 1)
            ncall = int(-(-int(e.counts.max()) // chunk))
            c = e.counts.astype(np.float32)[:, None]
            # NOTE: as llama-imatrix: an expert with no tokens is stored as 1 (value 1 / count 1)
            mean = np.where(c > 0, e.in_sum2 / np.where(c > 0, c, 1), np.float32(1.0))
            vals = mean * np.float32(ncall)
        raw = name.encode("utf-8")
        vals = np.ascontiguousarray(vals, dtype="<f4").reshape(-1)
        parts += [_I32.pack(len(raw)), raw, _I32.pack(ncall), _I32.pack(vals.size),
                  vals.tobytes()]
    parts.append(_I32.pack(im.chunk_count))
    ds = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    parts += [_I32.pack(len(ds)), ds]
    return write_atomic(path, b"".join(parts))


def write_imatrix(path, im: Imatrix, fmt: str | None = None) -> Path:
    """Write in ``fmt`` ("gguf" or "dat"); by default ``.dat`` files get the legacy format."""
    fmt = fmt or ("dat" if str(path).endswith(".dat") else "gguf")
    if fmt == "gguf":
        return write_imatrix_gguf(path, im)
    if fmt == "dat":
        return write_imatrix_dat(path, im)
    raise BadArgument(f"imatrix format {fmt!r} is unknown; use 'gguf' or 'dat'")


# --- the accumulator ------------------------------------------------------------------------
def accumulate(sums: dict, counts: dict, key: str, name: str, value: np.ndarray, n: int) -> None:
    """Add one product's statistics ``value`` over ``n`` tokens to ``sums[key]`` (checked: an
    input keeps one width); shared by the imatrix and Hessian collectors."""
    prev = sums.get(key)
    if prev is None:
        sums[key] = value
        counts[key] = n
        return
    if prev.shape != value.shape:
        raise BadArgument(f"{name}: inputs of {value.shape[0]} columns after "
                          f"{prev.shape[0]}; one matrix has one width")
    prev += value
    counts[key] += n


class Collector:
    """Sums squared input activations per column of every matrix the model multiplies.

    ``add(name, x)`` with ``x`` the (n_tokens, n_cols) input of weight ``name``.  Like
    llama-imatrix, it keeps ``blk.*`` matrices only (and ``output.weight`` with
    ``process_output``), skips products over fewer than 16 tokens, and counts chunks as
    tokens seen by a matrix / ``chunk_size``.
    """

    def __init__(self, chunk_size: int, process_output: bool = False):
        if chunk_size < 1:
            raise BadArgument(f"chunk size {chunk_size} must be >= 1")
        self.chunk_size = chunk_size
        self.process_output = process_output
        self._sums: dict[str, np.ndarray] = {}  # float64 (n_cols,) running sums
        self._counts: dict[str, int] = {}

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def add(self, name: str, x: np.ndarray) -> None:
        if not self.wants(name) or x.shape[0] < MIN_BATCH:
            return
        x = np.asarray(x, dtype=np.float32)  # (n_tokens, n_cols)
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)  # (n_cols,)
        if not np.isfinite(sq).all():
            raise BadArgument(f"non-finite activations entering {name}; the model overflows "
                              "on this text")
        accumulate(self._sums, self._counts, name, name, sq, x.shape[0])

    @property
    def chunk_count(self) -> int:
        return max(self._counts.values(), default=0) // self.chunk_size

    def result(self, datasets: Iterable[str] = ()) -> Imatrix:
        entries = {n: Entry(s.astype(np.float32)[None, :], np.array([self._counts[n]], np.int64))
                   for n, s in sorted(self._sums.items())}
        return Imatrix(entries, list(datasets), self.chunk_count, self.chunk_size)


# --- running a model over calibration text --------------------------------------------------
@contextlib.contextmanager
def observe_matmuls(model, observe: Callable[[str, np.ndarray], None]) -> Iterator[None]:
    """While active, ``observe(weight_name, x)`` sees the input ``x`` (n_tokens, n_cols) of
    every matrix product of ``model`` (a :class:`blockq.model.Model`), the output head included,
    on the CPU or on a GPU (the model's forward pass wraps its operations with the hook)."""
    saved = model.observe
    model.observe = observe
    try:
        yield
    finally:
        model.observe = saved


def chunks(tokens: list[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """Split ``tokens`` like llama-imatrix / llama-perplexity: whole chunks of ``n_ctx`` tokens,
    the first of each replaced by BOS when the model adds one (``bos`` not None)."""
    check_chunks(n_chunks)
    if n_ctx < 2:
        raise BadArgument(f"context {n_ctx} is too small; use -c 8 or more")
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    out = []
    for i in range(n):
        c = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


def text_chunks(tokenizer, text: str, n_ctx: int, n_chunks: int | None) -> list[list[int]]:
    """``text`` tokenized and cut into calibration chunks (at least two, as llama-imatrix)."""
    toks = tokenizer.encode(text, add_special=True)
    if len(toks) < 2 * n_ctx:
        raise BadArgument(f"calibration text gives {len(toks)} tokens; a context of {n_ctx} "
                          f"needs at least {2 * n_ctx} (more text, or a smaller -c)")
    bos = tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None
    return chunks(toks, n_ctx, n_chunks, bos)


def run_observed(model, work: list[list[int]], observe: Callable[[str, np.ndarray], None],
                 progress: Callable[[int, int, float], None] | None = None) -> None:
    """Forward every chunk of ``work`` with ``observe`` seeing each matrix input;
    ``progress(i, n, ppl)`` after each chunk with the running perplexity over the second
    halves of the chunks."""
    nll, count = 0.0, 0
    with observe_matmuls(model, observe):
        for i, c in enumerate(work):
            n_ctx = len(c)
            cache = model.new_cache(n_ctx)
            logits = model.forward(c, cache, outputs="all")  # (n_ctx, n_vocab)
            first = n_ctx // 2
            lp = log_softmax(logits[first:n_ctx - 1])
            tgt = np.asarray(c[first + 1:n_ctx])
            nll -= float(lp[np.arange(len(tgt)), tgt].sum())
            count += len(tgt)
            if progress is not None:
                progress(i + 1, len(work), math.exp(nll / count))


def compute_imatrix(model, tokenizer, text: str, *, n_ctx: int = 512, n_chunks: int | None = None,
                    dataset: str = "", process_output: bool = False,
                    progress: Callable[[int, int, float], None] | None = None) -> Imatrix:
    """Run ``model`` over ``text`` in chunks of ``n_ctx`` tokens and collect its imatrix.

    Needs at least two chunks of text (as llama-imatrix).  ``progress(i, n, ppl)`` is called
    after each chunk with the running perplexity over the second halves of the chunks.
    """
    work = text_chunks(tokenizer, text, n_ctx, n_chunks)
    col = Collector(n_ctx, process_output)
    run_observed(model, work, col.add, progress)
    return col.result([dataset] if dataset else [])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


# --- comparing a quantized model with its base -----------------------------------------------
@dataclass
class KLDResult:
    """llama-perplexity --kl-divergence's headline numbers."""
    kld: float  # mean KL(base || quant) over scored tokens, nats
    kld_stderr: float
    same_top: float  # share of scored tokens where both models' most likely token agree
    ppl_base: float
    ppl_quant: float
    chunks: int
    tokens: int  # scored tokens

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_quant / self.ppl_base

    def as_dict(self) -> dict:
        return {"kld": self.kld, "kld_stderr": self.kld_stderr, "same_top": self.same_top,
                "ppl_base": self.ppl_base, "ppl_quant": self.ppl_quant,
                "ppl_ratio": self.ppl_ratio, "chunks": self.chunks, "tokens": self.tokens}


def kl_divergence(base, quant, tokens, *, n_ctx: int = 512, n_chunks: int | None = None,
                  bos: int | None = None,
                  progress: Callable[[int, int, float], None] | None = None) -> KLDResult:
    """Run both models over the same chunks of ``tokens`` and compare their next-token
    distributions on the second half of each chunk (positions n_ctx/2 .. n_ctx-2), as
    llama-perplexity --kl-divergence does.  ``progress(i, n, kld_so_far)`` after each chunk."""
    return kl_divergence_many(base, [quant], tokens, n_ctx=n_ctx, n_chunks=n_chunks, bos=bos,
                              progress=progress)[0]


def kl_divergence_many(base, quants: Sequence, tokens, *, n_ctx: int = 512,
                       n_chunks: int | None = None, bos: int | None = None,
                       progress: Callable[[int, int, float], None] | None = None
                       ) -> list[KLDResult]:
    """:func:`kl_divergence` of several quantized models against one base; the base runs once
    per chunk."""
    for q in quants:
        same_vocabulary(base.metadata, q.metadata, "kld")
        if base.args.n_vocab != q.args.n_vocab:
            raise BadArgument(f"the models have different vocabularies ({base.args.n_vocab} vs "
                              f"{q.args.n_vocab} tokens); KL divergence needs the same one")
    if len(tokens) < 2 * n_ctx:
        raise BadArgument(f"text gives {len(tokens)} tokens; a context of {n_ctx} needs at "
                          f"least {2 * n_ctx} (more text, or a smaller -c)")
    work = chunks(list(tokens), n_ctx, n_chunks, bos)
    first = n_ctx // 2
    rows = np.arange(first, n_ctx - 1)
    acc = [dict(kld=0.0, kld2=0.0, nll=0.0, same=0) for _ in quants]
    nll_b = 0.0
    count = 0
    for i, c in enumerate(work):
        lp_b = log_softmax(base.forward(c, base.new_cache(n_ctx), rows))  # (n, n_vocab)
        p_b = np.exp(lp_b)
        top_b = lp_b.argmax(-1)
        tgt = np.asarray(c[first + 1:n_ctx])
        idx = np.arange(len(tgt))
        nll_b -= float(lp_b[idx, tgt].sum())
        count += len(tgt)
        for q, a in zip(quants, acc):
            lp_q = log_softmax(q.forward(c, q.new_cache(n_ctx), rows))
            k = (p_b * (lp_b - lp_q)).sum(axis=-1)  # (n,)
            a["kld"] += float(k.sum())
            a["kld2"] += float((k * k).sum())
            a["same"] += int((top_b == lp_q.argmax(-1)).sum())
            a["nll"] -= float(lp_q[idx, tgt].sum())
        if progress is not None:
            progress(i + 1, len(work), acc[0]["kld"] / count)
    out = []
    for a in acc:
        mean = a["kld"] / count
        var = a["kld2"] / count - mean * mean
        err = math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0
        out.append(KLDResult(mean, err, a["same"] / count, math.exp(nll_b / count),
                             math.exp(a["nll"] / count), len(work), count))
    return out


# --- use by the converter ---------------------------------------------------------------------
def vectors_for(im: Imatrix, tensors: Mapping[str, int]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Importance vectors for ``tensors`` (name -> row length) and one warning line per problem:
    a missing entry or a wrong length means that tensor is quantized without one (llama.cpp
    does the same for missing entries)."""
    out: dict[str, np.ndarray] = {}
    missing, wrong = [], []
    for name, n_cols in tensors.items():
        v = im.importance(name)
        if v is None:
            missing.append(name)
        elif v.size != n_cols:
            wrong.append(f"{name} ({v.size} values, rows of {n_cols})")
        else:
            out[name] = v
    warnings = []
    if missing:
        warnings.append(f"imatrix has no entry for {len(missing)} tensor(s) ("
                        + ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
                        + "); quantizing them without one")
    if wrong:
        warnings.append(f"imatrix entries of the wrong length for {len(wrong)} tensor(s): "
                        + ", ".join(wrong[:3]) + (", ..." if len(wrong) > 3 else "")
                        + "; quantizing them without one")
    return out, warnings
