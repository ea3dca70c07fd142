"""The runtime shared by every architecture: configuration from GGUF metadata
(:class:`ModelArgs`), rotary tables, the KV cache, and :class:`Model`, which maps a file's
tensors onto its architecture's blocks (:mod:`blockq.models`) and runs the forward pass.

One straight pass, as in llama2.c: metadata -> :class:`ModelArgs`; tensors -> attributes named
exactly like the file's tensors (``token_embd``, ``blk[i].attn_q``, ``blk[i].ffn_gate``,
``output_norm``, ``output``) holding zero-copy :class:`QMatrix` views of the mmapped blocks;
``forward(tokens, cache)`` -> logits.  Weights stay quantized; activations are float32.

The pass is written once over an operations set (:mod:`blockq.ops`): blockq's CPU kernels by
default, llama.cpp's roundings for ``numerics="llama"``, CuPy for the blocks offloaded to a GPU,
each optionally observed (calibration).
"""
from __future__ import annotations

import math
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadArgument, FormatError, UnsupportedModel
from .gguf.constants import Keys
from .models import ARCHITECTURES, Block, Linear, RMSNorm, architecture  # noqa: F401
from .ops import CPUOps, LlamaOps, Observed, attention  # noqa: F401
from .validate import MAX_CONTEXT, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, Fields, check_int, show

ARCHS = ARCHITECTURES  # the architectures blockq runs, by general.architecture
ROPE_SCALE_LINEAR_OLD = "{arch}.rope.scale_linear"  # pre-2024 files: linear factor under this key
ACTIVATIONS = ("silu", "gelu")
MAX_ROPE_FACTOR = 1024.0  # linear rope scaling factors beyond [1/this, this] are not a model


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a decoder model, read from GGUF metadata."""
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
    activation: str = "silu"  # feed-forward gate: "silu" (SwiGLU) or "gelu" (GeGLU, tanh form)
    embd_scale: float = 0.0  # token embeddings times this (0: not scaled)
    sliding_window: int = 0  # keys a local layer sees (0: every layer attends to all)
    swa_layers: tuple = ()  # per layer: True where the layer is local (sliding window)
    rope_base_swa: float = 0.0  # rope base of the local layers (0: rope_base)
    rope_freq_scale_swa: float = 0.0  # their position scale (0: rope_freq_scale)
    final_softcap: float = 0.0  # logits = cap * tanh(logits / cap) (0: none)
    attn_softcap: float = 0.0  # attention scores, likewise
    rope_ext_factor: float = 0.0  # YaRN's mix of extrapolated frequencies (1 for yarn, 0: none)
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor: cos and sin times this
    n_ctx_orig: int = 0  # rope.scaling.original_context_length (0: n_ctx_train)
    # derived in __post_init__
    rope_neox: bool = field(init=False)
    n_gqa: int = field(init=False)  # query heads per key/value head
    n_embd_q: int = field(init=False)  # n_head * head_dim
    n_embd_kv: int = field(init=False)  # n_head_kv * head_dim

    def __post_init__(self) -> None:
        arch = architecture(self.arch)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.head_dim == 0:
            set_("head_dim", self.n_embd // self.n_head)
        if self.rope_dim == 0:
            set_("rope_dim", self.head_dim)
        if self.attn_scale == 0.0:
            set_("attn_scale", 1.0 / math.sqrt(self.head_dim))
        if self.n_ctx_orig == 0:
            set_("n_ctx_orig", self.n_ctx_train)
        if self.n_head % self.n_head_kv:
            raise FormatError(f"{self.arch}: head_count {self.n_head} is not a multiple of "
                              f"head_count_kv {self.n_head_kv}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise FormatError(f"{self.arch}: rope.dimension_count {self.rope_dim} must be even "
                              f"and at most the head size {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            raise BadArgument(f"activation {self.activation!r}: use one of {ACTIVATIONS}")
        if self.swa_layers and len(self.swa_layers) != self.n_layer:
            raise FormatError(f"{self.arch}: {len(self.swa_layers)} sliding-window flags for "
                              f"{self.n_layer} layers")
        set_("rope_neox", arch.rope_neox)
        set_("n_gqa", self.n_head // self.n_head_kv)
        set_("n_embd_q", self.n_head * self.head_dim)
        set_("n_embd_kv", self.n_head_kv * self.head_dim)

    @classmethod
    def from_metadata(cls, md: Mapping, n_vocab: int | None = None,
                      where: str = "metadata") -> "ModelArgs":
        """Build from a GGUF metadata mapping; ``n_vocab`` (token_embd rows) when known.

        Every key is checked for type and range (:mod:`blockq.validate`); ``where`` (the file
        name) starts each error message.
        """
        f = Fields(md, where)
        arch = f.text(Keys.General.ARCHITECTURE)
        spec = architecture(arch, where)
        f = Fields(md, where, arch)
        n_expert = f.integer(Keys.LLM.EXPERT_COUNT, 0, lo=0)
        if n_expert:  # e.g. Mixtral, stored as arch llama
            raise UnsupportedModel(f"{where}: {arch} with {n_expert} experts "
                                   f"({f.key(Keys.LLM.EXPERT_COUNT)}): mixture-of-experts models "
                                   f"are not supported yet (supported: dense "
                                   f"{', '.join(ARCHITECTURES)})")

        n_embd = f.integer(Keys.LLM.EMBEDDING_LENGTH)
        n_head = f.integer(Keys.Attention.HEAD_COUNT, hi=MAX_HEADS)
        n_head_kv = f.integers(Keys.Attention.HEAD_COUNT_KV, n_head, hi=MAX_HEADS)
        if isinstance(n_head_kv, list):  # per-layer form
            if len(set(n_head_kv)) != 1:
                raise UnsupportedModel(f"{where}: per-layer head_count_kv {show(n_head_kv)} "
                                       "(only one value for all layers is supported)")
            n_head_kv = n_head_kv[0]
        scaling = f.text(Keys.Rope.SCALING_TYPE, "linear")
        if scaling not in spec.rope_scalings:
            raise UnsupportedModel(f"{where}: rope scaling type {scaling!r} is not supported "
                                   f"yet (supported: {', '.join(spec.rope_scalings)})")
        factor = f.number(Keys.Rope.SCALING_FACTOR, 0.0, lo=0.0, hi=MAX_ROPE_FACTOR) \
            or f.number(ROPE_SCALE_LINEAR_OLD, 0.0, lo=0.0, hi=MAX_ROPE_FACTOR)
        if 0.0 < factor < 1.0 / MAX_ROPE_FACTOR:
            raise FormatError(f"{where}: rope scaling factor {factor!r} is too small; it must "
                              f"be 0 (none) or in [{1.0 / MAX_ROPE_FACTOR}, {MAX_ROPE_FACTOR}]")
        if n_vocab is None:
            n_vocab = f.get(Keys.LLM.VOCAB_SIZE)
            if n_vocab is None:
                n_vocab = len(f.strings(Keys.Tokenizer.TOKENS))
        n_vocab = check_int(n_vocab, f"{where}: vocabulary size", hi=MAX_VOCAB)
        head_dim = f.integer(Keys.Attention.KEY_LENGTH, None) or 0
        if head_dim:
            value_length = f.integer(Keys.Attention.VALUE_LENGTH, head_dim)
            if value_length != head_dim:
                raise UnsupportedModel(f"{where}: key_length {head_dim} differs from "
                                       f"value_length {value_length}")
        elif n_embd % n_head:
            raise FormatError(f"{where}: embedding_length {n_embd} is not a multiple of "
                              f"head_count {n_head} (and no attention.key_length is given)")
        fields = dict(
            arch=arch,
            n_vocab=n_vocab,
            n_ctx_train=f.integer(Keys.LLM.CONTEXT_LENGTH, 2048, hi=MAX_CONTEXT),
            n_embd=n_embd,
            n_layer=f.integer(Keys.LLM.BLOCK_COUNT, hi=MAX_LAYERS),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=f.integer(Keys.LLM.FEED_FORWARD_LENGTH),
            rms_eps=f.number(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5, lo=0.0, lo_open=True,
                             hi=1.0),
            head_dim=head_dim,
            rope_dim=f.integer(Keys.Rope.DIMENSION_COUNT, 0, lo=0),
            rope_base=f.number(Keys.Rope.FREQ_BASE, 10000.0, lo=1.0, lo_open=True),
            rope_freq_scale=1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor,
            attn_scale=f.number(Keys.Attention.SCALE, 0.0, lo=0.0, hi=1e6),
            # NOTE: llama.cpp reads these two for every architecture; YaRN's betas and
            # extrapolation factor keep their defaults (32, 1, 1) for the ones blockq runs
            rope_ext_factor=1.0 if scaling == "yarn" else 0.0,
            rope_attn_factor=f.number(Keys.Rope.SCALING_ATTN_FACTOR, 1.0, lo=0.0, lo_open=True,
                                      hi=MAX_ROPE_FACTOR),
            n_ctx_orig=f.integer(Keys.Rope.SCALING_ORIG_CTX_LEN, 0, lo=0, hi=MAX_CONTEXT),
        )
        if scaling == "yarn" and factor == 0.0:
            raise FormatError(f"{where}: rope scaling type 'yarn' needs "
                              f"{f.key(Keys.Rope.SCALING_FACTOR)} (the context extension, > 0)")
        fields.update(spec.extra_args(f, fields))
        return cls(**fields)


YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # NOTE: llama.cpp's defaults (llama-hparams.h)


class Rope:
    """Rotary position embedding tables, computed the way ggml's CPU rope computes them:
    frequencies divided by per-pair ``freq_factors`` (llama3's ``rope_freqs``, Phi-3's long or
    short factors), positions scaled by ``freq_scale`` (linear), YaRN's ramp between scaled and
    unscaled frequencies when ``args.rope_ext_factor`` is set, cos and sin times ``mscale``."""

    def __init__(self, args: ModelArgs, freq_factors: np.ndarray | None = None,
                 base: float | None = None, freq_scale: float | None = None):
        f32 = np.float32
        self.half = args.rope_dim // 2
        self.neox = args.rope_neox
        self.base = f32(args.rope_base if base is None else base)
        self.freq_scale = f32(args.rope_freq_scale if freq_scale is None else freq_scale)
        self.freq_factors = freq_factors  # (rope_dim/2,) or None
        self.ext_factor = f32(args.rope_ext_factor)
        # NOTE: as llama_context's yarn_attn_factor (float arithmetic): with YaRN, mscale(factor)
        # of the model's factor, cancelled again (ggml's rope multiplies it back in), times the
        # file's attn_factor
        attn = f32(1.0)
        if self.ext_factor != 0:
            factor = f32(1.0) / f32(args.rope_freq_scale)
            attn = f32(1.0) if factor <= 1 else f32(f32(0.1) * np.log(factor) + f32(1.0))
            attn = f32(attn * (f32(1.0) / (f32(1.0) + f32(0.1) * np.log(factor))))
        attn = f32(attn * f32(args.rope_attn_factor))
        self.mscale = attn if self.ext_factor == 0 else \
            f32(attn * (f32(1.0) + f32(0.1) * np.log(f32(1.0) / self.freq_scale)))
        self.corr = (0.0, 0.0)
        if self.ext_factor != 0:  # ggml_rope_yarn_corr_dims
            def dim(beta):
                turns = f32(f32(beta) * f32(2)) * f32(math.pi)
                return f32(2 * self.half) * np.log(f32(args.n_ctx_orig) / turns) \
                    / (f32(2) * np.log(self.base))
            self.corr = (max(0.0, math.floor(dim(YARN_BETA_FAST))),
                         min(2 * self.half - 1.0, math.ceil(dim(YARN_BETA_SLOW))))
        self._cos = self._sin = np.empty((0, self.half), np.float32)  # (positions, half)

    @property
    def plain(self) -> bool:
        """No factors, scaling or YaRN: the rope numerics='llama' reproduces."""
        return (self.freq_factors is None and self.freq_scale == 1 and self.ext_factor == 0
                and self.mscale == 1)

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
        extrap = theta.copy() if self.ext_factor != 0 else None
        theta *= self.freq_scale
        if extrap is not None:  # YaRN: pair i keeps ramp(i) of its unscaled angle
            lo, hi = self.corr
            y = (np.arange(self.half, dtype=np.float32) - np.float32(lo)) \
                / np.float32(max(0.001, hi - lo))
            ramp = (np.float32(1) - np.clip(y, 0, 1)) * self.ext_factor  # (half,)
            theta = theta * (np.float32(1) - ramp) + extrap * ramp
        cos, sin = np.cos(theta), np.sin(theta)
        if self.mscale != 1:
            cos *= self.mscale
            sin *= self.mscale
        return cos, sin

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
# Model.load(numerics=...): "default" dots 8-bit activations with the weights' integer codes, as
# llama.cpp's CPU backend (where this CPU has int8 kernels: blockq.kernels.cpu_isa), "float"
# multiplies float32 activations by decoded weights, "llama" reproduces llama.cpp bit for bit
NUMERICS = ("default", "float", "llama")


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
    n = math.prod(shape) * 4
    try:
        buf = mmap.mmap(-1, max(n, 1))  # anonymous: zero-filled on first touch
    except (OSError, OverflowError, MemoryError):
        raise BadArgument(f"a KV cache of shape {shape} ({n / 2**30:.1f} GiB) cannot be "
                          "reserved here; use a smaller context (-c / n_ctx)") from None
    return np.frombuffer(buf, np.float32, count=n // 4).reshape(shape)


class Step:
    """What one forward call's layers share: the positions, the cache, the rows that get outputs,
    each layer's rope and window, and the rope tables of these positions."""

    def __init__(self, model: "Model", p0: int, n: int, cache: KVCache, rows):
        self.args, self.p0, self.n, self.cache, self.rows = model.args, p0, n, cache, rows
        self.ropes, self.windows = model.ropes_for(cache.n_ctx), model.windows
        self._tables: dict = {}

    def tables(self, rope: Rope) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (n, rope_dim/2) of ``rope`` at positions p0..p0+n (host arrays)."""
        t = self._tables.get(id(rope))
        if t is None:
            t = self._tables[id(rope)] = rope.tables(np.arange(self.p0, self.p0 + self.n))
        return t


class Model:
    """A decoder transformer whose weights are the GGUF file's blocks."""

    numerics = "default"  # "llama": every step as llama.cpp's CPU backend rounds it (slow)
    device = None  # blockq.gpu.offload.DeviceOps: the last blocks on a GPU (Model.offload)
    observe = None  # observe(weight_name, x) sees every linear input (blockq.imatrix)

    def __init__(self, args: ModelArgs, tensors: Mapping, metadata: Mapping | None = None):
        """``tensors``: name -> tensor info (``.qtype``, ``.shape``, ``.data``) as read_gguf gives."""
        from .kernels.cpu_matvec import QMatrix

        self.args = args
        self.metadata = metadata if metadata is not None else {}
        self._tensors = tensors  # to name a damaged one (check_weights)
        a = args
        spec = architecture(a.arch)

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
            return _as_f32(tensors[name])

        block_names = {t.name for t in spec.block.TENSORS}
        for name in tensors:
            parts = name.split(".")
            ok = (parts[0] in GLOBAL_TENSORS and len(parts) == 2) or (
                parts[0] == "blk" and len(parts) == 4 and parts[2] in block_names
                and parts[3] in ("weight", "bias") and parts[1].isdigit()
                and int(parts[1]) < a.n_layer)
            if not ok:
                raise UnsupportedModel(f"{a.arch} model: tensor {name!r} is not part of the "
                                       f"{a.arch} layout blockq runs (mixture-of-experts or "
                                       "another variant?)")

        self.token_embd = matrix("token_embd.weight", (a.n_vocab, a.n_embd))
        self.output_norm = RMSNorm(vector("output_norm.weight", a.n_embd), a.rms_eps,
                                   "output_norm.weight")
        if "output.weight" in tensors:
            self.output = Linear(matrix("output.weight", (a.n_vocab, a.n_embd)),
                                 _opt_vector(tensors, "output.bias", a.n_vocab), "output.weight")
        else:  # tied embeddings: the output projection is the embedding table
            self.output = Linear(self.token_embd, name="output.weight")
        self.tied = "output.weight" not in tensors
        def factors(name):
            return vector(name, a.rope_dim // 2) if name in tensors else None

        # NOTE: as llama_model::get_rope_factors: rope_freqs (llama3) if present, else Phi-3's
        # long factors when the context exceeds the original one, else its short factors
        freqs = factors("rope_freqs.weight")
        long = factors("rope_factors_long.weight")
        self.rope = Rope(a, freqs if freqs is not None else factors("rope_factors_short.weight"))
        self.ropes, self.windows = self._layer_ropes(self.rope)  # per layer; window 0: all keys
        self.ropes_long = None  # per layer, for contexts beyond n_ctx_orig
        if freqs is None and long is not None:
            self.ropes_long = self._layer_ropes(Rope(a, long))[0]

        self.blk: list[Block] = []
        for i in range(a.n_layer):
            parts = {}
            for t in spec.block.TENSORS:
                pre = f"blk.{i}.{t.name}"
                if not t.required and pre + ".weight" not in tensors:
                    continue
                shape = t.shape(a)
                if t.kind == "norm":
                    parts[t.name] = RMSNorm(vector(pre + ".weight", shape[0]), a.rms_eps,
                                            pre + ".weight")
                else:
                    parts[t.name] = Linear(matrix(pre + ".weight", shape),
                                           _opt_vector(tensors, pre + ".bias", shape[0]),
                                           pre + ".weight")
            self.blk.append(spec.block(parts))
        self.cpu = CPUOps()
        self.ops = self.cpu  # the set the CPU blocks and the head run with

    def _layer_ropes(self, rope: Rope) -> tuple[list, list]:
        """Each layer's rope (``rope``, or the local layers' own) and window (0: all keys)."""
        a = self.args
        rope_swa = rope
        base_swa = a.rope_base_swa or a.rope_base
        scale_swa = a.rope_freq_scale_swa or a.rope_freq_scale
        if any(a.swa_layers) and (base_swa, scale_swa) != (a.rope_base, a.rope_freq_scale):
            rope_swa = Rope(a, None, base=base_swa, freq_scale=scale_swa)
        swa = a.swa_layers or (False,) * a.n_layer
        return ([rope_swa if s else rope for s in swa],
                [a.sliding_window if s else 0 for s in swa])

    def ropes_for(self, n_ctx: int) -> list:
        """The per-layer ropes of a context of ``n_ctx`` tokens."""
        # NOTE: llama.cpp compares its context rounded up to a multiple of 256
        if self.ropes_long is not None and -(-n_ctx // 256) * 256 > self.args.n_ctx_orig:
            return self.ropes_long
        return self.ropes

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
            tensors = r.tensors
            n_vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors \
                else None
            model = cls(ModelArgs.from_metadata(md, n_vocab, Path(path).name), tensors, md)
        except BaseException:
            reader.__exit__(None, None, None)
            raise
        model._reader = reader  # keeps the mapping alive as long as the model
        model.path = Path(path)
        if numerics != "default":
            model.set_numerics(numerics)
        return model

    def set_numerics(self, numerics: str) -> None:
        """Switch between blockq's int8 ("default") or float kernels and llama.cpp's exact
        roundings ("llama")."""
        if numerics not in NUMERICS:
            raise BadArgument(f"numerics {numerics!r} is unknown; use one of {NUMERICS}")
        if numerics != "default" and self.device is not None:
            raise BadArgument("GPU offload runs the default numerics, not numerics="
                              f"{numerics!r}")
        for _, lin in self.linears():
            lin.weight.set_int8(numerics != "float")
        if numerics == "llama":
            if getattr(self, "_llama_ops", None) is None:
                self._llama_ops = LlamaOps(self)
            self.ops = self._llama_ops
        else:
            self.ops = self.cpu
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

    def linears(self):
        """(weight name, Linear) of every matrix product, the output head last."""
        for b in self.blk:
            for lin in b.linears():
                yield lin.name, lin
        yield "output.weight", self.output

    @property
    def nbytes(self) -> int:
        """Bytes of all weights as stored (quantized)."""
        total = self.token_embd.nbytes
        for name, lin in self.linears():
            if not (self.tied and name == "output.weight"):
                total += lin.weight.nbytes
        return total

    def new_cache(self, n_ctx: int | None = None, cache_type: str = "f16") -> KVCache:
        return KVCache(self.args, n_ctx or self.args.n_ctx_train, cache_type)

    def offload(self, n_layers: int, xp=None, to_device=None) -> None:
        """Put the last ``n_layers`` blocks (and the output head when all are) on the GPU.

        ``xp`` / ``to_device``: the array module and the function that moves a ``QMatrix`` to
        the device; by default CuPy and :class:`blockq.gpu.matrix.GPUQMatrix`.
        """
        from .gpu.offload import DeviceOps

        if n_layers and self.numerics != "default":
            raise BadArgument("GPU offload runs the default numerics, not numerics="
                              f"{self.numerics!r}")
        self.device = DeviceOps(self, n_layers, xp, to_device) if n_layers else None

    # -- forward --------------------------------------------------------------------------

    def forward(self, tokens: Sequence[int], cache: KVCache,
                outputs: "str | np.ndarray" = "last") -> np.ndarray:
        """Run ``tokens`` at positions ``cache.n_past``.. and append them to the cache.

        ``outputs``: "last" (logits of the last token), "all", or indices into ``tokens``.
        Returns logits (n_outputs, n_vocab) float32.  A damaged block (NaN/inf scale or value,
        checked on the first call) raises a FormatError naming the tensor.
        """
        p0 = cache.n_past
        if not getattr(self, "_weights_checked", False):  # once: ~1 GB/s, as the pass reads all
            self.check_weights()
            self._weights_checked = True
        try:
            logits = self._forward(tokens, cache, outputs)
        except ZeroDivisionError:  # a Numba kernel divided by an inf/NaN norm
            logits = None
        if logits is None or not np.isfinite(logits).all():
            self.check_weights()
            raise BadArgument(f"the logits after position {p0} are NaN/inf although every "
                              "weight block is finite: the activations overflowed")
        return logits

    def _forward(self, tokens, cache, outputs) -> np.ndarray:
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
        if rows is not None and n == 1 and len(rows) == 1 and rows[0] == 0:
            rows = None  # one token, its own output: nothing to drop

        cpu, dev = self.ops, self.device
        if self.observe is not None:
            cpu = Observed(cpu, self.observe)
            dev = dev if dev is None else Observed(dev, self.observe)
        first = a.n_layer if dev is None else dev.first  # blocks first.. run on the device
        step = Step(self, p0, n, cache, rows)
        x = self.embed(tokens, cpu)  # (n, n_embd)
        ops = cpu
        for il, b in enumerate(self.blk):
            if il == first:  # the one crossing host -> device
                x, ops = dev.enter(x), dev
            x = b(ops, x, il, step)  # (n or n_outputs, n_embd)
        if dev is not None and dev.head is None:
            x, ops = dev.to_host(x), cpu  # the head stays on the CPU
        x = self.head(x, ops)  # (n_outputs, n_vocab)
        cache.tokens.extend(int(t) for t in tokens)
        return ops.to_host(x)

    def embed(self, tokens, ops) -> np.ndarray:
        """The first step of the pass: token ids -> (n, n_embd) float32 rows."""
        x = self.token_embd.take_rows(np.asarray(tokens, dtype=np.int64))
        return ops.scale(x, self.args.embd_scale) if self.args.embd_scale else x

    def head(self, x, ops):
        """The last step: final norm and output matrix, (n, n_embd) -> (n, n_vocab) logits."""
        x = ops.linear(self.output, ops.rms_norm(x, self.output_norm))
        return ops.softcap(x, self.args.final_softcap) if self.args.final_softcap else x

    def check_weights(self) -> None:
        """Raise a FormatError naming the first tensor with NaN/inf blocks (scales or values)."""
        from .types import qtype
        from .validate import nonfinite_blocks

        for name, t in self._tensors.items():
            bad = nonfinite_blocks(t.data, qtype(t.qtype))
            if bad.size:
                where = f"{Path(self.path).name}: " if getattr(self, "path", None) else ""
                raise FormatError(f"{where}tensor {name} ({t.qtype}) has {bad.size} block(s) "
                                  f"that decode to NaN/inf (first: block {int(bad[0])}); the "
                                  "file is damaged or was quantized from out-of-range weights")


GLOBAL_TENSORS = ("token_embd", "output_norm", "output", "rope_freqs", "rope_factors_long",
                  "rope_factors_short")


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
    """Open a GGUF file of a supported architecture; others raise :class:`UnsupportedModel`."""
    return Model.load(path)
