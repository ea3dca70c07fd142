"""GPU runtime (optional): CuPy kernels that fuse dequantization into the matrix-vector product,
and per-layer offload.  ``import blockq`` never imports CuPy; only code that asks for a GPU does.
"""
from __future__ import annotations

from ..errors import BadArgument

# NOTE: worded as the README's GPU section: the [gpu] extra is CuPy for CUDA 12
INSTALL_HINT = ("pip install -e '.[gpu]' in the blockq checkout, i.e. cupy-cuda12x "
                "(with a CUDA 13 driver install cupy-cuda13x instead)")


def gpu_status() -> tuple[bool, str]:
    """(usable, reason or device description) without raising."""
    try:
        import cupy
    except ImportError:
        return False, f"CuPy is not installed: {INSTALL_HINT}"
    except Exception as e:  # a broken CuPy install (missing CUDA libraries...)
        return False, f"CuPy failed to import: {e}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cudaErrorInsufficientDriver, cudaErrorNoDevice...
        msg = str(e)
        if "Insufficient" in msg or "driver" in msg.lower():
            return False, f"the NVIDIA driver is too old for this CuPy build ({msg})"
        return False, f"no usable CUDA device ({msg})"
    if n == 0:
        return False, "no CUDA device found"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = cupy.cuda.runtime.memGetInfo()
    except Exception as e:
        return False, f"the CUDA device cannot be used ({e})"
    return True, f"{name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"


def require_gpu() -> str:
    """Raise a clear error when no GPU can be used; return the device description otherwise."""
    ok, why = gpu_status()
    if not ok:
        raise BadArgument(f"--gpu-layers needs a usable GPU: {why}")
    return why
