"""The operations a forward pass is written over, and the sets of them blockq runs with.

Every architecture's block (:mod:`blockq.models`) is written once against these calls::

    ops.linear(lin, x)            # (n, n_in) -> (n, n_out), bias included
    ops.linears(lins, x)          # several linears of one input (q, k, v; gate, up): a tuple
    ops.rms_norm(x, norm)         # rows of x (n, d) normalized, times norm.weight (d,)
    ops.add(x, y)                 # residual sum
    ops.swiglu(gate, up)          # silu(gate) * up
    ops.geglu(gate, up)           # gelu_tanh(gate) * up
    ops.attend(il, q, k, v, step) # rope q, k; store k, v in the layer's cache; causal attention
    ops.rows(x, rows)             # the rows that get outputs (the last layer drops the others)

The sets:

- :class:`ArrayOps`: the reference arithmetic on an array module ``xp`` (numpy, or CuPy for the
  blocks :mod:`blockq.gpu.offload` puts on a GPU, where it is subclassed with device matrices).
- :class:`CPUOps`: the default CPU set: ``QMatrix`` products, and for one token (decoding) the
  fused Numba kernels below in place of the numpy steps.
- :class:`LlamaOps`: ``numerics="llama"``, llama.cpp's CPU roundings step by step
  (:mod:`blockq.kernels.cpu_q8`).
- :class:`Observed`: any set with a hook around ``linear`` (calibration: imatrix collection).

This module imports no model code and no GPU code, so the model, the offload and the kernels
depend on it and not on each other.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import numba
from numba import njit, prange

from .errors import BadArgument, UnsupportedModel
from .kernels.cpu_attend import attend_prompt
from .kernels.cpu_exp import bits_f32, exp32, f32_bits, silu32
from .kernels.cpu_matvec import matvec_many
from .kernels.jitcache import keyed_jit

F32 = np.float32
GELU_C = F32(0.7978845608028654)  # sqrt(2 / pi)


def attention(q, k, v, p0: int, scale: float, window: int = 0, xp=np, softcap: float = 0.0):
    """Causal grouped-query attention of n new queries at positions p0.. over T = p0 + n keys.

    q (n, n_head, hd); k, v (n_head_kv, T, hd) -> (n, n_head * hd).  Query head h reads key/value
    head h // (n_head / n_head_kv), as in ggml's broadcasting.  ``window`` > 0: query position p
    sees only keys p - window < t <= p (llama.cpp's standard sliding window).  ``xp``: the array
    module (numpy, or CuPy for the layers offloaded to a GPU).  ``softcap`` > 0: scores become
    ``softcap * tanh(score / softcap)`` before the mask (Gemma 2).
    """
    n, n_head, hd = q.shape
    n_kv, T, _ = k.shape
    g = n_head // n_kv
    qh = q.reshape(n, n_kv, g, hd).transpose(1, 2, 0, 3).reshape(n_kv, g * n, hd)
    s = xp.matmul(qh, k.transpose(0, 2, 1))  # (n_kv, g*n, T)
    s *= np.float32(scale)
    if softcap:
        s = xp.tanh(s * np.float32(1.0 / softcap)) * np.float32(softcap)
    pos = p0 + xp.arange(n)  # (n,) query positions
    masked = None
    if n > 1:  # query i (position p0 + i) sees keys 0..p0+i
        masked = xp.arange(T)[None, :] > pos[:, None]  # (n, T)
    if window and T > window:
        far = xp.arange(T)[None, :] <= pos[:, None] - window
        masked = far if masked is None else masked | far
    if masked is not None:
        s.reshape(n_kv, g, n, T)[:, :, masked] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o = xp.matmul(s, v)  # (n_kv, g*n, hd)
    return o.reshape(n_kv, g, n, hd).transpose(2, 0, 1, 3).reshape(n, n_head * hd)


class ArrayOps:
    """The reference set on an array module; subclasses say where matrices and the KV cache
    live (``linear``, ``store``)."""

    xp = np

    def __init__(self, xp=np):
        self.xp = xp

    # -- crossings between sets (host arrays are numpy) --------------------------------------
    def enter(self, x):
        return self.xp.asarray(x)

    def to_host(self, x) -> np.ndarray:
        return x if self.xp is np else self.xp.asnumpy(x)

    # -- the operations ---------------------------------------------------------------------
    def linear(self, lin, x):  # (n, n_in) -> (n, n_out)
        return lin(x)

    def linears(self, lins, x):  # (n, n_in) -> a tuple of (n, n_out_i)
        return tuple(self.linear(lin, x) for lin in lins)

    def rms_norm(self, x, norm):
        xp = self.xp
        # NOTE: like ggml_rms_norm, the sum of squares is taken in double, the scale in float.
        ms = (x.astype(xp.float64) ** 2).sum(axis=1) / x.shape[1]
        scale = (1.0 / xp.sqrt((ms + norm.eps).astype(xp.float32)))[:, None]
        return (x * scale) * self.weight(norm)

    def weight(self, norm):
        return norm.weight

    def add(self, x, y):
        return x + y

    def scale(self, x, s: float):
        return x * F32(s)

    def rows(self, x, rows):
        return x[self.xp.asarray(rows)]

    def swiglu(self, g, u):
        return g / (1.0 + self.xp.exp(-g)) * u

    def geglu(self, g, u):
        xp = self.xp
        return F32(0.5) * g * (F32(1) + xp.tanh(GELU_C * (g + F32(0.044715) * g * g * g))) * u

    def softcap(self, x, cap: float):
        return self.xp.tanh(x * F32(1.0 / cap)) * F32(cap)

    def rope_tables(self, step, rope):
        cos, sin = step.tables(rope)
        return self.xp.asarray(cos), self.xp.asarray(sin)

    def store(self, il: int, step, k, v):
        """Write k, v (n, n_head_kv, hd) at positions step.p0..; -> the layer's (n_kv, n_ctx,
        hd) key and value arrays."""
        raise NotImplementedError

    def attend(self, il: int, q, k, v, step):
        """q (n, n_head*hd), k, v (n, n_head_kv*hd) -> (n, n_head*hd)."""
        a = step.args
        q, kc, vc = self.rope_store(il, q, k, v, step)
        T = step.p0 + step.n
        return attention(q, kc[:, :T], vc[:, :T], step.p0, a.attn_scale, step.windows[il],
                         xp=self.xp, softcap=a.attn_softcap)

    def rope_store(self, il: int, q, k, v, step):
        """Rotate q, k and store k, v: -> q (n, n_head, hd) and the layer's key and value
        arrays (n_kv, n_ctx, hd)."""
        a, n = step.args, step.n
        q = q.reshape(n, a.n_head, a.head_dim)
        k = k.reshape(n, a.n_head_kv, a.head_dim)
        v = v.reshape(n, a.n_head_kv, a.head_dim)
        rope = step.ropes[il]
        cos, sin = self.rope_tables(step, rope)
        rope(q, cos, sin)
        rope(k, cos, sin)
        kc, vc = self.store(il, step, k, v)
        return q, kc, vc


class CPUOps(ArrayOps):
    """blockq's default CPU kernels; one token (decoding) takes the fused Numba steps."""

    def linear(self, lin, x):
        return lin(x)

    def linears(self, lins, x):
        """One token: the int8 products of one input in one kernel call (its activation blocks
        made once) where their types allow; otherwise one product each."""
        if x.shape[0] == 1:
            ys = matvec_many([lin.weight for lin in lins], x[0])
            if ys is not None:
                for lin, y in zip(lins, ys):
                    if lin.bias is not None:
                        y += lin.bias
                return ys
        return super().linears(lins, x)

    def rms_norm(self, x, norm):
        x = np.ascontiguousarray(x, F32)
        out = np.empty_like(x)  # (n, d)
        _rms_norm_rows(x, norm.weight, float(norm.eps), out)  # eps in double, as numpy adds it
        return out

    def swiglu(self, g, u):
        g = np.ascontiguousarray(g)  # (n, n_ff)
        u = np.ascontiguousarray(u)
        if g.shape[0] == 1:
            _swiglu_into(g.reshape(-1), u.reshape(-1))
        else:
            _swiglu_rows(g, u)
        return g

    def store(self, il, step, k, v):
        step.cache.store(il, step.p0, k, v)
        return step.cache.k[il], step.cache.v[il]

    def rope_store(self, il, q, k, v, step):
        """ArrayOps.rope_store in one Numba call: q, k rotated in place, k and v (rounded to
        f16 for an f16 cache) written to the layer's cache."""
        a, n, cache = step.args, step.n, step.cache
        q = np.ascontiguousarray(q, F32).reshape(n, a.n_head, a.head_dim)
        k = np.ascontiguousarray(k, F32).reshape(n, a.n_head_kv, a.head_dim)
        v = np.ascontiguousarray(v, F32).reshape(n, a.n_head_kv, a.head_dim)
        rope = step.ropes[il]
        cos, sin = step.tables(rope)  # (n, half)
        _rope_store_rows(q, k, v, cos, sin, rope.neox, cache.k[il], cache.v[il], step.p0,
                         cache.cache_type == "f16")
        return q, cache.k[il], cache.v[il]

    def attend(self, il, q, k, v, step):
        if step.n != 1:
            return self._attend_prompt(il, q, k, v, step)
        a, cache = step.args, step.cache
        rope = step.ropes[il]
        cos, sin = step.tables(rope)
        att = np.empty((a.n_head, a.head_dim), np.float32)
        seen = step.p0 + 1 if not step.windows[il] else min(step.p0 + 1, step.windows[il])
        attend = _rope_store_attend if a.n_head * seen * a.head_dim >= ATTEND_PARALLEL_MIN \
            else _rope_store_attend_serial
        attend(q.reshape(a.n_head, a.head_dim), k.reshape(a.n_head_kv, a.head_dim),
                           v.reshape(a.n_head_kv, a.head_dim), cos[0], sin[0], rope.neox,
                           cache.k[il], cache.v[il], step.p0, F32(a.attn_scale),
                           cache.cache_type == "f16", step.windows[il], F32(a.attn_softcap), att)
        return att.reshape(1, -1)


    def _attend_prompt(self, il, q, k, v, step):
        """ArrayOps.attend with the attention itself on Numba's threads (``attend_prompt``)."""
        a = step.args
        q, kc, vc = self.rope_store(il, q, k, v, step)  # q (n, n_head, hd)
        out = np.empty((step.n, a.n_head * a.head_dim), F32)  # (n, n_head * hd)
        attend_prompt(np.ascontiguousarray(q, dtype=F32), kc, vc, step.p0, F32(a.attn_scale),
                      step.windows[il], F32(a.attn_softcap), out)
        return out


class LlamaOps(CPUOps):
    """llama.cpp's CPU roundings (``numerics="llama"``; :mod:`blockq.kernels.cpu_q8`): 8-bit
    activations through the kernel llama.cpp picks per matrix, f16 attention, ggml's expf."""

    def __init__(self, model):
        from .kernels import cpu_q8

        super().__init__()
        self.L = cpu_q8
        a = model.args
        ropes = model.ropes + (model.ropes_long or [])
        if a.activation != "silu" or a.attn_softcap or a.final_softcap \
                or not all(r.plain for r in ropes) or any(model.windows) \
                or any(lin.bias is not None for _, lin in model.linears()):
            raise UnsupportedModel("numerics='llama' covers SwiGLU models without biases, rope "
                                   "frequency factors, rope scaling (linear, YaRN, attn_factor) "
                                   "or sliding windows")
        # NOTE: a tied output is llama.cpp's token embedding table, never repacked
        self.dot = {name: cpu_q8.llama_dot(lin.weight,
                                           repackable=not (model.tied and name == "output.weight"))
                    for name, lin in model.linears()}
        self._tables: dict = {}

    def linear(self, lin, x):
        return self.dot[lin.name](x)

    linears = ArrayOps.linears  # each through the kernel llama.cpp picks for it

    def rms_norm(self, x, norm):
        return self.L.rms_norm(x, norm.weight, norm.eps)

    def add(self, x, y):
        return (x + y).astype(F32)

    def swiglu(self, g, u):
        return self.L.swiglu(g, u)

    def attend(self, il, q, k, v, step):
        a, n, p0, cache = step.args, step.n, step.p0, step.cache
        if cache.cache_type != "f16":
            raise BadArgument("numerics='llama' needs an f16 KV cache, as llama.cpp's default; "
                              f"got {cache.cache_type!r}")
        rope = step.ropes[il]
        T = p0 + n
        cos, sin = self._tables.get(id(rope), ((), ()))
        if len(cos) < T:
            cos, sin = self.L.rope_tables(float(rope.base), 2 * rope.half,
                                          -(-max(T, 1) // 1024) * 1024)
            self._tables[id(rope)] = cos, sin
        q = q.reshape(n, a.n_head, a.head_dim)
        k = k.reshape(n, a.n_head_kv, a.head_dim)
        v = v.reshape(n, a.n_head_kv, a.head_dim)
        self.L.rope(q, cos[p0:T], sin[p0:T], rope.neox)
        self.L.rope(k, cos[p0:T], sin[p0:T], rope.neox)
        cache.store(il, p0, k, v)
        return self.L.attention(q, cache.k[il, :, :T], cache.v[il, :, :T], p0, a.attn_scale)


class Observed:
    """``inner`` with ``observe(weight_name, x_host)`` called on every linear input first."""

    def __init__(self, inner, observe: Callable[[str, np.ndarray], None]):
        self.inner, self.observe = inner, observe

    def linear(self, lin, x):
        self.observe(lin.name, self.inner.to_host(x))
        return self.inner.linear(lin, x)

    def linears(self, lins, x):
        for lin in lins:
            self.observe(lin.name, self.inner.to_host(x))
        return self.inner.linears(lins, x)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


# ---------------------------------------------------------------------------------------------
# decode-step kernels: one token, one call per piece of a layer, no temporaries.  ArrayOps says
# what they compute; tests check both paths give the same logits.

# NOTE: error_model="numpy": a float division then has no zero test raising ZeroDivisionError,
# a branch that kept LLVM from vectorizing the loop around it (SwiGLU ran 15x slower).
_JIT = dict(cache=True, fastmath=True, error_model="numpy")


@njit(**_JIT)
def _sum_squares(x):  # float64, like ggml_rms_norm
    ss = 0.0
    for i in range(x.size):
        xd = np.float64(x[i])  # NOTE: squared in double, as the numpy steps (ArrayOps, the
        ss += xd * xd  # offloaded layers) do: a float32 square differs in the last bit, and
        # with 8-bit activations that can flip a code (ggml squares in float: ~1 ulp apart)
    return ss


@njit(cache=True, error_model="numpy")
def _rms_norm_into(x, w, eps, out):  # x, w, out (d,)
    """NOTE: the numpy steps' float32 roundings exactly: not fast-math (under which LLVM reorders
    (x * scale) * w and takes a reciprocal-square-root estimate), and the scale cast to float32
    (Numba types it float64, and x * scale was then a double product).  A last-bit difference
    from the numpy steps can flip 8-bit activation codes a layer later."""
    scale = np.float32(np.float32(1.0) / np.sqrt(np.float32(_sum_squares(x) / x.size + eps)))
    for i in range(x.size):
        out[i] = np.float32(x[i] * scale) * w[i]


@njit(cache=True, error_model="numpy")
def _rms_norm_rows(x, w, eps, out):  # x, out (n, d), w (d,)
    # NOTE: not fast-math either: _rms_norm_into is inlined here, and a fast-math caller's
    # function attributes let LLVM's code generator relax the inlined steps again
    for r in range(x.shape[0]):
        _rms_norm_into(x[r], w, eps, out[r])


@njit(**_JIT)
def _swiglu_into(g, u):  # g = silu(g) * u
    for i in range(g.size):
        g[i] = silu32(g[i]) * u[i]


@njit(nogil=True, **_JIT)
def _swiglu_chunk(c, g, u, n_threads):  # g = silu(g) * u, (n, n_ff): chunk c of the rows
    n = g.shape[0]
    for t in range(n * c // n_threads, n * (c + 1) // n_threads):
        _swiglu_into(g[t], u[t])


@njit(parallel=True, **_JIT)
def _swiglu_par(g, u, n_threads):
    for c in prange(n_threads):
        _swiglu_chunk(c, g, u, n_threads)


def _swiglu_rows(g, u):  # prompts: the rows on Numba's threads
    n = min(numba.get_num_threads(), g.shape[0])
    if n <= 1:  # NOTE: one thread runs the serial kernel: a parfor costs ~2 s of compile time
        _swiglu_chunk(0, g, u, 1)
    else:
        _swiglu_par(g, u, n)


@njit(cache=True)
def _f16_round(x):
    """x (float32) rounded to the nearest IEEE half (ties to even), as a float32.  Scalar bit
    operations (NOTE: an array ``view`` made this a 0.7 s compile)."""
    b = np.int64(f32_bits(x)) & 0xFFFFFFFF
    ax = b & 0x7FFFFFFF
    if ax >= 0x477FF000:  # rounds past 65504: inf (nan stays nan)
        if ax <= 0x7F800000:
            b = (b & 0x80000000) | 0x7F800000
    elif ax < 0x38800000:  # half subnormal range: steps of 2^-24
        return np.float32(np.rint(x * np.float32(16777216.0)) * np.float32(5.9604645e-08))
    else:  # drop 13 mantissa bits, rounding to nearest even
        b = (b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000
    return bits_f32(np.int32(b))


@njit(**_JIT)
def _rope_one(x, cos, sin, neox):  # x (heads, head_dim) rotated in place; cos, sin (half,)
    h = cos.size
    for r in range(x.shape[0]):
        for i in range(h):
            a, b = (i, i + h) if neox else (2 * i, 2 * i + 1)
            x0, x1 = x[r, a], x[r, b]
            x[r, a] = x0 * cos[i] - x1 * sin[i]
            x[r, b] = x0 * sin[i] + x1 * cos[i]


@njit(**_JIT)
def _put_row(c, pos, x, f16):
    """c[:, pos, :] = x, rounded to f16 precision when f16.  NOTE: loops, not the slice
    assignment, which alone took 3.2 s of Numba compile time (a generic broadcasting kernel) in
    every first run."""
    for h in range(c.shape[0]):
        for d in range(c.shape[2]):
            c[h, pos, d] = _f16_round(x[h, d]) if f16 else x[h, d]


@njit(**_JIT)
def _rope_store_rows(q, k, v, cos, sin, neox, kc, vc, p0, f16):
    """Tokens p0.. of a prompt: rotate q (n, n_head, hd) and k (n, n_head_kv, hd) in place, store
    k and v (rounded to f16 when f16) at their positions of kc, vc (n_head_kv, n_ctx, hd)."""
    for t in range(q.shape[0]):
        _rope_one(q[t], cos[t], sin[t], neox)
        _rope_one(k[t], cos[t], sin[t], neox)
        _put_row(kc, p0 + t, k[t], f16)
        _put_row(vc, p0 + t, v[t], f16)


def _rope_store_attend_py(q, k, v, cos, sin, neox, kc, vc, pos, scale, f16, window, softcap,
                          out):
    """Rotate q, k of one token at ``pos``; store k, v in the layer's cache; attend over the
    keys it sees (0..pos, or the last ``window`` of them when window > 0), scores soft-capped
    when softcap > 0.

    q, out (n_head, hd); k, v (n_head_kv, hd); kc, vc (n_head_kv, n_ctx, hd).
    """
    _rope_one(q, cos, sin, neox)
    _rope_one(k, cos, sin, neox)
    _put_row(kc, pos, k, f16)
    _put_row(vc, pos, v, f16)
    n_head, hd = q.shape
    g = n_head // kc.shape[0]
    t0 = max(0, pos - window + 1) if window > 0 else 0
    T = pos + 1
    for hh in prange(n_head):
        kv = hh // g
        s = np.empty(T - t0, np.float32)
        m = -np.inf
        for t in range(t0, T):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[hh, d] * kc[kv, t, d]
            acc *= scale
            if softcap > 0:
                acc = np.float32(np.tanh(acc * (np.float32(1.0) / softcap)) * softcap)
            s[t - t0] = acc
            m = max(m, acc)
        total = 0.0
        for j in range(T - t0):
            e = exp32(s[j] - m)
            s[j] = e
            total += e
        inv = np.float32(1.0 / total)
        for d in range(hd):
            out[hh, d] = 0.0
        for t in range(t0, T):
            w = s[t - t0] * inv
            for d in range(hd):
                out[hh, d] += w * vc[kv, t, d]


# NOTE: one token's attention over a short context is a few microseconds of work, less than
# waking the thread pool; below this many query-head x key x head-dim products it runs on the
# calling thread (SmolLM2 at 100 positions: 58 k).
ATTEND_PARALLEL_MIN = 1 << 18
_rope_store_attend = keyed_jit(("parallel",), parallel=True, **_JIT)(_rope_store_attend_py)
_rope_store_attend_serial = keyed_jit(("serial",), **_JIT)(_rope_store_attend_py)
