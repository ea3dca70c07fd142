"""blockq's GGUF container: a zero-copy reader and a streaming, atomic writer.

- :func:`read_gguf` -> :class:`GGUFFile` (``.metadata``, ``.tensors``, ``.version``, ...)
- :func:`write_gguf` / :class:`GGUFWriter`: header -> metadata -> tensor infos -> data
- :mod:`blockq.gguf.constants`: value types, metadata keys (``Keys``), llama.cpp file types

``formats/gguf.md`` is the normative description of the container.
"""
from .constants import FileType, Keys, ValueType
from .reader import Field, GGUFFile, Metadata, TensorInfo, Value, read_gguf
from .writer import GGUFWriter, WriterState, write_gguf

__all__ = ["Field", "FileType", "GGUFFile", "GGUFWriter", "Keys", "Metadata", "TensorInfo",
           "Value", "ValueType", "WriterState", "read_gguf", "write_gguf"]
