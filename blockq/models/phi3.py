"""``phi3`` (Phi-3 mini/medium, Phi-3.5-mini, Phi-4-mini): the llama block with q, k and v in
one fused matrix and the feed-forward's gate and up halves in one ``ffn_up``; NEOX rope whose
frequencies Phi-3's long-context models divide by ``rope_factors_long`` or ``_short``
(:class:`blockq.model.Rope`, chosen by the context size) with cos and sin times
``rope.scaling.attn_factor``.

    h = attn_norm(x);  q | k | v = attn_qkv h;  x += attn_output(attend(q, k, v))
    h = ffn_norm(x);   g | u = ffn_up h;        x += ffn_down(silu(g) * u)
"""
from __future__ import annotations

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


PHI3 = Architecture("phi3", Phi3Block, rope_neox=True, hf_tensors=HF_TENSORS)
