"""A mapped model file truncated or replaced under a running process: one line, not a crash.

Reading a page of a memory-mapped file beyond its (new) end raises SIGBUS in whatever code
touches it (numpy, a Numba kernel).  Python's own signal handlers cannot help: they run only
between bytecodes, and the faulting instruction would fault again forever.  :func:`watch`
therefore installs, once, a C-level handler (a ctypes callback) that names the mapped file whose
size changed, writes one line to stderr and ends the process with exit code 1.

Only files mapped through :func:`watch` are named; any other SIGBUS is reported as such.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import signal
import threading

EXIT_CODE = 1

_files: dict[int, tuple[str, int, int]] = {}  # id -> (path, size when mapped, inode)
_lock = threading.Lock()
_handler = None  # the ctypes callback, kept alive
_keys = itertools.count()


def _message() -> bytes:
    for path, size, ino in list(_files.values()):
        try:
            st = os.stat(path)
            now, now_ino = st.st_size, st.st_ino
        except OSError:
            now, now_ino = -1, -1
        if now != size or now_ino != ino:
            how = ("was deleted or replaced" if now < 0 or now_ino != ino else
                   f"shrank from {size:,} to {now:,} bytes")
            return (f"error: {path}: the file {how} while blockq had it mapped; stop other "
                    "programs writing it, then run again\n").encode("utf-8", "replace")
    names = ", ".join(p for p, _, _ in _files.values()) or "no file"
    return (f"error: bus error (SIGBUS) reading a mapped file ({names}): was it truncated?\n"
            ).encode("utf-8", "replace")


def _on_sigbus(signum):  # runs in the faulting thread, from the C-level handler
    try:
        os.write(2, _message())
    finally:
        os._exit(EXIT_CODE)


def _install() -> None:
    global _handler
    if _handler is not None or not hasattr(signal, "SIGBUS"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        proto = ctypes.CFUNCTYPE(None, ctypes.c_int)
        handler = proto(_on_sigbus)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, proto]
        if libc.signal(int(signal.SIGBUS), handler) == ctypes.c_void_p(-1).value:
            return
        _handler = handler
    except (OSError, AttributeError):  # no libc signal(): the default (a crash) stays
        pass


def watch(path, size: int) -> int:
    """Name ``path`` (mapped with ``size`` bytes) in a SIGBUS report; returns a key for
    :func:`unwatch`."""
    key = next(_keys)
    try:
        ino = os.stat(path).st_ino
    except OSError:
        ino = -1
    with _lock:
        _install()
        _files[key] = (str(path), size, ino)
    return key


def unwatch(key: int) -> None:
    with _lock:
        _files.pop(key, None)
