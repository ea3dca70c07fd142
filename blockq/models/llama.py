"""``llama`` (SmolLM2, TinyLlama, Llama 2/3, Mistral) and ``qwen2``: pre-norm blocks with
grouped-query attention and a SwiGLU feed-forward; any ``.bias`` in the file is added (qwen2's
q/k/v biases).

    h = attn_norm(x);  x += attn_output(attend(attn_q h, attn_k h, attn_v h))
    h = ffn_norm(x);   x += ffn_down(silu(ffn_gate h) * ffn_up h)
"""
from __future__ import annotations

from .base import Architecture, Block, linear, norm

# HF tensor name (regex, layer number captured) -> GGUF name; "{}" takes the groups in order
HF_TENSORS: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{}.attn_q.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{}.attn_k.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{}.attn_v.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "blk.{}.attn_output.{}"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
)

ATTENTION = (
    norm("attn_norm", lambda a: (a.n_embd,)),
    linear("attn_q", lambda a: (a.n_embd_q, a.n_embd)),
    linear("attn_k", lambda a: (a.n_embd_kv, a.n_embd)),
    linear("attn_v", lambda a: (a.n_embd_kv, a.n_embd)),
    linear("attn_output", lambda a: (a.n_embd, a.n_embd_q)),
)
FFN = (
    norm("ffn_norm", lambda a: (a.n_embd,)),
    linear("ffn_gate", lambda a: (a.n_ff, a.n_embd)),
    linear("ffn_up", lambda a: (a.n_ff, a.n_embd)),
    linear("ffn_down", lambda a: (a.n_embd, a.n_ff)),
)


class LlamaBlock(Block):
    TENSORS = ATTENTION + FFN

    def qk(self, ops, q, k, step):
        """What happens to q and k between their projections and rope (nothing here)."""
        return q, k

    def __call__(self, ops, x, il, step):  # x (n, n_embd)
        h = ops.rms_norm(x, self.attn_norm)
        q, k, v = ops.linears((self.attn_q, self.attn_k, self.attn_v), h)
        q, k = self.qk(ops, q, k, step)
        att = ops.attend(il, q, k, v, step)  # (n, n_embd_q)
        o = ops.linear(self.attn_output, att)  # (n, n_embd)
        if step.rows is not None and il == step.args.n_layer - 1:
            # NOTE: llama.cpp drops the rows without outputs after the attention output
            # projection; the kernels after it see fewer rows (and some pick their path by the
            # row count)
            o, x = ops.rows(o, step.rows), ops.rows(x, step.rows)
        x = ops.add(x, o)
        h = ops.rms_norm(x, self.ffn_norm)
        g = ops.swiglu(*ops.linears((self.ffn_gate, self.ffn_up), h))  # (n, n_ff)
        return ops.add(x, ops.linear(self.ffn_down, g))


# NOTE: llama.cpp's llama_model_rope_type(): `llama` uses NORM rope (adjacent pairs, because the
# converter permutes the q/k rows of HF llama checkpoints), `qwen2` uses NEOX rope (halves).
LLAMA = Architecture("llama", LlamaBlock, rope_neox=False,
                     hf_classes=(("LlamaForCausalLM", True), ("MistralForCausalLM", True)),
                     hf_tensors=HF_TENSORS, hf_sentencepiece=True)
QWEN2 = Architecture("qwen2", LlamaBlock, rope_neox=True,
                     hf_classes=(("Qwen2ForCausalLM", False),), hf_tensors=HF_TENSORS)
