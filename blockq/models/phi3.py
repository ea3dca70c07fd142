"""``phi3`` (Phi-3 mini/medium, Phi-3.5-mini, Phi-4-mini): the llama block with q, k and v in
one fused matrix and the feed-forward's gate and up halves in one ``ffn_up``; NEOX rope whose
frequencies Phi-3's long-context models divide by ``rope_factors_long`` or ``_short``
(:class:`blockq.model.Rope`, chosen by the context size) with cos and sin times
``rope.scaling.attn_factor``.

    h = attn_norm(x);  q | k | v = attn_qkv h;  x += attn_output(attend(q, k, v))
    h = ffn_norm(x);   g | u = ffn_up h;        x += ffn_down(silu(g) * u)
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import FormatError
from ..gguf.constants import Keys
from ..validate import MAX_CONTEXT, Fields, check_number, show
from .base import Architecture, Block, linear, norm

# NOTE: llama.cpp ignores phi3's attention.sliding_window (its Phi SWA is disabled), so
# blockq reads no window for phi3 either
HF_TENSORS: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", "blk.{}.attn_qkv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
)


class Phi3Block(Block):
    TENSORS = (
        norm("attn_norm", lambda a: (a.n_embd,)),
        linear("attn_qkv", lambda a: (a.n_embd_q + 2 * a.n_embd_kv, a.n_embd)),
        linear("attn_output", lambda a: (a.n_embd, a.n_embd_q)),
        norm("ffn_norm", lambda a: (a.n_embd,)),
        linear("ffn_up", lambda a: (2 * a.n_ff, a.n_embd)),  # gate rows, then up rows
        linear("ffn_down", lambda a: (a.n_embd, a.n_ff)),
    )

    def __call__(self, ops, x, il, step):  # x (n, n_embd)
        a = step.args
        h = ops.rms_norm(x, self.attn_norm)
        qkv = ops.linear(self.attn_qkv, h)  # (n, n_embd_q + 2 n_embd_kv)
        q, kv = qkv[:, :a.n_embd_q], a.n_embd_q + a.n_embd_kv
        att = ops.attend(il, q, qkv[:, a.n_embd_q:kv], qkv[:, kv:], step)  # (n, n_embd_q)
        o = ops.linear(self.attn_output, att)  # (n, n_embd)
        if step.rows is not None and il == a.n_layer - 1:  # as llama.cpp, see llama.py
            o, x = ops.rows(o, step.rows), ops.rows(x, step.rows)
        x = ops.add(x, o)
        gu = ops.linear(self.ffn_up, ops.rms_norm(x, self.ffn_norm))  # (n, 2 n_ff)
        g = ops.swiglu(gu[:, :a.n_ff], gu[:, a.n_ff:])  # (n, n_ff)
        return ops.add(x, ops.linear(self.ffn_down, g))


def _rope_dims(f, cfg) -> int:
    return int(_rope(f).number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0,
                                                                  lo=0.0, lo_open=True, hi=1.0),
                               lo=0.0, lo_open=True, hi=1.0) * cfg.n_embd) // cfg.n_head


def _rope(f):
    return Fields(f.get("rope_parameters") or f.get("rope_scaling") or {},
                  f"{f.where}: rope_scaling")


def _original_ctx(f) -> int:
    return _rope(f).integer("original_max_position_embeddings",
                            f.integer("original_max_position_embeddings", hi=MAX_CONTEXT),
                            hi=MAX_CONTEXT)


def _hf_metadata(f, cfg) -> dict:
    """Phi3MiniModel's keys: the original context, the rotated dimensions, the window (0 when
    none: llama.cpp ignores it), and with long/short factors the attention factor they imply."""
    md = {Keys.Rope.SCALING_ORIG_CTX_LEN: _original_ctx(f),
          Keys.Rope.DIMENSION_COUNT: _rope_dims(f, cfg),
          Keys.Attention.SLIDING_WINDOW: f.integer("sliding_window", 0, lo=0, hi=MAX_CONTEXT)}
    if _rope(f).get("long_factor") is not None:
        scale = (cfg.n_ctx or 0) / md[Keys.Rope.SCALING_ORIG_CTX_LEN]
        kind = _rope(f).text("rope_type", _rope(f).text("type", "longrope")).lower()
        # NOTE: as convert_hf_to_gguf's Phi-3: sqrt(1 + ln s / ln orig) for su/longrope,
        # 0.1 ln s + 1 for yarn, 1 within the original context
        if scale <= 1.0:
            attn = 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0
        else:
            attn = math.sqrt(1 + math.log(scale) / math.log(md[Keys.Rope.SCALING_ORIG_CTX_LEN]))
        md[Keys.Rope.SCALING_ATTN_FACTOR] = attn
    return md


def _hf_factors(f, cfg) -> dict:
    """``rope_factors_long`` / ``_short`` from rope_scaling's long_factor / short_factor."""
    r = _rope(f)
    if r.get("long_factor") is None:
        return {}
    n = _rope_dims(f, cfg) // 2
    out = {}
    for key, name in (("long_factor", "rope_factors_long.weight"),
                      ("short_factor", "rope_factors_short.weight")):
        v = r.get(key)
        if not isinstance(v, list) or len(v) != n:
            raise FormatError(f"{r.what(key)} must be a list of {n} numbers (half the rotated "
                              f"dimensions), got {show(v)}")
        out[name] = np.array([check_number(x, f"{r.what(key)}[{i}]", lo=0.0, lo_open=True)
                              for i, x in enumerate(v)], dtype=np.float32)
    return out


PHI3 = Architecture("phi3", Phi3Block, rope_neox=True,
                    hf_classes=(("Phi3ForCausalLM", False),), hf_tensors=HF_TENSORS,
                    hf_rope_types=("default", "longrope", "su"), hf_metadata=_hf_metadata,
                    hf_extra_tensors=_hf_factors, hf_sentencepiece=True)
