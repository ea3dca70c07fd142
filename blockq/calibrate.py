"""Calibration statistics beyond the diagonal: the input Hessian ``H = X^T X`` of every matrix.

One pass of blockq's runtime over a text (chunked exactly like ``blockq imatrix``) sums, for each
*distinct* matrix input, ``X^T X`` over all tokens (``X`` (n_tokens, n_in)).  Matrices that read
the same activations share one sum: q/k/v read the attention norm's output, gate/up the FFN
norm's; a tied output head reads the final norm's.  The diagonal of a sum divided by its token
count is exactly llama-imatrix's importance vector, so one calibration serves both the
importance-weighted searches and error-compensated rounding (:mod:`blockq.quantize.gptq`).

Side file (``formats/hessian.md``): a GGUF file with ``general.type = "hessian"``; per distinct
input one F32 tensor ``<first weight>.hessian`` of shape (n_in, n_in) holding the sum of
``x x^T``, the key ``hessian.count.<first weight>`` (tokens summed) and the string array
``hessian.users.<first weight>`` (every weight that reads that input).

The pass runs layer by layer: every chunk's hidden state (n_ctx * n_embd floats per chunk)
goes through block 0, then block 1, ...; when a block is done its inputs' sums are complete and
are moved to a temporary folder on disk (:class:`SpilledSums`), so memory holds the model, the
chunks' hidden states and one block's sums.  On disk, and in the side file, the sums take
4 * n_layer * (3 * n_embd^2 + n_ff^2) bytes for a llama-shaped model (SmolLM2-135M: 0.40 GB;
the synthetic 0.56 B (2048/5632, 8 layers): 1.4 GB; a 1 B Llama (2048/8192, 16 layers):
4.6 GB; an 8 B Llama (4096/14336, 32 layers): 32 GB of disk, one block's 1 GB in memory).
Reading a side file is lazy too: each sum is read from the file when a conversion asks for it.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from .errors import BadArgument, FormatError

GENERAL_TYPE = "general.type"
KIND = "hessian"
SUFFIX = ".hessian"
COUNT = "hessian.count."
USERS = "hessian.users."
DATASETS = "hessian.datasets"
CHUNK_SIZE = "hessian.chunk_size"
CHUNK_COUNT = "hessian.chunk_count"
RANDOM_DATASET = "random tokens"  # dataset name prefix of data-free calibration
MIN_BATCH = 16  # like llama-imatrix, products over fewer tokens are not counted
HEAD_ROWS = 32  # rows per output-head product in calibration (>= MIN_BATCH)


class SpilledSums(Mapping):
    """group -> float32 (n_in, n_in) sum, kept on disk and read when asked for.

    Each lookup reads the array into fresh memory (not a memory map, whose pages would stay
    resident); the caller drops it when done.  Diagonals are kept in memory (importance vectors
    need only them).  Arrays come from a private temporary folder (:meth:`put`, removed with
    this object) or from a side file's data (:meth:`put_file`)."""

    def __init__(self):
        self._where: dict[str, tuple[str, int, int]] = {}  # group -> (path, offset, n)
        self.diagonals: dict[str, np.ndarray] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    def put(self, g: str, a: np.ndarray) -> None:
        """Write ``a`` (n, n) float32 to the temporary folder."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="blockq-hessians-")
        path = os.path.join(self._tmp.name, f"{len(self._where)}.f32")
        a = np.ascontiguousarray(a, dtype=np.float32)
        a.tofile(path)
        self._where[g] = (path, 0, a.shape[0])
        self.diagonals[g] = np.diag(a).copy()

    def put_file(self, g: str, path: str, offset: int, n: int, diagonal: np.ndarray) -> None:
        """An (n, n) little-endian float32 array at ``offset`` of ``path``."""
        self._where[g] = (str(path), int(offset), int(n))
        self.diagonals[g] = diagonal

    def shape(self, g: str) -> tuple[int, int]:
        n = self._where[g][2]
        return (n, n)

    def __getitem__(self, g: str) -> np.ndarray:
        path, offset, n = self._where[g]
        a = np.fromfile(path, dtype="<f4", count=n * n, offset=offset)
        if a.size != n * n:
            raise FormatError(f"{path}: the Hessian of {g} is cut short (the file changed?)")
        return a.astype(np.float32, copy=False).reshape(n, n)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Remove the temporary folder now (it is removed with the object otherwise)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._where.clear()
        self.diagonals.clear()


@dataclass
class Hessians:
    """Sums of ``x x^T`` per distinct matrix input, and which weights read each input."""

    sums: Mapping[str, np.ndarray]  # group (its first weight) -> float32 (n_in, n_in)
    counts: dict[str, int]  # group -> tokens summed
    users: dict[str, list[str]]  # group -> weight names reading that input
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = 0
    chunk_count: int = 0
    _mean: tuple = field(default=(None, None), repr=False, compare=False)

    @property
    def data_free(self) -> bool:
        """Collected on random token ids (:func:`calibrate_random`), not on text."""
        return bool(self.datasets) and all(d.startswith(RANDOM_DATASET) for d in self.datasets)

    def group_of(self, weight: str) -> str | None:
        for g, names in self.users.items():
            if weight in names:
                return g
        return None

    def hessian(self, weight: str) -> np.ndarray | None:
        """The mean ``E[x x^T]`` (float64) of the input of ``weight``, or None.  The weights
        of one input get the very same array (the last one asked for is kept)."""
        g = self.group_of(weight)
        if g is None or not self.counts.get(g):
            return None
        if self._mean[0] != g:
            self._mean = (g, self.sums[g].astype(np.float64) / self.counts[g])
        return self._mean[1]

    def importance(self, weight: str) -> np.ndarray | None:
        """llama-imatrix's importance vector (mean squared input per column), float32."""
        g = self.group_of(weight)
        if g is None or not self.counts.get(g):
            return None
        diag = getattr(self.sums, "diagonals", {}).get(g)
        if diag is None:
            diag = np.diag(self.sums[g])
        return (diag.astype(np.float64) / self.counts[g]).astype(np.float32)

    @property
    def weights(self) -> list[str]:
        return sorted(n for names in self.users.values() for n in names)

    def shape(self, g: str) -> tuple[int, int]:
        s = self.sums
        return s.shape(g) if isinstance(s, SpilledSums) else s[g].shape

    def nbytes(self) -> int:
        """Bytes of all sums (float32), wherever they are kept."""
        return sum(4 * math.prod(self.shape(g)) for g in self.sums)


def _fingerprint(x: np.ndarray) -> tuple:
    """Shape and a few values: tells a reused buffer with new contents from the same input."""
    return (x.shape, float(x[0, :8].sum()), float(x[-1, -8:].sum()), float(x[x.shape[0] // 2].sum()))


class HessianCollector:
    """``add(weight, x)`` with ``x`` (n_tokens, n_in) the input of ``weight``.

    Consecutive calls with the very same array (q, k, v after one norm) are one input: its
    ``x^T x`` is summed once and the weights are recorded as its users.
    """

    def __init__(self, chunk_size: int, wanted: Callable[[str], bool] | None = None):
        self.chunk_size = chunk_size
        self.wanted = wanted or (lambda n: n.startswith("blk.") or n == "output.weight")
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.users: dict[str, list[str]] = {}
        self._group_of: dict[str, str] = {}
        self._last: tuple[tuple, str] | None = None  # (fingerprint of the last input, group)
        self._last_ref = None

    def add(self, name: str, x: np.ndarray) -> None:
        from .imatrix import accumulate

        if not self.wanted(name) or x.shape[0] < MIN_BATCH:
            return
        print_ = _fingerprint(x)
        g = self._group_of.get(name)
        if self._last is not None and self._last_ref is x and self._last[0] == print_ \
                and (g is None or g == self._last[1]):
            g = self._last[1]  # the same activations as the previous matrix: one input
            if self._group_of.get(name) is None:
                self._group_of[name] = g
                self.users[g].append(name)
            return
        if g is None:
            g = self._group_of[name] = name
            self.users[g] = [name]
        a = np.ascontiguousarray(x, dtype=np.float32)  # (n_tokens, n_in)
        xtx = a.T @ a  # (n_in, n_in)
        if not np.isfinite(xtx).all():
            raise BadArgument(f"non-finite activations entering {name}; the model overflows on "
                              "this text")
        accumulate(self.sums, self.counts, g, name, xtx, a.shape[0])
        self._last, self._last_ref = (print_, g), x

    def spill(self, into: SpilledSums) -> None:
        """Move every sum collected so far to disk (their inputs will not be seen again)."""
        for g in list(self.sums):
            into.put(g, self.sums.pop(g))
        self._last = self._last_ref = None

    def result(self, datasets: Iterable[str] = (), sums: Mapping | None = None) -> Hessians:
        n = max(self.counts.values(), default=0)
        return Hessians(self.sums if sums is None else sums, self.counts, self.users,
                        list(datasets), self.chunk_size,
                        n // self.chunk_size if self.chunk_size else 0)


def calibrate(model, tokenizer, text: str, *, n_ctx: int = 512, n_chunks: int | None = None,
              dataset: str = "", progress: Callable[[int, int, float], None] | None = None
              ) -> Hessians:
    """Run ``model`` over ``text`` in chunks of ``n_ctx`` tokens and sum every input's ``x x^T``.

    Needs at least two chunks of text (as ``blockq imatrix``).  ``progress(done, total, ppl)``
    is called after each block of each chunk (``total`` = chunks * (layers + 1)); ``ppl``, the
    perplexity over the second halves of the chunks, is NaN until the output head has run.
    """
    from .imatrix import text_chunks

    work = text_chunks(tokenizer, text, n_ctx, n_chunks)
    return _run(model, work, n_ctx, [dataset] if dataset else [], progress)


def calibrate_random(model, tokenizer=None, *, n_ctx: int = 512, n_chunks: int = 8,
                     seed: int = 0, progress: Callable[[int, int, float], None] | None = None
                     ) -> Hessians:
    """Calibration without any text: chunks of token ids drawn uniformly from the vocabulary
    (seeded, so a conversion is reproducible).  The model's own activations on them still show
    which input channels are loud and how they correlate, which is what the Hessians need."""
    if n_chunks < 1 or n_ctx < MIN_BATCH:
        raise BadArgument(f"random calibration needs >= 1 chunk of >= {MIN_BATCH} tokens")
    rng = np.random.default_rng(seed)
    n_vocab = int(model.args.n_vocab)
    bos = getattr(tokenizer, "bos_id", None) if getattr(tokenizer, "add_bos", False) else None
    work = []
    for _ in range(n_chunks):
        c = rng.integers(0, n_vocab, n_ctx).tolist()
        if bos is not None:
            c[0] = bos
        work.append(c)
    return _run(model, work, n_ctx, [f"{RANDOM_DATASET} (seed {seed})"], progress)


def _run(model, work: list[list[int]], n_ctx: int, datasets: list[str], progress) -> Hessians:
    """Every chunk through block 0, then block 1, ... with the collector observing each matrix
    input; a finished block's sums go to disk.  The arithmetic is the forward pass's own (the
    same blocks and operations, on the CPU), so the sums equal those of whole forwards (the
    head's up to float summation order: it runs in slabs of ``HEAD_ROWS`` rows)."""
    from .api import _set_blas_threads
    from .imatrix import log_softmax
    from .model import Step
    from .ops import Observed

    if model.device is not None:
        raise BadArgument("calibration runs on the CPU; load the model without GPU layers")
    _set_blas_threads(1)  # OpenBLAS workers fighting Numba's made a chunk 5x slower
    col = HessianCollector(n_ctx)
    sums = SpilledSums()
    ops = Observed(model.ops, col.add)
    cache = model.new_cache(max(len(c) for c in work))
    xs = [model.embed(c, model.ops) for c in work]  # (n_ctx, n_embd) per chunk
    total, done = len(work) * (model.args.n_layer + 1), 0
    for il, block in enumerate(model.blk):
        for j, c in enumerate(work):
            xs[j] = block(ops, xs[j], il, Step(model, 0, len(c), cache, None))
            done += 1
            if progress is not None:
                progress(done, total, math.nan)
        col.spill(sums)
    nll, count = 0.0, 0
    for j, c in enumerate(work):
        first = len(c) // 2  # positions first..n-2 are scored (their next token is known)
        # in slabs of rows: a 262k vocabulary makes one chunk's logits 0.5 GB (2 GB as the
        # float64 log-probabilities); every slab still passes the head's observed input
        cuts = list(range(0, len(c) - MIN_BATCH, HEAD_ROWS))[1:]  # no slab under MIN_BATCH
        for r0, r1 in zip([0] + cuts, cuts + [len(c)]):
            logits = ops.to_host(model.head(xs[j][r0:r1], ops))  # (r1 - r0, n_vocab)
            lo, hi = max(r0, first), min(r1, len(c) - 1)
            if lo < hi:
                lp = log_softmax(logits[lo - r0:hi - r0])
                tgt = np.asarray(c[lo + 1:hi + 1])
                nll -= float(lp[np.arange(len(tgt)), tgt].sum())
                count += len(tgt)
            del logits
        xs[j] = None
        done += 1
        if progress is not None:
            progress(done, total, math.exp(nll / count))
    col.spill(sums)
    return col.result(datasets, sums)


def _tied_output(h: Hessians, tensors: Iterable[str]) -> None:
    """A model without ``output.weight`` multiplies by ``token_embd.weight``: the head's input
    statistics belong to the embedding matrix then."""
    names = set(tensors)
    if "output.weight" not in names and "token_embd.weight" in names:
        for g, users in h.users.items():
            if "output.weight" in users:
                users.append("token_embd.weight")


def for_tensors(h: Hessians, tensors: Iterable[str]) -> Hessians:
    """``h`` with the tied-head alias added for a file holding ``tensors``."""
    _tied_output(h, tensors)
    return h


# --- side file ------------------------------------------------------------------------------
def write_hessians(path, h: Hessians) -> Path:
    """Write ``h`` as a GGUF side file (atomically)."""
    from .gguf.constants import ValueType
    from .gguf.reader import Value
    from .gguf.writer import write_gguf

    md: dict = {GENERAL_TYPE: KIND,
                DATASETS: Value(ValueType.ARRAY, list(h.datasets), elem_type=ValueType.STRING),
                CHUNK_SIZE: Value(ValueType.UINT32, int(h.chunk_size)),
                CHUNK_COUNT: Value(ValueType.UINT32, int(h.chunk_count))}
    tensors = []
    for g in sorted(h.sums):
        md[COUNT + g] = Value(ValueType.UINT64, int(h.counts[g]))
        md[USERS + g] = Value(ValueType.ARRAY, list(h.users[g]), elem_type=ValueType.STRING)
        tensors.append((g + SUFFIX, "F32", h.shape(g),  # read one at a time, when written
                        lambda g=g: np.ascontiguousarray(h.sums[g], dtype=np.float32)))
    return write_gguf(path, md, tensors)


def read_hessians(path) -> Hessians:
    """Open a side file written by :func:`write_hessians`.  Every value is checked here, one
    tensor at a time; the sums stay in the file and are read again when a conversion asks for
    one (so a side file larger than memory can still be used)."""
    from .gguf.reader import read_gguf

    path = Path(path)
    if not path.is_file():
        raise BadArgument(f"calibration file {path} does not exist")
    sums, counts, users = SpilledSums(), {}, {}
    with read_gguf(path) as f:
        md = f.metadata
        if md.get(GENERAL_TYPE) != KIND:
            raise FormatError(f"{path}: general.type is {md.get(GENERAL_TYPE)!r}, not "
                              f"{KIND!r} (write one with 'blockq calibrate')")
        for name, t in f.tensors.items():
            if not name.endswith(SUFFIX):
                continue
            g = name[:-len(SUFFIX)]
            if t.qtype != "F32" or len(t.shape) != 2 or t.shape[0] != t.shape[1]:
                raise FormatError(f"{path}: {name} is {t.qtype} {tuple(t.shape)}; a Hessian is "
                                  "a square F32 matrix")
            n = md.get(COUNT + g)
            u = md.get(USERS + g)
            if n is None or u is None:
                raise FormatError(f"{path}: {name} has no {COUNT + g} / {USERS + g} key")
            if int(n) < 1:
                raise FormatError(f"{path}: {COUNT + g} is {int(n)}; it counts tokens, >= 1")
            k = int(t.shape[0])
            sums.put_file(g, str(path), t.offset, k, np.zeros(k, np.float32))
            a = sums[g]  # read once (not through the map: its pages would stay resident)
            if not np.isfinite(a).all():
                raise FormatError(f"{path}: {name} has {int((~np.isfinite(a)).sum())} NaN/inf "
                                  "entries; recalibrate")
            diag = np.diag(a).copy()
            del a
            if (diag < 0).any():
                raise FormatError(f"{path}: {name} has negative diagonal entries (sums of "
                                  "squares are >= 0)")
            sums.diagonals[g] = diag
            counts[g], users[g] = int(n), [str(x) for x in u]
        if not len(sums):
            raise FormatError(f"{path}: no '<weight>{SUFFIX}' tensors")
        return Hessians(sums, counts, users, [str(d) for d in md.get(DATASETS, [])],
                        int(md.get(CHUNK_SIZE, 0)), int(md.get(CHUNK_COUNT, 0)))


def importance_vectors(h: Hessians, names: Mapping[str, int] | Iterable[str]) -> dict[str, np.ndarray]:
    """Importance vectors for the given weight names (those the calibration saw)."""
    out = {}
    for n in names:
        v = h.importance(n)
        if v is not None:
            out[n] = v
    return out
