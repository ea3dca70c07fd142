"""Thread settings of the libraries blockq's kernels share the cores with."""
from __future__ import annotations


def set_blas_threads(n: int) -> None:
    """Best effort: numpy's bundled OpenBLAS, found among the loaded libraries (as threadpoolctl
    does); other BLAS builds keep their own setting (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS).

    Blockq runs its own threads (Numba, quantizer pools); OpenBLAS workers spinning beside them
    on a small machine slow both (a 576x576 Cholesky took 1.9 s instead of milliseconds)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break
