"""Per-layer offload, as llama.cpp's ``-ngl``: the last N transformer blocks (and the output head
when all blocks are offloaded) live on the GPU with their own slice of the KV cache; the first
blocks stay on the CPU.  Activations cross once at the boundary and the logits come back once.

The device code is written against an array module ``xp`` (CuPy on a GPU).  With ``xp=numpy``
and the CPU matrices it runs on the host, which is how the plumbing (the split at every N, the
device cache, the crossings) is tested on machines without a GPU.
"""
from __future__ import annotations

import numpy as np

from ..errors import BadArgument
from ..ops import ArrayOps
from . import require_gpu

KV_MARGIN = 1.10  # auto: keep 10% of free memory spare beyond weights + KV cache


def parse_gpu_layers(value: "str | int | None", n_layer: int) -> "int | str":
    """``--gpu-layers`` value: an int >= 0 (above n_layer: all), "all" (= n_layer) or "auto"."""
    if value is None:
        return 0
    s = str(value).strip().lower()
    if s == "all":
        return n_layer
    if s == "auto":
        return "auto"
    try:
        n = int(s)
    except ValueError:
        raise BadArgument(f"--gpu-layers {value!r}: use a number 0..{n_layer}, 'all' or 'auto'")
    if n < 0:
        raise BadArgument(f"--gpu-layers {n}: use a number 0..{n_layer}, 'all' or 'auto'")
    return min(n, n_layer)  # as llama.cpp: -ngl 99 offloads every layer


def layer_bytes(model, il: int) -> int:
    return sum(lin.weight.nbytes for lin in model.blk[il].linears())


def auto_layers(model, n_ctx: int, free_bytes: int) -> int:
    """Most layers (last first) whose weights and KV cache fit into ``free_bytes`` with a margin."""
    a = model.args
    kv_per_layer = 2 * a.n_head_kv * n_ctx * a.head_dim * 4
    budget = free_bytes / KV_MARGIN
    head = model.output.weight.nbytes
    used, n = 0, 0
    for il in reversed(range(a.n_layer)):
        need = layer_bytes(model, il) + kv_per_layer
        if used + need > budget:
            break
        used += need
        n += 1
    if n == a.n_layer and used + head > budget:
        n -= 1  # everything but the head fits: keep the last block for the CPU, head with it
    return n


class DeviceOps(ArrayOps):
    """The operations of blocks ``first..n_layer-1`` of ``model`` on a device (plus the head when
    all blocks are there): device copies of their matrices and norm weights, and the device's
    own slice of the KV cache."""

    def __init__(self, model, n_layers: int, xp=None, to_device=None):
        a = model.args
        if not 0 <= n_layers <= a.n_layer:
            raise BadArgument(f"--gpu-layers {n_layers}: this model has {a.n_layer} layers")
        if xp is None:
            require_gpu()
            import cupy as xp  # noqa: F811

            from .matrix import GPUQMatrix

            def to_device(q):
                return GPUQMatrix(q.qtype, q.data, q.shape)
        super().__init__(xp)
        self.args = a
        self.n_layers = n_layers
        self.first = a.n_layer - n_layers
        self.mats: dict = {}  # weight name -> (device matrix, device bias or None)
        self.norms: dict = {}  # norm weight name -> device vector
        for b in model.blk[self.first:]:
            self._put(b.linears(), b.norms(), to_device)
        self.head = None
        if n_layers == a.n_layer and n_layers > 0:
            self._put([model.output], [model.output_norm], to_device)
            self.head = model.output
        self._k = self._v = None  # (n_layers, n_head_kv, n_ctx, head_dim) on the device

    def _put(self, linears, norms, to_device) -> None:
        xp = self.xp
        for lin in linears:
            self.mats[lin.name] = (to_device(lin.weight),
                                   None if lin.bias is None else xp.asarray(lin.bias))
        for nm in norms:
            self.norms[nm.name] = xp.asarray(nm.weight)

    def linear(self, lin, x):  # (n, n_in) -> (n, n_out)
        w, bias = self.mats[lin.name]
        y = w.matvec(x[0])[None, :] if x.shape[0] == 1 else w.matmul(x)
        return y if bias is None else y + bias

    def weight(self, norm):
        return self.norms[norm.name]

    def store(self, il, step, k, v):
        a, xp = self.args, self.xp
        n_ctx = step.cache.n_ctx
        if self._k is None or self._k.shape[2] != n_ctx:
            shape = (self.n_layers, a.n_head_kv, n_ctx, a.head_dim)
            self._k = xp.zeros(shape, xp.float32)
            self._v = xp.zeros(shape, xp.float32)
        if step.cache.cache_type == "f16":  # same precision as the CPU cache (values in half)
            k, v = k.astype(xp.float16), v.astype(xp.float16)
        j = il - self.first
        p0, T = step.p0, step.p0 + step.n
        self._k[j, :, p0:T] = k.transpose(1, 0, 2)
        self._v[j, :, p0:T] = v.transpose(1, 0, 2)
        return self._k[j], self._v[j]
