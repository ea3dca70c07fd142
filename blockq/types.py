"""The block-type table: the single source of truth for every other module.

Each type is a run of fixed-size blocks; a block holds ``block_size`` weights in ``type_size``
bytes.  ``fields`` lists the block's fields in byte order as ``(name, numpy dtype, count)``; the
byte size of a block is derived from it (``tests/test_types.py`` checks the table against it), and
``QType.dtype`` gives the numpy structured dtype that views raw bytes as blocks.

Ids are GGML's (``enum ggml_type``), so files flow both ways with llama.cpp.

Each :class:`QType` is also the one record that joins a type to its implementations
(STYLE.md habit 14): backends call :func:`register` for what they provide (``CAPABILITIES``
names the slots and the module that fills each), ``QType.impl(cap)`` finds it, and a type
declares in ``lacks`` what it has no implementation of, so that ``tests/test_types.py`` can show
every capability of every type or its explicit absence.  ``dot`` is the activation type
llama.cpp's CPU product quantizes ``x`` to for this weight type (``vec_dot_type``).

A type id the table does not know (removed or future GGML types) gets a placeholder from
:func:`undecodable`: files holding it can be listed, not decoded.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from .errors import BadArgument

QK_K = 256  # weights per k-quant super-block
QK = 32  # weights per legacy block

Field = tuple[str, str, int]  # (name, numpy dtype string, element count)

# capability -> the modules that register it, "module" or "module:function" separated by
# commas (imported, and the function called, on first use)
_CPU = "blockq.kernels.cpu_dequant,blockq.kernels.cpu_matvec,blockq.kernels.cpu_iquant"
CAPABILITIES: dict[str, str] = {
    "reference": "blockq.dequantize",  # numpy dequantizer, the oracle: records (n,) -> (n, bs)
    "dequantize": _CPU,  # CPU kernel: fn(blocks (n, ts), out (n, bs))
    "quantize": "blockq.quantize:load_quantizers",  # row quantizer fn(x, imatrix, out)
    "matvec": _CPU,  # QMatrix kernels: (matvec kernel or None, decode-rows kernel or None)
    "gpu": "blockq.gpu.source",  # CUDA decoder in blocks.cuh (its kernel-name suffix)
}


@dataclass(frozen=True)
class QType:
    id: int  # GGML type id
    name: str  # GGML type name, e.g. "Q4_K"
    block_size: int  # weights per block
    type_size: int  # bytes per block
    fields: tuple[Field, ...]  # byte layout of one block, in order
    description: str = ""
    dot: str | None = None  # llama.cpp's vec_dot_type: what x is quantized to for W @ x
    lacks: tuple[str, ...] = ()  # capabilities this type has no implementation of
    needs_imatrix: bool = False  # llama.cpp refuses to quantize it without importance vectors
    dtype: np.dtype = field(init=False, repr=False, compare=False)
    _impl: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        dt = np.dtype([(n, t, (c,)) if c > 1 else (n, t) for n, t, c in self.fields])
        object.__setattr__(self, "dtype", dt)
        unknown = set(self.lacks) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"{self.name}: unknown capabilities {sorted(unknown)}")

    @property
    def decodable(self) -> bool:
        """False for the placeholder of a type id blockq does not know (see ``undecodable``)."""
        return self.type_size > 0

    def has(self, capability: str) -> bool:
        """Whether the type has an implementation of ``capability`` (declared; imports nothing)."""
        return self.decodable and capability in CAPABILITIES and capability not in self.lacks

    def impl(self, capability: str):
        """The registered implementation of ``capability``; imports its module on first use."""
        if not self.has(capability):
            why = "cannot be decoded" if not self.decodable else f"has no {capability}"
            have = [t.name for t in _TYPES if t.has(capability)]
            raise BadArgument(f"block type {self.name} {why} in blockq"
                              + (f"; types with {capability}: {', '.join(have)}" if have else ""))
        if capability not in self._impl:
            _load(capability)
        if capability not in self._impl:
            raise RuntimeError(f"{CAPABILITIES[capability]} registered no {capability} for "
                               f"{self.name}, which does not declare it lacking")
        return self._impl[capability]

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of ``n_cols`` weights; the row length must be whole blocks."""
        if n_cols % self.block_size:
            raise BadArgument(
                f"{self.name} needs rows whose length is a multiple of {self.block_size}, "
                f"got a row of {n_cols}")
        return n_cols // self.block_size * self.type_size


_NEW = ("quantize",)  # decoded on CPU and GPU, multiplied on the CPU; no quantizer yet
_NEW_Q = ()  # ... with a quantizer
_INT = ("matvec", "quantize", "gpu")  # integer / F64 tensors: decoded, never multiplied

_TYPES = (
    QType(0, "F32", 1, 4, (("f", "<f4", 1),), "32-bit IEEE float", dot="F32"),
    QType(1, "F16", 1, 2, (("f", "<f2", 1),), "16-bit IEEE half", dot="F16"),
    QType(2, "Q4_0", QK, 2 + QK // 2, (("d", "<f2", 1), ("qs", "u1", QK // 2)),
          "4-bit, scale only: w = d * (q - 8)", dot="Q8_0"),
    QType(3, "Q4_1", QK, 2 + 2 + QK // 2,
          (("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", QK // 2)),
          "4-bit, scale and min: w = d * q + m", dot="Q8_1"),
    QType(6, "Q5_0", QK, 2 + 4 + QK // 2,
          (("d", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", QK // 2)),
          "5-bit, scale only: w = d * (q - 16)", dot="Q8_0"),
    QType(7, "Q5_1", QK, 2 + 2 + 4 + QK // 2,
          (("d", "<f2", 1), ("m", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", QK // 2)),
          "5-bit, scale and min: w = d * q + m", dot="Q8_1"),
    QType(8, "Q8_0", QK, 2 + QK, (("d", "<f2", 1), ("qs", "i1", QK)),
          "8-bit, scale only: w = d * q", dot="Q8_0"),
    QType(10, "Q2_K", QK_K, QK_K // 16 + QK_K // 4 + 2 + 2,
          (("scales", "u1", QK_K // 16), ("qs", "u1", QK_K // 4), ("d", "<f2", 1),
           ("dmin", "<f2", 1)),
          "2-bit k-quant: 16 sub-blocks of 16, 4-bit scales and mins", dot="Q8_K"),
    QType(11, "Q3_K", QK_K, QK_K // 8 + QK_K // 4 + 12 + 2,
          (("hmask", "u1", QK_K // 8), ("qs", "u1", QK_K // 4), ("scales", "u1", 12),
           ("d", "<f2", 1)),
          "3-bit k-quant: 16 sub-blocks of 16, 6-bit signed scales", dot="Q8_K"),
    QType(12, "Q4_K", QK_K, 2 + 2 + 12 + QK_K // 2,
          (("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)),
          "4-bit k-quant: 8 sub-blocks of 32, 6-bit scales and mins", dot="Q8_K"),
    QType(13, "Q5_K", QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2,
          (("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12), ("qh", "u1", QK_K // 8),
           ("qs", "u1", QK_K // 2)),
          "5-bit k-quant: 8 sub-blocks of 32, 6-bit scales and mins", dot="Q8_K"),
    QType(14, "Q6_K", QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,
          (("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16),
           ("d", "<f2", 1)),
          "6-bit k-quant: 16 sub-blocks of 16, 8-bit signed scales", dot="Q8_K"),
    QType(15, "Q8_K", QK_K, 4 + QK_K + 2 * QK_K // 16,
          (("d", "<f4", 1), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16)),
          "8-bit activations for k-quant dot products: f32 scale, sums of 16"),
    QType(16, "IQ2_XXS", QK_K, 2 + QK_K // 4, (("d", "<f2", 1), ("qs", "<u2", QK_K // 8)),
          "2.06 bpw i-quant: 8-weight groups from a 256-point E8 lattice codebook, 7-bit signs",
          dot="Q8_K", needs_imatrix=True, lacks=_NEW_Q),
    QType(17, "IQ2_XS", QK_K, 2 + QK_K // 4 + QK_K // 32,
          (("d", "<f2", 1), ("qs", "<u2", QK_K // 8), ("scales", "u1", QK_K // 32)),
          "2.31 bpw i-quant: 512-point codebook, 4-bit sub-block scales", dot="Q8_K",
          needs_imatrix=True, lacks=_NEW_Q),
    QType(18, "IQ3_XXS", QK_K, 2 + 3 * QK_K // 8,
          (("d", "<f2", 1), ("qs", "u1", QK_K // 4), ("scales_signs", "<u4", QK_K // 32)),
          "3.06 bpw i-quant: 4-weight groups from a 256-point codebook", dot="Q8_K", lacks=_NEW_Q),
    QType(19, "IQ1_S", QK_K, 2 + QK_K // 8 + QK_K // 16,
          (("d", "<f2", 1), ("qs", "u1", QK_K // 8), ("qh", "<u2", QK_K // 32)),
          "1.56 bpw i-quant: ternary 8-weight groups (2048-point grid) plus a shift",
          dot="Q8_K", needs_imatrix=True, lacks=_NEW_Q),
    QType(20, "IQ4_NL", QK, 2 + QK // 2, (("d", "<f2", 1), ("qs", "u1", QK // 2)),
          "4-bit non-linear: w = d * kvalues[q], a fixed 16-value grid", dot="Q8_0", lacks=_NEW_Q),
    QType(21, "IQ3_S", QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64,
          (("d", "<f2", 1), ("qs", "u1", QK_K // 4), ("qh", "u1", QK_K // 32),
           ("signs", "u1", QK_K // 8), ("scales", "u1", QK_K // 64)),
          "3.44 bpw i-quant: 512-point codebook of 4-weight groups, explicit signs",
          dot="Q8_K", lacks=_NEW_Q),
    QType(22, "IQ2_S", QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 32,
          (("d", "<f2", 1), ("qs", "u1", QK_K // 8), ("signs", "u1", QK_K // 8),
           ("qh", "u1", QK_K // 32), ("scales", "u1", QK_K // 32)),
          "2.56 bpw i-quant: 1024-point codebook, explicit signs", dot="Q8_K", lacks=_NEW_Q),
    QType(23, "IQ4_XS", QK_K, 2 + 2 + QK_K // 64 + QK_K // 2,
          (("d", "<f2", 1), ("scales_h", "<u2", 1), ("scales_l", "u1", QK_K // 64),
           ("qs", "u1", QK_K // 2)),
          "4.25 bpw non-linear: IQ4_NL's grid with 6-bit scales per 32", dot="Q8_K", lacks=_NEW_Q),
    QType(24, "I8", 1, 1, (("i", "i1", 1),), "8-bit signed integer", lacks=_INT),
    QType(25, "I16", 1, 2, (("i", "<i2", 1),), "16-bit signed integer", lacks=_INT),
    QType(26, "I32", 1, 4, (("i", "<i4", 1),), "32-bit signed integer", lacks=_INT),
    QType(27, "I64", 1, 8, (("i", "<i8", 1),), "64-bit signed integer", lacks=_INT),
    QType(28, "F64", 1, 8, (("f", "<f8", 1),), "64-bit IEEE float", lacks=_INT),
    QType(29, "IQ1_M", QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32,
          (("qs", "u1", QK_K // 8), ("qh", "u1", QK_K // 16), ("scales", "<u2", QK_K // 64)),
          "1.75 bpw i-quant: IQ1_S's grid, 3-bit scales per 16, f16 d spread over the scales",
          dot="Q8_K", lacks=_NEW_Q),
    QType(30, "BF16", 1, 2, (("f", "<u2", 1),), "bfloat16 (upper half of an f32)", dot="BF16"),
    QType(34, "TQ1_0", QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2,
          (("qs", "u1", (QK_K - 4 * QK_K // 64) // 5), ("qh", "u1", QK_K // 64),
           ("d", "<f2", 1)),
          "1.69 bpw ternary (BitNet b1.58): 5 trits per byte, w = d * t, t in -1..1",
          dot="Q8_K", lacks=_NEW_Q),
    QType(35, "TQ2_0", QK_K, QK_K // 4 + 2, (("qs", "u1", QK_K // 4), ("d", "<f2", 1)),
          "2.06 bpw ternary: 2 bits per trit, w = d * t, t in -1..1", dot="Q8_K", lacks=_NEW_Q),
    QType(39, "MXFP4", QK, 1 + QK // 2, (("e", "u1", 1), ("qs", "u1", QK // 2)),
          "OCP microscaling FP4: E2M1 values times a power-of-two (E8M0) scale", dot="Q8_0",
          lacks=_NEW_Q),
)

BY_NAME: dict[str, QType] = {t.name: t for t in _TYPES}
BY_ID: dict[int, QType] = {t.id: t for t in _TYPES}
ALL: tuple[QType, ...] = _TYPES


def undecodable(type_id: int, name: str | None = None) -> QType:
    """The placeholder record of a type id blockq cannot decode: listed by number, no layout."""
    label = f"{name} (id {type_id}, cannot be decoded)" if name else \
        f"id {type_id} (cannot be decoded)"
    return QType(int(type_id), label, 1, 0, (), "cannot be decoded by blockq")


def register(q: "str | int | QType", capability: str, impl) -> None:
    """Record ``impl`` as the type's implementation of ``capability`` (called by backends)."""
    t = qtype(q)
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    if capability in t.lacks:
        raise ValueError(f"{t.name} declares it lacks {capability}; drop it from its lacks "
                         f"in blockq/types.py to register one")
    t._impl[capability] = impl


def _load(capability: str) -> None:
    for spec in CAPABILITIES[capability].split(","):
        module, _, fn = spec.partition(":")
        mod = importlib.import_module(module)
        if fn:
            getattr(mod, fn)()


def qtype(q: "str | int | QType") -> QType:
    """Look a block type up by name ("Q4_K", case-insensitive), GGML id (12) or QType."""
    if isinstance(q, QType):
        return q
    if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
        t = BY_ID.get(int(q))
        if t is None:
            raise BadArgument(f"unknown GGML type id {int(q)}; known: "
                              + ", ".join(f"{t.name}={t.id}" for t in _TYPES))
        return t
    if isinstance(q, str):
        t = BY_NAME.get(q.upper())
        if t is None:
            raise BadArgument(f"unknown block type {q!r}; known: " + ", ".join(BY_NAME))
        return t
    raise BadArgument(f"block type must be a name or a GGML id, got {type(q).__name__}")
