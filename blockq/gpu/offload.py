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
    b = model.blk[il]
    return sum(getattr(b, n).weight.nbytes for n in
               ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))


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


class _DeviceLinear:
    def __init__(self, name, weight, bias, owner):
        self.name = name  # the GGUF weight's name, for observers (imatrix)
        self.weight = weight  # device matrix (n_out, n_in)
        self.bias = None if bias is None else owner.xp.asarray(bias)
        self.owner = owner

    def __call__(self, x):  # (n, n_in) -> (n, n_out)
        if self.owner.observe is not None:
            self.owner.observe(self.name, self.owner.to_host(x))
        y = self.weight.matvec(x[0])[None, :] if x.shape[0] == 1 else self.weight.matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y


def _rms_norm(xp, x, w, eps):  # x (n, d), w (d,)
    ms = (x.astype(xp.float64) ** 2).sum(axis=1) / x.shape[1]
    scale = (1.0 / xp.sqrt((ms + eps).astype(xp.float32)))[:, None]
    return (x * scale) * w


class DeviceLayers:
    """Blocks ``first..n_layer-1`` of ``model`` on a device, plus the head when all are there."""

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
        self.xp = xp
        self.observe = None  # observe(weight_name, x_host) sees every product's input (imatrix)
        self.args = a
        self.n_layers = n_layers
        self.first = a.n_layer - n_layers
        self.blocks = {}
        for il in range(self.first, a.n_layer):
            b = model.blk[il]
            lin = {n: _DeviceLinear(f"blk.{il}.{n}.weight", to_device(getattr(b, n).weight),
                                    getattr(b, n).bias, self)
                   for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                             "ffn_down")}
            norms = {n: xp.asarray(getattr(b, n).weight) for n in ("attn_norm", "ffn_norm")}
            self.blocks[il] = (lin, norms)
        self.head = None
        if n_layers == a.n_layer and n_layers > 0:
            self.head = (xp.asarray(model.output_norm.weight),
                         _DeviceLinear("output.weight", to_device(model.output.weight),
                                       model.output.bias, self))
        self._k = self._v = None  # (n_layers, n_head_kv, n_ctx, head_dim) on the device

    def to_host(self, a) -> np.ndarray:
        return a if self.xp is np else self.xp.asnumpy(a)

    def _cache(self, n_ctx: int):
        a, xp = self.args, self.xp
        if self._k is None or self._k.shape[2] != n_ctx:
            shape = (self.n_layers, a.n_head_kv, n_ctx, a.head_dim)
            self._k = xp.zeros(shape, xp.float32)
            self._v = xp.zeros(shape, xp.float32)
        return self._k, self._v

    def run(self, model, x: np.ndarray, p0: int, cos: np.ndarray, sin: np.ndarray, cache,
            rows) -> np.ndarray:
        """Blocks first.. on the device for activations ``x`` (n, n_embd) at positions p0...

        Returns the logits (host, float32) when the head is on the device, else the hidden
        state (host) for the CPU head.
        """
        from ..model import attention

        a, xp = self.args, self.xp
        n = x.shape[0]
        T = p0 + n
        kc, vc = self._cache(cache.n_ctx)
        x = xp.asarray(x)  # the one crossing host -> device
        cos, sin = xp.asarray(cos), xp.asarray(sin)
        eps = np.float32(a.rms_eps)
        f16 = cache.cache_type == "f16"
        for il in range(self.first, a.n_layer):
            lin, norms = self.blocks[il]
            j = il - self.first
            h = _rms_norm(xp, x, norms["attn_norm"], eps)
            q = lin["attn_q"](h).reshape(n, a.n_head, a.head_dim)
            k = lin["attn_k"](h).reshape(n, a.n_head_kv, a.head_dim)
            v = lin["attn_v"](h).reshape(n, a.n_head_kv, a.head_dim)
            model.rope(q, cos, sin)
            model.rope(k, cos, sin)
            if f16:  # same precision as the CPU cache (values rounded to half)
                k, v = k.astype(xp.float16), v.astype(xp.float16)
            kc[j, :, p0:T] = k.transpose(1, 0, 2)
            vc[j, :, p0:T] = v.transpose(1, 0, 2)
            att = attention(q, kc[j, :, :T], vc[j, :, :T], p0, a.attn_scale, xp=xp)
            if il == a.n_layer - 1 and rows is not None:
                att, x = att[xp.asarray(rows)], x[xp.asarray(rows)]
            x = x + lin["attn_output"](att)
            h = _rms_norm(xp, x, norms["ffn_norm"], eps)
            g = lin["ffn_gate"](h)
            x = x + lin["ffn_down"](g / (1.0 + xp.exp(-g)) * lin["ffn_up"](h))
        if self.head is not None:
            w, out = self.head
            x = out(_rms_norm(xp, x, w, eps))
        return self.to_host(x)  # the one crossing device -> host
