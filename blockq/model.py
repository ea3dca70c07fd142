"""Llama-family decoder (``llama``: SmolLM2, TinyLlama, Llama 2/3, Mistral; ``qwen2``) run from
a GGUF file's quantized blocks.

One straight pass, as in llama2.c: metadata -> :class:`ModelArgs`; tensors -> attributes named
exactly like the file's tensors (``token_embd``, ``blk[i].attn_q``, ``blk[i].ffn_gate``,
``output_norm``, ``output``) holding zero-copy :class:`QMatrix` views of the mmapped blocks;
``forward(tokens, cache)`` -> logits.  Weights stay quantized; activations are float32.

A batch of tokens (a prompt) goes through ``QMatrix.matmul``; one token (decoding) through
``QMatrix.matvec``.  Keys and values of past positions live in a :class:`KVCache`.
"""
from __future__ import annotations

import math
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit, prange

from .errors import BadArgument, FormatError, UnsupportedModel
from .gguf.constants import Keys


@dataclass(frozen=True)
class Arch:
    """What one architecture does differently; everything else is shared."""
    rope_neox: bool  # rotate (x[i], x[i + d/2]) pairs; False: adjacent (x[2i], x[2i+1]) pairs


# NOTE: llama.cpp's llama_model_rope_type(): `llama` uses NORM rope (adjacent pairs, because the
# converter permutes the q/k rows of HF llama checkpoints), `qwen2` uses NEOX rope (halves).
# qwen2's q/k/v biases need no flag: any `.bias` tensor in the file is applied.
ARCHS: dict[str, Arch] = {
    "llama": Arch(rope_neox=False),
    "qwen2": Arch(rope_neox=True),
}

ROPE_SCALINGS = ("none", "linear")  # `{arch}.rope.scaling.type` values we run (yarn: not yet)
ROPE_SCALE_LINEAR_OLD = "{arch}.rope.scale_linear"  # pre-2024 files: linear factor under this key


def _arch_key(template: str, arch: str) -> str:
    return template.format(arch=arch)


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a llama-family model, read from GGUF metadata."""
    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rms_eps: float
    head_dim: int = 0  # 0: n_embd // n_head
    rope_dim: int = 0  # 0: head_dim (rotate the whole head)
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0  # linear position interpolation: positions * this
    attn_scale: float = 0.0  # 0: 1 / sqrt(head_dim)
    # derived in __post_init__
    rope_neox: bool = field(init=False)
    n_gqa: int = field(init=False)  # query heads per key/value head
    n_embd_q: int = field(init=False)  # n_head * head_dim
    n_embd_kv: int = field(init=False)  # n_head_kv * head_dim

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UnsupportedModel(f"architecture {self.arch!r} is not supported yet "
                                   f"(supported: {', '.join(ARCHS)})")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.head_dim == 0:
            set_("head_dim", self.n_embd // self.n_head)
        if self.rope_dim == 0:
            set_("rope_dim", self.head_dim)
        if self.attn_scale == 0.0:
            set_("attn_scale", 1.0 / math.sqrt(self.head_dim))
        if self.n_head % self.n_head_kv:
            raise FormatError(f"{self.arch}: head_count {self.n_head} is not a multiple of "
                              f"head_count_kv {self.n_head_kv}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise FormatError(f"{self.arch}: rope.dimension_count {self.rope_dim} must be even "
                              f"and at most the head size {self.head_dim}")
        set_("rope_neox", ARCHS[self.arch].rope_neox)
        set_("n_gqa", self.n_head // self.n_head_kv)
        set_("n_embd_q", self.n_head * self.head_dim)
        set_("n_embd_kv", self.n_head_kv * self.head_dim)

    @classmethod
    def from_metadata(cls, md: Mapping, n_vocab: int | None = None) -> "ModelArgs":
        """Build from a GGUF metadata mapping; ``n_vocab`` (token_embd rows) when known."""
        arch = md.get(Keys.General.ARCHITECTURE)
        if arch is None:
            raise FormatError(f"metadata has no {Keys.General.ARCHITECTURE!r}")
        if arch not in ARCHS:
            raise UnsupportedModel(f"architecture {arch!r} is not supported yet "
                                   f"(supported: {', '.join(ARCHS)})")

        def get(template, default=None, required=False):
            key = _arch_key(template, arch)
            if key in md:
                return md[key]
            if required:
                raise FormatError(f"{arch} model: metadata key {key!r} is missing")
            return default

        n_head = int(get(Keys.Attention.HEAD_COUNT, required=True))
        n_head_kv = get(Keys.Attention.HEAD_COUNT_KV, n_head)
        if isinstance(n_head_kv, (list, tuple, np.ndarray)):  # per-layer form
            if len(set(int(h) for h in n_head_kv)) != 1:
                raise UnsupportedModel(f"{arch}: per-layer head_count_kv {list(n_head_kv)} "
                                       "(only one value for all layers is supported)")
            n_head_kv = n_head_kv[0]
        scaling = str(get(Keys.Rope.SCALING_TYPE, "linear"))
        if scaling not in ROPE_SCALINGS:
            raise UnsupportedModel(f"{arch}: rope scaling type {scaling!r} is not supported yet "
                                   f"(supported: {', '.join(ROPE_SCALINGS)})")
        factor = float(get(Keys.Rope.SCALING_FACTOR, 0.0) or get(ROPE_SCALE_LINEAR_OLD, 0.0))
        if n_vocab is None:
            n_vocab = get(Keys.LLM.VOCAB_SIZE)
            if n_vocab is None:
                n_vocab = len(md[Keys.Tokenizer.TOKENS])
        head_dim = int(get(Keys.Attention.KEY_LENGTH, 0))
        if head_dim and int(get(Keys.Attention.VALUE_LENGTH, head_dim)) != head_dim:
            raise UnsupportedModel(f"{arch}: key_length {head_dim} differs from value_length "
                                   f"{get(Keys.Attention.VALUE_LENGTH)}")
        return cls(
            arch=arch,
            n_vocab=int(n_vocab),
            n_ctx_train=int(get(Keys.LLM.CONTEXT_LENGTH, 2048)),
            n_embd=int(get(Keys.LLM.EMBEDDING_LENGTH, required=True)),
            n_layer=int(get(Keys.LLM.BLOCK_COUNT, required=True)),
            n_head=n_head,
            n_head_kv=int(n_head_kv),
            n_ff=int(get(Keys.LLM.FEED_FORWARD_LENGTH, required=True)),
            rms_eps=float(get(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
            head_dim=head_dim,
            rope_dim=int(get(Keys.Rope.DIMENSION_COUNT, 0)),
            rope_base=float(get(Keys.Rope.FREQ_BASE, 10000.0)),
            rope_freq_scale=1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor,
            attn_scale=float(get(Keys.Attention.SCALE, 0.0)),
        )


# ---------------------------------------------------------------------------------------------
# layers


class Linear:
    """``y = W x (+ b)`` with W quantized (rows = outputs, numpy order) and b float32."""

    def __init__(self, weight, bias: np.ndarray | None = None):
        self.weight = weight  # QMatrix (n_out, n_in)
        self.bias = bias  # (n_out,) or None

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, n_in) -> (n, n_out)
        if x.shape[0] == 1:
            y = self.weight.matvec(x[0])[None, :]
        else:
            y = self.weight.matmul(x)
        if self.bias is not None:
            y += self.bias
        return y

    def vec(self, x: np.ndarray) -> np.ndarray:  # (n_in,) -> (n_out,)
        y = self.weight.matvec(x)
        if self.bias is not None:
            y += self.bias
        return y


class RMSNorm:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""

    def __init__(self, weight: np.ndarray, eps: float):
        self.weight = weight  # (n_embd,)
        self.eps = eps

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, n_embd)
        # NOTE: like ggml_rms_norm, the sum of squares is taken in double, the scale in float.
        ms = np.einsum("ij,ij->i", x, x, dtype=np.float64) / x.shape[-1]
        scale = (1.0 / np.sqrt((ms + self.eps).astype(np.float32)))[:, None]
        return (x * scale) * self.weight


@dataclass
class Block:
    """One transformer layer; attribute names are the GGUF tensor names after ``blk.N.``."""
    attn_norm: RMSNorm
    attn_q: Linear
    attn_k: Linear
    attn_v: Linear
    attn_output: Linear
    ffn_norm: RMSNorm
    ffn_gate: Linear
    ffn_up: Linear
    ffn_down: Linear


# tensor name after "blk.N." -> which kind of layer it feeds
BLOCK_TENSORS = {
    "attn_norm": RMSNorm, "ffn_norm": RMSNorm,
    "attn_q": Linear, "attn_k": Linear, "attn_v": Linear, "attn_output": Linear,
    "ffn_gate": Linear, "ffn_up": Linear, "ffn_down": Linear,
}
GLOBAL_TENSORS = ("token_embd", "output_norm", "output", "rope_freqs")


class Rope:
    """Rotary position embedding tables, computed the way ggml's CPU rope computes them."""

    def __init__(self, args: ModelArgs, freq_factors: np.ndarray | None = None):
        self.half = args.rope_dim // 2
        self.neox = args.rope_neox
        self.base = np.float32(args.rope_base)
        self.freq_scale = np.float32(args.rope_freq_scale)
        self.freq_factors = freq_factors  # (rope_dim/2,) llama3 long-context factors, or None
        self._cos = self._sin = np.empty((0, self.half), np.float32)  # (positions, half)

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of the rotation angles, both (n, rope_dim/2) float32."""
        end = int(positions.max()) + 1 if len(positions) else 0
        if end > len(self._cos):  # grow the cached tables in steps of 1024 positions
            n = -(-end // 1024) * 1024
            self._cos, self._sin = self._compute(np.arange(n))
        return self._cos[positions], self._sin[positions]

    def _compute(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # NOTE: ggml walks the frequencies by repeated float multiplication,
        # theta_i = p * s * s * ... (i times), s = base^(-2/d), so we do too (bit-for-bit angles).
        step = np.float32(self.base ** np.float32(-2.0 / (2 * self.half)))
        theta = np.empty((len(positions), self.half), np.float32)
        t = positions.astype(np.float32)
        for i in range(self.half):
            theta[:, i] = t
            t = t * step
        if self.freq_factors is not None:
            theta /= self.freq_factors
        theta *= self.freq_scale
        return np.cos(theta), np.sin(theta)

    def __call__(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate ``x`` (n, heads, head_dim) in place and return it."""
        h = self.half
        if self.neox:  # pairs (x[i], x[i + h])
            x0, x1 = x[..., :h].copy(), x[..., h:2 * h].copy()
            lo, hi = np.s_[..., :h], np.s_[..., h:2 * h]
        else:  # pairs (x[2i], x[2i + 1])
            x0, x1 = x[..., 0:2 * h:2].copy(), x[..., 1:2 * h:2].copy()
            lo, hi = np.s_[..., 0:2 * h:2], np.s_[..., 1:2 * h:2]
        c, s = cos[:, None, :], sin[:, None, :]  # (n, 1, h)
        x[lo] = x0 * c - x1 * s
        x[hi] = x0 * s + x1 * c
        return x


CACHE_TYPES = ("f16", "f32")
NUMERICS = ("default", "llama")  # Model.load(numerics=...)


class KVCache:
    """Keys and values of every layer for the positions seen so far (``tokens``).

    Layout (n_layer, n_head_kv, n_ctx, head_dim) float32: one head's keys are contiguous, so
    attention reads them without a copy.  With ``cache_type="f16"`` every stored value is rounded
    to half precision first.
    """

    def __init__(self, args: ModelArgs, n_ctx: int, cache_type: str = "f16"):
        if cache_type not in CACHE_TYPES:
            raise BadArgument(f"cache type {cache_type!r} is unknown; use one of {CACHE_TYPES}")
        shape = (args.n_layer, args.n_head_kv, n_ctx, args.head_dim)
        self.k = _lazy_zeros(shape)
        self.v = _lazy_zeros(shape)
        self.n_ctx = n_ctx
        self.cache_type = cache_type
        self.tokens: list[int] = []  # the token at each stored position

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes the cache would take at full context in its nominal type (f16: half of ours)."""
        per = 2 if self.cache_type == "f16" else 4
        return 2 * self.k.size * per

    def clear(self) -> None:
        self.tokens.clear()

    def truncate(self, n: int) -> None:
        """Forget positions n.. (their slots get overwritten by the next forward)."""
        del self.tokens[n:]

    def store(self, layer: int, p0: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v (n, n_head_kv, head_dim) at positions p0..p0+n."""
        n = k.shape[0]
        if self.cache_type == "f16":
            # NOTE: llama.cpp keeps its KV cache in f16 by default; rounding here reproduces
            # that precision while keeping the reads float32 (no conversion per step).
            k = k.astype(np.float16)
            v = v.astype(np.float16)
        self.k[layer, :, p0:p0 + n] = k.transpose(1, 0, 2)
        self.v[layer, :, p0:p0 + n] = v.transpose(1, 0, 2)


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros whose 4 KiB pages become resident only when written.

    NOTE: not np.zeros: numpy asks the kernel for transparent huge pages on large arrays, so the
    first key stored in each (layer, head) slab would fault in 2 MiB, and a 4096-token cache
    became fully resident (+180 MiB on SmolLM2) after one token.
    """
    n = int(np.prod(shape)) * 4
    buf = mmap.mmap(-1, max(n, 1))  # anonymous: zero-filled on first touch
    return np.frombuffer(buf, np.float32, count=n // 4).reshape(shape)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, scale: float,
              xp=np) -> np.ndarray:
    """Causal grouped-query attention of n new queries at positions p0.. over T = p0 + n keys.

    q (n, n_head, hd); k, v (n_head_kv, T, hd) -> (n, n_head * hd).  Query head h reads key/value
    head h // (n_head / n_head_kv), as in ggml's broadcasting.  ``xp``: the array module (numpy,
    or CuPy for the layers offloaded to a GPU).
    """
    n, n_head, hd = q.shape
    n_kv, T, _ = k.shape
    g = n_head // n_kv
    qh = q.reshape(n, n_kv, g, hd).transpose(1, 2, 0, 3).reshape(n_kv, g * n, hd)
    s = xp.matmul(qh, k.transpose(0, 2, 1))  # (n_kv, g*n, T)
    s *= np.float32(scale)
    if n > 1:  # query i (position p0 + i) sees keys 0..p0+i
        future = xp.arange(T)[None, :] > (p0 + xp.arange(n))[:, None]  # (n, T)
        s.reshape(n_kv, g, n, T)[:, :, future] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o = xp.matmul(s, v)  # (n_kv, g*n, hd)
    return o.reshape(n_kv, g, n, hd).transpose(2, 0, 1, 3).reshape(n, n_head * hd)


# ---------------------------------------------------------------------------------------------
# decode-step kernels: one token, one call per piece of a layer, no temporaries.  The batch path
# above says what they compute; tests check both paths give the same logits.

_JIT = dict(cache=True, fastmath=True)


@njit(**_JIT)
def _rms_norm_into(x, w, eps, out):  # x, w, out (d,)
    ss = 0.0  # float64, like ggml_rms_norm
    for i in range(x.size):
        ss += x[i] * x[i]
    scale = np.float32(1.0) / np.sqrt(np.float32(ss / x.size + eps))
    for i in range(x.size):
        out[i] = (x[i] * scale) * w[i]


@njit(**_JIT)
def _add_rms_norm_into(x, y, w, eps, out):  # x += y; out = rms_norm(x) * w
    for i in range(x.size):
        x[i] += y[i]
    _rms_norm_into(x, w, eps, out)


@njit(**_JIT)
def _swiglu_into(g, u):  # g = silu(g) * u
    for i in range(g.size):
        g[i] = g[i] / (np.float32(1.0) + np.exp(-g[i])) * u[i]


@njit(cache=True)
def _round_f16(a):
    """Round float32 values in place to the nearest IEEE half (ties to even), as f32."""
    bits = a.view(np.uint32)
    for i in range(a.size):
        b = bits[i]
        ax = b & np.uint32(0x7FFFFFFF)
        if ax >= np.uint32(0x477FF000):  # rounds past 65504: inf (nan stays nan)
            if ax <= np.uint32(0x7F800000):
                bits[i] = (b & np.uint32(0x80000000)) | np.uint32(0x7F800000)
        elif ax < np.uint32(0x38800000):  # half subnormal range: steps of 2^-24
            a[i] = np.float32(np.rint(a[i] * np.float32(16777216.0)) * np.float32(5.9604645e-08))
        else:  # drop 13 mantissa bits, rounding to nearest even
            bits[i] = (b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1))) \
                & np.uint32(0xFFFFE000)


@njit(**_JIT)
def _rope_one(x, cos, sin, neox):  # x (heads, head_dim) rotated in place; cos, sin (half,)
    h = cos.size
    for r in range(x.shape[0]):
        for i in range(h):
            a, b = (i, i + h) if neox else (2 * i, 2 * i + 1)
            x0, x1 = x[r, a], x[r, b]
            x[r, a] = x0 * cos[i] - x1 * sin[i]
            x[r, b] = x0 * sin[i] + x1 * cos[i]


@njit(parallel=True, **_JIT)
def _rope_store_attend(q, k, v, cos, sin, neox, kc, vc, pos, scale, f16, out):
    """Rotate q, k of one token at ``pos``; store k, v in the layer's cache; attend over 0..pos.

    q, out (n_head, hd); k, v (n_head_kv, hd); kc, vc (n_head_kv, n_ctx, hd).
    """
    _rope_one(q, cos, sin, neox)
    _rope_one(k, cos, sin, neox)
    if f16:
        _round_f16(k.reshape(-1))
        _round_f16(v.reshape(-1))
    kc[:, pos, :] = k
    vc[:, pos, :] = v
    n_head, hd = q.shape
    g = n_head // kc.shape[0]
    T = pos + 1
    for hh in prange(n_head):
        kv = hh // g
        s = np.empty(T, np.float32)
        m = -np.inf
        for t in range(T):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[hh, d] * kc[kv, t, d]
            acc *= scale
            s[t] = acc
            m = max(m, acc)
        total = 0.0
        for t in range(T):
            e = np.exp(s[t] - m)
            s[t] = e
            total += e
        inv = np.float32(1.0 / total)
        for d in range(hd):
            out[hh, d] = 0.0
        for t in range(T):
            w = s[t] * inv
            for d in range(hd):
                out[hh, d] += w * vc[kv, t, d]


# ---------------------------------------------------------------------------------------------
# the model


class Model:
    """A llama-family transformer whose weights are the GGUF file's blocks."""

    fast_decode = True  # one token goes through _decode's fused kernels (False: the batch path)
    numerics = "default"  # "llama": every step as llama.cpp's CPU backend rounds it (slow)
    device = None  # blockq.gpu.offload.DeviceLayers: the last blocks on a GPU (Model.offload)

    def __init__(self, args: ModelArgs, tensors: Mapping, metadata: Mapping | None = None):
        """``tensors``: name -> tensor info (``.qtype``, ``.shape``, ``.data``) as read_gguf gives."""
        from .kernels.cpu_matvec import QMatrix

        self.args = args
        self.metadata = metadata if metadata is not None else {}
        a = args

        def need(name):
            if name not in tensors:
                raise FormatError(f"{a.arch} model: tensor {name!r} is missing")
            return tensors[name]

        def check(name, shape):
            got = tuple(need(name).shape)
            if got != tuple(shape):
                raise FormatError(f"tensor {name!r} has shape {got}, expected {tuple(shape)} "
                                  f"for this {a.arch} model")

        def matrix(name, shape):
            check(name, shape)
            t = tensors[name]
            return QMatrix(t.qtype, t.data, tuple(t.shape))

        def vector(name, n):
            check(name, (n,))
            t = tensors[name]
            return _as_f32(t)

        for name in tensors:
            parts = name.split(".")
            ok = (parts[0] in GLOBAL_TENSORS and len(parts) == 2) or (
                parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_TENSORS
                and parts[3] in ("weight", "bias") and parts[1].isdigit()
                and int(parts[1]) < a.n_layer)
            if not ok:
                raise UnsupportedModel(f"{a.arch} model: tensor {name!r} is not part of the "
                                       "llama-family layout blockq runs (mixture-of-experts or "
                                       "another variant?)")

        self.token_embd = matrix("token_embd.weight", (a.n_vocab, a.n_embd))
        self.output_norm = RMSNorm(vector("output_norm.weight", a.n_embd), a.rms_eps)
        if "output.weight" in tensors:
            self.output = Linear(matrix("output.weight", (a.n_vocab, a.n_embd)),
                                 _opt_vector(tensors, "output.bias", a.n_vocab))
        else:  # tied embeddings: the output projection is the embedding table
            self.output = Linear(self.token_embd)
        self.tied = "output.weight" not in tensors
        freq_factors = None
        if "rope_freqs.weight" in tensors:
            freq_factors = vector("rope_freqs.weight", a.rope_dim // 2)
        self.rope = Rope(a, freq_factors)

        out_dims = {"attn_q": (a.n_embd_q, a.n_embd), "attn_k": (a.n_embd_kv, a.n_embd),
                    "attn_v": (a.n_embd_kv, a.n_embd), "attn_output": (a.n_embd, a.n_embd_q),
                    "ffn_gate": (a.n_ff, a.n_embd), "ffn_up": (a.n_ff, a.n_embd),
                    "ffn_down": (a.n_embd, a.n_ff)}
        self.blk: list[Block] = []
        for i in range(a.n_layer):
            parts = {}
            for base, kind in BLOCK_TENSORS.items():
                pre = f"blk.{i}.{base}"
                if kind is RMSNorm:
                    parts[base] = RMSNorm(vector(pre + ".weight", a.n_embd), a.rms_eps)
                else:
                    shape = out_dims[base]
                    parts[base] = Linear(matrix(pre + ".weight", shape),
                                         _opt_vector(tensors, pre + ".bias", shape[0]))
            self.blk.append(Block(**parts))

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: "str | Path", numerics: str = "default") -> "Model":
        """Open a GGUF file and map its weights (zero-copy; the file stays mapped).

        ``numerics``: one of NUMERICS; "llama" reproduces llama.cpp's CPU logits to the bit
        (8-bit activations, f16 attention; :mod:`blockq.kernels.cpu_q8`), in numpy: slow.
        """
        if numerics not in NUMERICS:
            raise BadArgument(f"numerics {numerics!r} is unknown; use one of {NUMERICS}")
        from .gguf.reader import read_gguf

        reader = read_gguf(path)
        r = reader.__enter__()
        try:
            md = r.metadata
            arch = md.get(Keys.General.ARCHITECTURE)
            if arch not in ARCHS:
                raise UnsupportedModel(f"{Path(path).name}: architecture {arch!r} is not "
                                       f"supported yet (supported: {', '.join(ARCHS)})")
            tensors = r.tensors
            n_vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors \
                else None
            model = cls(ModelArgs.from_metadata(md, n_vocab), tensors, md)
        except BaseException:
            reader.__exit__(None, None, None)
            raise
        model._reader = reader  # keeps the mapping alive as long as the model
        model.path = Path(path)
        if numerics != "default":
            model.set_numerics(numerics)
        return model

    def set_numerics(self, numerics: str) -> None:
        """Switch between blockq's kernels ("default") and llama.cpp's roundings ("llama")."""
        if numerics not in NUMERICS:
            raise BadArgument(f"numerics {numerics!r} is unknown; use one of {NUMERICS}")
        if numerics == "llama" and getattr(self, "_q8", None) is None:
            from .kernels.cpu_q8 import llama_dot
            self._q8 = {id(lin.weight): llama_dot(lin.weight) for b in self.blk
                        for lin in (b.attn_q, b.attn_k, b.attn_v, b.attn_output, b.ffn_gate,
                                    b.ffn_up, b.ffn_down)}
            # NOTE: a tied output is llama.cpp's token embedding table, never repacked
            self._q8[id(self.output.weight)] = llama_dot(self.output.weight,
                                                         repackable=not self.tied)
        self.numerics = numerics

    def close(self) -> None:
        """Close the file (the mapping itself goes once no weight view is left)."""
        reader = getattr(self, "_reader", None)
        if reader is not None:
            self._reader = None
            reader.__exit__(None, None, None)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        """Bytes of all weights as stored (quantized)."""
        total = self.token_embd.nbytes + (0 if self.tied else self.output.weight.nbytes)
        for b in self.blk:
            for lin in (b.attn_q, b.attn_k, b.attn_v, b.attn_output, b.ffn_gate, b.ffn_up,
                        b.ffn_down):
                total += lin.weight.nbytes
        return total

    def new_cache(self, n_ctx: int | None = None, cache_type: str = "f16") -> KVCache:
        return KVCache(self.args, n_ctx or self.args.n_ctx_train, cache_type)

    # -- forward --------------------------------------------------------------------------

    def forward(self, tokens: Sequence[int], cache: KVCache,
                outputs: "str | np.ndarray" = "last") -> np.ndarray:
        """Run ``tokens`` at positions ``cache.n_past``.. and append them to the cache.

        ``outputs``: "last" (logits of the last token), "all", or indices into ``tokens``.
        Returns logits (n_outputs, n_vocab) float32.
        """
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        p0 = cache.n_past
        if n == 0:
            raise ValueError("forward needs at least one token")
        if p0 + n > cache.n_ctx:
            raise BadArgument(f"{p0} cached + {n} new tokens exceed the context of "
                              f"{cache.n_ctx} tokens (raise -c / n_ctx)")
        if isinstance(outputs, str):
            if outputs not in ("last", "all"):
                raise BadArgument(f"outputs={outputs!r}: use 'last', 'all' or row indices")
            rows = np.array([n - 1]) if outputs == "last" else None
        else:
            rows = np.asarray(outputs, dtype=np.int64)

        if self.numerics == "llama":
            return self._forward_llama(tokens, cache, rows)
        if n == 1 and self.fast_decode and self.device is None:
            return self._decode(int(tokens[0]), cache)[None, :]

        x = self.token_embd.take_rows(tokens)  # (n, n_embd)
        cos, sin = self.rope.tables(np.arange(p0, p0 + n))  # (n, rope_dim/2)
        T = p0 + n
        n_cpu = a.n_layer if self.device is None else self.device.first
        for il, b in enumerate(self.blk[:n_cpu]):
            h = b.attn_norm(x)  # (n, n_embd)
            q = b.attn_q(h).reshape(n, a.n_head, a.head_dim)
            k = b.attn_k(h).reshape(n, a.n_head_kv, a.head_dim)
            v = b.attn_v(h).reshape(n, a.n_head_kv, a.head_dim)
            self.rope(q, cos, sin)
            self.rope(k, cos, sin)
            cache.store(il, p0, k, v)
            att = attention(q, cache.k[il, :, :T], cache.v[il, :, :T], p0, a.attn_scale)
            if il == a.n_layer - 1 and rows is not None:  # only the rows we return go on
                att, x = att[rows], x[rows]
            x = x + b.attn_output(att)  # (n, n_embd)
            h = b.ffn_norm(x)
            g = np.ascontiguousarray(b.ffn_gate(h))  # (n, n_ff)
            _swiglu_into(g.reshape(-1), np.ascontiguousarray(b.ffn_up(h)).reshape(-1))
            x = x + b.ffn_down(g)
        if self.device is not None:  # the last blocks (and maybe the head) on the GPU
            x = self.device.run(self, x, p0, cos, sin, cache, rows)
            if self.device.head is not None:
                cache.tokens.extend(int(t) for t in tokens)
                return x  # (n_outputs, n_vocab)
        cache.tokens.extend(int(t) for t in tokens)
        return self.output(self.output_norm(x))  # (n_outputs, n_vocab)

    def offload(self, n_layers: int, xp=None, to_device=None) -> None:
        """Put the last ``n_layers`` blocks (and the output head when all are) on the GPU.

        ``xp`` / ``to_device``: the array module and the function that moves a ``QMatrix`` to
        the device; by default CuPy and :class:`blockq.gpu.matrix.GPUQMatrix`.
        """
        from .gpu.offload import DeviceLayers

        if n_layers and self.numerics != "default":
            raise BadArgument("GPU offload runs the default numerics, not numerics="
                              f"{self.numerics!r}")
        self.device = DeviceLayers(self, n_layers, xp, to_device) if n_layers else None

    def _decode(self, token: int, cache: KVCache) -> np.ndarray:
        """``forward`` for one token: matvecs plus the fused kernels above.  -> (n_vocab,)"""
        a = self.args
        pos = cache.n_past
        eps = np.float32(a.rms_eps)
        scale = np.float32(a.attn_scale)
        f16 = cache.cache_type == "f16"
        x = self.token_embd.take_rows(np.array([token]))[0]  # (n_embd,)
        cos, sin = self.rope.tables(np.array([pos]))
        cos, sin = cos[0], sin[0]  # (rope_dim/2,)
        h = np.empty_like(x)  # (n_embd,)
        att = np.empty((a.n_head, a.head_dim), np.float32)
        for il, b in enumerate(self.blk):
            _rms_norm_into(x, b.attn_norm.weight, eps, h)
            q = b.attn_q.vec(h).reshape(a.n_head, a.head_dim)
            k = b.attn_k.vec(h).reshape(a.n_head_kv, a.head_dim)
            v = b.attn_v.vec(h).reshape(a.n_head_kv, a.head_dim)
            _rope_store_attend(q, k, v, cos, sin, a.rope_neox, cache.k[il], cache.v[il], pos,
                               scale, f16, att)
            _add_rms_norm_into(x, b.attn_output.vec(att.reshape(-1)), b.ffn_norm.weight, eps, h)
            g = b.ffn_gate.vec(h)  # (n_ff,)
            _swiglu_into(g, b.ffn_up.vec(h))
            x += b.ffn_down.vec(g)
        _rms_norm_into(x, self.output_norm.weight, eps, h)
        cache.tokens.append(token)
        return self.output.vec(h)  # (n_vocab,)

    def _forward_llama(self, tokens: np.ndarray, cache: KVCache, rows) -> np.ndarray:
        """``forward`` with llama.cpp's CPU roundings (see :mod:`blockq.kernels.cpu_q8`)."""
        from .kernels import cpu_q8 as L

        a = self.args
        if cache.cache_type != "f16":
            raise BadArgument("numerics='llama' needs an f16 KV cache, as llama.cpp's default; "
                              f"got {cache.cache_type!r}")
        if any(b is not None for b in self._biases()) or self.rope.freq_factors is not None \
                or float(self.rope.freq_scale) != 1.0:
            raise UnsupportedModel("numerics='llama' covers llama models without biases, rope "
                                   "frequency factors or rope scaling")
        dot = self._q8
        n = len(tokens)
        p0 = cache.n_past
        T = p0 + n
        x = self.token_embd.take_rows(tokens)  # (n, n_embd)
        if getattr(self, "_rope_llama", None) is None or len(self._rope_llama[0]) < T:
            self._rope_llama = L.rope_tables(float(self.rope.base), a.rope_dim,
                                             -(-max(T, 1) // 1024) * 1024)
        cos, sin = self._rope_llama[0][p0:T], self._rope_llama[1][p0:T]
        for il, b in enumerate(self.blk):
            h = L.rms_norm(x, b.attn_norm.weight, b.attn_norm.eps)
            q = dot[id(b.attn_q.weight)](h).reshape(n, a.n_head, a.head_dim)
            k = dot[id(b.attn_k.weight)](h).reshape(n, a.n_head_kv, a.head_dim)
            v = dot[id(b.attn_v.weight)](h).reshape(n, a.n_head_kv, a.head_dim)
            L.rope(q, cos, sin, a.rope_neox)
            L.rope(k, cos, sin, a.rope_neox)
            cache.store(il, p0, k, v)
            att = L.attention(q, cache.k[il, :, :T], cache.v[il, :, :T], p0, a.attn_scale)
            o = dot[id(b.attn_output.weight)](att)
            if il == a.n_layer - 1 and rows is not None:
                # NOTE: llama.cpp drops the rows without outputs after the attention output
                # projection; the kernels after it see fewer rows (and some pick their path
                # by the row count)
                o, x = o[rows], x[rows]
            x = (x + o).astype(np.float32)
            h = L.rms_norm(x, b.ffn_norm.weight, b.ffn_norm.eps)
            g = L.swiglu(dot[id(b.ffn_gate.weight)](h), dot[id(b.ffn_up.weight)](h))
            x = (x + dot[id(b.ffn_down.weight)](g)).astype(np.float32)
        cache.tokens.extend(int(t) for t in tokens)
        h = L.rms_norm(x, self.output_norm.weight, self.output_norm.eps)
        return dot[id(self.output.weight)](h)  # (n_outputs, n_vocab)

    def _biases(self):
        yield self.output.bias
        for b in self.blk:
            for lin in (b.attn_q, b.attn_k, b.attn_v, b.attn_output, b.ffn_gate, b.ffn_up,
                        b.ffn_down):
                yield lin.bias


def _as_f32(t) -> np.ndarray:
    """A small non-matrix tensor (norm weight, bias) as a float32 vector."""
    if t.qtype == "F32":
        return np.frombuffer(t.data, dtype="<f4").reshape(t.shape).astype(np.float32)
    from .dequantize import dequantize
    return np.asarray(dequantize(t.data, t.qtype, t.shape), dtype=np.float32)


def _opt_vector(tensors: Mapping, name: str, n: int) -> np.ndarray | None:
    if name not in tensors:
        return None
    t = tensors[name]
    if tuple(t.shape) != (n,):
        raise FormatError(f"tensor {name!r} has shape {tuple(t.shape)}, expected ({n},)")
    return _as_f32(t)


def load_model(path: "str | Path") -> Model:
    """Open a llama-family GGUF file; other architectures raise :class:`UnsupportedModel`."""
    return Model.load(path)
