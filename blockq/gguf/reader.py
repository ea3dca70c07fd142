"""Read a GGUF file: memory-mapped, zero-copy, lazy, and strict about what it accepts.

Opening a file walks the header, the metadata records and the tensor infos once, checking every
count and length against the bytes that remain *before* anything is allocated, so no input can
make the reader allocate more than the file holds.  Values are not decoded while opening: a
262,144-entry vocabulary is only stepped over (its string lengths are read, nothing else) and is
decoded the first time ``metadata[key]`` asks for it.  Tensor data is never copied: ``.data``
is a read-only uint8 view of the mapped file.

Layout (all little-endian; ``formats/gguf.md`` is the normative description)::

    header       "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count ×   key: u64 length + UTF-8 bytes | value type u32 | value
    tensor_count × name: u64 length + bytes | n_dims u32 | dims u64[n_dims] | type u32 | offset u64
    padding      zeros up to a multiple of general.alignment (default 32)
    data         each tensor at data_offset + offset, each start a multiple of the alignment

Every problem raises :class:`blockq.errors.FormatError` naming the file, the byte offset and
what is wrong.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import numpy as np

from .. import sigbus
from ..errors import BadArgument, FormatError
from ..types import BY_ID, QType, undecodable
from .constants import (DEFAULT_ALIGNMENT, GGUF_MAGIC, HEADER_BYTES, INT64_MAX, MAX_DIMS,
                        MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES, OTHER_GGML_TYPES, READ_VERSIONS,
                        SCALAR_DTYPES, Keys, ValueType, type_label)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STRUCT_CODES = {"u1": "B", "i1": "b", "u2": "H", "i2": "h", "u4": "I", "i4": "i", "f4": "f",
                 "u8": "Q", "i8": "q", "f8": "d"}
_SCALAR_STRUCTS = {t: struct.Struct("<" + _STRUCT_CODES[f"{d.kind}{d.itemsize}"])
                   for t, d in SCALAR_DTYPES.items()}
_SCALAR_SIZES = {t: d.itemsize for t, d in SCALAR_DTYPES.items()}
MAX_ARRAY_NESTING = 8  # arrays of arrays: GGUF allows them (llama.cpp refuses them); cap the depth
_TRUNCATED = "truncated download?"


def format_error(name: str, offset: int, message: str) -> FormatError:
    """A FormatError for ``name`` whose message says ``message`` (which names ``offset``)."""
    err = FormatError(f"{name}: {message}")
    err.file = name
    err.offset = offset
    return err


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Value:
    """A metadata value with its GGUF type, for writing exactly the type you mean.

    ``elem_type`` is the element type of an ARRAY.  An array of arrays holds ``Value`` items.
    """
    type: ValueType
    value: Any
    elem_type: ValueType | None = None

    def __post_init__(self):
        object.__setattr__(self, "type", ValueType(self.type))
        if self.elem_type is not None:
            object.__setattr__(self, "elem_type", ValueType(self.elem_type))


@dataclass(frozen=True, eq=False)
class Field:
    """Where one metadata record sits in the file and what type it holds (value decoded lazily)."""
    key: str
    type: ValueType
    elem_type: ValueType | None  # element type of an ARRAY, else None
    count: int | None  # number of elements of an ARRAY, else None
    offset: int  # first byte of the record (its key length)
    value_offset: int  # first byte after the value-type tag
    end: int  # one past the last byte of the value
    _file: "GGUFFile" = field(repr=False)

    @property
    def label(self) -> str:
        """``"UINT32"`` or ``"ARRAY[STRING]"``."""
        return type_label(self.type, self.elem_type)

    @property
    def raw(self) -> bytes:
        """The encoded value exactly as stored (after the type tag): what a rewrite copies."""
        return bytes(self._file._buffer()[self.value_offset:self.end])

    @property
    def value(self) -> Any:
        return self._file.metadata[self.key]


class Metadata(Mapping):
    """Key -> decoded value, in file order.  Decoding happens on first access and is cached.

    Decoded forms: integers and floats as Python numbers, BOOL as bool, STRING as str, arrays
    of numbers as read-only numpy views of the file, arrays of BOOL as numpy bool arrays,
    arrays of strings as lists of str, arrays of arrays as lists.
    """

    def __init__(self, file: "GGUFFile", fields: dict[str, Field]):
        self._file = file
        self._fields = fields
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            pass
        f = self._fields[key]
        value = self._file._decode(f)
        self._cache[key] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, key) -> bool:
        return key in self._fields

    def __repr__(self) -> str:
        return f"<Metadata of {self._file.name}: {len(self)} keys>"

    def field(self, key: str) -> Field:
        """The record of ``key``: its GGUF type, element type, count and byte offsets."""
        return self._fields[key]

    def fields(self) -> dict[str, Field]:
        """A new dict key -> Field in file order; edit it and pass it to ``write_gguf``."""
        return dict(self._fields)

    def value_type(self, key: str) -> ValueType:
        return self._fields[key].type

    def typed(self, key: str) -> Value:
        """The value of ``key`` with its GGUF type(s), as the writer takes it."""
        f = self._fields[key]
        return self._file._decode(f, typed=True)


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor: name, block type, shape (numpy order, outermost first), where its bytes are."""
    name: str
    type: QType
    shape: tuple[int, ...]  # numpy order: reverse of GGUF's dims (ne[0] is the last entry here)
    offset: int  # absolute file offset of the first byte of data
    nbytes: int
    info_offset: int  # where this tensor's info record starts in the file
    _file: "GGUFFile" = field(repr=False)

    @property
    def qtype(self) -> str:
        """The block-type name, e.g. ``"Q4_K"``."""
        return self.type.name

    @property
    def dims(self) -> tuple[int, ...]:
        """GGUF order: innermost (contiguous) dimension first."""
        return self.shape[::-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_elements

    @property
    def decodable(self) -> bool:
        """False for a type id blockq does not know: such a tensor is listed, never read."""
        return self.type.decodable

    @property
    def data(self) -> np.ndarray:
        """Zero-copy read-only uint8 view of the tensor's encoded bytes."""
        if not self.type.decodable:
            raise BadArgument(f"tensor {self.name} of {self._file.name} has GGML type "
                              f"{self.type.name}, which blockq cannot decode; its data cannot "
                              f"be read (the tensor can only be listed)")
        return np.frombuffer(self._file._buffer(), dtype=np.uint8, count=self.nbytes,
                             offset=self.offset)

    def blocks(self) -> np.ndarray:
        """The data viewed as the block type's structured dtype, shape ``(n_blocks,)``."""
        return self.data.view(self.type.dtype)


class GGUFFile:
    """An open GGUF file.  Use as a context manager or call :meth:`close`.

    Attributes: ``path`` (None for in-memory input), ``name`` (used in messages), ``version``,
    ``alignment``, ``data_offset`` (absolute offset of the data section), ``size`` (bytes),
    ``metadata`` (:class:`Metadata`), ``tensors`` (read-only ordered mapping name ->
    :class:`TensorInfo`, in file order), ``tensor_info_offset`` (where the tensor infos start).
    """

    def __init__(self, buf, size: int, name: str, path: Path | None):
        self._buf = buf
        self.size = size
        self.name = name
        self.path = path
        p = _Parser(buf, size, name)
        self.version, n_tensors, n_kv = p.header()
        fields, pos = p.metadata(self, n_kv)
        self.metadata = Metadata(self, fields)
        self.alignment = p.alignment(fields.get(Keys.General.ALIGNMENT))
        self.tensor_info_offset = pos
        infos, pos = p.tensor_infos(self, n_tensors, pos, self.alignment)
        self.data_offset = _pad(pos, self.alignment)
        self.tensors: Mapping[str, TensorInfo] = MappingProxyType(
            p.place_tensors(self, infos, self.data_offset))

    # -- lifetime --
    def close(self) -> None:
        buf, self._buf = self._buf, None
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
                sigbus.unwatch(getattr(self, "_sigbus", None))
            except BufferError:
                pass  # numpy views of tensors still use the mapping; it goes when they do

    @property
    def closed(self) -> bool:
        return self._buf is None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<GGUFFile {self.name}: v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors>")

    def _buffer(self):
        if self._buf is None:
            raise BadArgument(f"{self.name} is closed; read tensor data and metadata before "
                              f"closing it (or keep it open)")
        return self._buf

    # -- summaries --
    @property
    def n_weights(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # -- lazy decoding --
    def _decode(self, f: Field, typed: bool = False):
        buf = self._buffer()
        if f.type is ValueType.ARRAY:
            value, _ = _Decoder(buf, self.name, f.key).array(f.value_offset, typed, 0)
            return value
        value = _Decoder(buf, self.name, f.key).scalar(f.type, f.value_offset)
        return Value(f.type, value) if typed else value


def read_gguf(source) -> GGUFFile:
    """Open a GGUF file (a path, or bytes-like holding a whole file) for reading.

    The file is memory-mapped; close it (or use ``with``) when done.  Raises FormatError for a
    malformed file and FileNotFoundError / OSError when the path cannot be opened.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        buf = memoryview(source).cast("B") if not isinstance(source, bytes) else source
        return GGUFFile(buf, len(buf), "<memory>", None)
    path = Path(os.fspath(source))
    name = str(source)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return GGUFFile(b"", 0, name, path)  # raises: too short for a header
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        f = GGUFFile(mm, size, name, path)
        f._sigbus = sigbus.watch(path, size)  # truncated while mapped: one line, exit 1
        return f
    except BaseException:
        mm.close()
        raise


# ---------------------------------------------------------------------------------------------
class _Parser:
    """One pass over header, metadata records and tensor infos; every read is bounds-checked."""

    def __init__(self, buf, size: int, name: str):
        self.buf = buf
        self.size = size
        self.name = name

    def error(self, offset: int, message: str) -> FormatError:
        return format_error(self.name, offset, message)

    def need(self, pos: int, n: int, what: str) -> None:
        if n > self.size - pos:
            raise self.error(pos, f"{what} needs {n} bytes at offset {pos} but the file ends at "
                                  f"{self.size}: {_TRUNCATED}")

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return _U32.unpack_from(self.buf, pos)[0]

    def u64(self, pos: int, what: str) -> int:
        self.need(pos, 8, what)
        return _U64.unpack_from(self.buf, pos)[0]

    def string(self, pos: int, what: str) -> tuple[bytes, int]:
        """(raw bytes, position after) of a u64-length-prefixed string."""
        n = self.u64(pos, f"length of {what}")
        if n > self.size - pos - 8:
            raise self.error(pos, f"{what} at offset {pos} claims {n} bytes but only "
                                  f"{self.size - pos - 8} remain before the end of the file "
                                  f"at {self.size}: {_TRUNCATED}")
        return bytes(self.buf[pos + 8:pos + 8 + n]), pos + 8 + n

    def text(self, pos: int, what: str) -> tuple[str, int]:
        raw, end = self.string(pos, what)
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError as e:
            raise self.error(pos, f"{what} at offset {pos} is not valid UTF-8 "
                                  f"(byte {e.start}: {raw[e.start:e.start + 1]!r})") from None

    # -- header --
    def header(self) -> tuple[int, int, int]:
        if self.size < HEADER_BYTES:
            raise self.error(0, f"file is {self.size} bytes, shorter than the {HEADER_BYTES}-byte "
                                f"GGUF header at offset 0: empty or {_TRUNCATED}")
        magic = bytes(self.buf[0:4])
        if magic != GGUF_MAGIC:
            raise self.error(0, f"bad magic {magic!r} at offset 0: a GGUF file starts with "
                                f"{GGUF_MAGIC!r} (is this a GGUF file?)")
        version = self.u32(4, "version")
        if version not in READ_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in READ_VERSIONS:
                why = f"it looks like a big-endian GGUF v{swapped}; blockq reads little-endian"
            elif version == 1:
                why = "GGUF v1 (32-bit counts) is obsolete; re-convert the model"
            else:
                why = "blockq reads versions " + " and ".join(map(str, READ_VERSIONS))
            raise self.error(4, f"GGUF version {version} at offset 4 is not supported: {why}")
        n_tensors = self.u64(8, "tensor count")
        n_kv = self.u64(16, "metadata count")
        room = self.size - HEADER_BYTES
        if n_kv > room // MIN_KV_BYTES:
            raise self.error(16, f"metadata count {n_kv} at offset 16 cannot fit: "
                                 f"{room} bytes follow the header and a record takes at least "
                                 f"{MIN_KV_BYTES}")
        if n_tensors > (room - n_kv * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES:
            raise self.error(8, f"tensor count {n_tensors} at offset 8 cannot fit: "
                                f"{room} bytes follow the header and a tensor info takes at "
                                f"least {MIN_TENSOR_INFO_BYTES}")
        return version, n_tensors, n_kv

    # -- metadata --
    def metadata(self, file: "GGUFFile", n_kv: int) -> tuple[dict[str, Field], int]:
        fields: dict[str, Field] = {}
        pos = HEADER_BYTES
        for i in range(n_kv):
            start = pos
            key, pos = self.text(pos, f"key of metadata record {i}")
            if not key:
                raise self.error(start, f"metadata record {i} at offset {start} has an empty key")
            if key in fields:
                raise self.error(start, f"duplicate metadata key {key!r} at offset {start} "
                                        f"(first at offset {fields[key].offset}); keys must "
                                        f"be unique")
            vtype = self.value_type(pos, f"value type of {key}")
            value_pos = pos + 4
            end, elem, count = self.skip_value(value_pos, vtype, key, 0)
            fields[key] = Field(key, vtype, elem, count, start, value_pos, end, file)
            pos = end
        return fields, pos

    def value_type(self, pos: int, what: str) -> ValueType:
        raw = self.u32(pos, what)
        try:
            return ValueType(raw)
        except ValueError:
            raise self.error(pos, f"{what} at offset {pos} is {raw}, not a GGUF value type "
                                  f"(0..{max(ValueType)})") from None

    def skip_value(self, pos: int, vtype: ValueType, key: str, depth: int):
        """End of the value at ``pos``, plus (element type, count) for arrays."""
        if vtype is ValueType.STRING:
            _, end = self.string(pos, f"string value of {key}")
            return end, None, None
        if vtype is not ValueType.ARRAY:
            size = _SCALAR_SIZES[vtype]
            self.need(pos, size, f"{vtype.name} value of {key}")
            return pos + size, None, None
        if depth >= MAX_ARRAY_NESTING:
            raise self.error(pos, f"array {key} at offset {pos} nests deeper than "
                                  f"{MAX_ARRAY_NESTING} levels")
        elem = self.value_type(pos, f"element type of array {key}")
        count = self.u64(pos + 4, f"length of array {key}")
        data = pos + 12
        room = self.size - data
        if elem is ValueType.STRING:
            unit = 8  # each string has at least its length
        elif elem is ValueType.ARRAY:
            unit = 12  # each inner array has at least its element type and length
        else:
            unit = _SCALAR_SIZES[elem]
        if count > room // unit:
            raise self.error(pos, f"array {key} at offset {pos} claims {count} "
                                      f"{elem.name} elements (at least {count * unit} bytes) "
                                      f"but only {room} bytes remain before the end of the "
                                      f"file at {self.size}: {_TRUNCATED}")
        if elem is ValueType.STRING:
            return self.skip_strings(data, count, key), elem, count
        if elem is ValueType.ARRAY:
            p = data
            for j in range(count):  # each element is an array header and data, untagged
                p, _, _ = self.skip_value(p, ValueType.ARRAY, f"{key}[{j}]", depth + 1)
            return p, elem, count
        return data + count * unit, elem, count

    def skip_strings(self, pos: int, count: int, key: str) -> int:
        """Step over ``count`` length-prefixed strings; only their lengths are read."""
        unpack, buf, p = _U64.unpack_from, self.buf, pos
        try:
            for _ in range(count):
                p += 8 + unpack(buf, p)[0]
        except (struct.error, OverflowError):  # a length sent the cursor past the end
            p = self.size + 1
        if p <= self.size:
            return p
        # Slow path, only on error: walk again to name the string that runs past the end.
        p = pos
        for j in range(count):
            _, p = self.string(p, f"string {key}[{j}]")
        return p  # not reached: the fast path saw an overrun

    def alignment(self, f: Field | None) -> int:
        if f is None:
            return DEFAULT_ALIGNMENT
        if f.type is not ValueType.UINT32:
            raise self.error(f.offset, f"{f.key} at offset {f.offset} is {f.label}; it must be "
                                       f"UINT32 (a power of two)")
        a = _U32.unpack_from(self.buf, f.value_offset)[0]
        if a == 0 or a & (a - 1):
            raise self.error(f.value_offset, f"{f.key} at offset {f.value_offset} is {a}; it "
                                             f"must be a power of two (default 32)")
        return a

    # -- tensor infos --
    def tensor_infos(self, file, n_tensors: int, pos: int, alignment: int):
        infos = []  # (name, qtype, shape, relative offset, nbytes, record offset)
        seen: dict[str, int] = {}
        for i in range(n_tensors):
            start = pos
            name, pos = self.text(pos, f"name of tensor {i}")
            if name in seen:
                raise self.error(start, f"duplicate tensor name {name!r} at offset {start} "
                                        f"(first at offset {seen[name]}); names must be unique")
            seen[name] = start
            n_dims = self.u32(pos, f"dimension count of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.error(pos, f"tensor {name} at offset {start} has {n_dims} "
                                      f"dimensions at offset {pos}; GGUF allows 1..{MAX_DIMS}")
            pos += 4
            self.need(pos, 8 * n_dims, f"dimensions of tensor {name}")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, pos)
            n = 1
            for j, d in enumerate(dims):
                if d == 0 or d > INT64_MAX:
                    raise self.error(pos + 8 * j, f"tensor {name} dimension {j} at offset "
                                                  f"{pos + 8 * j} is {d}; it must be in "
                                                  f"1..{INT64_MAX}")
                n *= d
            if n > INT64_MAX:
                raise self.error(pos, f"tensor {name} dimensions {list(dims)} at offset {pos} "
                                      f"have a product {n} that overflows int64")
            pos += 8 * n_dims
            tid = self.u32(pos, f"type of tensor {name}")
            qt = BY_ID.get(tid)
            if qt is None:  # listed by number; only reading its data is refused (TensorInfo.data)
                qt = undecodable(tid, OTHER_GGML_TYPES.get(tid))
            if dims[0] % qt.block_size:
                raise self.error(start, f"tensor {name} at offset {start} has rows of "
                                        f"{dims[0]} weights; {qt.name} needs a multiple of "
                                        f"{qt.block_size}")
            pos += 4
            rel = self.u64(pos, f"data offset of tensor {name}")
            if rel % alignment:
                raise self.error(pos, f"tensor {name} data offset {rel} (stored at offset {pos}) "
                                      f"is not a multiple of the alignment {alignment}")
            pos += 8
            infos.append((name, qt, tuple(reversed(dims)), rel, n // qt.block_size
                          * qt.type_size if qt.decodable else None, start))
        return infos, pos

    def place_tensors(self, file, infos, data_offset: int) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        # A tensor of an undecodable type has no known size: it gets the bytes up to the next
        # tensor's data (or the end of the file), padding included.
        starts = sorted({data_offset + i[3] for i in infos} | {self.size})
        for name, qt, shape, rel, nbytes, start in infos:
            off = data_offset + rel
            if nbytes is None:
                nbytes = next((s for s in starts if s > off), off) - off
            if nbytes > self.size - off:
                raise self.error(off, f"tensor {name} needs {nbytes} bytes at offset {off} but "
                                      f"the file ends at {self.size}: {_TRUNCATED}")
            tensors[name] = TensorInfo(name, qt, shape, off, nbytes, start, file)
        spans = sorted(tensors.values(), key=lambda t: t.offset)
        for a, b in zip(spans, spans[1:]):
            if b.offset < a.offset + a.nbytes:
                raise self.error(b.offset, f"tensor {b.name} at offset {b.offset} overlaps "
                                           f"tensor {a.name} (bytes {a.offset}.."
                                           f"{a.offset + a.nbytes}); tensors must not share "
                                           f"bytes")
        return tensors


class _Decoder:
    """Decodes one metadata value from the buffer (bounds were checked when the file opened)."""

    def __init__(self, buf, name: str, key: str):
        self.buf = buf
        self.name = name
        self.key = key

    def scalar(self, vtype: ValueType, pos: int):
        if vtype is ValueType.STRING:
            n = _U64.unpack_from(self.buf, pos)[0]
            return self.text(pos + 8, n, self.key)
        v = _SCALAR_STRUCTS[vtype].unpack_from(self.buf, pos)[0]
        return bool(v) if vtype is ValueType.BOOL else v

    def text(self, pos: int, n: int, what: str) -> str:
        raw = bytes(self.buf[pos:pos + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise format_error(self.name, pos + e.start,
                               f"string {what} at offset {pos} is not valid UTF-8 (byte "
                               f"{e.start}: {raw[e.start:e.start + 1]!r})") from None

    def array(self, pos: int, typed: bool, depth: int):
        """(decoded array, position after it) for the array header at ``pos``."""
        elem = ValueType(_U32.unpack_from(self.buf, pos)[0])
        count = _U64.unpack_from(self.buf, pos + 4)[0]
        p = pos + 12
        if elem is ValueType.STRING:
            unpack, buf, text, key = _U64.unpack_from, self.buf, self.text, self.key
            out = []
            for j in range(count):
                n = unpack(buf, p)[0]
                raw = bytes(buf[p + 8:p + 8 + n])
                try:
                    out.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    text(p + 8, n, f"{key}[{j}]")  # raises with the offset
                p += 8 + n
        elif elem is ValueType.ARRAY:
            out = []
            for _ in range(count):
                v, p = self.array(p, typed, depth + 1)
                out.append(v)
        else:
            dt = SCALAR_DTYPES[elem]
            out = np.frombuffer(self.buf, dtype=dt, count=count, offset=p)
            if elem is ValueType.BOOL:
                out = out != 0
            p += count * dt.itemsize
        return (Value(ValueType.ARRAY, out, elem) if typed else out), p
