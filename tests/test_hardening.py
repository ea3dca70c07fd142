"""Hostile and careless input: every case is one clear blockq error, never a traceback,
a crash, an exhausted machine, or a lost or half-written file.

Each test here is one of the cases found by probing blockq as an attacker would (issue 15).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from blockq.convert import convert
from blockq.errors import BlockqError, FormatError, UnsupportedModel
from blockq.model import Model, ModelArgs
from blockq.tokenizer import Tokenizer
from test_convert import QUIET, make_hf
from test_model import BASE_MD
from tiny_model import tokenizer_metadata, write_tiny


# --- model metadata -----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("llama.embedding_length", 0, ["embedding_length = 0", "[1, "]),
    ("llama.attention.head_count", 0, ["head_count = 0"]),
    ("llama.attention.head_count_kv", 0, ["head_count_kv = 0"]),
    ("llama.attention.head_count_kv", [], ["empty array"]),
    ("llama.context_length", -5, ["context_length = -5"]),
    ("llama.context_length", 1 << 40, ["context_length = 1,099,511,627,776"]),
    ("general.architecture", ["llama"], ["general.architecture", "must be a string"]),
    ("llama.block_count", "30", ["block_count = '30'", "a string"]),
    ("llama.block_count", 100_000, ["block_count = 100,000", "512"]),
    ("llama.embedding_length", math.nan, ["embedding_length = nan", "integer"]),
    ("llama.embedding_length", 577, ["not a multiple of head_count 9"]),
    ("llama.feed_forward_length", True, ["feed_forward_length = True", "a boolean"]),
    ("llama.attention.layer_norm_rms_epsilon", math.nan, ["layer_norm_rms_epsilon = nan"]),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, ["layer_norm_rms_epsilon = -1e-05"]),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", ["a string"]),
    ("llama.rope.freq_base", 0.0, ["freq_base = 0.0", "(1.0, inf)"]),
    ("llama.rope.freq_base", -10000.0, ["freq_base = -10000.0"]),
    ("llama.rope.freq_base", math.inf, ["freq_base = inf"]),
    ("llama.rope.scaling.factor", 1e-30, ["scaling factor 1e-30 is too small"]),
    ("llama.rope.scaling.factor", -2.0, ["scaling.factor = -2.0"]),
    ("llama.rope.scaling.type", 1, ["scaling.type = 1", "must be a string"]),
    ("llama.attention.key_length", 0, ["key_length = 0"]),
    ("llama.rope.dimension_count", -2, ["dimension_count = -2"]),
    ("llama.vocab_size", 0, ["vocabulary size = 0"]),
])
def test_bad_metadata_value_is_one_format_error(key, value, words):
    with pytest.raises(FormatError) as e:
        ModelArgs.from_metadata({**BASE_MD, key: value}, where="m.gguf")
    msg = str(e.value)
    assert msg.startswith("m.gguf: ") and "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_key_and_empty_vocabulary():
    md = {k: v for k, v in BASE_MD.items() if k != "llama.vocab_size"}
    with pytest.raises(FormatError, match="tokenizer.ggml.tokens is missing"):
        ModelArgs.from_metadata(md)
    with pytest.raises(FormatError, match="vocabulary size = 0"):
        ModelArgs.from_metadata({**md, "tokenizer.ggml.tokens": []})


def test_model_load_names_the_file_for_an_array_architecture(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", extra_md={"general.architecture": ["llama", "x"]})
    with pytest.raises(FormatError, match=r"m\.gguf: general\.architecture .* must be a string"):
        Model.load(path)


@pytest.mark.parametrize("key, value, words", [
    ("tokenizer.ggml.tokens", [], ["tokenizer.ggml.tokens has 0 entries"]),
    ("tokenizer.ggml.merges", np.arange(4, dtype=np.uint32), ["uint32", "array of strings"]),
    ("tokenizer.ggml.tokens", np.arange(4, dtype=np.int32), ["array of strings"]),
    ("tokenizer.ggml.token_type", ["a", "b"], ["not an array of integers"]),
    ("tokenizer.ggml.bos_token_id", "1", ["bos_token_id = '1'"]),
    ("tokenizer.ggml.model", ["gpt2"], ["tokenizer.ggml.model", "must be a string"]),
])
def test_bad_tokenizer_metadata_is_one_format_error(key, value, words):
    with pytest.raises(FormatError) as e:
        Tokenizer.from_metadata({**tokenizer_metadata(), key: value})
    for w in words:
        assert w in str(e.value)


# --- Hugging Face configs and safetensors headers ----------------------------------------------
def _hf_with(tmp_path, cfg_edit=None, config_text=None):
    make_hf(tmp_path / "hf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    path = tmp_path / "hf" / "config.json"
    if config_text is None:
        cfg = json.loads(path.read_text())
        cfg_edit(cfg)
        config_text = json.dumps(cfg)
    path.write_text(config_text)
    (tmp_path / "o").mkdir()
    return tmp_path / "hf", tmp_path / "o" / "out.gguf"


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("edit, error, words", [
    (_set("num_attention_heads", 0), FormatError, ["num_attention_heads = 0"]),
    (_set("num_hidden_layers", "1"), FormatError, ["num_hidden_layers = '1'", "a string"]),
    (_set("num_hidden_layers", [1]), FormatError, ["num_hidden_layers = [1]", "an array"]),
    (_set("num_hidden_layers", 10_000_000), FormatError, ["10,000,000", "512"]),
    (_set("hidden_size", 65), FormatError, ["not a multiple of num_attention_heads 2"]),
    (_set("num_key_value_heads", 0), FormatError, ["num_key_value_heads = 0"]),
    (_set("rms_norm_eps", -1.0), FormatError, ["rms_norm_eps = -1.0"]),
    (_set("rope_theta", 0), FormatError, ["rope_theta = 0.0"]),
    (_set("vocab_size", 1.5), FormatError, ["vocab_size = 1.5"]),
    (_set("architectures", [{}]), UnsupportedModel, ["architecture {}"]),
    (_set("architectures", "LlamaForCausalLM"), None, []),
    (_set("rope_scaling", "linear"), FormatError, ["rope_scaling = 'linear'", "object"]),
    (_set("rope_scaling", {"rope_type": "linear", "factor": 0}), FormatError, ["factor = 0.0"]),
    (_set("tie_word_embeddings", "yes"), FormatError, ["tie_word_embeddings = 'yes'"]),
])
def test_bad_hf_config_is_one_error_before_any_work(tmp_path, edit, error, words):
    src, out = _hf_with(tmp_path, edit)
    if error is None:  # a bare string names the class as well as a one-element list does
        convert(src, out, "Q8_0", **QUIET)
        assert out.exists()
        return
    with pytest.raises(error) as e:
        convert(src, out, "Q8_0", **QUIET)
    assert "config.json" in str(e.value)
    for w in words:
        assert w in str(e.value)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("text, words", [
    ("[]", ["top level is an array"]),
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, ["nested too deeply"]),
    ("\xff", ["not valid JSON"]),
])
def test_unusable_config_json(tmp_path, text, words):
    src, out = _hf_with(tmp_path, config_text=text)
    with pytest.raises(FormatError) as e:
        convert(src, out, "Q8_0", **QUIET)
    for w in words:
        assert w in str(e.value)


def _rewrite_header(path, header):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = raw[8 + n:]
    h = (header if isinstance(header, bytes) else json.dumps(header).encode())
    path.write_bytes(len(h).to_bytes(8, "little") + h + body)


def _first_entry(edit):
    def f(h):
        name = next(k for k in h if k != "__metadata__")
        edit(h[name])
        return h
    return f


@pytest.mark.parametrize("make_header, words", [
    (lambda h: [], ["header is []", "JSON object"]),
    (lambda h: b"[" * 50_000 + b"]" * 50_000, ["nested too deeply"]),
    (_first_entry(lambda e: e.__setitem__("shape", [-1, 64])), ["shape = -1"]),
    (_first_entry(lambda e: e.__setitem__("shape", ["64", 64])), ["shape = '64'"]),
    (_first_entry(lambda e: e.__setitem__("data_offsets", ["0", 4])), ["data_offsets = '0'"]),
    (_first_entry(lambda e: e.__setitem__("dtype", ["F32"])), ["is ['F32']"]),
    (lambda h: {**h, "x": 5}, ["lacks dtype/shape/data_offsets"]),
])
def test_bad_safetensors_header(tmp_path, make_header, words):
    src, out = _hf_with(tmp_path, lambda c: None)
    st = src / "model.safetensors"
    n = int.from_bytes(st.read_bytes()[:8], "little")
    header = json.loads(st.read_bytes()[8:8 + n])
    _rewrite_header(st, make_header(header))
    with pytest.raises(BlockqError) as e:
        convert(src, out, "Q8_0", **QUIET)
    for w in words:
        assert w in str(e.value)
    assert list(out.parent.iterdir()) == []
