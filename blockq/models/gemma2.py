"""``gemma2`` (Gemma-2 2B / 9B / 27B): Gemma 3's block without q/k norms, with soft-capped
attention scores and logits (``cap * tanh(x / cap)``: 50 and 30 unless the file says otherwise)
and every other layer local (sliding window, 4096 by default) with the global layers' rope.
The output projection is always the token embedding table.
"""
from __future__ import annotations

import math

from ..gguf.constants import Keys
from ..validate import MAX_CONTEXT
from .base import Architecture, Block, norm
from .gemma3 import HF_TENSORS, LOGIT_SOFTCAP, SLIDING_WINDOW, sandwich, swa_layers
from .llama import ATTENTION, FFN

ATTN_SOFTCAP = "{arch}.attn_logit_softcapping"


class Gemma2Block(Block):
    TENSORS = ATTENTION + (norm("post_attention_norm", lambda a: (a.n_embd,)),) + FFN \
        + (norm("post_ffw_norm", lambda a: (a.n_embd,)),)

    def __call__(self, ops, x, il, step):  # x (n, n_embd)
        h = ops.rms_norm(x, self.attn_norm)
        att = ops.attend(il, *ops.linears((self.attn_q, self.attn_k, self.attn_v), h),
                         step)  # (n, n_embd_q)
        return sandwich(self, ops, x, att, il, step)


def _args(get, f: dict) -> dict:
    # NOTE: llama.cpp's gemma2 defaults: a 4096-token window on every other layer (the even
    # ones), caps 50 (attention) and 30 (logits), local layers with the global rope
    window = get.integer(SLIDING_WINDOW, 4096, lo=0, hi=MAX_CONTEXT)
    head_dim = f["head_dim"] or f["n_embd"] // f["n_head"]
    q_dim = f["n_embd"] / f["n_head"] if f["n_layer"] == 46 else head_dim  # 27B: 46 layers
    return dict(activation="gelu", embd_scale=math.sqrt(f["n_embd"]), sliding_window=window,
                swa_layers=swa_layers(get, f["n_layer"], window, 2),
                rope_base_swa=get.number(Keys.Rope.FREQ_BASE_SWA, f["rope_base"], lo=1.0,
                                         lo_open=True),
                attn_scale=f["attn_scale"] or 1.0 / math.sqrt(q_dim),
                attn_softcap=get.number(ATTN_SOFTCAP, 50.0, lo=0.0),
                final_softcap=get.number(LOGIT_SOFTCAP, 30.0, lo=0.0))


def _hf_metadata(f, cfg) -> dict:
    """Gemma2Model's keys: its own set (no rope base), with both caps and the window."""
    return {"{arch}.rope.freq_base": None,
            "{arch}.attention.key_length": f.integer("head_dim"),
            "{arch}.attention.value_length": f.integer("head_dim"),
            ATTN_SOFTCAP: f.number("attn_logit_softcapping", lo=0.0, lo_open=True),
            LOGIT_SOFTCAP: f.number("final_logit_softcapping", lo=0.0, lo_open=True),
            SLIDING_WINDOW: f.integer("sliding_window", hi=MAX_CONTEXT)}


GEMMA2 = Architecture("gemma2", Gemma2Block, rope_neox=True, extra_args=_args,
                      hf_classes=(("Gemma2ForCausalLM", False),), hf_tensors=HF_TENSORS,
                      hf_metadata=_hf_metadata, hf_norm_shift=1.0, hf_sentencepiece=True,
                      hf_sp_space_prefix=False)
