"""Tiny random llama-family GGUF files for tests, written through blockq's own writer.

Also an independent float64 reference forward pass: it un-permutes the q/k rows the way
convert_hf_to_gguf permuted them and applies Hugging Face's ``rotate_half`` rotary embedding,
so it checks blockq's rope convention (adjacent pairs for ``llama``, halves for ``qwen2``) from
the other side rather than repeating it.  Weights come from gguf-py's dequantizer (the oracle).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import blockq
from blockq.quantize import quantize

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s")


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def tokenizer_metadata() -> dict:
    """A byte-level BPE vocabulary: 256 bytes, a few merges, <|endoftext|> + ChatML markers."""
    tokens = _byte_chars() + [m.replace(" ", "") for m in MERGES] + list(SPECIALS)
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": list(MERGES),
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


N_VOCAB = 256 + len(MERGES) + len(SPECIALS)


def write_tiny(path: Path, *, arch: str = "llama", qtype: str = "F32", tied: bool = True,
               biases: bool = False, n_layer: int = 2, n_embd: int = 256, n_head: int = 4,
               n_head_kv: int = 2, n_ff: int = 512, rope_freqs: bool = False,
               rope_scale: float = 0.0, seed: int = 0, drop: str | None = None,
               out_qtype: str | None = None, extra_md: dict | None = None,
               head_dim: int = 0, sliding_window: int = 0,
               rope_factors: bool = False) -> Path:
    """Write a random ``arch`` model; 2-D weights in ``qtype`` (norms and biases stay F32).

    ``arch="qwen3"`` adds q/k norms, ``"gemma3"`` those and its sandwich norms, ``"gemma2"``
    the sandwich norms; ``sliding_window`` sets the Gemmas' local layers' window.  ``"phi3"``
    fuses q/k/v into ``attn_qkv`` and gate/up into ``ffn_up``; ``rope_factors`` adds Phi-3's
    ``rope_factors_long`` / ``_short`` tensors.
    """
    rng = np.random.default_rng(seed)
    hd = head_dim or n_embd // n_head
    gemma = arch in ("gemma2", "gemma3")
    qk_norm = arch in ("gemma3", "qwen3")  # an RMS norm over each head of q and k
    md = {
        "general.architecture": arch,
        "general.name": f"tiny-{arch}",
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": np.float32(1e-5),
        f"{arch}.rope.freq_base": np.float32(10000.0),
        f"{arch}.rope.dimension_count": hd,
        **tokenizer_metadata(),
    }
    if head_dim:
        md[f"{arch}.attention.key_length"] = md[f"{arch}.attention.value_length"] = head_dim
    if gemma:
        md[f"{arch}.attention.layer_norm_rms_epsilon"] = np.float32(1e-6)
        md[f"{arch}.rope.freq_base"] = np.float32(1e6)
    if sliding_window:
        md[f"{arch}.attention.sliding_window"] = sliding_window
    md.update(extra_md or {})
    if rope_scale:
        md[f"{arch}.rope.scaling.type"] = "linear"
        md[f"{arch}.rope.scaling.factor"] = np.float32(rope_scale)
    tensors = []

    def mat(name, rows, cols, qt=qtype):
        w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        data = w if qt == "F32" else quantize(w, qt)
        tensors.append((name, qt, (rows, cols), data))

    def vec(name, n, center=1.0, spread=0.1):
        v = (center + spread * rng.standard_normal(n)).astype(np.float32)
        tensors.append((name, "F32", (n,), v))

    emb = rng.standard_normal((N_VOCAB, n_embd)).astype(np.float32)
    tensors.append(("token_embd.weight", qtype, (N_VOCAB, n_embd),
                    emb if qtype == "F32" else quantize(emb, qtype)))
    vec("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", N_VOCAB, n_embd, out_qtype or qtype)
    if rope_freqs:
        tensors.append(("rope_freqs.weight", "F32", (hd // 2,),
                        np.linspace(1.0, 8.0, hd // 2).astype(np.float32)))
    if rope_factors:
        for name, hi in (("rope_factors_long", 16.0), ("rope_factors_short", 2.0)):
            tensors.append((name + ".weight", "F32", (hd // 2,),
                            np.geomspace(1.0, hi, hd // 2).astype(np.float32)))
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        if arch == "phi3":
            mat(p + "attn_qkv.weight", (n_head + 2 * n_head_kv) * hd, n_embd)
            mat(p + "attn_output.weight", n_embd, n_head * hd)
            vec(p + "ffn_norm.weight", n_embd)
            mat(p + "ffn_up.weight", 2 * n_ff, n_embd)
            mat(p + "ffn_down.weight", n_embd, n_ff)
            continue
        mat(p + "attn_q.weight", n_head * hd, n_embd)
        mat(p + "attn_k.weight", n_head_kv * hd, n_embd)
        mat(p + "attn_v.weight", n_head_kv * hd, n_embd)
        if biases:
            vec(p + "attn_q.bias", n_head * hd, 0.0, 0.5)
            vec(p + "attn_k.bias", n_head_kv * hd, 0.0, 0.5)
            vec(p + "attn_v.bias", n_head_kv * hd, 0.0, 0.5)
        mat(p + "attn_output.weight", n_embd, n_head * hd)
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd)
        mat(p + "ffn_up.weight", n_ff, n_embd)
        mat(p + "ffn_down.weight", n_embd, n_ff)
        if qk_norm:
            for name in ("attn_q_norm", "attn_k_norm"):
                vec(p + name + ".weight", hd)
        if gemma:
            for name in ("post_attention_norm", "post_ffw_norm"):
                vec(p + name + ".weight", n_embd)
    if drop is not None:
        tensors = [t for t in tensors if t[0] != drop]
    blockq.write_gguf(path, md, tensors)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# reference forward pass (float64, whole sequence, Hugging Face conventions)


def _weights(path: Path) -> tuple[dict, dict]:
    with blockq.read_gguf(path) as r:
        md = {k: r.metadata[k] for k in r.metadata if not k.startswith("tokenizer.")}
        w = {}
        for name, t in r.tensors.items():
            raw = np.array(t.data)
            if t.qtype == "F32":
                a = raw.view("<f4")
            else:
                a = gguf_dequantize(raw.reshape(t.shape[0], -1), GGMLQuantizationType[t.qtype])
            w[name] = np.asarray(a, dtype=np.float64).reshape(t.shape)
    return md, w


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's q/k row permutation (per head: halves -> pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def reference_logits(path: Path, tokens: list[int], n_ctx: int = 64) -> np.ndarray:
    """Logits (n, n_vocab) of ``tokens`` at positions 0..n-1, computed in float64.

    ``n_ctx``: the context the runtime was given (it picks Phi-3's long or short factors)."""
    md, w = _weights(path)
    arch = md["general.architecture"]
    if arch == "phi3":  # fused q|k|v and gate|up rows: split them
        for name in [k for k in w if k.endswith("attn_qkv.weight")]:
            qkv = w.pop(name)  # (n_q + 2 n_k, n_embd)
            n_q = md["phi3.attention.head_count"] * int(md.get(
                "phi3.attention.key_length",
                md["phi3.embedding_length"] // md["phi3.attention.head_count"]))
            n_k = (qkv.shape[0] - n_q) // 2
            for c, part in zip("qkv", np.split(qkv, [n_q, n_q + n_k])):
                w[name.replace("qkv", c)] = part
        for name in [k for k in w if k.endswith("ffn_up.weight")]:
            w[name.replace("up", "gate")], w[name] = np.split(w[name], 2)
    n_embd = md[f"{arch}.embedding_length"]
    n_head = md[f"{arch}.attention.head_count"]
    n_kv = md[f"{arch}.attention.head_count_kv"]
    eps = float(md[f"{arch}.attention.layer_norm_rms_epsilon"])
    scale = 1.0 / float(md.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    hd = int(md.get(f"{arch}.attention.key_length", n_embd // n_head))
    gemma = arch in ("gemma2", "gemma3")
    window = int(md.get(f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else 0))
    # Gemma 2 soft-caps attention scores (50) and logits (30)
    attn_cap, out_cap = (50.0, 30.0) if arch == "gemma2" else (0.0, 0.0)
    n = len(tokens)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    orig = int(md.get(f"{arch}.rope.scaling.original_context_length",
                      md[f"{arch}.context_length"]))
    factors = w.get("rope_freqs.weight")
    if factors is None:  # Phi-3: long factors when the context (in 256s) exceeds the original
        long = -(-n_ctx // 256) * 256 > orig
        factors = w.get("rope_factors_long.weight" if long else "rope_factors_short.weight")
    yarn = md.get(f"{arch}.rope.scaling.type") == "yarn"
    mscale = float(md.get(f"{arch}.rope.scaling.attn_factor", 1.0))

    def rotary(base, scale, global_=True):
        inv = base ** (-np.arange(0, hd, 2) / hd)  # (hd/2,)
        m = mscale if global_ else 1.0
        if factors is not None and global_:
            inv = inv / factors
        if yarn and global_:  # Hugging Face's YaRN: ramp between interpolated and original
            def dim(beta):
                return hd * np.log(orig / (beta * 2 * np.pi)) / (2 * np.log(base))
            lo, hi = max(np.floor(dim(32.0)), 0), min(np.ceil(dim(1.0)), hd - 1)
            ramp = np.clip((np.arange(hd // 2) - lo) / max(hi - lo, 0.001), 0, 1)
            inv = inv * scale * ramp + inv * (1 - ramp)
            scale, m = 1.0, m * (0.1 * np.log(1 / scale) + 1)
        ang = np.arange(n)[:, None] * inv[None, :] * scale  # (n, hd/2)
        cos = m * np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]  # (n, 1, hd)
        sin = m * np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

        def rope(x):  # Hugging Face rotate_half convention
            half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
            return x * cos + half * sin
        return rope

    rope_global = rotary(float(md.get(f"{arch}.rope.freq_base", 10000.0)), scale)
    rope_local = rotary(10000.0, 1.0, False)  # Gemma 3's local layers (rope_local_base_freq)
    x = w["token_embd.weight"][tokens]  # (n, n_embd)
    if gemma:
        x = x * np.sqrt(n_embd)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    pos = np.arange(n)
    local_mask = np.where(pos[:, None] - pos[None, :] >= window, -np.inf, causal) if window \
        else causal
    for i in range(md[f"{arch}.block_count"]):
        p = f"blk.{i}."
        b = lambda name: w.get(p + name + ".bias", 0.0)  # noqa: E731
        if arch == "gemma2":  # every other layer local, with the global rope
            local, rope = window > 0 and i % 2 == 0, rope_global
        else:  # Gemma 3: 5 local layers, then 1 global one
            local = gemma and window > 0 and i % 6 != 5
            rope = rope_local if local else rope_global
        mask = local_mask if local else causal
        h = norm(x, w[p + "attn_norm.weight"])
        wq, wk = w[p + "attn_q.weight"], w[p + "attn_k.weight"]
        if arch == "llama":  # GGUF llama q/k rows are permuted for adjacent-pair rope
            wq, wk = _unpermute(wq, n_head), _unpermute(wk, n_kv)
            bq = _unpermute(np.reshape(b("attn_q"), (-1, 1)), n_head)[:, 0] \
                if p + "attn_q.bias" in w else 0.0
            bk = _unpermute(np.reshape(b("attn_k"), (-1, 1)), n_kv)[:, 0] \
                if p + "attn_k.bias" in w else 0.0
        else:
            bq, bk = b("attn_q"), b("attn_k")
        q = (h @ wq.T + bq).reshape(n, n_head, hd)
        k = (h @ wk.T + bk).reshape(n, n_kv, hd)
        if p + "attn_q_norm.weight" in w:
            q, k = norm(q, w[p + "attn_q_norm.weight"]), norm(k, w[p + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        v = (h @ w[p + "attn_v.weight"].T + b("attn_v")).reshape(n, n_kv, hd)
        out = np.empty((n, n_head, hd))
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd)
            if attn_cap:
                s = attn_cap * np.tanh(s / attn_cap)
            s = s + mask
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            out[:, hh] = pr @ v[:, kv]
        o = out.reshape(n, -1) @ w[p + "attn_output.weight"].T
        x = x + (norm(o, w[p + "post_attention_norm.weight"]) if gemma else o)
        h = norm(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        if gemma:  # gelu, tanh approximation
            act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        else:
            act = g / (1 + np.exp(-g))
        f = (act * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = x + (norm(f, w[p + "post_ffw_norm.weight"]) if gemma else f)
    out_w = w.get("output.weight", w["token_embd.weight"])
    logits = norm(x, w["output_norm.weight"]) @ out_w.T + w.get("output.bias", 0.0)
    return out_cap * np.tanh(logits / out_cap) if out_cap else logits


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    """``n`` argmax tokens after ``prompt`` (the prompt in one batch, then one token at a time,
    as llama.cpp's recorded runs), without stopping at end-of-generation tokens."""
    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(list(prompt), cache)[0]
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache)[0]
    return out
