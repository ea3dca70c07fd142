"""Quantization presets (``Q4_K_M`` ...) and llama.cpp's per-tensor type rules, as data.

A preset names a default block type and the ``llama_ftype`` id written as ``general.file_type``.
Most matrices get the default type; the rules below (llama.cpp ``src/llama-quant.cpp``,
``llama_tensor_get_type``) give some tensors more bits (the output head, ``attn_v`` and
``ffn_down`` in chosen layers), and a fallback swaps a 256-block k-quant for a 32-block type
when a row is not a whole number of super-blocks.  ``plan()`` applies everything in llama.cpp's
order and returns one block type per tensor; ``tests/test_presets.py`` checks the result against
lists recorded from ``llama-quantize`` (``tools/record_presets.py``).

Only dense models are covered (llama, mistral, qwen2 and friends): llama.cpp's extra branches for
mixture-of-experts and Falcon are left out.  The i-quant presets below IQ4 plan tensors in types
that llama-quantize refuses to make without an importance matrix (:data:`NEEDS_IMATRIX`);
``plan`` refuses them the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import BadArgument, UnsupportedModel
from .types import qtype


@dataclass(frozen=True)
class Preset:
    name: str  # what users type: "Q4_K_M"
    ftype: int  # llama_ftype id (include/llama.h), written as general.file_type
    default: str  # block type of every matrix no rule below touches
    description: str = ""

    @property
    def quantized(self) -> bool:
        return qtype(self.default).is_quantized


_PRESETS = (
    Preset("F32", 0, "F32", "all tensors 32-bit float"),
    Preset("F16", 1, "F16", "matrices 16-bit float, vectors F32"),
    Preset("BF16", 32, "BF16", "matrices bfloat16, vectors F32"),
    Preset("Q8_0", 7, "Q8_0", "8.5 bits per weight"),
    Preset("Q4_0", 2, "Q4_0", "4.5 bpw, scale only"),
    Preset("Q4_1", 3, "Q4_1", "5.0 bpw, scale and min"),
    Preset("Q5_0", 8, "Q5_0", "5.5 bpw, scale only"),
    Preset("Q5_1", 9, "Q5_1", "6.0 bpw, scale and min"),
    Preset("Q2_K", 10, "Q2_K", "2-bit k-quant, attn_v/ffn_down/attn_output raised"),
    Preset("Q3_K_S", 11, "Q3_K", "3-bit k-quant everywhere but the output head"),
    Preset("Q3_K_M", 12, "Q3_K", "3-bit k-quant, attn_v/ffn_down/attn_output raised"),
    Preset("Q3_K_L", 13, "Q3_K", "3-bit k-quant, attn_v/ffn_down/attn_output at Q5_K"),
    Preset("Q4_K_S", 14, "Q4_K", "4-bit k-quant, first layers' attn_v/ffn_down at Q5_K"),
    Preset("Q4_K_M", 15, "Q4_K", "4-bit k-quant, half of attn_v/ffn_down at Q6_K"),
    Preset("Q5_K_S", 16, "Q5_K", "5-bit k-quant"),
    Preset("Q5_K_M", 17, "Q5_K", "5-bit k-quant, half of attn_v/ffn_down at Q6_K"),
    Preset("Q6_K", 18, "Q6_K", "6.6 bpw k-quant"),
    Preset("IQ4_NL", 25, "IQ4_NL", "4.5 bpw non-linear, 32-weight blocks"),
    Preset("IQ4_XS", 30, "IQ4_XS", "4.25 bpw non-linear, 6-bit scales per 32"),
    Preset("TQ1_0", 36, "TQ1_0", "1.69 bpw ternary (BitNet b1.58 models)"),
    Preset("TQ2_0", 37, "TQ2_0", "2.06 bpw ternary (BitNet b1.58 models)"),
    Preset("IQ3_M", 27, "IQ3_S", "3.66 bpw i-quant mix, attn_v/attn_output/first ffn_down Q4_K"),
    Preset("IQ3_S", 26, "IQ3_S", "3.44 bpw i-quant"),
    Preset("IQ3_XS", 22, "IQ3_S", "3.3 bpw i-quant mix, attn_q/attn_k/middle ffn at IQ3_XXS"),
    Preset("IQ3_XXS", 23, "IQ3_XXS", "3.06 bpw i-quant, attn_q/attn_k at IQ2_S"),
    Preset("IQ2_M", 29, "IQ2_S", "2.7 bpw i-quant mix (needs an imatrix)"),
    Preset("IQ2_S", 28, "IQ2_XS", "2.5 bpw i-quant mix (needs an imatrix)"),
    Preset("IQ2_XS", 20, "IQ2_XS", "2.31 bpw i-quant (needs an imatrix)"),
    Preset("IQ2_XXS", 19, "IQ2_XXS", "2.06 bpw i-quant (needs an imatrix)"),
    Preset("IQ1_M", 31, "IQ1_M", "1.75 bpw i-quant (needs an imatrix)"),
    Preset("IQ1_S", 24, "IQ1_S", "1.56 bpw i-quant (needs an imatrix)"),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}
BY_FTYPE: dict[int, Preset] = {p.ftype: p for p in _PRESETS}


def preset(name: "str | Preset") -> Preset:
    """Look a preset up by name, case-insensitive (``q4_k_m`` -> Q4_K_M)."""
    if isinstance(name, Preset):
        return name
    p = PRESETS.get(str(name).upper())
    if p is None:
        raise BadArgument(f"unknown preset {name!r}; known: " + ", ".join(PRESETS))
    return p


# --- tensor categories ---------------------------------------------------------------------------
# The rules speak of broad kinds of tensor, found from the GGUF name. First match wins.
OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = (
    "output", "token_embd", "attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "ffn_up", "ffn_gate", "ffn_down", "other"

_CATEGORIES: tuple[tuple[str, str, bool], ...] = (
    # (text, category, whole name must equal text (True) or just contain it (False))
    ("output.weight", OUTPUT, True),
    ("token_embd.weight", TOKEN_EMBD, True),
    ("attn_qkv.weight", ATTN_QKV, False),
    ("attn_v.weight", ATTN_V, False),
    ("attn_k.weight", ATTN_K, False),
    ("attn_q.weight", ATTN_Q, False),
    ("attn_output.weight", ATTN_OUTPUT, False),
    ("ffn_up", FFN_UP, False),  # NOTE: bare substrings, as llama.cpp: ffn_up_exps etc. count too
    ("ffn_gate", FFN_GATE, False),
    ("ffn_down", FFN_DOWN, False),
)
_ATTN_V_LIKE = (ATTN_V, ATTN_QKV)  # tensors counted by llama.cpp's n_attention_wv


def category(name: str) -> str:
    for text, cat, exact in _CATEGORIES:
        if (name == text) if exact else (text in name):
            return cat
    return OTHER


# Substrings of names llama.cpp never quantizes (besides vectors, names not ending in "weight"
# and norms); the dense architectures we convert only meet the first two.
_KEEP_AS_IS = ("ffn_gate_inp.weight", "_norm.weight", "altup", "laurel", "per_layer_model_proj",
               "ssm_conv1d", "attn_rel_b.weight", "position_embd", "token_types.weight")


def quantizable(name: str, ndim: int) -> bool:
    """Whether llama.cpp's quantizer may change this tensor's type at all (else it is copied)."""
    return ndim >= 2 and name.endswith("weight") and not any(s in name for s in _KEEP_AS_IS)


# --- the rules -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ctx:
    """What a rule may look at when it decides one tensor's type."""
    preset: str
    i: int  # this tensor's rank among its kind (llama.cpp's i_attention_wv / i_ffn_down)
    n: int  # how many of its kind (n_attention_wv; for ffn_down the layer count)
    n_gqa: int  # query heads per KV head
    cols: int  # row length (GGUF ne[0])
    has_imatrix: bool


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for the '_M' presets: the first and last eighth of the layers,
    and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _always(c: Ctx) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    category: str
    presets: frozenset
    when: Callable[[Ctx], bool]
    qtype: str
    why: str


def _rule(cat: str, presets: str, when, qt: str, why: str) -> Rule:
    return Rule(cat, frozenset(presets.split()), when, qt, why)


_K_AND_LEGACY = "Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K"
_IQ4_AND_TERNARY = "IQ4_NL IQ4_XS TQ1_0 TQ2_0"
_IQ3 = "IQ3_XXS IQ3_XS IQ3_S IQ3_M"
# NOTE: llama.cpp decides every tensor of these presets in one branch of its own (before the
# attn_v / ffn_down / attn_output rules of the others, and without the 70B attn_v bump)
_IQ_LOW = "IQ2_XXS IQ2_XS IQ2_S IQ2_M IQ1_S IQ1_M"


def _gqa4(c: Ctx) -> bool:
    return c.n_gqa >= 4


def _first_eighth(c: Ctx) -> bool:
    return c.i < c.n // 8

# Within a category the first rule whose preset and condition match decides; no match keeps the
# preset's default type.  Order matters only between rules of the same preset.
RULES: tuple[Rule, ...] = (
    # The output head (and token_embd when the model ties the two, so it IS the output head).
    _rule(OUTPUT, " ".join((_K_AND_LEGACY, "Q8_0", _IQ4_AND_TERNARY, _IQ3, _IQ_LOW)),
          lambda c: c.cols % qtype(PRESETS[c.preset].default).block_size != 0,
          "Q8_0", "rows not whole blocks of the default type: Q8_0"),
    _rule(OUTPUT, "IQ3_XXS " + _IQ_LOW, _always, "Q5_K", "i-quants below 3.3 bpw: output at Q5_K"),
    _rule(OUTPUT, " ".join((_K_AND_LEGACY, _IQ4_AND_TERNARY, _IQ3)), _always, "Q6_K",
          "the output head gets 6 bits in every preset below Q8_0"),
    # token_embd when it is not the output head too
    _rule(TOKEN_EMBD, "TQ1_0 TQ2_0", _always, "Q4_K", "ternary presets: token_embd at Q4_K"),
    _rule(TOKEN_EMBD, "IQ2_XXS IQ2_XS IQ1_S IQ1_M", _always, "Q2_K",
          "the lowest i-quants: token_embd at Q2_K"),
    _rule(TOKEN_EMBD, "IQ2_S IQ2_M IQ3_XXS", _always, "IQ3_S", "IQ2_S/IQ2_M/IQ3_XXS: at IQ3_S"),
    # attn_v: small (n_kv_head rows) and sensitive, so cheap to raise.
    _rule(ATTN_V, "Q2_K", lambda c: c.n_gqa >= 4, "Q4_K", "Q2_K with >= 4 query heads per KV head"),
    _rule(ATTN_V, "Q2_K", _always, "Q3_K", "Q2_K otherwise"),
    _rule(ATTN_V, "Q3_K_M", lambda c: c.i < 2, "Q5_K", "Q3_K_M: the first two attn_v"),
    _rule(ATTN_V, "Q3_K_M", _always, "Q4_K", "Q3_K_M: the rest"),
    _rule(ATTN_V, "Q3_K_L", _always, "Q5_K", "Q3_K_L: all attn_v"),
    _rule(ATTN_V, "Q4_K_M Q5_K_M", lambda c: use_more_bits(c.i, c.n), "Q6_K",
          "_M presets: attn_v in the use_more_bits layers"),
    _rule(ATTN_V, "Q4_K_S", lambda c: c.i < 4, "Q5_K", "Q4_K_S: the first four attn_v"),
    _rule(ATTN_V, "IQ4_NL IQ4_XS", lambda c: c.n_gqa >= 4, "Q5_K",
          "IQ4 presets with >= 4 query heads per KV head"),
    _rule(ATTN_V, _IQ_LOW + " IQ3_XXS IQ3_XS IQ3_S", _gqa4, "Q4_K",
          "i-quants with >= 4 query heads per KV head"),
    _rule(ATTN_V, "IQ2_S IQ2_M", _always, "IQ3_S", "IQ2_S/IQ2_M: attn_v at IQ3_S"),
    _rule(ATTN_V, "IQ2_XXS IQ2_XS IQ1_S IQ1_M", _always, "Q2_K", "lowest i-quants: attn_v Q2_K"),
    _rule(ATTN_V, "IQ3_XXS", lambda c: not c.has_imatrix, "IQ3_S",
          "IQ3_XXS without an imatrix: attn_v at IQ3_S"),
    _rule(ATTN_V, "IQ3_M", _always, "Q4_K", "IQ3_M: all attn_v at Q4_K"),
    # NOTE: a fused attn_qkv takes the attn_v rules above: llama.cpp tests "attn_v-like" before
    # its own attn_qkv branch, which is therefore never reached.
    # ffn_down: i is the layer index, n the layer count.
    _rule(FFN_DOWN, "Q2_K", _always, "Q3_K", "Q2_K: all ffn_down at Q3_K"),
    _rule(FFN_DOWN, "IQ2_S IQ2_M", _first_eighth, "IQ3_S", "IQ2_S/IQ2_M: first eighth at IQ3_S"),
    _rule(FFN_DOWN, "IQ2_XXS IQ2_XS IQ1_S IQ1_M", _first_eighth, "Q2_K",
          "lowest i-quants: first eighth of layers at Q2_K"),
    _rule(FFN_DOWN, "IQ3_XXS", lambda c: not c.has_imatrix and c.i < c.n // 8, "Q4_K",
          "IQ3_XXS without an imatrix: first eighth of layers at Q4_K"),
    _rule(FFN_DOWN, "IQ3_XXS", lambda c: not c.has_imatrix, "Q3_K",
          "IQ3_XXS without an imatrix: the rest at Q3_K"),
    _rule(FFN_DOWN, "IQ3_M", _first_eighth, "Q4_K", "IQ3_M: first eighth of layers at Q4_K"),
    _rule(FFN_DOWN, "Q3_K_M", lambda c: c.i < c.n // 16, "Q5_K",
          "Q3_K_M: first sixteenth of layers"),
    _rule(FFN_DOWN, "Q3_K_M", _always, "Q4_K", "Q3_K_M: the rest at Q4_K"),
    _rule(FFN_DOWN, "Q3_K_L", _always, "Q5_K", "Q3_K_L: all ffn_down at Q5_K"),
    _rule(FFN_DOWN, "Q4_K_M Q5_K_M", lambda c: use_more_bits(c.i, c.n), "Q6_K",
          "_M presets: ffn_down in the use_more_bits layers"),
    _rule(FFN_DOWN, "IQ4_NL IQ4_XS", lambda c: not c.has_imatrix and c.i < c.n // 8, "Q5_K",
          "IQ4 presets without an imatrix: first eighth of layers at Q5_K"),
    _rule(FFN_DOWN, "Q4_K_S", lambda c: c.i < c.n // 8, "Q5_K", "Q4_K_S: first eighth of layers"),
    _rule(FFN_DOWN, "Q4_0", lambda c: c.has_imatrix and c.i < c.n // 8, "Q4_1",
          "Q4_0 with an imatrix: first eighth of layers at Q4_1"),
    _rule(FFN_DOWN, "Q5_0", lambda c: c.has_imatrix and c.i < c.n // 8, "Q5_1",
          "Q5_0 with an imatrix: first eighth of layers at Q5_1"),
    # attn_output.
    _rule(ATTN_OUTPUT, "Q2_K", _always, "Q3_K", "Q2_K: attn_output at Q3_K"),
    _rule(ATTN_OUTPUT, "Q3_K_M", _always, "Q4_K", "Q3_K_M: attn_output at Q4_K"),
    _rule(ATTN_OUTPUT, "Q3_K_L", _always, "Q5_K", "Q3_K_L: attn_output at Q5_K"),
    _rule(ATTN_OUTPUT, "IQ1_S IQ1_M", _always, "IQ2_XXS", "IQ1 presets: attn_output at IQ2_XXS"),
    _rule(ATTN_OUTPUT, "IQ2_S IQ2_M IQ3_XXS", _always, "IQ3_S",
          "IQ2_S/IQ2_M/IQ3_XXS: attn_output at IQ3_S"),
    _rule(ATTN_OUTPUT, "IQ3_M", _always, "Q4_K", "IQ3_M: attn_output at Q4_K"),
    # attn_q, attn_k; ffn_gate, ffn_up (i: layer index)
    _rule(ATTN_Q, "IQ3_XS", _always, "IQ3_XXS", "IQ3_XS: attn_q at IQ3_XXS"),
    _rule(ATTN_Q, "IQ3_XXS", _always, "IQ2_S", "IQ3_XXS: attn_q at IQ2_S"),
    _rule(ATTN_K, "IQ3_XS", _always, "IQ3_XXS", "IQ3_XS: attn_k at IQ3_XXS"),
    _rule(ATTN_K, "IQ3_XXS", _always, "IQ2_S", "IQ3_XXS: attn_k at IQ2_S"),
    _rule(FFN_GATE, "IQ3_XS", lambda c: c.n // 8 <= c.i < 7 * c.n // 8, "IQ3_XXS",
          "IQ3_XS: ffn_gate of the middle layers at IQ3_XXS"),
    _rule(FFN_UP, "IQ3_XS", lambda c: c.n // 8 <= c.i < 7 * c.n // 8, "IQ3_XXS",
          "IQ3_XS: ffn_up of the middle layers at IQ3_XXS"),
)

# Types llama-quantize will not make without an importance matrix (tensor_requires_imatrix; the
# Q2_K of its Q2_K_S preset too, which blockq does not have), except for token_embd and output.
NEEDS_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})

# A 70B llama (80 layers, grouped KV heads; any 80-layer qwen2) shares each attn_v among 8 query
# heads, so llama.cpp lifts its attn_v from 3 or 4 bits to Q5_K.
BUMP_70B = {"Q3_K": "Q5_K", "Q4_K": "Q5_K"}

# When a row is not a whole number of blocks, llama.cpp falls back to a type with 32-weight
# blocks; if even that does not fit, to F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
            **{t: "IQ4_NL" for t in ("IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                                     "IQ1_M", "IQ1_S")}}


def fallback(qt: str, cols: int) -> str:
    """The type llama.cpp really uses for rows of ``cols`` when it wanted ``qt``."""
    if cols % qtype(qt).block_size == 0:
        return qt
    qt = FALLBACK.get(qt, qt)
    return qt if cols % qtype(qt).block_size == 0 else "F16"


def _by_rules(cat: str, c: Ctx) -> str | None:
    for r in RULES:
        if r.category == cat and c.preset in r.presets and r.when(c):
            return r.qtype
    return None


def order_key(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (its weight map): tensors outside blocks first, then by block
    number, then by name.  The per-kind counters of the rules follow this order."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def parse_override(text: str) -> tuple[str, str]:
    """``REGEX=TYPE`` (llama-quantize's --tensor-type) -> (lower-cased regex, type name)."""
    pattern, sep, qt = text.rpartition("=")
    if not sep or not pattern or not qt:
        raise BadArgument(f"tensor type override {text!r} is not REGEX=TYPE, e.g. attn_v=q8_0")
    try:
        re.compile(pattern.lower())
    except re.error as e:
        raise BadArgument(f"tensor type override {text!r}: bad regex ({e})") from None
    return pattern.lower(), qtype(qt).name


def plan(tensors: Iterable[tuple[str, Sequence[int], str]], preset_name: "str | Preset", *,
         n_layer: int, n_head: int, n_head_kv: int, arch: str = "llama", n_expert: int = 0,
         has_imatrix: bool = False, overrides: Sequence[tuple[str, str]] = (),
         fell_back: "dict[tuple[int, str, str], int] | None" = None) -> dict[str, str]:
    """Choose each tensor's block type like ``llama-quantize`` would.

    ``tensors``: ``(gguf name, numpy-order shape, current type name)``; ``overrides``: ``(regex,
    type)`` pairs as from :func:`parse_override`, first match wins.  Returns name -> type name,
    in llama.cpp's tensor order (:func:`order_key`).  ``fell_back``, when given, counts the
    tensors whose rows did not fit the wanted type: ``(cols, wanted, used) -> n``.
    """
    p = preset(preset_name)
    if n_expert > 1:
        raise UnsupportedModel(f"model has {n_expert} experts; blockq's presets cover dense models "
                               "only (no expert rules)")
    if n_head_kv <= 0 or n_head % n_head_kv:
        raise BadArgument(f"{n_head} query heads cannot be shared among {n_head_kv} KV heads")
    items = sorted(((n, tuple(int(d) for d in s), qtype(t).name) for n, s, t in tensors),
                   key=lambda it: order_key(it[0]))
    cats = {n: category(n) for n, _, _ in items}
    n_attention_wv = sum(c in _ATTN_V_LIKE for c in cats.values())
    tied = OUTPUT not in cats.values()  # no output.weight: token_embd doubles as the output head
    is_70b = n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))
    compiled = [(re.compile(rx), qt) for rx, qt in overrides]
    counters = {ATTN_V: 0, FFN_DOWN: 0, FFN_GATE: 0, FFN_UP: 0}
    out: dict[str, str] = {}
    for name, shape, cur in items:
        if not quantizable(name, len(shape)):
            out[name] = cur
            continue
        if not p.quantized:
            out[name] = p.default
            continue
        cols = shape[-1]
        manual = next((qt for rx, qt in compiled if rx.search(name)), None)
        if manual is not None:
            new = manual  # NOTE: as llama.cpp, an override skips the rules and their counters
        else:
            cat = cats[name]
            if cat == TOKEN_EMBD and tied:
                cat = OUTPUT
            if cat in _ATTN_V_LIKE:
                cat = ATTN_V
            i = counters.get(cat, 0)
            n = n_attention_wv if cat == ATTN_V else n_layer
            ctx = Ctx(p.name, i, n, n_head // n_head_kv, cols, has_imatrix)
            new = _by_rules(cat, ctx) or p.default
            if cat == ATTN_V and is_70b and p.name not in _IQ_LOW.split():
                new = BUMP_70B.get(new, new)
            if cat in counters:
                counters[cat] += 1
        out[name] = fallback(new, cols)
        if (not has_imatrix and out[name] in NEEDS_IMATRIX
                and name not in ("token_embd.weight", "output.weight")):
            raise BadArgument(f"preset {p.name} needs an importance matrix: {name} would be "
                              f"{out[name]}, which llama.cpp refuses to make without one (the "
                              "result would be garbage); pass an imatrix (blockq imatrix ...)")
        if fell_back is not None and out[name] != new:
            key = (cols, new, out[name])
            fell_back[key] = fell_back.get(key, 0) + 1
    return out
