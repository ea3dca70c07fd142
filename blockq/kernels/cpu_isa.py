"""Which instruction set the int8 kernels of :mod:`blockq.kernels.cpu_int8` are built for.

The int8 kernels are written with LLVM's x86 intrinsics (``pmaddubsw`` / ``pmaddwd``,
``vpdpbusd``).  An intrinsic the CPU lacks does not raise: LLVM aborts the whole process while
compiling it.  So the variant is chosen here, from the feature list Numba will compile for,
*before* anything compiles, and the int8 module is never imported on a CPU that cannot run it.

Variants, best first (``BLOCKQ_ISA`` forces one, for tests and benchmarks):

- ``avx512vnni``: 32-byte ``vpdpbusd`` (and ``vpdpwssd``) in EVEX form (needs AVX2, FMA, F16C,
  AVX-512 F, BW, VL and VNNI: Ice Lake and later Xeons, AMD Zen 4 and 5).
- ``avxvnni``: the same instructions in VEX form (needs AVX2, FMA, F16C and AVX-VNNI: Alder
  Lake and later Intel cores, AMD Zen 5).  Both VNNI variants emit the same LLVM intrinsics;
  LLVM encodes them as the target allows, so on a CPU with both feature sets the two compile
  to the same machine code.
- ``avx2``: 32-byte ``pmaddubsw`` + ``pmaddwd`` (needs AVX2, FMA and F16C).
- ``float``: no integer dots; the float32 kernels of :mod:`blockq.kernels.cpu_matvec`
  (any CPU, arm64 included).

The features are LLVM's host features, overridden by ``NUMBA_CPU_FEATURES`` where it is set
(Numba then compiles for that list; with ``NUMBA_CPU_NAME`` set as well only the listed
features count): a variant is picked only if Numba will compile with everything it needs.
"""
from __future__ import annotations

import os
import platform
import sys

from ..errors import BadArgument

# variant -> host features it needs (names as LLVM spells them), best first
_AVX2 = ("avx2", "fma", "f16c")
REQUIRES: dict[str, tuple[str, ...]] = {
    "avx512vnni": _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avxvnni": _AVX2 + ("avxvnni",),
    "avx2": _AVX2,
    "float": (),
}
VNNI = ("avx512vnni", "avxvnni")  # the variants whose dots are vpdpbusd
ENV = "BLOCKQ_ISA"


def host_features() -> dict[str, bool]:
    """The CPU features Numba compiles for: LLVM's host features with ``NUMBA_CPU_FEATURES``
    applied on top ({} where LLVM cannot tell, e.g. arm64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    from llvmlite import binding as llvm
    try:
        host = dict(llvm.get_host_cpu_features())
    except RuntimeError:
        host = {}
    return with_numba_overrides(host, os.environ.get("NUMBA_CPU_FEATURES"),
                                os.environ.get("NUMBA_CPU_NAME"))


def with_numba_overrides(host: dict[str, bool], feature_string: str | None,
                         cpu_name: str | None = None) -> dict[str, bool]:
    """``host`` as changed by an LLVM feature string such as ``"+avx2,-avx512vnni"`` (Numba's
    ``NUMBA_CPU_FEATURES``).  With another CPU name forced, features the string does not list
    are unknown, so they count as absent."""
    if not feature_string:
        return dict(host)
    out = {} if cpu_name else dict(host)
    for item in feature_string.split(","):
        item = item.strip()
        if len(item) > 1 and item[0] in "+-":
            out[item[1:]] = item[0] == "+"
    return out


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


# variant -> prefixes of the host features a CPU whose best variant it is would lack (float:
# none, it is this CPU's own float code)
_LACKS = {"avx512vnni": ("avxvnni",), "avxvnni": ("avx512", "avx10", "amx"),
          "avx2": ("avx512", "avx10", "amx", "avxvnni", "avxifma", "avxneconvert"), "float": ()}


def numba_features_for(variant: str, host: dict[str, bool] | None = None) -> str:
    """A ``NUMBA_CPU_FEATURES`` string that makes Numba compile as for a CPU whose best variant
    is ``variant`` (this host's features less those such a CPU lacks: for ``avx2`` every AVX-512
    and VNNI feature), so that LLVM cannot use the better instructions on its own either (it
    folds an add of ``pmaddwd`` into ``vpdpwssd`` where VNNI is there).  For benchmarks and
    tests that force each variant on one machine."""
    host = host_features() if host is None else host
    drop = _LACKS[variant]
    return ",".join(("+" if on and not k.startswith(drop) else "-") + k
                    for k, on in sorted(host.items()))


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
