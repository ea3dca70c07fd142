"""``keyed_jit``: ``numba.njit(cache=True)`` with more in each disk-cache entry's key; and
Numba's disk cache made safe for several processes at once (``_entry_name``).

Numba keys a cached compilation by the function's bytecode, its closure variables and the target
CPU -- not by the options it was compiled with, nor by what its intrinsics expand to.  Two
compilations that differ only there (a serial and a parallel one of the same function; the same
int8 kernel for two instruction-set variants, see :mod:`blockq.kernels.cpu_int8`) would share
one cache entry, and a later process would load whichever was written last.  ``keyed_jit``
adds a tuple of values that tells them apart.
"""
from __future__ import annotations

import hashlib
import types

from numba import njit
from numba.core.caching import FunctionCache, IndexDataCacheFile


# NOTE: Numba's disk cache names a new entry's data file by the first number its index does not
# use yet, and writes the index before the data.  Two processes compiling different entries of
# one function at once (a test and the server or CLI process it started, sharing the package's
# cache) both read the index without the other's entry, both take number 1, and the last data
# file written is the code of one entry under the other's index key: Numba loads it without
# checking, and a later process runs one instruction-set variant's code for another (wrong
# logits) or code for another signature (a crash).  Here a data file is named by a hash of its
# key, written before the index, and loaded only if its name is that hash: a race now loses at
# most an index entry (compiled again later), never pairs a key with other code.

def _entry_name(cache_file, key) -> str:
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    return f"{cache_file._index_name[:-4]}.{digest}.nbc"  # the index's name, .nbi -> .HASH.nbc


def _save(self, key, data):
    name = _entry_name(self, key)
    self._save_data(name, data)
    overloads = self._load_index()
    if overloads.get(key) != name:
        overloads[key] = name
        self._save_index(overloads)


def _load(self, key):
    name = self._load_index().get(key)
    if name is None or name != _entry_name(self, key):  # absent, or written the old way
        return None
    try:
        return self._load_data(name)
    except OSError:
        return None


IndexDataCacheFile.save = _save
IndexDataCacheFile.load = _load


class _KeyedCache(FunctionCache):
    """Numba's disk cache with ``extra`` appended to each entry's key."""

    def __init__(self, py_func, extra: tuple):
        super().__init__(py_func)
        self._extra = extra

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + self._extra


def _distinct(fn, extra: tuple):
    """A copy of ``fn`` whose ``__qualname__`` ends in a hash of ``extra`` and of its closure's
    values.

    NOTE: Numba names a compiled function's symbol after its qualified name plus a counter of
    the functions of that name the compiling process has seen.  Closures a factory makes per
    type (``_q8_32_quantizer.<locals>.quantize`` for Q8_0 and for Q8_1), or one function compiled
    twice (serial and parallel), compiled by two processes, both get counter 1, and a third
    process that loads both from the disk cache resolves the two names to one address: the
    Q8_1 quantizer then ran for Q5_0's products (wrong results, order-dependent).  With the
    hash the names, and the cache files, differ."""
    from numba.core.serialize import dumps
    cells = tuple(c.cell_contents for c in fn.__closure__ or ())
    tag = hashlib.sha256(dumps((tuple(extra), cells))).hexdigest()[:12]
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__, copy.__doc__ = fn.__kwdefaults__, fn.__doc__
    copy.__module__, copy.__qualname__ = fn.__module__, f"{fn.__qualname__}_{tag}"
    return copy


def keyed_jit(extra: tuple, **options):
    """``numba.njit(cache=True, **options)`` whose cache entries carry ``extra`` in their key
    (a ``cache`` option given is ignored: the result always caches), compiled under a name of
    its own (``_distinct``)."""
    options = {k: v for k, v in options.items() if k != "cache"}

    def wrap(fn):
        d = njit(cache=True, **options)(_distinct(fn, tuple(extra)))
        d._cache = _KeyedCache(d.py_func, tuple(extra))
        return d
    return wrap
