"""Write a GGUF file: streamed tensor by tensor, typed like llama.cpp expects, and atomic.

:class:`GGUFWriter` is a state machine over the file's sections and refuses calls out of order::

    HEADER --add_metadata--> METADATA --add_tensor_info--> TENSOR_INFOS
           --write_tensor_data--> DATA --finish--> DONE        (abort() from any state: ABORTED)

Metadata and tensor infos are small and collected in memory; the first ``write_tensor_data``
(or ``finish``) writes header, metadata, tensor infos and padding, then each tensor's bytes go
straight to disk, so peak memory is about one tensor.  Everything is written to an unnamed
file in the destination folder (:class:`blockq.outfile.AtomicFile`: ``O_TMPFILE``, else a
hidden temporary file), flushed, fsynced, then named and renamed over the destination: an
interrupted write, even by SIGKILL, leaves nothing, and never touches a file already there
until the rename.

:func:`write_gguf` drives the writer for the common case.  Like llama.cpp's quantizer it sets
``general.quantization_version`` (2) and ``general.file_type`` (the llama_ftype of the preset;
when not given, guessed from the most common type of the 2-D+ tensors as llama.cpp's loader
does), except that keys already present are kept as given and where they are.
"""
from __future__ import annotations

import enum
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import BadArgument, FormatError
from ..outfile import AtomicFile
from ..types import QType, qtype as _qtype
from .constants import (DEFAULT_ALIGNMENT, FILE_TYPE_OF_QTYPE, FLOAT_TYPES, GGUF_MAGIC,
                        INT64_MAX, INTEGER_TYPES, MAX_DIMS, MAX_NAME, QUANTIZATION_VERSION,
                        SCALAR_DTYPES, WRITE_VERSION, FileType, Keys, ValueType,
                        known_key_type)
from .reader import Field, Metadata, TensorInfo, Value

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FLOAT_QTYPES = ("F32", "F16", "BF16")


class WriterState(enum.IntEnum):
    HEADER = 0  # nothing added yet
    METADATA = 1  # adding metadata
    TENSOR_INFOS = 2  # adding tensor infos (metadata closed)
    DATA = 3  # header, metadata and infos are on disk; tensor data streaming in order
    DONE = 4  # renamed into place
    ABORTED = 5  # temporary file removed


# --- metadata typing and encoding -------------------------------------------------------------
def _int_type(v: int) -> ValueType:
    # NOTE: gguf-py types a bare int as INT32, but llama.cpp's loader wants UINT32 for nearly
    # every integer key (counts, lengths, token ids) and refuses a scalar of another type, so a
    # non-negative int that fits becomes UINT32.
    if 0 <= v < 1 << 32:
        return ValueType.UINT32
    if -(1 << 31) <= v < 0:
        return ValueType.INT32
    if -(1 << 63) <= v < 1 << 63:
        return ValueType.INT64
    if 0 <= v < 1 << 64:
        return ValueType.UINT64
    raise FormatError(f"integer {v} does not fit any GGUF integer type (64 bits at most)")


_DTYPE_TYPES = {d: t for t, d in SCALAR_DTYPES.items() if t is not ValueType.BOOL}


def _dtype_type(dt: np.dtype) -> ValueType | None:
    dt = np.dtype(dt)
    if dt.kind == "b":
        return ValueType.BOOL
    if dt.kind in "US" or dt == object:
        return ValueType.STRING
    if dt.kind == "f" and dt.itemsize < 4:
        return ValueType.FLOAT32
    return _DTYPE_TYPES.get(dt.newbyteorder("<") if dt.itemsize > 1 else dt)


def infer_type(value: Any) -> tuple[ValueType, ValueType | None]:
    """(type, element type) for a plain Python / numpy value, following gguf-py's conventions."""
    if isinstance(value, Value):
        return value.type, value.elem_type
    if isinstance(value, Field):
        return value.type, value.elem_type
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL, None
    if isinstance(value, np.generic):
        t = _dtype_type(value.dtype)
        if t is None or t is ValueType.STRING and not isinstance(value, (np.str_, np.bytes_)):
            raise BadArgument(f"no GGUF type for numpy {value.dtype} value {value!r}")
        return t, None
    if isinstance(value, int):
        return _int_type(value), None
    if isinstance(value, float):
        return ValueType.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return ValueType.STRING, None
    if isinstance(value, np.ndarray):
        t = _dtype_type(value.dtype)
        if t is None:
            raise BadArgument(f"no GGUF element type for a numpy array of {value.dtype}")
        return ValueType.ARRAY, t
    if isinstance(value, (list, tuple)):
        return ValueType.ARRAY, _infer_elem(value)
    raise BadArgument(f"no GGUF type for a {type(value).__name__} value {value!r:.60}; use "
                      f"str, int, float, bool, a list of them or blockq.gguf.Value")


def _infer_elem(items) -> ValueType:
    if len(items) == 0:
        raise FormatError("an empty list has no element type; pass "
                          "blockq.gguf.Value(ValueType.ARRAY, [], elem_type=...)")
    kinds = {infer_type(v)[0] for v in items}
    if kinds <= {ValueType.STRING}:
        return ValueType.STRING
    if kinds <= {ValueType.BOOL}:
        return ValueType.BOOL
    if kinds <= {ValueType.ARRAY}:
        return ValueType.ARRAY
    if kinds <= INTEGER_TYPES:
        # gguf-py's arrays of ints are INT32 (e.g. tokenizer.ggml.token_type)
        lo, hi = min(int(v) for v in items), max(int(v) for v in items)
        return ValueType.INT32 if -(1 << 31) <= lo and hi < 1 << 31 else \
            (ValueType.INT64 if lo < 0 or hi < 1 << 63 else ValueType.UINT64)
    if kinds <= INTEGER_TYPES | FLOAT_TYPES:
        return ValueType.FLOAT32
    raise FormatError(f"a GGUF array holds one type; got a list mixing "
                      f"{', '.join(sorted(k.name for k in kinds))}")


def _encode_scalar(vtype: ValueType, v: Any, what: str) -> bytes:
    if vtype is ValueType.STRING:
        if isinstance(v, (bytes, np.bytes_)):
            raw = bytes(v)
        elif isinstance(v, str):
            raw = v.encode("utf-8")
        else:
            raise FormatError(f"{what}: STRING needs str or bytes, got {type(v).__name__} "
                              f"{v!r:.60}")
        return _U64.pack(len(raw)) + raw
    dt = SCALAR_DTYPES[vtype]
    if vtype is ValueType.BOOL:
        if not isinstance(v, (bool, np.bool_)) and v not in (0, 1):
            raise FormatError(f"{what}: BOOL needs True/False, got {v!r:.60}")
        return b"\x01" if v else b"\x00"
    if vtype in INTEGER_TYPES:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise FormatError(f"{what}: {vtype.name} needs an integer, got "
                              f"{type(v).__name__} {v!r:.60}")
        info = np.iinfo(dt)
        if not info.min <= int(v) <= info.max:
            raise FormatError(f"{what}: {v} does not fit {vtype.name} "
                              f"({info.min}..{info.max})")
        return np.array(int(v), dtype=dt).tobytes()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise FormatError(f"{what}: {vtype.name} needs a number, got {type(v).__name__} "
                          f"{v!r:.60}")
    return np.array(v, dtype=dt).tobytes()


def _encode_array_body(elem: ValueType, items: Any, what: str) -> bytes:
    """Element type, count and elements (an ARRAY value without its tag)."""
    if isinstance(items, Value):
        if items.type is not ValueType.ARRAY:
            raise FormatError(f"{what}: an element of an array of arrays must be an ARRAY, "
                              f"got {items.type.name}")
        return _encode_array_body(items.elem_type or _infer_elem(items.value), items.value, what)
    if elem is ValueType.STRING:
        parts = []
        for j, s in enumerate(items):
            if isinstance(s, str):
                raw = s.encode("utf-8")
            elif isinstance(s, (bytes, np.bytes_)):
                raw = bytes(s)
            else:
                raise FormatError(f"{what}[{j}]: STRING needs str or bytes, got "
                                  f"{type(s).__name__} {s!r:.60}")
            parts.append(_U64.pack(len(raw)))
            parts.append(raw)
        return _U32.pack(elem) + _U64.pack(len(parts) // 2) + b"".join(parts)
    if elem is ValueType.ARRAY:
        bodies = []
        for j, inner in enumerate(items):
            if isinstance(inner, Value):
                bodies.append(_encode_array_body(elem, inner, f"{what}[{j}]"))
            else:
                bodies.append(_encode_array_body(infer_type(inner)[1] or _infer_elem(inner),
                                                 inner, f"{what}[{j}]"))
        return _U32.pack(elem) + _U64.pack(len(bodies)) + b"".join(bodies)
    dt = SCALAR_DTYPES[elem]
    a = np.asarray(items)
    if a.ndim != 1:
        raise FormatError(f"{what}: an ARRAY[{elem.name}] needs a flat sequence, got shape "
                          f"{a.shape}")
    if a.size:
        if elem is ValueType.BOOL:
            if a.dtype.kind != "b" and not np.isin(a, (0, 1)).all():
                raise FormatError(f"{what}: ARRAY[BOOL] needs True/False values")
        elif elem in INTEGER_TYPES:
            if a.dtype.kind not in "iu":
                raise FormatError(f"{what}: ARRAY[{elem.name}] needs integers, got {a.dtype}")
            info = np.iinfo(dt)
            lo, hi = int(a.min()), int(a.max())
            if lo < info.min or hi > info.max:
                raise FormatError(f"{what}: values {lo}..{hi} do not fit {elem.name} "
                                  f"({info.min}..{info.max})")
        elif a.dtype.kind not in "iuf":
            raise FormatError(f"{what}: ARRAY[{elem.name}] needs numbers, got {a.dtype}")
    return _U32.pack(elem) + _U64.pack(a.size) + a.astype(dt, copy=False).tobytes()


def encode_value(key: str, value: Any, vtype: ValueType | None = None,
                 elem: ValueType | None = None, arch: str | None = None
                 ) -> tuple[ValueType, bytes]:
    """(GGUF type, encoded value bytes after the type tag) for one metadata value.

    Type precedence: a reader ``Field`` is copied byte for byte; a ``Value`` or explicit
    ``vtype`` is used as given; a key llama.cpp knows (constants.KEY_TYPES) gets its type;
    anything else is inferred from the Python value (:func:`infer_type`).
    """
    if isinstance(value, Field):
        return value.type, value.raw
    if isinstance(value, Value):
        vtype, elem, value = value.type, value.elem_type, value.value
    elif vtype is None:
        known = known_key_type(key, arch)
        if known is not None:
            vtype, elem = known
            if vtype is not ValueType.ARRAY and isinstance(value, (list, tuple, np.ndarray)):
                vtype, elem = ValueType.ARRAY, vtype  # a per-layer list for a scalar key
        else:
            vtype, elem = infer_type(value)
    vtype = ValueType(vtype)
    if vtype is ValueType.ARRAY:
        if elem is None:
            elem = infer_type(value)[1] if isinstance(value, np.ndarray) else _infer_elem(value)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise FormatError(f"metadata {key}: ARRAY[{ValueType(elem).name}] needs a "
                              f"sequence, got {type(value).__name__} {value!r:.60}")
        return vtype, _encode_array_body(ValueType(elem), value, f"metadata {key}")
    return vtype, _encode_scalar(vtype, value, f"metadata {key}")


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _U64.pack(len(raw)) + raw


# --- the writer -------------------------------------------------------------------------------
class GGUFWriter:
    """Write one GGUF file in the order header -> metadata -> tensor infos -> data.

    ``path``: destination (its folder must exist).  ``alignment``: data alignment (default:
    ``general.alignment`` from the metadata, else 32).  ``file_type``: llama_ftype to store in
    ``general.file_type`` (default: keep the metadata's, else guess from the tensor types).
    ``arch``: architecture used to type ``{arch}.*`` keys (default: ``general.architecture``
    once added).  Use as a context manager: an exception inside aborts and removes the
    temporary file; a clean exit calls :meth:`finish`.
    """

    def __init__(self, path, *, alignment: int | None = None, file_type: int | None = None,
                 arch: str | None = None):
        self.path = Path(os.fspath(path))
        self.state = WriterState.HEADER
        self._alignment_arg = alignment
        if alignment is not None:
            self._check_alignment(alignment, "alignment")
        if file_type is not None and not (isinstance(file_type, (int, np.integer))
                                          and 0 <= file_type < 1 << 32):
            raise BadArgument(f"file_type {file_type!r} must be a llama_ftype number, e.g. "
                              f"{FileType.MOSTLY_Q4_K_M.value} for Q4_K_M")
        self._file_type = None if file_type is None else int(file_type)
        self._arch = arch
        self._kv: dict[str, tuple[ValueType, bytes]] = {}
        self._infos: list[tuple[str, QType, tuple[int, ...], int]] = []  # name, type, shape, nbytes
        self._names: set[str] = set()
        self._offsets: list[int] = []
        self._next = 0  # index of the next tensor whose data is due
        self._fh = None
        self.alignment = alignment or DEFAULT_ALIGNMENT

    # -- state machine --
    def _advance(self, target: WriterState, call: str) -> None:
        if self.state in (WriterState.DONE, WriterState.ABORTED):
            raise BadArgument(f"GGUFWriter for {self.path}: {call}() after the writer is "
                              f"{self.state.name}; start a new writer")
        if self.state > target:
            raise BadArgument(f"GGUFWriter for {self.path}: {call}() in state "
                              f"{self.state.name}; a GGUF file is written header -> metadata "
                              f"-> tensor infos -> data, so {call}() must come before any "
                              f"{self.state.name.lower().replace('_', ' ')} call")
        self.state = target

    @staticmethod
    def _check_alignment(a, what: str) -> None:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a <= 0 or a & (a - 1) \
                or a >= 1 << 32:
            raise FormatError(f"{what} {a!r} is not valid: it must be a power of two that fits "
                              f"UINT32 (default {DEFAULT_ALIGNMENT})")

    # -- metadata --
    def add_metadata(self, key: str, value: Any, vtype: ValueType | None = None,
                     elem_type: ValueType | None = None) -> None:
        """Add one key.  ``value``: plain Python/numpy, a ``Value``, or a reader ``Field``."""
        self._advance(WriterState.METADATA, "add_metadata")
        if not isinstance(key, str) or not key:
            raise FormatError(f"metadata key {key!r}: keys are non-empty strings")
        if key in self._kv:
            raise FormatError(f"metadata key {key!r} added twice; GGUF keys are unique")
        if key == Keys.General.ARCHITECTURE and self._arch is None:
            v = value.value if isinstance(value, (Value, Field)) else value
            self._arch = v if isinstance(v, str) else None
        t, raw = encode_value(key, value, vtype, elem_type, self._arch)
        if key == Keys.General.ALIGNMENT:
            if t is not ValueType.UINT32:
                raise FormatError(f"metadata {key} must be UINT32, got {t.name}")
            a = _U32.unpack(raw)[0]
            self._check_alignment(a, key)
            if self._alignment_arg is not None and a != self._alignment_arg:
                raise BadArgument(f"alignment={self._alignment_arg} disagrees with the "
                                  f"metadata's {key}={a}; give one of them")
            self.alignment = a
        self._kv[key] = (t, raw)

    # -- tensor infos --
    def add_tensor_info(self, name: str, qtype: "str | int | QType", shape) -> None:
        """Declare the next tensor: ``shape`` in numpy order (outermost first)."""
        self._advance(WriterState.TENSOR_INFOS, "add_tensor_info")
        t = _qtype(qtype)
        if not isinstance(name, str):
            raise BadArgument(f"tensor name must be a str, got {type(name).__name__}")
        n_bytes = len(name.encode("utf-8"))
        if not 0 < n_bytes < MAX_NAME:
            raise FormatError(f"tensor name {name!r} is {n_bytes} bytes; llama.cpp needs "
                              f"1..{MAX_NAME - 1}")
        if name in self._names:
            raise FormatError(f"tensor {name!r} added twice; tensor names are unique")
        try:
            shape = tuple(int(d) for d in shape)
        except TypeError:
            raise BadArgument(f"tensor {name}: shape must be a sequence of ints, got "
                              f"{shape!r}") from None
        if not 1 <= len(shape) <= MAX_DIMS or min(shape) < 1:
            raise FormatError(f"tensor {name}: shape {shape} must have 1..{MAX_DIMS} "
                              f"dimensions, each at least 1")
        n = 1
        for d in shape:
            n *= d
        if n > INT64_MAX:
            raise FormatError(f"tensor {name}: shape {shape} has {n} elements, more than int64")
        if shape[-1] % t.block_size:
            raise FormatError(f"tensor {name}: rows of {shape[-1]} weights (last dimension of "
                              f"{shape}) are not whole {t.name} blocks of {t.block_size}")
        self._names.add(name)
        self._infos.append((name, t, shape, n // t.block_size * t.type_size))

    # -- data --
    def write_tensor_data(self, data, name: str | None = None) -> None:
        """Write the next tensor's data (in the order the infos were added).

        ``data``: uint8 bytes/array of the encoded tensor, a float array for F32/F16/BF16, or a
        zero-argument callable returning one of those (called now).
        """
        self._advance(WriterState.DATA, "write_tensor_data")
        if self._fh is None:
            self._begin()
        if self._next >= len(self._infos):
            raise BadArgument(f"GGUFWriter for {self.path}: write_tensor_data() called "
                              f"{self._next + 1} times but only {len(self._infos)} tensor "
                              f"infos were added")
        tname, t, shape, nbytes = self._infos[self._next]
        if name is not None and name != tname:
            raise BadArgument(f"write_tensor_data({name!r}): the next tensor due is {tname!r} "
                              f"(data comes in the order of add_tensor_info)")
        if callable(data):
            data = data()
        buf = _tensor_bytes(tname, t, shape, nbytes, data)
        self._fh.write(buf)
        self._fh.write(b"\0" * (-nbytes % self.alignment))
        self._next += 1

    def finish(self) -> Path:
        """Write what remains, flush, fsync and rename into place.  Returns the path."""
        self._advance(WriterState.DATA, "finish")
        if self._fh is None:
            self._begin()
        if self._next != len(self._infos):
            raise BadArgument(f"GGUFWriter for {self.path}: finish() after data for "
                              f"{self._next} of {len(self._infos)} tensors; the next due is "
                              f"{self._infos[self._next][0]!r}")
        fh, self._fh = self._fh, None
        fh.commit()
        self.state = WriterState.DONE
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; the destination is left as it was."""
        if self.state is WriterState.DONE:
            return
        self.state = WriterState.ABORTED
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.discard()

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.state not in (WriterState.DONE, WriterState.ABORTED):
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise

    def __del__(self):
        if getattr(self, "_fh", None) is not None:
            self.abort()

    # -- header, metadata and infos, all at once --
    def _final_metadata(self) -> dict[str, tuple[ValueType, bytes]]:
        kv = dict(self._kv)
        gen = Keys.General
        if self._alignment_arg not in (None, DEFAULT_ALIGNMENT) and gen.ALIGNMENT not in kv:
            kv[gen.ALIGNMENT] = (ValueType.UINT32, _U32.pack(self.alignment))
        if gen.QUANTIZATION_VERSION not in kv:
            kv[gen.QUANTIZATION_VERSION] = (ValueType.UINT32, _U32.pack(QUANTIZATION_VERSION))
        if self._file_type is not None:
            kv[gen.FILE_TYPE] = (ValueType.UINT32, _U32.pack(self._file_type))  # in place
        elif gen.FILE_TYPE not in kv:
            kv[gen.FILE_TYPE] = (ValueType.UINT32, _U32.pack(guess_file_type(
                (t.name, shape) for _, t, shape, _ in self._infos)))
        return kv

    def _begin(self) -> None:
        kv = self._final_metadata()
        parts = [GGUF_MAGIC, _U32.pack(WRITE_VERSION), _U64.pack(len(self._infos)),
                 _U64.pack(len(kv))]
        for key, (t, raw) in kv.items():
            parts += [_encode_string(key), _U32.pack(t), raw]
        offset = 0
        for name, t, shape, nbytes in self._infos:
            parts += [_encode_string(name), _U32.pack(len(shape)),
                      struct.pack(f"<{len(shape)}Q", *reversed(shape)), _U32.pack(t.id),
                      _U64.pack(offset)]
            self._offsets.append(offset)
            offset += nbytes + (-nbytes % self.alignment)
        head = b"".join(parts)
        head += b"\0" * (-len(head) % self.alignment)
        self._fh = AtomicFile(self.path)
        self._fh.write(head)


def guess_file_type(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> int:
    """llama_ftype for ``(type name, shape)`` pairs: the most common type among 2-D+ tensors.

    NOTE: like llama.cpp's loader, a tie goes to the type that reached the top count first, and
    a type without a preset (or no 2-D tensor at all) gives ALL_F32.
    """
    counts: Counter[str] = Counter()
    best, best_n = None, 0
    for name, shape in tensors:
        if len(shape) < 2:
            continue
        counts[name] += 1
        if counts[name] > best_n:
            best, best_n = name, counts[name]
    return int(FILE_TYPE_OF_QTYPE.get(best, FileType.ALL_F32))


def _tensor_bytes(name: str, t: QType, shape: tuple[int, ...], nbytes: int, data):
    """The encoded bytes of one tensor as a flat uint8 buffer of exactly ``nbytes``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        got = len(buf)
    elif isinstance(data, np.ndarray):
        if data.dtype.kind == "f":
            if t.name not in _FLOAT_QTYPES:
                raise BadArgument(f"tensor {name} is {t.name}: pass its encoded bytes "
                                  f"(blockq.quantize(x, {t.name!r})), not {data.dtype} values")
            n = nbytes // t.type_size
            if data.size != n:
                raise FormatError(f"tensor {name}: {data.size} float values for shape {shape} "
                                  f"({n} weights)")
            from ..quantize import row_quantizer  # F32/F16/BF16 conversion, as ggml rounds
            x = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, shape[-1])
            out = np.empty((x.shape[0], shape[-1] * t.type_size), dtype=np.uint8)
            row_quantizer(t.name)(x, None, out)
            return out
        if data.dtype != np.uint8 and data.dtype != t.dtype:
            raise BadArgument(f"tensor {name}: data must be uint8 bytes of the encoded tensor "
                              f"(or floats for F32/F16/BF16), got {data.dtype}")
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        got = buf.size
    else:
        raise BadArgument(f"tensor {name}: data must be bytes, a numpy array or a callable "
                          f"returning one, got {type(data).__name__}")
    if got != nbytes:
        raise FormatError(f"tensor {name}: got {got} bytes of data but {t.name} of shape "
                          f"{shape} takes {nbytes} bytes")
    return buf


def write_gguf(path, metadata: Mapping[str, Any], tensors: Iterable, *,
               alignment: int | None = None, file_type: int | None = None) -> Path:
    """Write a GGUF file atomically; returns its path.

    ``metadata``: a reader's ``Metadata`` (copied byte for byte, types and order kept), or a
    dict key -> value where a value is plain Python/numpy (typed by the table of llama.cpp keys,
    else inferred), a ``Value`` (explicit type) or a reader ``Field`` (copied as stored).

    ``tensors``: items ``(name, qtype, shape, data)`` with ``shape`` in numpy order and ``data``
    the encoded uint8 bytes (floats allowed for F32/F16/BF16) or a zero-argument callable
    returning them; reader ``TensorInfo`` items are copied.  The infos of all items are needed
    before the first byte of data, so ``tensors`` is listed first; to keep peak memory at about
    one tensor, give callables (they are called one at a time, in order, and each result is
    dropped once written) or reader tensors (mapped, not loaded).

    Tensors are placed in the given order, each at the next multiple of the alignment, exactly
    as llama.cpp lays them out, so rewriting a llama.cpp file reproduces it byte for byte.
    """
    fields = metadata.fields() if isinstance(metadata, Metadata) else metadata
    arch = fields.get(Keys.General.ARCHITECTURE)
    arch = arch.value if isinstance(arch, (Value, Field)) else arch
    w = GGUFWriter(path, alignment=alignment, file_type=file_type,
                   arch=arch if isinstance(arch, str) else None)
    try:
        for key, value in fields.items():
            w.add_metadata(key, value)
        sources: list = []
        for item in tensors:
            if isinstance(item, TensorInfo):
                w.add_tensor_info(item.name, item.type, item.shape)
                sources.append(lambda item=item: item.data)
            else:
                try:
                    name, qt, shape, data = item
                except (TypeError, ValueError):
                    raise BadArgument(f"each tensor is (name, qtype, shape, data) or a reader "
                                      f"TensorInfo, got {item!r:.80}") from None
                w.add_tensor_info(name, qt, shape)
                sources.append(data)
        for i in range(len(sources)):
            data, sources[i] = sources[i], None  # drop each tensor once written
            w.write_tensor_data(data)
            del data
        return w.finish()
    except BaseException:
        w.abort()
        raise
