"""``qwen3`` (Qwen3 0.6B .. 32B dense): the qwen2 block without q/k/v biases and with an RMS
norm over each head of q and of k before rope (``attn_q_norm``, ``attn_k_norm``, one weight of
head_dim shared by all heads).
"""
from __future__ import annotations

from .base import Architecture, head_norm, norm
from .llama import ATTENTION, FFN, HF_TENSORS, LlamaBlock

QK_NORMS = (norm("attn_q_norm", lambda a: (a.head_dim,)),
            norm("attn_k_norm", lambda a: (a.head_dim,)))
HF_QK_NORMS = (
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{}.attn_k_norm.weight"),
)


class Qwen3Block(LlamaBlock):
    TENSORS = ATTENTION + QK_NORMS + FFN

    def qk(self, ops, q, k, step):
        a = step.args
        return (head_norm(ops, q, self.attn_q_norm, a.n_head, a.head_dim),
                head_norm(ops, k, self.attn_k_norm, a.n_head_kv, a.head_dim))


QWEN3 = Architecture("qwen3", Qwen3Block, rope_neox=True,
                     hf_classes=(("Qwen3ForCausalLM", False),),
                     hf_tensors=HF_TENSORS + HF_QK_NORMS)
