"""``gemma3`` (text part: Gemma-3 270M .. 27B): embeddings scaled by sqrt(n_embd), per-head RMS
norms of q and k, "sandwich" norms after attention and after the feed-forward, GELU (tanh)
gating, and local layers with a sliding window and their own rope base (5 local layers, then 1
global one).  The file's norm weights already hold Gemma's ``1 + w`` (llama.cpp's converter adds
the one).

    h = attn_norm(x);  q, k = attn_q_norm(attn_q h), attn_k_norm(attn_k h)   (per head)
    x += post_attention_norm(attn_output(attend(q, k, attn_v h)))
    h = ffn_norm(x);   x += post_ffw_norm(ffn_down(gelu(ffn_gate h) * ffn_up h))
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import FormatError
from ..gguf.constants import Keys
from ..validate import MAX_CONTEXT, MAX_LAYERS
from .base import Architecture, Block, head_norm, norm
from .llama import ATTENTION, FFN
from .llama import HF_TENSORS as LLAMA_HF
from .qwen3 import HF_QK_NORMS, QK_NORMS

SWA_PATTERN = 6  # NOTE: llama.cpp: layer il is local unless il % 6 == 5
ROPE_BASE_SWA = 10000.0  # NOTE: llama.cpp's fixed base for gemma3's local layers
SLIDING_WINDOW = "{arch}.attention.sliding_window"
SWA_PATTERN_KEY = "{arch}.attention.sliding_window_pattern"  # an int period or per-layer flags
LOGIT_SOFTCAP = "{arch}.final_logit_softcapping"


class Gemma3Block(Block):
    TENSORS = ATTENTION + QK_NORMS + (norm("post_attention_norm", lambda a: (a.n_embd,)),) \
        + FFN + (norm("post_ffw_norm", lambda a: (a.n_embd,)),)

    def __call__(self, ops, x, il, step):  # x (n, n_embd)
        a = step.args
        h = ops.rms_norm(x, self.attn_norm)
        q, k, v = ops.linears((self.attn_q, self.attn_k, self.attn_v), h)
        q = head_norm(ops, q, self.attn_q_norm, a.n_head, a.head_dim)
        k = head_norm(ops, k, self.attn_k_norm, a.n_head_kv, a.head_dim)
        att = ops.attend(il, q, k, v, step)  # (n, n_embd_q)
        return sandwich(self, ops, x, att, il, step)


def sandwich(b, ops, x, att, il, step):
    """The rest of a Gemma block after attention: output projection, post-attention norm,
    residual, GeGLU feed-forward between its two norms, residual."""
    o = ops.linear(b.attn_output, att)  # (n, n_embd)
    if step.rows is not None and il == step.args.n_layer - 1:  # as llama.cpp, see llama.py
        o, x = ops.rows(o, step.rows), ops.rows(x, step.rows)
    x = ops.add(x, ops.rms_norm(o, b.post_attention_norm))
    h = ops.rms_norm(x, b.ffn_norm)
    g = ops.geglu(*ops.linears((b.ffn_gate, b.ffn_up), h))  # (n, n_ff)
    return ops.add(x, ops.rms_norm(ops.linear(b.ffn_down, g), b.post_ffw_norm))


def swa_layers(get, n_layer: int, window: int, period: int) -> tuple:
    """Per layer: local (sliding window)?  From ``sliding_window_pattern`` (a period, or one
    flag per layer), else ``period``; no layer is local without a window."""
    pattern = get.get(SWA_PATTERN_KEY, period)
    if isinstance(pattern, (list, tuple, np.ndarray)):
        if len(pattern) != n_layer:
            raise FormatError(f"{get.what(SWA_PATTERN_KEY)} has {len(pattern)} flags for "
                              f"{n_layer} layers")
        return tuple(window > 0 and bool(p) for p in pattern)
    # NOTE: as llama.cpp's set_swa_pattern: period p, the last layer of each period global;
    # 0 makes every layer local
    p = get.integer(SWA_PATTERN_KEY, period, lo=0, hi=MAX_LAYERS)
    return tuple(window > 0 and (p == 0 or il % p < p - 1) for il in range(n_layer))


def _args(get, f: dict) -> dict:
    window = get.integer(SLIDING_WINDOW, 0, lo=0, hi=MAX_CONTEXT)
    swa = swa_layers(get, f["n_layer"], window, SWA_PATTERN)
    head_dim = f["head_dim"] or f["n_embd"] // f["n_head"]
    # NOTE: llama.cpp scales queries by 1/sqrt(n_embd / n_head) for the 27B model (62 layers)
    # and by 1/sqrt(head_dim) otherwise
    q_dim = f["n_embd"] / f["n_head"] if f["n_layer"] == 62 else head_dim
    base_swa = get.number(Keys.Rope.FREQ_BASE_SWA, ROPE_BASE_SWA, lo=1.0, lo_open=True)
    return dict(activation="gelu", embd_scale=math.sqrt(f["n_embd"]), sliding_window=window,
                swa_layers=swa, rope_base_swa=base_swa, rope_freq_scale_swa=1.0,
                attn_scale=f["attn_scale"] or 1.0 / math.sqrt(q_dim),
                final_softcap=get.number(LOGIT_SOFTCAP, 0.0, lo=0.0))


# HF names (Gemma2 / Gemma3ForCausalLM): the llama ones but for the norms around each half
HF_TENSORS: tuple[tuple[str, str], ...] = tuple(
    (rx, out) for rx, out in LLAMA_HF if "layernorm" not in rx) + (
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", "blk.{}.post_ffw_norm.weight"),
)


def _hf_metadata(f, cfg) -> dict:
    """Gemma3Model's keys beyond the common ones: head size (256 by default), the final cap
    where set, the window unless every layer is global, the local layers' rope base."""
    md = {"{arch}.attention.key_length": cfg.head_dim or 256,
          "{arch}.attention.value_length": cfg.head_dim or 256}
    if f.get("final_logit_softcapping"):
        md[LOGIT_SOFTCAP] = f.number("final_logit_softcapping", lo=0.0, lo_open=True)
    if f.get("sliding_window_pattern") != 1:
        md[SLIDING_WINDOW] = f.integer("sliding_window", hi=MAX_CONTEXT)
    if f.get("rope_local_base_freq") is not None:
        md[Keys.Rope.FREQ_BASE_SWA] = f.number("rope_local_base_freq", lo=1.0, lo_open=True)
    return md


GEMMA3 = Architecture("gemma3", Gemma3Block, rope_neox=True, extra_args=_args,
                      hf_classes=(("Gemma3ForCausalLM", False),), hf_tensors=HF_TENSORS + HF_QK_NORMS,
                      hf_metadata=_hf_metadata, hf_norm_shift=1.0, hf_sentencepiece=True,
                      hf_sp_space_prefix=False)
