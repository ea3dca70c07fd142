"""One error type per domain. Every message names the thing, the value, and what would be right."""


class BlockqError(Exception):
    """Base class of every error blockq raises on purpose."""


class FormatError(BlockqError, ValueError):
    """A GGUF (or imatrix) file is malformed: names the file, the byte offset and what is wrong."""


class BadArgument(BlockqError, ValueError):
    """A caller passed a value blockq cannot use (wrong shape, NaN weights, unknown type name...)."""


class UnsupportedModel(BlockqError, ValueError):
    """A well-formed model that blockq cannot run or convert yet (architecture, tokenizer...)."""


class FileError(BlockqError, OSError):
    """A file or folder cannot be read or written (read-only, full, no permission, changed
    while read): names the path and the cause."""
