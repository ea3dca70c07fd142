"""blockq.convert: Hugging Face folders and GGUF files -> GGUF at a preset, streamed and atomic.

Fixtures write tiny random llama / qwen2 / qwen3 / gemma2 / gemma3 / phi3 checkpoints
(config.json, safetensors, tokenizer.json, tokenizer_config.json).  Oracles: the weights themselves (an F32 conversion must reproduce them,
q/k rows un-permuted by tests/tiny_model.py's independent inverse), tests/tiny_model.py's
float64 forward pass, blockq.quantize on the same rows, gguf-py's SpecialVocab (how
convert_hf_to_gguf reads special tokens) and, for the realistic vocabulary, the tokenizer keys
llama.cpp wrote into the shipped SmolLM2 file; llama.cpp's outputs on four converted folders
(tools/record_tiny_archs.py).
"""
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import blockq
from blockq import BadArgument, FormatError, UnsupportedModel
from blockq.convert import convert, gguf_name, qk_permutation
from blockq.dequantize import dequantize
from blockq.imatrix import Collector, write_imatrix
from blockq.quantize import quantize
from tiny_model import CHATML, _unpermute, reference_logits, tokenizer_metadata

N_VOCAB_CFG = 272  # the tiny tokenizer has 267 tokens: ids 267..271 become [PAD] entries


# --- fixtures: a Hugging Face folder ----------------------------------------------------------
def _tokenizer_json(md: dict, pretok: dict | None = None) -> dict:
    """tokenizer.json for a GGUF-style byte-level BPE vocabulary (tokens, types, merges)."""
    toks, types = md["tokenizer.ggml.tokens"], np.asarray(md["tokenizer.ggml.token_type"])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": int(i), "content": toks[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in np.where(types == 3)[0]],
        "normalizer": None,
        "pre_tokenizer": pretok or {"type": "ByteLevel", "add_prefix_space": False,
                                    "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(toks)},
                  "merges": list(md["tokenizer.ggml.merges"])},
    }


def _pb_varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


SP_PIECES = ([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
             + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
             + [(p, -float(i), 1) for i, p in enumerate(
                 ("▁", "t", "h", "e", "▁t", "he", "▁the", "a", "c", "▁c", "at", "▁cat"))]
             + [("<user>", 0.0, 4)])  # 272 pieces


def sp_model_bytes(pieces=SP_PIECES) -> bytes:
    """A SentencePiece tokenizer.model: ModelProto field 1 per piece (text, score, type)."""
    out = b""
    for text, score, kind in pieces:
        t = text.encode()
        body = b"\x0a" + _pb_varint(len(t)) + t + b"\x15" + struct.pack("<f", score) \
            + b"\x18" + _pb_varint(kind)
        out += b"\x0a" + _pb_varint(len(body)) + body
    return out + b"\x12\x02\x08\x01"  # a trainer_spec, skipped by the reader


def _save_bf16(path: Path, tensors: dict) -> None:
    """A safetensors file of BF16 tensors (numpy has no bf16: truncate float32 ourselves)."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        u = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape),
                        "data_offsets": [off, off + len(u)]}
        blobs.append(u)
        off += len(u)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_hf(folder: Path, *, arch="LlamaForCausalLM", dtype="F32", shards=1, tied=False,
            n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, seed=0, tok_md=None,
            n_vocab=N_VOCAB_CFG, mutate=None, pretok=None, head_dim=None,
            config: dict | None = None, sentencepiece: bool = False,
            sp_added: dict | None = None) -> dict:
    """Write a random checkpoint folder; returns the HF tensors (float32, bf16-rounded for BF16).

    Gemma2/Gemma3ForCausalLM get their four norms per layer (Gemma 3 also q/k norms),
    Phi3ForCausalLM fused qkv_proj and gate_up_proj; ``config`` adds config.json keys;
    ``sentencepiece``: the vocabulary is SP_PIECES' tokenizer.model (no tokenizer.json), with
    ``sp_added`` (id -> [text, special]) more added tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hd = head_dim or n_embd // n_head
    w = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, n_embd)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(n_embd)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((n_vocab, n_embd)) / np.sqrt(n_embd)
    gemma = arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
    for i in range(n_layer):
        p = f"model.layers.{i}."
        m = lambda r, c: rng.standard_normal((r, c)) / np.sqrt(c)  # noqa: E731
        if arch == "Phi3ForCausalLM":
            w.update({p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(n_embd),
                      p + "self_attn.qkv_proj.weight": m((n_head + 2 * n_head_kv) * hd, n_embd),
                      p + "self_attn.o_proj.weight": m(n_embd, n_head * hd),
                      p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(n_embd),
                      p + "mlp.gate_up_proj.weight": m(2 * n_ff, n_embd),
                      p + "mlp.down_proj.weight": m(n_embd, n_ff)})
            continue
        if gemma:  # HF Gemma norms hold w of (1 + w): centred on 0
            w.update({p + name: 1 + 0.1 * rng.standard_normal(n_embd) for name in (
                "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")})
        if arch == "Gemma3ForCausalLM":
            w.update({p + "self_attn.q_norm.weight": 0.1 * rng.standard_normal(hd),
                      p + "self_attn.k_norm.weight": 0.1 * rng.standard_normal(hd)})
        w.update({p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(n_embd),
                  p + "self_attn.q_proj.weight": m(n_head * hd, n_embd),
                  p + "self_attn.k_proj.weight": m(n_head_kv * hd, n_embd),
                  p + "self_attn.v_proj.weight": m(n_head_kv * hd, n_embd),
                  p + "self_attn.o_proj.weight": m(n_embd, n_head * hd),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(n_embd),
                  p + "mlp.gate_proj.weight": m(n_ff, n_embd),
                  p + "mlp.up_proj.weight": m(n_ff, n_embd),
                  p + "mlp.down_proj.weight": m(n_embd, n_ff)})
        if arch == "Qwen3ForCausalLM":
            w.update({p + "self_attn.q_norm.weight": 1 + 0.1 * rng.standard_normal(hd),
                      p + "self_attn.k_norm.weight": 1 + 0.1 * rng.standard_normal(hd)})
        if arch == "Qwen2ForCausalLM":
            w.update({p + "self_attn.q_proj.bias": 0.5 * rng.standard_normal(n_head * hd),
                      p + "self_attn.k_proj.bias": 0.5 * rng.standard_normal(n_head_kv * hd),
                      p + "self_attn.v_proj.bias": 0.5 * rng.standard_normal(n_head_kv * hd)})
    if gemma:
        w = {k: v - 1 if k.endswith("layernorm.weight") or k == "model.norm.weight" else v
             for k, v in w.items()}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    if dtype == "BF16":  # what the file will hold
        w = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in w.items()}
    if mutate:
        mutate(w)
    cfg = {"architectures": [arch], "hidden_size": n_embd, "num_hidden_layers": n_layer,
           "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
           "intermediate_size": n_ff, "vocab_size": n_vocab, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied,
           "bos_token_id": 0, "eos_token_id": 266, "torch_dtype": "float32"}
    if head_dim:
        cfg["head_dim"] = head_dim
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    names = list(w)
    parts = [names[i::shards] for i in range(shards)]
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else
             "model.safetensors" for i in range(shards)]
    for part, fname in zip(parts, files):
        sub = {n: w[n] for n in part}
        if dtype == "BF16":
            _save_bf16(folder / fname, sub)
        else:
            save_file({n: a.astype(np.float16 if dtype == "F16" else np.float32)
                       for n, a in sub.items()}, str(folder / fname))
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for part, f in zip(parts, files) for n in part}}))
    if sentencepiece:
        (folder / "tokenizer.model").write_bytes(sp_model_bytes())
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
            "added_tokens_decoder": {
                "271": {"content": "<user>", "special": False},
                **{k: {"content": t, "special": sp} for k, (t, sp) in (sp_added or {}).items()}}}))
        return w
    md = tok_md or tokenizer_metadata()
    (folder / "tokenizer.json").write_text(json.dumps(_tokenizer_json(md, pretok)))
    toks = md["tokenizer.ggml.tokens"]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": toks[md["tokenizer.ggml.bos_token_id"]],
        "eos_token": toks[md["tokenizer.ggml.eos_token_id"]],
        "add_prefix_space": False, "chat_template": md.get("tokenizer.chat_template", CHATML)}))
    if dtype == "F16":
        w = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
    return w


# subprocesses import the blockq of this checkout, not an installed one
THIS_CHECKOUT = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def writing_into(pid: int, folder: Path, timeout: float = 60) -> bool:
    """Wait until process ``pid`` has a file open for writing in ``folder`` (unnamed or not)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                if os.readlink(fd).startswith(f"{folder}/"):
                    return True
            except OSError:
                pass
        time.sleep(0.02)
    return False


def _gguf(path):
    with blockq.read_gguf(path) as f:
        md = {k: f.metadata[k] for k in f.metadata}
        ts = {n: (t.qtype, t.shape, np.array(t.data)) for n, t in f.tensors.items()}
    return md, ts


def _f32(entry):
    qt, shape, raw = entry
    return raw.view("<f4").reshape(shape) if qt == "F32" else \
        np.asarray(dequantize(raw, qt, shape))


QUIET = {"warn": lambda s: None}


# --- the HF path ------------------------------------------------------------------------------
def test_hf_to_f32_reproduces_the_weights_with_llamas_qk_permutation(tmp_path):
    w = make_hf(tmp_path / "hf")
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F32", **QUIET)
    md, ts = _gguf(r.path)
    assert md["general.architecture"] == "llama" and md["general.file_type"] == 0
    assert md["llama.rope.dimension_count"] == 64 and md["llama.vocab_size"] == N_VOCAB_CFG
    for hf, a in w.items():
        g = gguf_name(hf, "llama")
        got = _f32(ts[g])
        if ".attn_q." in g:
            got = _unpermute(got, 4)
        elif ".attn_k." in g:
            got = _unpermute(got, 2)
        np.testing.assert_array_equal(got, a, err_msg=g)
    assert list(ts) == sorted(ts, key=blockq.presets.order_key)  # llama-quantize's order


@pytest.mark.parametrize("arch,tied,head_dim", [("LlamaForCausalLM", False, None),
                                               ("Qwen2ForCausalLM", True, None),
                                               ("Qwen3ForCausalLM", True, 96)])
def test_converted_model_runs_like_the_reference(tmp_path, arch, tied, head_dim):
    make_hf(tmp_path / "hf", arch=arch, tied=tied, head_dim=head_dim)
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F32", **QUIET)
    md, ts = _gguf(r.path)
    assert ("output.weight" in ts) == (not tied)
    if arch == "Qwen2ForCausalLM":
        assert md["general.architecture"] == "qwen2" and ts["blk.0.attn_q.bias"][0] == "F32"
    if arch == "Qwen3ForCausalLM":
        assert md["general.architecture"] == "qwen3" and md["qwen3.attention.key_length"] == 96
        assert ts["blk.1.attn_k_norm.weight"][1] == (96,) and "blk.0.attn_q.bias" not in ts
    from blockq.model import Model
    m = Model.load(r.path)
    toks = [5, 70, 200, 13, 99, 140, 7, 31]
    got = m.forward(toks, m.new_cache(16, "f32"), outputs="all")
    want = reference_logits(r.path, toks)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


GEMMA2_CFG = {"head_dim": 64, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
              "sliding_window": 5, "rms_norm_eps": 1e-6}
GEMMA3_CFG = {"head_dim": 128, "sliding_window": 5, "sliding_window_pattern": 6,
              "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("arch, kw, want_md", [
    ("Gemma2ForCausalLM", dict(tied=True, n_layer=3, config=GEMMA2_CFG),
     {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
      "gemma2.attention.sliding_window": 5, "gemma2.attention.key_length": 64}),
    ("Gemma3ForCausalLM", dict(tied=True, n_layer=7, n_head=2, n_head_kv=1, head_dim=128,
                               config=GEMMA3_CFG),
     {"gemma3.attention.sliding_window": 5, "gemma3.rope.freq_base_swa": 10000.0,
      "gemma3.rope.freq_base": 1e6, "gemma3.attention.key_length": 128}),
])
def test_gemma_conversion_adds_one_to_the_norms_and_runs_like_the_reference(tmp_path, arch, kw,
                                                                             want_md):
    w = make_hf(tmp_path / "hf", arch=arch, **kw)
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F32", **QUIET)
    md, ts = _gguf(r.path)
    a = md["general.architecture"]
    for k, v in want_md.items():
        assert md[k] == pytest.approx(v), k
    if a == "gemma2":
        assert f"{a}.rope.freq_base" not in md  # Gemma2Model writes none
    np.testing.assert_array_equal(_f32(ts["blk.0.post_ffw_norm.weight"]),
                                  w["model.layers.0.post_feedforward_layernorm.weight"] + 1)
    np.testing.assert_array_equal(_f32(ts["output_norm.weight"]), w["model.norm.weight"] + 1)
    from blockq.model import Model
    m = Model.load(r.path, numerics="float")
    toks = [5, 70, 200, 13, 99, 140, 7, 31]
    got = m.forward(toks, m.new_cache(16, "f32"), outputs="all")
    want = reference_logits(r.path, toks)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


PHI3_CFG = {"original_max_position_embeddings": 64, "max_position_embeddings": 256,
            "sliding_window": 2047,
            "rope_scaling": {"type": "longrope", "long_factor": list(np.geomspace(1, 9, 32)),
                             "short_factor": list(np.geomspace(1, 1.5, 32))}}


def test_phi3_conversion_fuses_like_llama_cpp_and_runs_as_its_split_model(tmp_path):
    """The fused attn_qkv / ffn_up of the converted file, split into q, k, v and gate, up,
    make a qwen2 file (the same NEOX block) with the same logits."""
    w = make_hf(tmp_path / "hf", arch="Phi3ForCausalLM", config=PHI3_CFG)
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F32", **QUIET)
    md, ts = _gguf(r.path)
    assert md["general.architecture"] == "phi3"
    assert (md["phi3.rope.scaling.original_context_length"], md["phi3.rope.dimension_count"],
            md["phi3.attention.sliding_window"]) == (64, 64, 2047)
    assert md["phi3.rope.scaling.attn_factor"] == pytest.approx(
        np.sqrt(1 + np.log(4) / np.log(64)), rel=1e-6)
    assert "phi3.rope.scaling.type" not in md  # Phi3MiniModel writes none
    np.testing.assert_array_equal(_f32(ts["rope_factors_long.weight"]),
                                  np.float32(PHI3_CFG["rope_scaling"]["long_factor"]))
    np.testing.assert_array_equal(_f32(ts["blk.1.attn_qkv.weight"]),
                                  w["model.layers.1.self_attn.qkv_proj.weight"])
    np.testing.assert_array_equal(_f32(ts["blk.0.ffn_up.weight"]),
                                  w["model.layers.0.mlp.gate_up_proj.weight"])
    split_md = {k.replace("phi3.", "qwen2."): v for k, v in md.items()}
    split_md["general.architecture"] = "qwen2"
    tensors = []
    for name, (qt, shape, raw) in ts.items():
        x = _f32((qt, shape, raw))
        if ".attn_qkv." in name:
            parts = np.split(x, [256, 256 + 128])
            tensors += [(name.replace("qkv", c), "F32", p.shape, p) for c, p in zip("qkv", parts)]
        elif ".ffn_up." in name:
            tensors += [(name.replace("up", c), "F32", p.shape, p)
                        for c, p in zip(("gate", "up"), np.split(x, 2))]
        else:
            tensors.append((name, "F32", shape, x))
    blockq.write_gguf(tmp_path / "split.gguf", split_md, tensors)
    from blockq.model import Model
    m, ref = Model.load(r.path, numerics="float"), Model.load(tmp_path / "split.gguf",
                                                             numerics="float")
    assert m.ropes_for(256) is m.ropes_long  # 256 > the original 64
    toks = [5, 70, 200, 13, 99, 140, 7, 31]
    for n_ctx in (16, 512):
        np.testing.assert_allclose(m.forward(toks, m.new_cache(n_ctx, "f32"), outputs="all"),
                                   ref.forward(toks, ref.new_cache(n_ctx, "f32"), outputs="all"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, space_prefix", [("LlamaForCausalLM", None),
                                                 ("Gemma3ForCausalLM", False)])
def test_sentencepiece_vocabulary_converts_as_llama_cpps_converter(tmp_path, arch, space_prefix):
    make_hf(tmp_path / "hf", arch=arch, sentencepiece=True, n_vocab=274,
            config={"bos_token_id": 1, "eos_token_id": 2,
                    **(GEMMA3_CFG if arch.startswith("Gemma") else {})},
            **(dict(n_head=2, n_head_kv=1, head_dim=128) if arch.startswith("Gemma") else {}))
    md, _ = _gguf(convert(tmp_path / "hf", tmp_path / "m.gguf", "Q8_0", **QUIET).path)
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("llama", "default")
    toks, types = md["tokenizer.ggml.tokens"], list(md["tokenizer.ggml.token_type"])
    assert toks[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert toks[3 + 0x41] == "<0x41>" and types[3 + 0x41] == 6
    assert toks[259 + 6] == "▁the" and md["tokenizer.ggml.scores"][259 + 6] == -6.0
    assert (toks[271], types[271]) == ("<user>", 4)  # added_tokens_decoder, not special
    assert toks[272:] == ["[PAD272]", "[PAD273]"] and types[272:] == [5, 5]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert md.get("tokenizer.ggml.add_space_prefix") is space_prefix
    assert "tokenizer.ggml.merges" not in md
    from blockq.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("the cat", add_special=False) == (
        [259 + 6, 259 + 11] if space_prefix is None else [259 + 1, 259 + 5, 259 + 11])


def test_sentencepiece_model_errors_are_one_line(tmp_path):
    make_hf(tmp_path / "hf", sentencepiece=True)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(sp_model_bytes()[:-40])
    with pytest.raises(FormatError, match="tokenizer.model.*(past the end|truncated)"):
        convert(tmp_path / "hf", tmp_path / "m.gguf", "Q8_0", **QUIET)


def named_config(name: str) -> dict:
    """config.json additions by name ("A+B" merges them), as the recorded cases give them."""
    return {k: v for part in name.split("+") for k, v in globals()[part].items()}


SP_IDS = {"bos_token_id": 1, "eos_token_id": 2}
CONVERTED = json.loads((Path(__file__).parent / "data" / "llama_cpp_tiny_archs.json")
                       .read_text())["converted"]


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_converted_folders_run_as_in_llama_cpp(tmp_path, name):
    """llama.cpp loaded these conversions (tools/record_tiny_archs.py): its last logits and
    greedy tokens, replayed on the byte-identical file blockq converts now."""
    from blockq.model import Model
    from tiny_model import greedy_ids
    case = CONVERTED[name]
    kw = dict(case["make_hf"])
    if isinstance(kw.get("config"), str):
        kw["config"] = named_config(kw["config"])
    make_hf(tmp_path / name, **kw)
    path = convert(tmp_path / name, tmp_path / f"{name}.gguf", "F32", **QUIET).path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"], \
        f"{name}: the conversion no longer comes out byte-identical to the recorded one"
    m = Model.load(path)
    for run in case["runs"]:
        want = np.array(run["last_logits"], dtype=np.float32)
        got = m.forward(run["prompt_ids"], m.new_cache(64), "last")[0]
        assert np.abs(got - want).max() / want.std() < 2e-2
        assert greedy_ids(m, run["prompt_ids"], len(run["greedy"])) == run["greedy"]
    from blockq.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(m.metadata)
    for text, ids in case.get("tokens", {}).items():
        assert tok.encode(text, add_special=False) == ids, text
    for text, ids in case.get("tokens_special", {}).items():
        assert tok.encode(text, add_special=False, parse_special=True) == ids, text


@pytest.mark.parametrize("rope, md_want", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
      "beta_fast": 16.0},
     {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
      "rope.scaling.original_context_length": 64, "rope.scaling.yarn_beta_fast": 16.0}),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, {}),
])
def test_rope_scaling_of_hf_configs(tmp_path, rope, md_want):
    make_hf(tmp_path / "hf", arch="Qwen3ForCausalLM" if rope["rope_type"] == "yarn"
            else "LlamaForCausalLM", config={"rope_scaling": rope})
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "Q8_0", **QUIET)
    md, ts = _gguf(r.path)
    a = md["general.architecture"]
    for k, v in md_want.items():
        assert md[f"{a}.{k}"] == v
    if rope["rope_type"] == "llama3":
        f = _f32(ts["rope_freqs.weight"])
        assert f.shape == (32,) and f[0] == 1.0 and f[-1] == 8.0
    from blockq.model import Model
    m = Model.load(r.path)
    assert np.isfinite(m.forward([1, 2, 3], m.new_cache(16))).all()


@pytest.mark.parametrize("arch, config, words", [
    ("Phi3ForCausalLM", {"original_max_position_embeddings": None},
     ["original_max_position_embeddings", "missing"]),
    ("Phi3ForCausalLM", {**PHI3_CFG, "rope_scaling": {"type": "longrope", "long_factor": [1.0],
                                                      "short_factor": [1.0]}},
     ["long_factor", "32 numbers"]),
    ("Gemma2ForCausalLM", {"head_dim": 64}, ["attn_logit_softcapping", "missing"]),
    ("Qwen3ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     ["original_max_position_embeddings", "missing"]),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "longrope"}}, ["'longrope'", "yarn"]),
])
def test_bad_config_of_the_new_classes(tmp_path, arch, config, words):
    make_hf(tmp_path / "hf", arch=arch, config=config)
    (tmp_path / "o").mkdir()
    with pytest.raises((FormatError, UnsupportedModel)) as e:
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q8_0", **QUIET)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
    _assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("dtype,shards", [("BF16", 1), ("F16", 3), ("F32", 2)])
def test_dtypes_and_shards_read_exactly(tmp_path, dtype, shards):
    w = make_hf(tmp_path / "hf", dtype=dtype, shards=shards)
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F32", **QUIET)
    _, ts = _gguf(r.path)
    np.testing.assert_array_equal(_f32(ts["token_embd.weight"]), w["model.embed_tokens.weight"])
    np.testing.assert_array_equal(_f32(ts["blk.1.ffn_down.weight"]),
                                  w["model.layers.1.mlp.down_proj.weight"])


def test_quantized_tensors_are_blockq_quantize_of_the_rows(tmp_path):
    w = make_hf(tmp_path / "hf", dtype="BF16")
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "Q4_K_M", **QUIET)
    md, ts = _gguf(r.path)
    assert md["general.file_type"] == 15
    assert r.types == blockq.presets.plan(
        [(gguf_name(n), a.shape, "F32") for n, a in w.items()], "Q4_K_M", n_layer=2, n_head=4,
        n_head_kv=2)
    qt, shape, raw = ts["blk.0.attn_k.weight"]
    rows = w["model.layers.0.self_attn.k_proj.weight"][qk_permutation(128, 2)]
    np.testing.assert_array_equal(raw.reshape(shape[0], -1), quantize(rows, qt))
    assert ts["output_norm.weight"][0] == "F32"


def test_imatrix_reaches_the_quantizer_and_the_metadata(tmp_path):
    w = make_hf(tmp_path / "hf")
    col = Collector(32)
    rng = np.random.default_rng(3)
    for i in range(2):
        for base in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            x = rng.standard_normal((32, 256)) * np.arange(1, 257) / 50
            col.add(f"blk.{i}.{base}.weight", x)
        col.add(f"blk.{i}.attn_output.weight", rng.standard_normal((32, 256)))
    im = col.result(["calib.txt"])
    write_imatrix(tmp_path / "im.gguf", im)
    said = []
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "Q4_K_M", imatrix=tmp_path / "im.gguf",
                warn=said.append)
    md, ts = _gguf(r.path)
    assert md["quantize.imatrix.file"] == str(tmp_path / "im.gguf")
    assert md["quantize.imatrix.dataset"] == "calib.txt"
    assert md["quantize.imatrix.entries_count"] == 12
    qt, shape, raw = ts["blk.1.ffn_up.weight"]
    x = w["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(raw.reshape(shape[0], -1),
                                  quantize(x, qt, imatrix=im.importance("blk.1.ffn_up.weight")))
    assert not np.array_equal(raw.reshape(shape[0], -1), quantize(x, qt))
    # ffn_down has no entry: quantized without one, and said so in one line
    assert any("no entry" in s and "ffn_down" in s for s in said)


def test_tokenizer_keys_match_gguf_special_vocab(tmp_path):
    gguf = pytest.importorskip("gguf")
    make_hf(tmp_path / "hf")
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F16", **QUIET)
    md, ts = _gguf(r.path)
    sv = gguf.SpecialVocab(tmp_path / "hf", load_merges=True)
    assert md["tokenizer.ggml.merges"] == sv.merges
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    for typ, tid in sv.special_token_ids.items():
        assert md[f"tokenizer.ggml.{names[typ]}_token_id"] == tid
    for typ, flag in sv.add_special_token.items():
        assert md[f"tokenizer.ggml.add_{typ}_token"] == flag
    assert md["tokenizer.chat_template"] == sv.chat_template
    tm = tokenizer_metadata()
    assert md["tokenizer.ggml.tokens"][:267] == list(tm["tokenizer.ggml.tokens"])
    assert md["tokenizer.ggml.tokens"][267:] == [f"[PAD{i}]" for i in range(267, 272)]
    assert list(md["tokenizer.ggml.token_type"][264:]) == [3, 3, 3, 5, 5, 5, 5, 5]
    assert ts["token_embd.weight"][0] == "F16" and md["general.file_type"] == 1


@pytest.mark.realfile
def test_smollm2_vocabulary_converts_like_llama_cpp(tmp_path, smollm2_file):
    """tokenizer.json rebuilt from the shipped file's vocab; converting it must give back the
    tokenizer keys llama.cpp's converter wrote (pre-tokenizer 'smollm' found by its hash)."""
    with blockq.read_gguf(smollm2_file) as f:
        ref = {k: f.metadata[k] for k in f.metadata if k.startswith("tokenizer.")}
    pretok = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    make_hf(tmp_path / "hf", tok_md=ref, n_vocab=49152, n_embd=64, n_head=4, n_head_kv=2,
            n_ff=128, n_layer=1, tied=True, pretok=pretok)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    tc.update(unk_token="<|endoftext|>", pad_token="<|im_end|>")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(tc))
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "F32", **QUIET)
    md, _ = _gguf(r.path)
    for key, want in ref.items():
        got = md[key]
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            assert got == want, key


# --- GGUF requantization ----------------------------------------------------------------------
def test_requantize_gguf_copies_metadata_and_quantizes_dequantized_rows(tmp_path):
    make_hf(tmp_path / "hf")
    f32 = convert(tmp_path / "hf", tmp_path / "f32.gguf", "F32", **QUIET).path
    q8 = convert(f32, tmp_path / "q8.gguf", "Q8_0", **QUIET).path
    q4 = convert(q8, tmp_path / "q4.gguf", "Q4_0", warn=lambda s: None).path
    md8, t8 = _gguf(q8)
    md4, t4 = _gguf(q4)
    assert md4["general.file_type"] == 2
    assert {k: v for k, v in md4.items() if k != "general.file_type"}.keys() == \
        {k: v for k, v in md8.items() if k != "general.file_type"}.keys()
    assert list(md4)[-2:] == ["general.quantization_version", "general.file_type"]
    qt, shape, raw = t4["blk.0.ffn_gate.weight"]
    np.testing.assert_array_equal(raw.reshape(shape[0], -1),
                                  quantize(_f32(t8["blk.0.ffn_gate.weight"]), qt))
    np.testing.assert_array_equal(t4["output_norm.weight"][2], t8["output_norm.weight"][2])


# --- errors: one clear line, nothing written --------------------------------------------------
def _assert_nothing_written(folder: Path):
    assert not (folder / "out.gguf").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]


def _drop(name):
    return lambda w: w.pop(name)


def _reshape(name):
    return lambda w: w.__setitem__(name, w[name][:-1])


def _poison(name):
    def f(w):
        w[name] = w[name].copy()
        w[name][3, 7] = np.nan
    return f


@pytest.mark.parametrize("mutate,err,text", [
    (_drop("model.layers.1.mlp.up_proj.weight"), FormatError, "mlp.up_proj"),
    (_reshape("model.layers.0.self_attn.v_proj.weight"), FormatError, "shape"),
    (_poison("model.layers.1.mlp.down_proj.weight"), BadArgument, "NaN"),
])
def test_bad_checkpoint(tmp_path, mutate, err, text):
    make_hf(tmp_path / "hf", mutate=mutate)
    (tmp_path / "o").mkdir()
    with pytest.raises(err, match=text):
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q4_K_M", **QUIET)
    _assert_nothing_written(tmp_path / "o")


def test_unknown_architecture(tmp_path):
    make_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "o").mkdir()
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q4_K_M", **QUIET)
    _assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("content", [b"not an imatrix at all", b"GGUF\x03\x00\x00\x00garbage"])
def test_bad_imatrix_file(tmp_path, content):
    make_hf(tmp_path / "hf")
    (tmp_path / "o").mkdir()
    (tmp_path / "bad.dat").write_bytes(content)
    with pytest.raises(FormatError):
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q4_K_M",
                imatrix=tmp_path / "bad.dat", **QUIET)
    _assert_nothing_written(tmp_path / "o")


def test_imatrix_of_the_wrong_width_is_skipped_with_a_warning(tmp_path):
    make_hf(tmp_path / "hf")
    col = Collector(16)
    col.add("blk.0.attn_q.weight", np.ones((16, 100), np.float32))
    said = []
    r = convert(tmp_path / "hf", tmp_path / "m.gguf", "Q4_K_M", imatrix=col.result(),
                warn=said.append)
    assert r.path.exists() and any("wrong length" in s and "blk.0.attn_q" in s for s in said)


def test_interrupted_convert_leaves_nothing(tmp_path):
    make_hf(tmp_path / "hf")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "out.gguf").write_bytes(b"old")

    def stop(ev):
        if ev.i_tensor == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q4_K_M", progress=stop, **QUIET)
    assert (tmp_path / "o" / "out.gguf").read_bytes() == b"old"  # untouched
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".part")]


@pytest.mark.slow
def test_killed_cli_convert_leaves_nothing(tmp_path):
    make_hf(tmp_path / "hf", n_layer=4, n_ff=2048)
    (tmp_path / "o").mkdir()
    code = ("import sys, time, blockq.convert as c\n"
            "c.SLAB_BYTES = 4096\n"  # many slabs: time to be killed mid-write
            "orig = c._producer\n"
            "def slow(*a, **k):\n"
            "    f = orig(*a, **k)\n"
            "    return lambda: (time.sleep(0.2), f())[1]\n"
            "c._producer = slow\n"
            "from blockq.cli import main\n"
            "main(sys.argv[1:])\n")
    p = subprocess.Popen([sys.executable, "-c", code, "convert", str(tmp_path / "hf"),
                          str(tmp_path / "o" / "out.gguf"), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                         env=THIS_CHECKOUT)
    assert writing_into(p.pid, tmp_path / "o")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and (b"interrupted" in err or b"aborted" in err)
    _assert_nothing_written(tmp_path / "o")


# --- the command line -------------------------------------------------------------------------
def test_cli_convert_prints_a_json_summary(tmp_path, capsys):
    from blockq.cli import main

    make_hf(tmp_path / "hf")
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--type", "q6_k",
          "--tensor-type", "ffn_down=Q8_0", "--json", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "Q6_K" and out["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert out["types"] == {"Q6_K": 14, "Q8_0": 2, "F32": 5}


def test_cli_error_is_one_line_and_nonzero(tmp_path, capsys):
    from blockq.cli import main

    make_hf(tmp_path / "hf", mutate=_drop("model.norm.weight"))
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: ")
    assert "output_norm.weight" in err[0] and not (tmp_path / "m.gguf").exists()


def test_cli_positional_type_and_fallback_explained(tmp_path, capsys):
    """``blockq convert IN OUT Q4_K_M`` as llama-quantize takes it; rows of 96 weights cannot
    hold 256-weight blocks, and the warning says which type was used instead, for how many."""
    from blockq.cli import main

    make_hf(tmp_path / "hf", n_embd=96, n_head=4, n_head_kv=2, n_ff=256)
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "q4_k_m", "--json",
          "--quiet"])
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["preset"] == "Q4_K_M"
    n_q5 = out["types"]["Q5_0"]
    assert n_q5 > 1
    assert f"96 columns are not a multiple of 256: Q5_0 instead of Q4_K for {n_q5} tensors" \
        in cap.err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "n.gguf"), "Q6_K", "--type",
              "Q8_0", "--quiet"])
    assert "two types given" in capsys.readouterr().err
