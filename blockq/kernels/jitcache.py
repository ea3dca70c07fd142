"""``keyed_jit``: ``numba.njit(cache=True)`` with more in each disk-cache entry's key.

Numba keys a cached compilation by the function's bytecode, its closure variables and the target
CPU -- not by the options it was compiled with, nor by what its intrinsics expand to.  Two
compilations that differ only there (a serial and a parallel one of the same function; the same
int8 kernel for two instruction-set variants, see :mod:`blockq.kernels.cpu_int8`) would share
one cache entry, and a later process would load whichever was written last.  ``keyed_jit``
adds a tuple of values that tells them apart.
"""
from __future__ import annotations

from numba import njit
from numba.core.caching import FunctionCache


class _KeyedCache(FunctionCache):
    """Numba's disk cache with ``extra`` appended to each entry's key."""

    def __init__(self, py_func, extra: tuple):
        super().__init__(py_func)
        self._extra = extra

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + self._extra


def keyed_jit(extra: tuple, **options):
    """``numba.njit(cache=True, **options)`` whose cache entries carry ``extra`` in their key
    (a ``cache`` option given is ignored: the result always caches)."""
    options = {k: v for k, v in options.items() if k != "cache"}

    def wrap(fn):
        d = njit(cache=True, **options)(fn)
        d._cache = _KeyedCache(d.py_func, tuple(extra))
        return d
    return wrap
