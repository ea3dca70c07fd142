"""What every architecture module is made of: the layers (``Linear``, ``RMSNorm``), the tensor
table that loading, offload and calibration read, and the :class:`Architecture` record that
joins an architecture's name, rope convention, metadata reader and block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import numpy as np


class Linear:
    """``y = W x (+ b)`` with W quantized (rows = outputs, numpy order) and b float32."""

    def __init__(self, weight, bias: np.ndarray | None = None, name: str = ""):
        self.weight = weight  # QMatrix (n_out, n_in)
        self.bias = bias  # (n_out,) or None
        self.name = name  # the GGUF weight's name ("blk.3.attn_q.weight")

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, n_in) -> (n, n_out)
        if x.shape[0] == 1:
            y = self.weight.matvec(x[0])[None, :]
        else:
            y = self.weight.matmul(x)
        if self.bias is not None:
            y += self.bias
        return y


class RMSNorm:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""

    def __init__(self, weight: np.ndarray, eps: float, name: str = ""):
        self.weight = weight  # (d,)
        self.eps = eps
        self.name = name

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (n, d)
        # NOTE: like ggml_rms_norm, the sum of squares is taken in double, the scale in float.
        ms = np.einsum("ij,ij->i", x, x, dtype=np.float64) / x.shape[-1]
        scale = (1.0 / np.sqrt((ms + self.eps).astype(np.float32)))[:, None]
        return (x * scale) * self.weight


@dataclass(frozen=True)
class T:
    """One tensor of a block (name after ``blk.N.``) or of the model: its kind and shape."""
    name: str
    kind: str  # "linear" (quantized matrix, optional .bias) or "norm" (float vector)
    shape: Callable  # args -> shape tuple in numpy order
    required: bool = True


def linear(name, shape, required=True) -> T:
    return T(name, "linear", shape, required)


def norm(name, shape, required=True) -> T:
    return T(name, "norm", shape, required)


class Block:
    """One transformer layer; attributes are named like the GGUF tensors after ``blk.N.``.

    Subclasses give ``TENSORS`` and ``__call__(ops, x, il, step) -> x``.
    """

    TENSORS: ClassVar[tuple[T, ...]] = ()

    def __init__(self, layers: dict):
        for k, v in layers.items():
            setattr(self, k, v)

    def linears(self) -> Iterator[Linear]:
        for t in self.TENSORS:
            lin = getattr(self, t.name, None)
            if t.kind == "linear" and lin is not None:
                yield lin

    def norms(self) -> Iterator[RMSNorm]:
        for t in self.TENSORS:
            nm = getattr(self, t.name, None)
            if t.kind == "norm" and nm is not None:
                yield nm

    def __call__(self, ops, x, il: int, step):
        raise NotImplementedError


@dataclass(frozen=True)
class Architecture:
    """Everything one ``general.architecture`` does differently."""
    name: str
    block: type  # a Block subclass
    rope_neox: bool  # rotate (x[i], x[i + d/2]) pairs; False: adjacent (x[2i], x[2i+1]) pairs
    # (metadata reader: a blockq.validate.Fields, fields read so far) -> further ModelArgs fields
    extra_args: Callable[[Callable, dict], dict] = lambda get, fields: {}
    rope_scalings: tuple[str, ...] = ("none", "linear", "yarn")
    # Hugging Face conversion (blockq.convert): class name -> whether q/k rows are permuted for
    # adjacent-pair rope; HF tensor name (regex, layer captured) -> GGUF name
    hf_classes: tuple[tuple[str, bool], ...] = ()
    hf_tensors: tuple[tuple[str, str], ...] = ()
    hf_rope_types: tuple[str, ...] = ("default", "linear", "llama3", "yarn")
    # (config.json Fields, blockq.convert.HFConfig) -> GGUF keys beyond the common ones that
    # llama.cpp's converter writes for this class (None: a common key it does not write)
    hf_metadata: Callable = lambda f, cfg: {}
    # (config.json Fields, HFConfig) -> extra float32 tensors the converter derives, by name
    hf_extra_tensors: Callable = lambda f, cfg: {}
    hf_norm_shift: float = 0.0  # added to every HF ``*norm.weight`` (Gemma's ``1 + w``)
    # vocabulary: a tokenizer.model (SentencePiece) is read first, as the converter does;
    # add_space_prefix: the value it then writes (None: none)
    hf_sentencepiece: bool = False
    hf_sp_space_prefix: bool | None = None


def head_norm(ops, x, norm, n_heads: int, head_dim: int):
    """RMS norm of each head of x (n, n_heads * head_dim) with one (head_dim,) weight."""
    n = x.shape[0]
    return ops.rms_norm(x.reshape(n * n_heads, head_dim), norm)
