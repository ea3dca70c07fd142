"""Which instruction set the int8 kernels of :mod:`blockq.kernels.cpu_int8` are built for.

The int8 kernels are written with LLVM's x86 intrinsics (``pmaddubsw`` / ``pmaddwd``).  An
intrinsic the CPU lacks does not raise: LLVM aborts the whole process while compiling it.  So
the variant is chosen here, from the host's feature list, *before* anything compiles, and the
int8 module is never imported on a CPU that cannot run it.

Variants, best first (``BLOCKQ_ISA`` forces one, for tests and benchmarks):

- ``avx2``: 32-byte ``pmaddubsw`` + ``pmaddwd`` (needs AVX2, FMA and F16C).
- ``float``: no integer dots; the float32 kernels of :mod:`blockq.kernels.cpu_matvec`
  (any CPU, arm64 included).

NOTE: AVX-VNNI / AVX-512-VNNI variants (``vpdpbusd``) are not built: the machine this was
written on has neither, and a variant that cannot run here cannot be validated here.
"""
from __future__ import annotations

import os
import platform
import sys

from ..errors import BadArgument

# variant -> host features it needs (names as LLVM spells them), best first
REQUIRES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2", "fma", "f16c"),
    "float": (),
}
ENV = "BLOCKQ_ISA"


def host_features() -> dict[str, bool]:
    """The host CPU's features as LLVM sees them ({} where LLVM cannot tell, e.g. arm64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    from llvmlite import binding as llvm
    try:
        return dict(llvm.get_host_cpu_features())
    except RuntimeError:
        return {}


def supported(features: dict[str, bool]) -> list[str]:
    """The variants a CPU with ``features`` can run, best first (``float`` always)."""
    return [v for v, need in REQUIRES.items() if all(features.get(f, False) for f in need)]


def choose(features: dict[str, bool], forced: str | None = None) -> str:
    """The variant to run: ``forced`` (e.g. from ``BLOCKQ_ISA``) if the CPU has it, else the
    best one it has.  Forcing a variant the CPU lacks is a BadArgument, never a crash."""
    ok = supported(features)
    if not forced:
        return ok[0]
    forced = forced.strip().lower()
    if forced not in REQUIRES:
        raise BadArgument(f"{ENV}={forced!r} is unknown; use one of {', '.join(REQUIRES)}")
    if forced not in ok:
        missing = [f for f in REQUIRES[forced] if not features.get(f, False)]
        raise BadArgument(f"{ENV}={forced}: this CPU lacks {', '.join(missing)}; it can run "
                          f"{', '.join(ok)}")
    return forced


_CHOSEN: str | None = None


def isa() -> str:
    """The variant this process runs (chosen once, on first use)."""
    global _CHOSEN
    if _CHOSEN is None:
        _CHOSEN = choose(host_features(), os.environ.get(ENV))
    return _CHOSEN


_ANNOUNCED = False


def announce_compile() -> None:
    """Say once per process, on stderr, that kernels may compile (only when nothing is cached)."""
    global _ANNOUNCED
    if not _ANNOUNCED:
        _ANNOUNCED = True
        print("compiling kernels (first run only)...", file=sys.stderr, flush=True)
