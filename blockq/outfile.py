"""Writing an output file without ever losing what the user has.

- :func:`check_output` refuses, before any work, an output that is one of the command's inputs
  (same inode, through symbolic or hard links too), an existing output that is not a regular
  file (device, FIFO, socket, folder), and a folder blockq cannot write in;
- :class:`AtomicFile` writes into an unnamed file (Linux ``O_TMPFILE``) that gets a name only
  once complete (``linkat``, then ``rename`` over the old file), so even SIGKILL leaves nothing;
  where unnamed files are not available it falls back to a hidden temporary file + rename;
- :class:`SourceWatch` notices a source file changing while a long job reads it;
- :func:`signals_as_interrupt` turns SIGTERM, SIGHUP (a closed terminal) and SIGQUIT into
  KeyboardInterrupt, so the clean-up above runs (once Numba's compiler is left, if one came
  inside it);
- :func:`file_error`: an OSError as one line naming the path and the cause.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from .errors import BadArgument, FileError

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_can_link: dict[int, bool] = {}  # st_dev -> whether an unnamed file can be linked there


def file_error(path, e: OSError, doing: str) -> FileError:
    """``path: cannot <doing>: <cause> (ENOSPC)`` as a FileError."""
    code = errno.errorcode.get(e.errno, "")
    cause = e.strerror or str(e)
    return FileError(f"{path}: cannot {doing}: {cause}{f' ({code})' if code else ''}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def _input_files(inputs: Iterable) -> list[Path]:
    """Every file the inputs name: a file itself, a folder's files (one level)."""
    out = []
    for p in inputs:
        if p is None:
            continue
        p = Path(os.fspath(p))
        if p.is_dir():
            with contextlib.suppress(OSError):
                out += [q for q in p.iterdir() if q.is_file()]
        else:
            out.append(p)
    return out


def check_output(path, inputs: Iterable = (), what: str = "output") -> Path:
    """Refuse an output that would destroy an input or a special file; probe its folder.

    Returns the path to write: a symbolic link is followed, so its target is replaced (as a
    program opening the path would do) and the link stays.
    """
    path = Path(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise file_error(path, e, f"use as the {what}") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise BadArgument(f"{what} {path} is a {_kind(st.st_mode)}, not a regular file; "
                              "blockq only writes regular files (give a file name)")
        for inp in _input_files(inputs):
            try:
                si = os.stat(inp)
            except OSError:
                continue
            if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
                how = "" if os.path.abspath(inp) == os.path.abspath(path) else \
                    " (the same file through a link)"
                raise BadArgument(f"{what} {path} is the input {inp}{how}; writing it would "
                                  "destroy the input: give another output name")
        if path.is_symlink():
            path = path.resolve()
    folder = path.parent
    if not folder.is_dir():
        raise BadArgument(f"{what} folder {folder} does not exist")
    AtomicFile(path).discard()  # raises a FileError where the folder is not writable
    return path


def _link_unnamed(fd: int, dst: Path) -> None:
    """Give the unnamed file ``fd`` the name ``dst`` (linkat with AT_EMPTY_PATH, else /proc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(dst), _AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    try:
        os.link(f"/proc/self/fd/{fd}", dst, follow_symlinks=True)
    except OSError:
        raise OSError(err, os.strerror(err), str(dst)) from None


def _unnamed_ok(folder: Path) -> bool:
    """Whether an O_TMPFILE file in ``folder`` can be opened and then linked (probed once)."""
    if not _O_TMPFILE:
        return False
    try:
        dev = os.stat(folder).st_dev
    except OSError:
        return False
    if dev not in _can_link:
        ok = False
        try:
            fd = os.open(folder, _O_TMPFILE | os.O_WRONLY, 0o600)
        except OSError:
            _can_link[dev] = False
            return False
        probe = folder / f".blockq-probe-{os.getpid()}"
        try:
            _link_unnamed(fd, probe)
            ok = True
            os.unlink(probe)
        except OSError:
            pass
        finally:
            os.close(fd)
        _can_link[dev] = ok
    return _can_link[dev]


class AtomicFile:
    """A new file at ``path`` that exists only once :meth:`commit` ran; binary writes."""

    def __init__(self, path):
        self.path = Path(os.fspath(path))
        self._tmp: str | None = None  # the named temporary file (fallback only)
        folder = self.path.parent
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
        try:
            if _unnamed_ok(folder):
                fd = os.open(folder, _O_TMPFILE | os.O_WRONLY, mode)
            else:
                fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.",
                                                 suffix=".part")
                os.fchmod(fd, mode)
        except OSError as e:
            raise file_error(folder, e, f"create {self.path.name} in it") from None
        self.fh = os.fdopen(fd, "wb")

    def write(self, data) -> None:
        try:
            self.fh.write(data)
        except OSError as e:
            raise file_error(self.path, e, "write") from None

    def commit(self) -> Path:
        """Flush, fsync, then give the file its name (replacing an old file atomically)."""
        fh, self.fh = self.fh, None
        try:
            check_interrupt()
            fh.flush()
            os.fsync(fh.fileno())
            if self._tmp is None:
                self._tmp = self._name_unnamed(fh.fileno())
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException as e:
            self.fh = fh
            self.discard()
            if isinstance(e, OSError):
                raise file_error(self.path, e, "write") from None
            raise
        fh.close()
        _fsync_dir(self.path.parent)
        return self.path

    def _name_unnamed(self, fd: int) -> str:
        for _ in range(100):
            tmp = self.path.parent / f".{self.path.name}.{os.urandom(4).hex()}.part"
            try:
                _link_unnamed(fd, tmp)
                return str(tmp)
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(self.path))

    def discard(self) -> None:
        """Drop what was written; the destination is left as it was."""
        fh, self.fh = self.fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.fh is not None:
            self.commit()
        else:
            self.discard()


def write_atomic(path, data: bytes) -> Path:
    """``data`` to ``path`` atomically (see :class:`AtomicFile`)."""
    with AtomicFile(path) as f:
        f.write(data)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SourceWatch:
    """Size, modification time and inode of open source files; :meth:`check` says if any moved.

    Watch file descriptors (``fds``) where possible: a file replaced by rename keeps the old
    inode open, so only writes into the file itself matter, and those change size or mtime.
    """

    def __init__(self, fds: Iterable[int] = (), paths: Iterable = ()):
        self._fds = {fd: self._snap(os.fstat(fd)) for fd in fds}
        self._paths = {Path(p): self._snap(os.stat(p)) for p in paths if p is not None}

    @staticmethod
    def _snap(st) -> tuple[int, int]:
        return st.st_size, st.st_mtime_ns

    def check(self, what: str = "source") -> None:
        for fd, was in self._fds.items():
            self._compare(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(
                f"/proc/self/fd/{fd}") else f"file descriptor {fd}", was, os.fstat(fd), what)
        for p, was in self._paths.items():
            try:
                st = os.stat(p)
            except OSError as e:
                raise file_error(p, e, f"read the {what} any more") from None
            self._compare(p, was, st, what)

    def _compare(self, name, was, st, what) -> None:
        now = self._snap(st)
        if now != was:
            change = (f"its size went from {was[0]:,} to {now[0]:,} bytes" if now[0] != was[0]
                      else "it was modified")
            raise FileError(f"{name}: the {what} changed while blockq read it ({change}); "
                            "nothing was written: run again once it is complete")


_pending: list[int] = []  # termination signals received inside signals_as_interrupt()
_deferred: list[int] = []  # ... of which those that came while Numba compiled, not yet raised
_rearm = None  # the Numba event listener raising them once the compile is over


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a signal came while its exception could not be raised (inside
    Numba's compiler, see :func:`signals_as_interrupt`) or may have been swallowed."""
    if _pending:
        _deferred.clear()
        raise KeyboardInterrupt


def _compiling() -> bool:
    """Whether this thread is inside Numba's compiler (holds its lock)."""
    lock = sys.modules.get("numba.core.compiler_lock")
    return lock is not None and lock.global_compiler_lock.is_locked()


def _arm_after_compile() -> None:
    """Have the end of the current compile raise the deferred KeyboardInterrupt (a listener of
    Numba's ``numba:compiler_lock`` event, whose end is announced once the lock is released)."""
    global _rearm
    if _rearm is not None:
        return
    from numba.core import event

    class Rearm(event.Listener):
        def on_start(self, ev) -> None:
            pass

        def on_end(self, ev) -> None:
            if (_deferred and threading.current_thread() is threading.main_thread()
                    and not _compiling()):
                _deferred.clear()
                raise KeyboardInterrupt

    _rearm = Rearm()
    event.register("numba:compiler_lock", _rearm)


@contextlib.contextmanager
def signals_as_interrupt():
    """SIGINT, SIGTERM, SIGHUP and SIGQUIT raise KeyboardInterrupt, so clean-up code runs; and
    :meth:`AtomicFile.commit` refuses to name a file after any of them came.

    A signal that comes while Numba compiles is raised only once the compile is over: an
    exception thrown into its compiler (or into LLVM's callbacks, where ctypes swallows it)
    leaves half-built LLVM objects behind (a module the engine owns but Python still frees), and
    the process then dies of "no compiled object yet" (exit code 1) or a memory error (SIGSEGV)
    instead of exiting with 130."""
    global _rearm

    def handler(signum, frame):
        _pending.append(signum)
        if _compiling():
            _deferred.append(signum)
            _arm_after_compile()
            return
        raise KeyboardInterrupt
    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending.clear()
        _deferred.clear()
        if _rearm is not None:
            from numba.core import event
            event.unregister("numba:compiler_lock", _rearm)
            _rearm = None
