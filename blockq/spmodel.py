"""The pieces of a SentencePiece ``tokenizer.model`` (a protobuf ``ModelProto``), read without
the sentencepiece package: what convert needs to write a ``llama`` GGUF vocabulary.

    ModelProto:       field 1 (repeated, length-delimited): SentencePiece; others skipped
    SentencePiece:    field 1: piece (UTF-8) | field 2: score (float32) | field 3: type (varint)
    protobuf record:  key = varint (field << 3 | wire type), then by wire type
                      0: varint | 1: 8 bytes | 2: varint length + bytes | 5: 4 bytes
"""
from __future__ import annotations

import struct
from pathlib import Path

from .errors import FormatError

# SentencePiece's piece types, which are also GGUF's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise FormatError(f"{where}: a protobuf varint at byte {pos} runs past the end")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, pos


def _fields(buf: bytes, where: str):
    """(field number, wire type, value) of each record: ints for 0/1/5, bytes for 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos, where)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise FormatError(f"{where}: protobuf wire type {wire} at byte {pos} (field "
                              f"{field}) is not one a SentencePiece model uses")
        if pos > len(buf):
            raise FormatError(f"{where}: field {field} runs past the end ({len(buf)} bytes): "
                              "truncated file?")
        yield field, wire, value


def read_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of ``tokenizer.model``, in id order."""
    path = Path(path)
    data = path.read_bytes()
    out = []
    for field, wire, value in _fields(data, str(path)):
        if field != 1 or wire != 2:
            continue
        where = f"{path}: piece {len(out)}"
        piece, score, kind = None, 0.0, NORMAL
        for f, w, v in _fields(value, where):
            if f == 1 and w == 2:
                try:
                    piece = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise FormatError(f"{where} is not UTF-8: {v[:20]!r}") from None
            elif f == 2 and w == 5:
                (score,) = struct.unpack("<f", v)
            elif f == 3 and w == 0:
                kind = v
        if piece is None:
            raise FormatError(f"{where} has no text")
        if not NORMAL <= kind <= BYTE:
            raise FormatError(f"{where} ({piece!r}) has type {kind}; SentencePiece's are 1..6")
        out.append((piece, score, kind))
    if not out:
        raise FormatError(f"{path}: no pieces; not a SentencePiece model")
    return out
