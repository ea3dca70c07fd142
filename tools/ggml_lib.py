"""llama.cpp's ggml CPU code called through ctypes: the oracle for ``numerics="llama"``.

Needs ``pip install llama-cpp-python`` (its shared libraries); tests never import this module,
tools do.  Three entry points:

- ``mul_mat(qtype, blocks, shape, x)``: ggml's own matrix product of a quantized matrix by
  float activations, through a one-node graph (``ggml_mul_mat`` + ``ggml_graph_compute``): the
  path llama.cpp takes for weights in an ordinary CPU buffer (llamafile's tinyBLAS where it
  applies, else the type's ``vec_dot`` on activations quantized to its ``vec_dot_type``).
- ``vec_dot(qtype, w_blocks, a_blocks, n)`` and ``from_float(qtype, x)``: one row's dot and the
  activation quantizer, from ``ggml_get_type_traits_cpu``.
- ``symbol(name)``: any other exported function (the repack gemv / gemm kernels, say).
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np

from blockq.types import qtype

_c = ctypes
Q8_1_ID = 9  # ggml's runtime-only activation type (blocks: d f16, s f16, qs[32] int8)


class _InitParams(_c.Structure):
    _fields_ = [("mem_size", _c.c_size_t), ("mem_buffer", _c.c_void_p), ("no_alloc", _c.c_bool)]


class _TraitsCPU(_c.Structure):
    _fields_ = [("from_float", _c.c_void_p), ("vec_dot", _c.c_void_p),
                ("vec_dot_type", _c.c_int), ("nrows", _c.c_int64)]


FROM_FLOAT = _c.CFUNCTYPE(None, _c.c_void_p, _c.c_void_p, _c.c_int64)
VEC_DOT = _c.CFUNCTYPE(None, _c.c_int, _c.c_void_p, _c.c_size_t, _c.c_void_p, _c.c_size_t,
                       _c.c_void_p, _c.c_size_t, _c.c_int)
# repack kernels: (n, s, bs, vx, vy, nr, nc)
GEMX = _c.CFUNCTYPE(None, _c.c_int, _c.c_void_p, _c.c_size_t, _c.c_void_p, _c.c_void_p,
                    _c.c_int, _c.c_int)


@lru_cache(None)
def libs() -> tuple:
    import llama_cpp

    d = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = _c.CDLL(os.path.join(d, "libggml-base.so"), mode=_c.RTLD_GLOBAL)
    cpu = _c.CDLL(os.path.join(d, "libggml-cpu.so"), mode=_c.RTLD_GLOBAL)
    base.ggml_init.restype = _c.c_void_p
    base.ggml_init.argtypes = [_InitParams]
    base.ggml_free.argtypes = [_c.c_void_p]
    base.ggml_new_tensor_2d.restype = _c.c_void_p
    base.ggml_new_tensor_2d.argtypes = [_c.c_void_p, _c.c_int, _c.c_int64, _c.c_int64]
    base.ggml_mul_mat.restype = _c.c_void_p
    base.ggml_mul_mat.argtypes = [_c.c_void_p, _c.c_void_p, _c.c_void_p]
    base.ggml_new_graph.restype = _c.c_void_p
    base.ggml_new_graph.argtypes = [_c.c_void_p]
    base.ggml_build_forward_expand.argtypes = [_c.c_void_p, _c.c_void_p]
    base.ggml_get_data.restype = _c.c_void_p
    base.ggml_get_data.argtypes = [_c.c_void_p]
    base.ggml_nbytes.restype = _c.c_size_t
    base.ggml_nbytes.argtypes = [_c.c_void_p]
    cpu.ggml_graph_compute_with_ctx.restype = _c.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [_c.c_void_p, _c.c_void_p, _c.c_int]
    cpu.ggml_get_type_traits_cpu.restype = _c.POINTER(_TraitsCPU)
    cpu.ggml_get_type_traits_cpu.argtypes = [_c.c_int]
    cpu.ggml_cpu_init()
    return base, cpu


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def mul_mat(qt: str, blocks: np.ndarray, shape: tuple[int, int], x: np.ndarray,
            threads: int = 1) -> np.ndarray:
    """ggml_mul_mat(W, X): W (rows, cols) of type ``qt`` given as its raw bytes, X float32
    (n, cols) -> (n, rows) float32, computed by ggml's CPU backend."""
    base, cpu = libs()
    rows, cols = shape
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    raw = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1)
    mem = raw.nbytes + 4 * x.size * 3 + 4 * n * rows + (64 << 20)
    ctx = base.ggml_init(_InitParams(mem, None, False))
    try:
        w = base.ggml_new_tensor_2d(ctx, qtype(qt).id, cols, rows)
        a = base.ggml_new_tensor_2d(ctx, 0, cols, n)  # GGML_TYPE_F32
        if base.ggml_nbytes(w) != raw.nbytes:
            raise ValueError(f"{qt} {shape}: ggml wants {base.ggml_nbytes(w)} bytes, "
                             f"got {raw.nbytes}")
        _c.memmove(base.ggml_get_data(w), _ptr(raw), raw.nbytes)
        _c.memmove(base.ggml_get_data(a), _ptr(x), x.nbytes)
        y = base.ggml_mul_mat(ctx, w, a)
        g = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(g, y)
        if cpu.ggml_graph_compute_with_ctx(ctx, g, threads) != 0:
            raise RuntimeError("ggml_graph_compute_with_ctx failed")
        out = np.empty((n, rows), np.float32)
        _c.memmove(_ptr(out), base.ggml_get_data(y), out.nbytes)
        return out
    finally:
        base.ggml_free(ctx)


def traits(qt: str) -> _TraitsCPU:
    return libs()[1].ggml_get_type_traits_cpu(qtype(qt).id).contents


def vec_dot_type(qt: str) -> str:
    vid = traits(qt).vec_dot_type
    return "Q8_1" if vid == Q8_1_ID else qtype(vid).name


def from_float(qt: str, x: np.ndarray) -> np.ndarray:
    """The CPU backend's quantizer for type ``qt`` (e.g. Q8_0, Q8_1, Q8_K) of one float row
    -> raw bytes."""
    t = qtype(qt)
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.zeros(x.size // t.block_size * t.type_size, np.uint8)
    FROM_FLOAT(traits(qt).from_float)(_ptr(x), _ptr(out), x.size)
    return out


def vec_dot(qt: str, w: np.ndarray, a: np.ndarray, n: int) -> np.float32:
    """``vec_dot`` of type ``qt`` for one weight row's bytes ``w`` and activation bytes ``a``
    (of its vec_dot_type), ``n`` values."""
    w = np.ascontiguousarray(w).view(np.uint8)
    a = np.ascontiguousarray(a).view(np.uint8)
    s = np.zeros(1, np.float32)
    VEC_DOT(traits(qt).vec_dot)(n, _ptr(s), 0, _ptr(w), 0, _ptr(a), 0, 1)
    return s[0]


def symbol(name: str, proto=GEMX):
    """An exported function of libggml-cpu (e.g. ``ggml_gemv_q4_K_8x8_q8_K``) as ``proto``."""
    return proto((name, libs()[1]))


# ---------------------------------------------------------------------------------------------
# the repacked path (added for blockq/kernels/cpu_q8_repack.py)


@lru_cache(None)
def _backend_api() -> tuple:
    """Declare the ggml-backend functions ``mul_mat_repacked`` needs (on top of ``libs()``)."""
    base, cpu = libs()
    vp, sz = _c.c_void_p, _c.c_size_t
    for lib, name, res, args in (
            (base, "ggml_tensor_overhead", sz, []),
            (base, "ggml_graph_overhead", sz, []),
            (base, "ggml_backend_alloc_ctx_tensors_from_buft", vp, [vp, vp]),
            (base, "ggml_backend_alloc_ctx_tensors", vp, [vp, vp]),
            (base, "ggml_backend_tensor_set", None, [vp, vp, sz, sz]),
            (base, "ggml_backend_tensor_get", None, [vp, vp, sz, sz]),
            (base, "ggml_backend_graph_compute", _c.c_int, [vp, vp]),
            (base, "ggml_backend_buffer_free", None, [vp]),
            (base, "ggml_backend_free", None, [vp]),
            (cpu, "ggml_backend_cpu_init", vp, []),
            (cpu, "ggml_backend_cpu_set_n_threads", None, [vp, _c.c_int]),
            (cpu, "_Z35ggml_backend_cpu_repack_buffer_typev", vp, [])):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return base, cpu


def mul_mat_repacked(qt: str, blocks: np.ndarray, shape: tuple[int, int], x: np.ndarray,
                     threads: int = 1) -> np.ndarray:
    """ggml_mul_mat(W, X) with W in the CPU_REPACK buffer, as llama.cpp loads Q4_0 / Q4_K (and
    IQ4_NL, MXFP4) matrices with rows % 8 == 0 on an AVX2 machine: ``ggml_backend_tensor_set``
    repacks the rows 8 at a time (q4_0_8x8 / q4_K_8x8) and the graph runs through the repack
    traits' gemm (groups of 4 activation rows) / gemv (the rest).  W (rows, cols) of type ``qt``
    as raw bytes, X float32 (n, cols) -> (n, rows) float32."""
    base, cpu = _backend_api()
    rows, cols = shape
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    raw = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1)
    ctx_w = ctx = backend = buf_w = buf = None
    try:
        ctx_w = base.ggml_init(_InitParams(4 * base.ggml_tensor_overhead(), None, True))
        w = base.ggml_new_tensor_2d(ctx_w, qtype(qt).id, cols, rows)
        if base.ggml_nbytes(w) != raw.nbytes:
            raise ValueError(f"{qt} {shape}: ggml wants {base.ggml_nbytes(w)} bytes, "
                             f"got {raw.nbytes}")
        buft = cpu._Z35ggml_backend_cpu_repack_buffer_typev()
        buf_w = base.ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, buft)
        if not buf_w:
            raise RuntimeError("could not allocate the CPU_REPACK buffer")
        base.ggml_backend_tensor_set(w, _ptr(raw), 0, raw.nbytes)  # repacks (asserts if it can't)

        mem = 8 * base.ggml_tensor_overhead() + base.ggml_graph_overhead()
        ctx = base.ggml_init(_InitParams(mem, None, True))
        a = base.ggml_new_tensor_2d(ctx, 0, cols, n)  # GGML_TYPE_F32
        y = base.ggml_mul_mat(ctx, w, a)
        g = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(g, y)
        backend = cpu.ggml_backend_cpu_init()
        cpu.ggml_backend_cpu_set_n_threads(backend, threads)
        buf = base.ggml_backend_alloc_ctx_tensors(ctx, backend)  # a and y, in a CPU buffer
        base.ggml_backend_tensor_set(a, _ptr(x), 0, x.nbytes)
        if base.ggml_backend_graph_compute(backend, g) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")
        out = np.empty((n, rows), np.float32)
        base.ggml_backend_tensor_get(y, _ptr(out), 0, out.nbytes)
        return out
    finally:
        if buf:
            base.ggml_backend_buffer_free(buf)
        if backend:
            base.ggml_backend_free(backend)
        if ctx:
            base.ggml_free(ctx)
        if buf_w:
            base.ggml_backend_buffer_free(buf_w)
        if ctx_w:
            base.ggml_free(ctx_w)
