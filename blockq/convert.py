"""Checkpoints -> quantized GGUF, one tensor at a time.

Two sources:

- a Hugging Face model folder (``config.json``, one or more ``*.safetensors`` shards, with
  ``model.safetensors.index.json`` when sharded, ``tokenizer.json`` / ``tokenizer_config.json``)
  of a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
  ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` or ``Phi3ForCausalLM`` (the HF classes, tensor
  names, extra keys and derived tensors of each architecture module in :mod:`blockq.models`).
  Metadata, tensor names, the q/k row permutation of llama, Gemma's ``1 + w`` norms, Phi-3's
  rope factors and the byte-level BPE vocabulary are written the way
  llama.cpp's ``convert_hf_to_gguf.py`` writes them, so the result runs in llama.cpp and blockq;
- a GGUF file (requantize: each tensor is dequantized, then quantized to its new type; tensors
  whose type does not change are copied byte for byte; metadata is copied as stored).

Every tensor gets the type llama-quantize would give it (:mod:`blockq.presets`).  The pipeline
per tensor is: read a slab of rows (``os.pread``, never a whole mapped file, so resident memory
stays at about one output tensor), convert to float32, quantize with the tensor's importance
vector, copy into the output buffer; the GGUF writer streams that tensor to a temporary file
that is renamed into place only once everything is written.  Any error (a missing tensor, a
shape that disagrees with config.json, NaN/inf weights, an unknown architecture, a bad imatrix)
raises before or during the write and leaves nothing at the destination.
"""
from __future__ import annotations

import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import models as _models
from . import presets as _presets
from .errors import BadArgument, BlockqError, FormatError, UnsupportedModel
from .outfile import SourceWatch, check_interrupt, check_output
from .types import qtype as _qtype
from .validate import (MAX_CONTEXT, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, Fields, check_int,
                       load_json_object, parse_json, show)

GPTQ_SLAB_BYTES = 16 << 20  # float32 source rows per error-compensated slab
SLAB_BYTES = 32 << 20  # float32 bytes of rows converted at once

# --- architectures --------------------------------------------------------------------------
# HF class -> (GGUF architecture, q/k rows permuted for llama.cpp's adjacent-pair rope), from
# the architecture modules (blockq.models), which also own the tensor names
ARCHITECTURES = {cls: (a.name, permute) for a in _models.ARCHITECTURES.values()
                 for cls, permute in a.hf_classes}
HF_SKIPPED = (re.compile(r".*\.rotary_emb\.inv_freq\Z"),)  # recomputed by every runtime


def _hf_names(arch: str) -> list:
    return [(re.compile(rx + r"\Z"), out) for rx, out in _models.ARCHITECTURES[arch].hf_tensors]


_HF_COMPILED = {a: _hf_names(a) for a in {a for a, _ in ARCHITECTURES.values()}}


def gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """The GGUF name of a Hugging Face tensor, or None for one to drop; unknown -> error."""
    for rx, out in _HF_COMPILED[arch]:
        m = rx.match(hf_name)
        if m:
            return out.format(*m.groups())
    if any(rx.match(hf_name) for rx in HF_SKIPPED):
        return None
    raise UnsupportedModel(f"checkpoint tensor {hf_name!r} has no place in a {arch} GGUF "
                           "(mixture-of-experts, vision tower, or another architecture?)")


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives a q (or k) projection: within each head, the two
    rotary halves are interleaved so rope can rotate adjacent pairs.  ``new[i] = old[perm[i]]``.
    """
    if rows % (2 * n_head):
        raise FormatError(f"{rows} projection rows do not split into {n_head} heads of pairs")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


# --- reading bytes --------------------------------------------------------------------------
def _pread(fd: int, offset: int, n: int) -> np.ndarray:
    """``n`` bytes at ``offset`` into a fresh uint8 array (not a mapping: it frees itself)."""
    buf = np.empty(n, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise FormatError(f"file ends {n - got} bytes early reading {n} bytes at offset "
                              f"{offset} (truncated download?)")
        got += k
    return buf


def _to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian stored floats -> float32."""
    if dtype == "F32":
        return raw.view("<f4").astype(np.float32, copy=False)
    if dtype == "F16":
        return raw.view("<f2").astype(np.float32)
    if dtype == "BF16":  # the upper 16 bits of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    raise UnsupportedModel(f"tensor dtype {dtype} is not supported (F32, F16, BF16)")


@dataclass
class SourceTensor:
    """One tensor to write: its GGUF name, numpy-order shape, stored type and how to read it."""
    name: str
    shape: tuple[int, ...]
    qtype: str  # its type as llama-quantize would find it in an F32/F16/BF16 GGUF
    read_rows: Callable[[int, int], np.ndarray]  # rows r0..r1 as float32 (r1 - r0, cols)
    read_raw: Callable[[], np.ndarray] | None = None  # stored bytes, when copying unchanged
    origin: str = ""  # where it came from, for messages
    stored: str = ""  # type of the bytes read_raw returns (default: qtype)

    def __post_init__(self) -> None:
        self.stored = self.stored or self.qtype

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes as stored in the source."""
        return self.rows * _qtype(self.stored).row_bytes(self.cols)


@dataclass
class Checkpoint:
    """A model to convert: metadata for the GGUF file, tensors, and the facts the rules need."""
    metadata: dict[str, Any]
    tensors: list[SourceTensor]
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    warnings: list[str] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list, repr=False)
    _files: list = field(default_factory=list, repr=False)  # open GGUF readers (metadata fields)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- safetensors ----------------------------------------------------------------------------
# A safetensors file: u64 header length N | N bytes of JSON {name: {dtype, shape, data_offsets
# [begin, end)}, "__metadata__": {...}} | data, offsets relative to the end of the header.
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class _StEntry:
    file: Path
    fd: int
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute
    nbytes: int


def _read_safetensors_header(path: Path, fd: int) -> dict[str, _StEntry]:
    size = os.fstat(fd).st_size
    if size < 8:
        raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", bytes(_pread(fd, 0, 8)))
    if n > min(size - 8, 100 << 20):
        raise FormatError(f"{path}: header length {n} does not fit the {size}-byte file")
    header = parse_json(bytes(_pread(fd, 8, n)), f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is {show(header)}; it must be a JSON "
                          "object of tensors")
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        what = f"{path.name}: tensor {name}"
        if not isinstance(e, dict) or not isinstance(e.get("shape"), list) \
                or not isinstance(e.get("data_offsets"), list) or len(e["data_offsets"]) != 2:
            raise FormatError(f"{path}: header entry {name!r} lacks dtype/shape/data_offsets")
        dtype = e.get("dtype")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise UnsupportedModel(f"{what} is {show(dtype)}; blockq converts F32, F16 and BF16 "
                                   "checkpoints")
        if len(e["shape"]) > 4:
            raise FormatError(f"{what} has {len(e['shape'])} dimensions; at most 4")
        shape = tuple(check_int(d, f"{what} shape", lo=0, hi=size) for d in e["shape"])
        b, end = (check_int(x, f"{what} data_offsets", lo=0, hi=size)
                  for x in e["data_offsets"])
        want = math.prod(shape) * _ST_DTYPES[dtype]
        if end - b != want or base + end > size:
            raise FormatError(f"{path.name}: tensor {name} claims bytes {b}..{end} for "
                              f"{dtype}{list(shape)} ({want} bytes) in a {size}-byte file")
        out[name] = _StEntry(path, fd, dtype, shape, base + b, want)
    return out


# --- Hugging Face folders -------------------------------------------------------------------
@dataclass(frozen=True)
class HFConfig:
    """The hyper-parameters of a llama-family config.json, checked."""
    architecture: str
    arch: str
    permute_qk: bool
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int | None
    rms_eps: float
    rope_theta: float
    head_dim: int | None  # only when config.json states it
    tied: bool
    rope_scaling: dict
    config: dict = field(default_factory=dict, compare=False, repr=False)  # config.json
    where: str = "config.json"

    @classmethod
    def from_dict(cls, c: dict, where: str = "config.json") -> "HFConfig":
        f = Fields(c, where)
        archs = f.get("architectures", [])
        arch_name = archs[0] if isinstance(archs, list) and archs else archs
        if not isinstance(arch_name, str) or arch_name not in ARCHITECTURES:
            raise UnsupportedModel(f"{where}: architecture {show(arch_name)} is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")
        arch, permute = ARCHITECTURES[arch_name]
        if f.get("num_local_experts") or f.get("num_experts"):
            raise UnsupportedModel(f"{where}: mixture-of-experts checkpoints are not supported")
        rope = dict(f.obj("rope_parameters", None) or f.obj("rope_scaling", None) or {})
        r = Fields(rope, f"{where}: rope_scaling")
        kind = r.text("rope_type", r.text("type", "default")).lower()
        kinds = _models.architecture(arch).hf_rope_types
        if kind not in kinds:
            raise UnsupportedModel(f"{where}: rope scaling {kind!r} is not supported for "
                                   f"{arch_name} ({', '.join(kinds)})")
        if kind == "yarn":
            r.number("factor", lo=0.0, lo_open=True, hi=MAX_CONTEXT)
            r.integer("original_max_position_embeddings", hi=MAX_CONTEXT)
            for key in ("extrapolation_factor", "attention_factor", "attn_factor", "beta_fast",
                        "beta_slow"):
                r.number(key, None, lo=0.0, hi=1e6)
        for key in ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            r.number(key, None, lo=0.0, lo_open=True, hi=MAX_CONTEXT)
        if kind == "llama3" and r.number("low_freq_factor", 1.0) >= r.number("high_freq_factor",
                                                                             4.0):
            raise FormatError(f"{where}: rope_scaling low_freq_factor must be below "
                              "high_freq_factor")
        theta = f.number("rope_theta", r.number("rope_theta", 10000.0, lo=1.0, lo_open=True),
                         lo=1.0, lo_open=True)
        n_embd = f.integer("hidden_size")
        n_head = f.integer("num_attention_heads", hi=MAX_HEADS)
        n_head_kv = f.integer("num_key_value_heads", n_head, hi=MAX_HEADS)
        head_dim = f.integer("head_dim", None)
        if head_dim is None and n_embd % n_head:
            raise FormatError(f"{where}: hidden_size {n_embd} is not a multiple of "
                              f"num_attention_heads {n_head} (and no head_dim is given)")
        if n_head % n_head_kv:
            raise FormatError(f"{where}: {n_head} attention heads cannot share "
                              f"{n_head_kv} key/value heads")
        return cls(arch_name, arch, permute, f.integer("vocab_size", hi=MAX_VOCAB), n_embd,
                   f.integer("num_hidden_layers", hi=MAX_LAYERS), n_head, n_head_kv,
                   f.integer("intermediate_size"),
                   f.integer("max_position_embeddings", None, hi=MAX_CONTEXT),
                   f.number("rms_norm_eps", 1e-6, lo=0.0, lo_open=True, hi=1.0), theta,
                   head_dim, f.flag("tie_word_embeddings", False), rope, dict(c), where)

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def args(self):
        """The runtime's view of this config (blockq.model.ModelArgs), from its metadata."""
        from .model import ModelArgs
        md = {**self.metadata(), "general.architecture": self.arch}
        return ModelArgs.from_metadata(md, self.n_vocab)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every GGUF tensor this config implies -> numpy shape (biases not included), from the
        architecture's tensor table."""
        out = {"token_embd.weight": (self.n_vocab, self.n_embd),
               "output_norm.weight": (self.n_embd,)}
        if not self.tied:
            out["output.weight"] = (self.n_vocab, self.n_embd)
        args = self.args()
        table = _models.architecture(self.arch).block.TENSORS
        for i in range(self.n_layer):
            out.update({f"blk.{i}.{t.name}.weight": t.shape(args) for t in table if t.required})
        return out

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        args = self.args()
        table = _models.architecture(self.arch).block.TENSORS
        return {f"blk.{i}.{t.name}.bias": t.shape(args)[:1] for i in range(self.n_layer)
                for t in table if t.kind == "linear"}

    def metadata(self) -> dict[str, Any]:
        """The model keys convert_hf_to_gguf.py writes for this architecture."""
        a = self.arch
        md: dict[str, Any] = {f"{a}.block_count": self.n_layer}
        if self.n_ctx is not None:
            md[f"{a}.context_length"] = int(self.n_ctx)
        md.update({f"{a}.embedding_length": self.n_embd, f"{a}.feed_forward_length": self.n_ff,
                   f"{a}.attention.head_count": self.n_head,
                   f"{a}.attention.head_count_kv": self.n_head_kv})
        r = self.rope_scaling
        kind = str(r.get("rope_type", r.get("type", ""))).lower()
        if kind in ("linear", "yarn") and r.get("factor") is not None:
            md[f"{a}.rope.scaling.type"] = kind
            md[f"{a}.rope.scaling.factor"] = float(r["factor"])
        if kind == "yarn":
            md[f"{a}.rope.scaling.original_context_length"] = \
                int(r["original_max_position_embeddings"])
            # NOTE: written as the converter writes them; llama.cpp (and blockq) read them for
            # none of the architectures blockq runs
            for hf, key in (("extrapolation_factor", "yarn_ext_factor"),
                            ("attention_factor", "yarn_attn_factor"),
                            ("attn_factor", "yarn_attn_factor"),
                            ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                if r.get(hf) is not None and f"{a}.rope.scaling.{key}" not in md:
                    md[f"{a}.rope.scaling.{key}"] = float(r[hf])
        md[f"{a}.rope.freq_base"] = self.rope_theta
        md[f"{a}.attention.layer_norm_rms_epsilon"] = self.rms_eps
        if self.head_dim is not None:
            md[f"{a}.attention.key_length"] = int(self.head_dim)
            md[f"{a}.attention.value_length"] = int(self.head_dim)
        if a == "llama":  # NOTE: LlamaModel adds these two; Qwen2Model does not
            md[f"{a}.vocab_size"] = self.n_vocab
            md[f"{a}.rope.dimension_count"] = self.hd
        extra = _models.architecture(a).hf_metadata(Fields(self.config, self.where), self)
        md.update({k.format(arch=a): v for k, v in extra.items()})
        return {k: v for k, v in md.items() if v is not None}

    def rope_freqs(self) -> np.ndarray | None:
        """llama3 long-context frequency factors (the ``rope_freqs.weight`` tensor), or None."""
        r = self.rope_scaling
        if str(r.get("rope_type", r.get("type", ""))).lower() != "llama3":
            return None
        factor = float(r.get("factor", 8.0))
        lo, hi = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
        old = float(r.get("original_max_position_embeddings", 8192))
        dim = self.hd
        freqs = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(1.0)
            elif wavelen > old / lo:
                out.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return np.array(out, dtype=np.float32)


# --- the tokenizer ------------------------------------------------------------------------------
# convert_hf_to_gguf identifies a BPE pre-tokenizer by hashing the ids it gives this text.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
          "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
          "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
          "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M "
          "not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_HASHES = {  # sha256(str(ids)) -> tokenizer.ggml.pre
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's guess for added tokens not flagged special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _is_byte_level(tj: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []) + node.get("decoders", []))
    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def pre_tokenizer_name(tokenizer_json: Path) -> tuple[str, str | None]:
    """(tokenizer.ggml.pre, warning or None), identified the way convert_hf_to_gguf does."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHKTXT).ids
    h = sha256(str(ids).encode()).hexdigest()
    name = PRE_HASHES.get(h)
    if name is None:
        return "default", (f"BPE pre-tokenizer not recognized (chkhsh {h[:16]}...); writing "
                           "'default' (llama.cpp's converter knows more: check tokenization)")
    return name, None


def tokenizer_metadata(folder: Path, n_vocab: int, architecture: str) -> tuple[dict, list[str]]:
    """GGUF tokenizer keys for a byte-level BPE (``gpt2``) vocabulary, or for a SentencePiece
    one (``llama``) where the HF class's converter reads ``tokenizer.model`` first; warnings."""
    spec = _models.architecture(ARCHITECTURES[architecture][0])
    cfg_path = folder / "tokenizer_config.json"
    tcfg = load_json_object(cfg_path, "tokenizer settings") if cfg_path.is_file() else {}
    # NOTE: as Phi3MiniModel: a GPT2Tokenizer class means the BPE vocabulary (Phi-4-mini)
    if spec.hf_sentencepiece and (folder / "tokenizer.model").is_file() \
            and tcfg.get("tokenizer_class") != "GPT2Tokenizer":
        return sentencepiece_metadata(folder, n_vocab, tcfg, spec), []
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise UnsupportedModel(f"{folder}: SentencePiece tokenizer (tokenizer.model) without "
                                   "tokenizer.json; blockq converts byte-level BPE vocabularies")
        raise FormatError(f"{folder}: no tokenizer.json")
    tj = load_json_object(tj_path, "the tokenizer")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(tj):
        raise UnsupportedModel(f"{tj_path}: a {model.get('type')} tokenizer"
                               f"{' with byte fallback' if model.get('byte_fallback') else ''}; "
                               "blockq converts byte-level BPE (gpt2) vocabularies only")
    warnings = []
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = tj.get("added_tokens") or []
    for a in added:
        vocab[a["content"]] = int(a["id"])
    if vocab and max(vocab.values()) >= n_vocab:
        raise FormatError(f"{tj_path}: token id {max(vocab.values())} is beyond config.json's "
                          f"vocab_size {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    added_by_id = {int(a["id"]): a for a in added}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added_by_id:
            tokens.append(t)
            types.append(TOKEN_CONTROL if added_by_id[i].get("special") or _looks_special(t)
                         else TOKEN_USER_DEFINED)
        else:
            tokens.append(t)
            types.append(TOKEN_NORMAL)

    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):
        # NOTE: pairs (transformers >= 4.45); a space inside a part is stored as U+0120+...
        # shifted by 256, as convert_hf_to_gguf does, so "a b" still splits on one space
        merges = [" ".join("".join(chr(ord(ch) + 256) if ch == " " else ch for ch in part)
                           for part in pair) for pair in merges]
    pre, warn = pre_tokenizer_name(tj_path)
    if warn:
        warnings.append(warn)
    md: dict[str, Any] = {}
    if isinstance(tcfg.get("add_prefix_space"), bool):
        md["tokenizer.ggml.add_space_prefix"] = tcfg["add_prefix_space"]
    md.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
               "tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
               "tokenizer.ggml.merges": list(merges)})
    md.update(_special_metadata(folder, tj, tcfg))
    if architecture in ("LlamaForCausalLM", "MistralForCausalLM") and n_vocab == 49152:
        # NOTE: convert_hf_to_gguf's LlamaModel turns BOS off for 49152-token vocabularies
        # (meant for granite; it catches SmolLM too, and llama.cpp's SmolLM files carry it)
        md["tokenizer.ggml.add_bos_token"] = False
    return md, warnings


def sentencepiece_metadata(folder: Path, n_vocab: int, tcfg: dict, spec) -> dict:
    """GGUF keys of a SentencePiece vocabulary as convert_hf_to_gguf's
    ``_create_vocab_sentencepiece`` writes them: the model's pieces, scores and types
    (user-defined pieces as normal ones), ids up to config.json's vocab_size as ``[PAD{i}]``
    (unused, score -10000), ``added_tokens.json`` and tokenizer_config's
    ``added_tokens_decoder`` on top (score -1000; control when special or special-looking,
    else user-defined with ``▁`` as a space)."""
    from .spmodel import BYTE, CONTROL, UNKNOWN, UNUSED, USER_DEFINED, read_pieces

    pieces = read_pieces(folder / "tokenizer.model")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i, (piece, score, kind) in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i] = piece, score
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else TOKEN_NORMAL
    added = folder / "added_tokens.json"
    for text, tid in (load_json_object(added, "added tokens") if added.is_file() else {}).items():
        tid = check_int(tid, f"{added}: id of {text!r}", lo=0, hi=MAX_VOCAB)
        if tid < n_vocab:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    for key, entry in Fields(tcfg, "tokenizer_config.json").obj("added_tokens_decoder",
                                                                 {}).items():
        tid = check_int(int(key) if str(key).isdigit() else key,
                        f"tokenizer_config.json: added_tokens_decoder id {key!r}", lo=0,
                        hi=MAX_VOCAB)
        text = Fields(entry, f"tokenizer_config.json: added token {tid}").text("content")
        if tid >= n_vocab:
            continue
        if entry.get("special") or _looks_special(text):
            types[tid] = CONTROL
        else:
            text, types[tid] = text.replace("\u2581", " "), USER_DEFINED
        tokens[tid], scores[tid] = text, -1000.0
    tj_path = folder / "tokenizer.json"
    tj = load_json_object(tj_path, "the tokenizer") if tj_path.is_file() else {}
    md: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                          "tokenizer.ggml.tokens": tokens,
                          "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
                          "tokenizer.ggml.token_type": np.array(types, dtype=np.int32)}
    md.update(_special_metadata(folder, tj, tcfg))
    if spec.hf_sp_space_prefix is not None:
        md["tokenizer.ggml.add_space_prefix"] = spec.hf_sp_space_prefix
    return md


def _special_metadata(folder: Path, tj: dict, tcfg: dict) -> dict:
    """Special token ids, add_*_token flags and the chat template, as gguf-py's SpecialVocab."""
    md: dict[str, Any] = {}
    ids, add = _special_tokens(tj, tcfg,
                               load_json_object(folder / "config.json", "the model config"))
    for typ, tid in ids.items():
        key = "padding" if typ == "pad" else ("unknown" if typ == "unk" else
                                              ("seperator" if typ == "sep" else typ))
        # NOTE: "seperator" is llama.cpp's spelling of the key
        md[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    for typ, flag in add.items():
        md[f"tokenizer.ggml.add_{typ}_token"] = bool(flag)
    template = _chat_template(folder, tcfg)
    if template is not None:
        md["tokenizer.chat_template"] = template
    return md


def _special_tokens(tj: dict, tcfg: dict, config: dict) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and add_*_token flags, found as gguf-py's SpecialVocab finds them:
    tokenizer_config.json names the tokens (looked up among tokenizer.json's added tokens),
    the post-processor says whether BOS/EOS are added, config.json's *_token_id fill gaps."""
    added = tj.get("added_tokens") or []
    cfg = dict(tcfg)
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}

    def content(entry) -> str | None:
        if isinstance(entry, str):
            return entry
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            return entry["content"]
        return None

    bos, eos = content(cfg.get("bos_token")), content(cfg.get("eos_token"))
    if not bos and content(cfg.get("cls_token")) and cfg:
        bos = content(cfg["cls_token"])
        cfg["bos_token"] = bos
    if not eos and content(cfg.get("sep_token")) and cfg:
        eos = content(cfg["sep_token"])
        cfg["eos_token"] = eos
    post = tj.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            if len(single) > 1:
                first = (single[0].get("SpecialToken") or {}).get("id")
                if first:
                    if not cfg:
                        bos = first
                    add["bos"] = first in (bos, content(cfg.get("cls_token")))
                last = (single[-1].get("SpecialToken") or {}).get("id")
                if last:
                    if not cfg:
                        eos = last
                    add["eos"] = last == eos
        elif proc.get("type") == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
    if cfg:
        cfg["bos_token"], cfg["eos_token"] = bos, eos
        for typ in SPECIAL_TYPES:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                add[typ] = flag
            text = content(cfg.get(f"{typ}_token"))
            if text is None:
                continue
            tid = next((int(a["id"]) for a in added if a.get("content") == text), None)
            if tid is not None and typ not in ids:
                ids[typ] = tid
    for typ in SPECIAL_TYPES:
        tid = config.get(f"{typ}_token_id")
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and typ not in ids:
            ids[typ] = tid
    return ids, add


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    t = tcfg.get("chat_template")
    if t is None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        cj = folder / "chat_template.json"
        if cj.is_file():
            t = load_json_object(cj, "the chat template").get("chat_template")
    if isinstance(t, list):  # named templates: llama.cpp reads the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def open_hf(folder) -> Checkpoint:
    """Open a Hugging Face model folder for conversion (nothing is read but headers)."""
    folder = Path(folder)
    cfg = HFConfig.from_dict(load_json_object(folder / "config.json", "the model config"),
                             str(folder / "config.json"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wmap = Fields(load_json_object(index, "the shard index"), str(index)).obj("weight_map",
                                                                                  {})
        if not all(isinstance(v, str) and v and "/" not in v for v in wmap.values()):
            raise FormatError(f"{index}: weight_map values must be shard file names in "
                              f"{folder}")
        files = sorted({folder / f for f in wmap.values()})
    else:
        wmap = None
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no *.safetensors files (blockq does not read .bin/.pt)")
    ck = Checkpoint({}, [], cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_head_kv)
    try:
        entries: dict[str, _StEntry] = {}
        for f in files:
            if not f.is_file():
                raise FormatError(f"{index.name} names shard {f.name}, which is not in {folder}")
            fd = os.open(f, os.O_RDONLY)
            ck._fds.append(fd)
            for name, e in _read_safetensors_header(f, fd).items():
                if wmap is not None and wmap.get(name) not in (None, f.name):
                    continue
                entries[name] = e
        if wmap is not None:
            lost = sorted(set(wmap) - set(entries))
            if lost:
                raise FormatError(f"{index.name} lists {len(lost)} tensor(s) its shards lack, "
                                  f"e.g. {lost[0]}")
        _hf_tensors(ck, cfg, entries)
        tok_md, warns = tokenizer_metadata(folder, cfg.n_vocab, cfg.architecture)
        ck.warnings += warns
        ck.metadata = {"general.architecture": cfg.arch, "general.type": "model",
                       "general.name": folder.resolve().name, **cfg.metadata(), **tok_md}
        return ck
    except BaseException:
        ck.close()
        raise


def _hf_tensors(ck: Checkpoint, cfg: HFConfig, entries: dict[str, _StEntry]) -> None:
    by_gguf: dict[str, tuple[str, _StEntry]] = {}
    for hf, e in entries.items():
        g = gguf_name(hf, cfg.arch)
        if g is None:
            continue
        if g == "output.weight" and cfg.tied:
            continue  # NOTE: tied checkpoints may store lm_head too; llama.cpp uses token_embd
        by_gguf[g] = (hf, e)
    want = cfg.shapes()
    biases = cfg.bias_shapes()
    missing = [g for g in want if g not in by_gguf]
    if missing:
        raise FormatError(f"checkpoint lacks {len(missing)} tensor(s) {cfg.architecture} with "
                          f"{cfg.n_layer} layers needs, e.g. {missing[0]} "
                          f"({_hf_name_hint(missing[0], cfg.arch)})")
    for g, (hf, e) in by_gguf.items():
        shape = want.get(g) or biases.get(g)
        if shape is None:
            raise FormatError(f"checkpoint tensor {hf} ({g}) does not belong to a {cfg.n_layer}-"
                              f"layer {cfg.architecture} as config.json describes it")
        if e.shape != shape:
            raise FormatError(f"checkpoint tensor {hf} has shape {list(e.shape)}; config.json "
                              f"implies {list(shape)}")
    if cfg.arch == "qwen2":
        lacking = [b for b in biases if b.split(".")[2] in ("attn_q", "attn_k", "attn_v")
                   and b not in by_gguf]
        if lacking:
            raise FormatError(f"Qwen2 checkpoint lacks q/k/v bias {lacking[0]}")
    spec = _models.architecture(cfg.arch)
    for g, (hf, e) in by_gguf.items():
        perm = None
        if cfg.permute_qk and (".attn_q." in g or ".attn_k." in g):
            perm = qk_permutation(e.shape[0], cfg.n_head if ".attn_q." in g else cfg.n_head_kv)
        t = _st_source(g, hf, e, perm)
        if spec.hf_norm_shift and hf.endswith("norm.weight"):  # NOTE: as the converter: 1 + w
            t = _vector_source(g, t.read_rows(0, 1)[0] + np.float32(spec.hf_norm_shift),
                               t.origin + f" + {spec.hf_norm_shift:g}")
        ck.tensors.append(t)
    extra = dict(spec.hf_extra_tensors(Fields(cfg.config, cfg.where), cfg))
    freqs = cfg.rope_freqs()
    if freqs is not None:
        extra["rope_freqs.weight"] = freqs
    for g, v in extra.items():
        ck.tensors.append(_vector_source(g, np.asarray(v, np.float32), "config.json rope"))


def _vector_source(g: str, v: np.ndarray, origin: str) -> SourceTensor:
    """An F32 vector computed here (shifted norms, rope factors) as a tensor to write."""
    v = np.ascontiguousarray(v, dtype="<f4")  # (n,)
    return SourceTensor(g, v.shape, "F32", lambda r0, r1: v[None, :].astype(np.float32),
                        lambda: v.view(np.uint8).copy(), origin=origin)


def _hf_name_hint(g: str, arch: str) -> str:
    for rx, out in _models.ARCHITECTURES[arch].hf_tensors:
        pat = re.escape(out).replace(r"\{\}", "(.+?)")
        m = re.fullmatch(pat, g)
        if m:
            text = rx
            for grp in m.groups():
                text = re.sub(r"\([^)]*\)", grp, text, count=1)
            return text.replace("\\", "")
    return g


def _st_source(g: str, hf: str, e: _StEntry, perm: np.ndarray | None) -> SourceTensor:
    cols = e.shape[-1]
    isz = _ST_DTYPES[e.dtype]
    row_bytes = cols * isz

    def read_rows(r0: int, r1: int) -> np.ndarray:
        if perm is not None:  # q/k: gather permuted rows (these matrices are small)
            full = _to_f32(_pread(e.fd, e.offset, e.nbytes), e.dtype).reshape(-1, cols)
            return np.ascontiguousarray(full[perm[r0:r1]])
        raw = _pread(e.fd, e.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        return _to_f32(raw, e.dtype).reshape(r1 - r0, cols)

    def read_raw() -> np.ndarray:
        if perm is not None:
            full = _pread(e.fd, e.offset, e.nbytes).reshape(-1, row_bytes)
            return np.ascontiguousarray(full[perm])
        return _pread(e.fd, e.offset, e.nbytes)

    # NOTE: convert_hf_to_gguf stores vectors (norms, biases) as F32 whatever the checkpoint
    # holds, and llama-quantize then leaves them alone: they are F32 for the rules too.
    return SourceTensor(g, e.shape, "F32" if len(e.shape) == 1 else e.dtype, read_rows,
                        read_raw, origin=f"{e.file.name}:{hf}", stored=e.dtype)


# --- GGUF files -----------------------------------------------------------------------------
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def open_gguf(path) -> Checkpoint:
    """Open a GGUF model for requantization (metadata is copied as stored)."""
    from .dequantize import dequantize
    from .gguf.reader import read_gguf

    path = Path(path)
    f = read_gguf(path)
    ck = None
    try:
        md = f.metadata
        if md.get("general.type", "model") != "model":
            raise FormatError(f"{path}: general.type is {md.get('general.type')!r}, not a model")
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError(f"{path}: no general.architecture")

        def num(key, default=None):
            v = md.get(f"{arch}.{key}", default)
            if v is None:
                raise FormatError(f"{path}: {arch}.{key} is missing")
            if isinstance(v, (list, tuple, np.ndarray)):  # per-layer form
                v = max(int(x) for x in v)
            return int(v)

        n_head = num("attention.head_count")
        fields = {k: v for k, v in md.fields().items() if k not in _SPLIT_KEYS}
        ck = Checkpoint(fields, [], arch, num("block_count"), n_head,
                        num("attention.head_count_kv", n_head), num("expert_count", 0))
        ck._files.append(f)  # the metadata fields are copied from the mapped file
        fd = os.open(path, os.O_RDONLY)
        ck._fds.append(fd)
        for t in f.tensors.values():
            ck.tensors.append(_gguf_source(t, fd, dequantize, path.name))
        return ck
    except BaseException:
        if ck is not None:
            ck.close()
        else:
            f.close()
        raise


def _gguf_source(t, fd: int, dequantize, fname: str) -> SourceTensor:
    qt = _qtype(t.qtype)
    cols = t.shape[-1]
    row_bytes = qt.row_bytes(cols)
    offset, nbytes = t.offset, t.nbytes

    def read_rows(r0: int, r1: int) -> np.ndarray:
        raw = _pread(fd, offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        if qt.name in ("F32", "F16", "BF16"):
            return _to_f32(raw, qt.name).reshape(r1 - r0, cols)
        return np.asarray(dequantize(raw, qt.name, (r1 - r0, cols)), dtype=np.float32)

    return SourceTensor(t.name, tuple(t.shape), qt.name, read_rows,
                        lambda: _pread(fd, offset, nbytes), origin=f"{fname}:{t.name}")


def open_source(src) -> Checkpoint:
    """A Hugging Face folder or a GGUF file."""
    p = Path(src)
    if p.is_dir():
        return open_hf(p)
    if p.is_file():
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return open_gguf(p)
        raise FormatError(f"{p}: neither a GGUF file (magic {magic!r}) nor a model folder")
    raise BadArgument(f"source {p} does not exist")


# --- the conversion ---------------------------------------------------------------------------
@dataclass
class Progress:
    """What a progress callback sees after each slab of rows."""
    tensor: str
    i_tensor: int  # tensors finished before this one
    n_tensors: int
    bytes_done: int  # source bytes processed so far
    bytes_total: int


@dataclass
class Result:
    path: Path
    types: dict[str, str]  # tensor name -> type written
    nbytes: int  # file size
    n_params: int
    warnings: list[str]


def convert(src, out, preset: str = "Q4_K_M", *, imatrix=None, overrides: Sequence[str] = (),
            threads: int | None = None, progress: Callable[[Progress], None] | None = None,
            warn: Callable[[str], None] | None = None, hessians=None,
            type_plan: Mapping[str, str] | None = None,
            extra_metadata: Mapping[str, Any] | None = None) -> Result:
    """Convert ``src`` (HF folder or GGUF file) into a GGUF file at ``out`` with ``preset``.

    ``imatrix``: a path or an :class:`blockq.imatrix.Imatrix`.  ``overrides``: ``REGEX=TYPE``
    strings, as llama-quantize's ``--tensor-type``.  ``threads``: Numba threads.  ``warn``
    receives one line per warning (default: printed to stderr).

    ``hessians``: a path or :class:`blockq.calibrate.Hessians` (``blockq calibrate``): every
    matrix whose input statistics it holds is quantized with error-compensated rounding
    (:mod:`blockq.quantize.gptq`), and its diagonal serves as the imatrix where none is given.
    ``type_plan``: tensor name -> block type, replacing the preset's choice for those tensors (the
    budgeted allocation of :mod:`blockq.optimize` passes its plan here).  ``extra_metadata``:
    keys added after the copied ones.
    """
    from .calibrate import Hessians, for_tensors, read_hessians
    from .gguf.constants import ValueType
    from .gguf.reader import Value
    from .imatrix import Imatrix, read_imatrix, vectors_for

    said: list[str] = []
    shout = warn or (lambda s: print(f"warning: {s}", file=sys.stderr))

    def warn(s: str) -> None:
        said.append(s)
        shout(s)

    p = _presets.preset(preset)
    rules = [_presets.parse_override(o) for o in overrides]
    out = check_output(out, [src, imatrix if not isinstance(imatrix, Imatrix) else None])
    im = None
    im_path = None
    if imatrix is not None:
        if isinstance(imatrix, Imatrix):
            im = imatrix
        else:
            im_path = str(imatrix)
            im = read_imatrix(imatrix)
        if not im.entries:
            raise FormatError(f"imatrix {im_path or ''} has no entries")
    hs = None
    if hessians is not None:
        hs = hessians if isinstance(hessians, Hessians) else read_hessians(hessians)
    if threads is not None:
        _set_threads(threads)

    with open_source(src) as ck:
        watch = SourceWatch(ck._fds)
        for w in ck.warnings:
            warn(w)
        names = [t.name for t in ck.tensors]
        if len(set(names)) != len(names):
            raise FormatError(f"{src}: tensor names repeat")
        fell_back: dict = {}
        types = preset_plan(ck, p, im is not None or hs is not None, rules, fell_back)
        for (cols, wanted, used), n in sorted(fell_back.items()):
            block = _qtype(wanted).block_size
            warn(f"{cols} columns are not a multiple of {block}: {used} instead of {wanted} for "
                 f"{n} tensor{'s' if n > 1 else ''} (as llama-quantize)")
        if type_plan is not None:
            unknown = sorted(set(type_plan) - set(names))
            if unknown:
                raise BadArgument(f"type plan names tensors the source lacks: {unknown[:3]}")
            for n, tp in type_plan.items():
                _qtype(tp)  # a known type name
                types[n] = tp
        if hs is not None:
            for_tensors(hs, names)
        vectors: dict[str, np.ndarray] = {}
        if im is not None:
            targets = {t.name: t.cols for t in ck.tensors
                       if types[t.name] != t.stored and _qtype(types[t.name]).is_quantized}
            vectors, warns = vectors_for(im, targets)
            for w in warns:
                warn(w)
        elif hs is not None:
            vectors = {n: v for n in types if (v := hs.importance(n)) is not None}
        requant = sorted({t.stored for t in ck.tensors if _qtype(t.stored).is_quantized
                          and types[t.name] != t.stored})
        if requant:
            warn(f"requantizing from {', '.join(requant)}: the result cannot be better than "
                 "the source (convert from F32/F16/BF16 for best quality)")
        # NOTE: like llama-quantize, the two version keys move to the end of the copied
        # metadata, then come the imatrix keys: a requantized file's header matches its own.
        md = {k: v for k, v in ck.metadata.items()
              if k not in ("general.quantization_version", "general.file_type")}
        md["general.quantization_version"] = Value(ValueType.UINT32, 2)
        md["general.file_type"] = Value(ValueType.UINT32, p.ftype)
        if im is not None:
            if im_path is not None:
                md["quantize.imatrix.file"] = im_path
            if im.datasets:
                md["quantize.imatrix.dataset"] = im.datasets[0]
            md["quantize.imatrix.entries_count"] = Value(ValueType.UINT32, len(im.entries))
            if im.chunk_count > 0:
                md["quantize.imatrix.chunks_count"] = Value(ValueType.UINT32, im.chunk_count)
        # NOTE: no key says how the blocks were rounded: the file stays byte for byte the size
        # of llama-quantize's for the same plan (a reader needs no such key to decode them)
        md.update(extra_metadata or {})
        tensors = sorted(ck.tensors, key=lambda t: _presets.order_key(t.name))
        total = sum(t.nbytes for t in tensors)
        state = {"done": 0}
        items = []
        for i, t in enumerate(tensors):
            # the Hessian is made when the tensor's turn comes: made here, every tensor's
            # float64 mean would live at once (twice the side file's size)
            H = (lambda n=t.name: hs.hessian(n)) if hs is not None else None
            items.append((t.name, types[t.name], t.shape,
                          _producer(t, types[t.name], vectors.get(t.name), i, len(tensors),
                                    total, state, progress, watch, H,
                                    data_free=hs is not None and hs.data_free)))
        from .gguf.writer import write_gguf
        path = write_gguf(out, md, items, file_type=p.ftype)
    n_params = sum(math.prod(t.shape) for t in tensors)
    return Result(path, {t.name: types[t.name] for t in tensors}, path.stat().st_size, n_params,
                  said)


def preset_plan(ck: Checkpoint, p, has_imatrix: bool, rules=(), fell_back=None
                ) -> dict[str, str]:
    """llama-quantize's type for every tensor of ``ck`` under preset ``p`` (``fell_back``
    collects (cols, wanted, used) -> count of the legacy fallbacks)."""
    return _presets.plan(((t.name, t.shape, t.qtype) for t in ck.tensors), _presets.preset(p),
                         n_layer=ck.n_layer, n_head=ck.n_head, n_head_kv=ck.n_head_kv,
                         arch=ck.arch, n_expert=ck.n_expert, has_imatrix=has_imatrix,
                         overrides=rules, fell_back=fell_back)


def _set_threads(n: int) -> None:
    import numba
    if n < 1:
        raise BadArgument(f"threads {n} must be >= 1")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _producer(t: SourceTensor, target: str, imp: np.ndarray | None, i: int, n: int, total: int,
              state: dict, progress, watch: SourceWatch,
              hessian: Callable[[], np.ndarray | None] | None = None,
              data_free: bool = False) -> Callable[[], np.ndarray]:
    """A callable the writer calls when this tensor's turn comes: returns its encoded bytes.

    With ``hessian`` (returns the tensor's input statistics) and a target with a grid of codes
    (:func:`blockq.quantize.gptq.compensable`: the integer grids, IQ4_NL, IQ4_XS, the codebooks
    of IQ3_*, IQ2_*, IQ1_*), the whole matrix is read and quantized with error-compensated rounding (``data_free``: the
    statistics came from random token ids, see :func:`blockq.quantize.gptq.settings`)."""
    from .quantize import quantize
    from .quantize.gptq import compensable, gptq_quantize, settings as gptq_settings

    def report():
        if progress is not None:
            progress(Progress(t.name, i, n, state["done"], total))

    def make() -> np.ndarray:
        try:
            if target == t.stored:  # unchanged: copy the stored bytes
                raw = t.read_raw()
                if target in ("F32", "F16", "BF16"):
                    _check_finite(t, _to_f32(raw.reshape(-1), target), 0)
                watch.check()
                check_interrupt()
                state["done"] += t.nbytes
                report()
                return raw
            tt = _qtype(target)
            H = hessian() if hessian is not None and compensable(tt.name) else None
            if H is not None and H.shape[0] == t.cols:
                # rows are independent under error compensation (the columns interact, through
                # H): slabs of rows bound the memory of a vocabulary-sized head
                out = np.empty((t.rows, tt.row_bytes(t.cols)), dtype=np.uint8)
                step = max(1, GPTQ_SLAB_BYTES // (4 * t.cols))
                for r0 in range(0, t.rows, step):
                    r1 = min(t.rows, r0 + step)
                    x = t.read_rows(r0, r1)  # (r1 - r0, cols) float32
                    _check_finite(t, x, r0)
                    out[r0:r1] = gptq_quantize(x, tt, H, imatrix=imp, name=t.name,
                                               **gptq_settings(data_free))
                    del x
                    check_interrupt()
                state["done"] += t.nbytes
                report()
                watch.check()
                return out
            out = np.empty((t.rows, tt.row_bytes(t.cols)), dtype=np.uint8)  # (rows, row_bytes)
            step = max(1, SLAB_BYTES // (4 * t.cols))
            src_row = t.nbytes // t.rows
            for r0 in range(0, t.rows, step):
                r1 = min(t.rows, r0 + step)
                x = t.read_rows(r0, r1)  # (r1 - r0, cols) float32
                _check_finite(t, x, r0)
                out[r0:r1] = quantize(x, tt, imatrix=imp if tt.is_quantized else None)
                check_interrupt()
                state["done"] += (r1 - r0) * src_row
                report()
            watch.check()
            return out
        except BlockqError as e:
            raise type(e)(f"{t.name} ({t.origin}): {e}") from None

    return make


def _check_finite(t: SourceTensor, x: np.ndarray, r0: int) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        flat = int(np.argmax(bad.reshape(-1)))
        r, c = divmod(flat, t.cols)
        raise BadArgument(f"{int(bad.sum())} NaN/inf weights (first at row {r0 + r}, column {c}: "
                          f"{float(x.reshape(-1)[flat])}); the checkpoint is damaged")
