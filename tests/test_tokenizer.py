"""Tokenizer: llama.cpp's ids on the real vocabularies, and small hand-checked synthetic cases.

The real-file oracle is tests/data/tokens_{smollm2,gemma3}.json, written by
tools/record_llama_tokens.py from llama.cpp itself (llama-cpp-python, vocab_only).
"""
import json
import time
from pathlib import Path

import pytest

from blockq import read_gguf
from blockq.errors import BadArgument, FormatError, UnsupportedModel
from blockq.tokenizer import Attr, Tokenizer, _bytes_to_unicode

DATA = Path(__file__).parent / "data"


def _record(name: str) -> dict:
    return json.loads((DATA / f"tokens_{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_file):
    md = read_gguf(smollm2_file).metadata
    return {k: md[k] for k in md if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def gemma3_meta(gemma3_file):
    md = read_gguf(gemma3_file).metadata
    return {k: md[k] for k in md if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def real(smollm2_meta, gemma3_meta):
    """name -> (Tokenizer, llama.cpp record)."""
    return {"smollm2": (Tokenizer.from_metadata(smollm2_meta), _record("smollm2")),
            "gemma3": (Tokenizer.from_metadata(gemma3_meta), _record("gemma3"))}


# -- real files vs llama.cpp -------------------------------------------------------------------

@pytest.mark.realfile
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_encode_matches_llama_cpp(real, name):
    tok, rec = real[name]
    assert len(rec["cases"]) >= 20
    for case in rec["cases"]:
        text = case["text"]
        assert tok.encode(text, add_special=False, parse_special=False) == case["plain"], text
        assert tok.encode(text, add_special=True, parse_special=True) == case["special"], text


@pytest.mark.realfile
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_decode_matches_llama_cpp_and_round_trips(real, name):
    tok, rec = real[name]
    for case in rec["cases"]:
        text = case["text"]
        assert tok.decode(case["plain"]) == case["detok_plain"] == text
        assert tok.decode(case["special"], special=True) == case["detok_special"]
        assert tok.decode(tok.encode(text, add_special=True)) == text


@pytest.mark.realfile
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_special_ids_and_pieces_match_llama_cpp(real, name):
    tok, rec = real[name]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.add_bos) == \
        (rec["n_vocab"], rec["bos"], rec["eos"], rec["add_bos"])
    assert sorted(tok.eog_ids) == rec["eog"]
    for tid, (plain, special) in rec["pieces"].items():
        assert tok.token_to_piece(int(tid)).hex() == plain, tid
        assert tok.token_to_piece(int(tid), special=True).hex() == special, tid


@pytest.mark.realfile
@pytest.mark.parametrize("pre", sorted(_record("smollm2")["other_pre"]))
def test_other_pre_tokenizers_match_llama_cpp(smollm2_meta, pre):
    """The SmolLM2 vocabulary under another tokenizer.ggml.pre: llama.cpp recorded it too."""
    rec = _record("smollm2")["other_pre"][pre]
    tok = Tokenizer.from_metadata({**smollm2_meta, "tokenizer.ggml.pre": pre})
    for case in rec["cases"]:
        text = case["text"]
        assert tok.encode(text, add_special=False) == case["plain"], (pre, text)
        special = tok.encode(text, add_special=True, parse_special=True)
        assert special == case["special"], (pre, text)
        assert tok.decode(case["plain"]) == case["detok_plain"], (pre, text)  # clean_spaces


@pytest.mark.realfile
def test_build_is_fast(gemma3_meta):
    t0 = time.process_time()
    tok = Tokenizer.from_metadata(gemma3_meta)
    took = time.process_time() - t0
    assert tok.n_vocab == 262144
    assert took < 3.0, f"building the 262k Gemma-3 vocabulary took {took:.2f} s of CPU"


@pytest.mark.realfile
def test_stream_decoder_holds_back_partial_characters(real):
    tok, _ = real["gemma3"]
    text = "Zoë: 你好 😀 ok"
    ids = tok.encode(text, add_special=False)
    # spell the emoji out through byte-fallback tokens, one byte per token
    emoji = [tok.token_to_id[f"<0x{b:02X}>"] for b in "😀".encode()]
    ids = ids + emoji
    dec = tok.stream()
    outs = [dec.push(t) for t in ids]
    assert "".join(outs) + dec.flush() == text + "😀"
    assert outs[-4:] == ["", "", "", "😀"]
    assert all("\ufffd" not in o for o in outs)


# -- synthetic vocabularies --------------------------------------------------------------------

BYTE_CHARS = [_bytes_to_unicode()[b] for b in range(256)]


def gpt2_meta(pre="gpt-2", extra=(), extra_types=(), merges=(), **kw):
    """Byte-level vocab: ids 0..255 are the 256 bytes, then ``extra`` tokens."""
    tokens = BYTE_CHARS + list(extra)
    types = [1] * 256 + list(extra_types or [1] * len(extra))
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": list(merges), **kw}


TEXT = "Hello  world's 12345\n\n  x!? DON'T"
SPLITS = [  # hand-checked against each pre-tokenizer's regexes in llama-vocab.cpp
    ("gpt-2", ["Hello", " ", " world", "'s", " 12345", "\n\n ", " x", "!?", " DON", "'", "T"]),
    ("smollm", ["Hello", " ", " world", "'s", " ", "1", "2", "3", "4", "5", "\n\n ", " x", "!?",
                " DON", "'", "T"]),
    ("llama-bpe", ["Hello", " ", " world", "'s", " ", "123", "45", "\n\n", " ", " x", "!?",
                   " DON", "'T"]),
    ("qwen2", ["Hello", " ", " world", "'s", " ", "1", "2", "3", "4", "5", "\n\n", " ", " x", "!?",
               " DON", "'T"]),
    ("default", ["Hello", " ", " world", "'", "s", " ", "123", "45", "\n\n ", " x", "!?", " DON",
                 "'", "T"]),
]


@pytest.mark.parametrize("pre,expected", SPLITS)
def test_pre_tokenizer_splits(pre, expected):
    tok = Tokenizer.from_metadata(gpt2_meta(pre))
    assert tok.pre_split(TEXT) == expected
    # no merges: every byte is its own token, ids == bytes
    assert tok.encode(TEXT, add_special=False) == list(TEXT.encode())
    assert tok.decode(list(TEXT.encode())) == TEXT


def test_bpe_merges_by_rank():
    # "a b" ranks before "b c": "abc" -> ab + c, even though bc is also a token
    merges = ["a b", "b c", "Ġ ab"]
    meta = gpt2_meta(extra=["ab", "bc", "Ġab"], merges=merges)
    tok = Tokenizer.from_metadata(meta)
    ab, bc, sab = 256, 257, 258
    assert tok.encode("abc") == [ab, ord("c")]
    assert tok.encode("bc") == [bc]
    assert tok.encode(" abc") == [sab, ord("c")]
    assert tok.decode([sab, ord("c")]) == " abc"


def test_llama3_defaults_add_bos_and_ignore_merges():
    # "abc" is a token but no merge builds it: llama3 vocabularies take whole-word tokens as is
    meta = gpt2_meta("llama-bpe", extra=["abc", "<|begin_of_text|>"], extra_types=[1, 3],
                     **{"tokenizer.ggml.bos_token_id": 257})
    tok = Tokenizer.from_metadata(meta)
    assert tok.add_bos
    assert tok.encode("abc") == [257, 256]
    assert Tokenizer.from_metadata(gpt2_meta("gpt-2", extra=["abc"])).encode("abc") == \
        [ord("a"), ord("b"), ord("c")]


def test_special_tokens_parse_like_llama_cpp():
    ctrl, user = 256, 257
    meta = gpt2_meta(extra=["<|im_start|>", "<u>"], extra_types=[3, 4])
    tok = Tokenizer.from_metadata(meta)
    text = "x<u>y<|im_start|>"
    # user-defined tokens are always cut out; control tokens only with parse_special
    assert tok.encode(text) == [ord("x"), user, ord("y"), *b"<|im_start|>"]
    assert tok.encode(text, parse_special=True) == [ord("x"), user, ord("y"), ctrl]
    ids = tok.encode(text, parse_special=True)
    assert tok.decode(ids) == "x<u>y"  # control tokens hidden unless special=True
    assert tok.decode(ids, special=True) == text


def test_special_tokens_longest_first_not_leftmost():
    # NOTE: llama.cpp cuts the longest special text first, wherever it is: "abcd" -> a + [bcd]
    meta = gpt2_meta(extra=["ab", "bcd"], extra_types=[4, 4])
    tok = Tokenizer.from_metadata(meta)
    assert tok.encode("abcd") == [ord("a"), 257]


def test_eog_detection_by_text():
    extra = ["<|im_end|>", "<|endoftext|>", "<|end|>", "<|return|>", "<|call|>", "<x>"]
    meta = gpt2_meta(extra=extra, extra_types=[1, 3, 3, 3, 3, 3],
                     **{"tokenizer.ggml.eos_token_id": 261})
    tok = Tokenizer.from_metadata(meta)
    # <|im_end|> typed NORMAL is still EOG (and becomes CONTROL); <|end|> is not EOG next to
    # <|return|> + <|call|>; the file's eos <x> always is.
    assert tok.eog_ids == {256, 257, 259, 260, 261}
    assert tok.attrs[256] & Attr.CONTROL
    assert tok.encode("<|im_end|>", parse_special=False) == list(b"<|im_end|>")
    assert tok.eot_id == 256


# SentencePiece: ids 0..2 specials, 3..258 the byte tokens, then these pieces
SPM_PIECES = {"\u2581": -5.0, "a": -1.0, "b": -1.0, "c": -1.0, "ab": -2.0, "bc": -3.0,
              "\u2581a": -2.5}


def spm_meta(pieces=SPM_PIECES, **kw):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + list(pieces.values())
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, **kw}


def spm_ids(*pieces):
    names = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    return [names.index(p) for p in pieces]


@pytest.mark.parametrize("text,ab,bc,expected", [
    ("abc", -2.0, -3.0, ("ab", "c")),   # best score first
    ("abc", -3.0, -2.0, ("a", "bc")),
    ("abc", -2.0, -2.0, ("ab", "c")),   # equal scores: leftmost pair
    ("é", -2.0, -3.0, ("<0xC3>", "<0xA9>")),  # no token: UTF-8 byte fallback
])
def test_spm_merge_order(text, ab, bc, expected):
    pieces = {**SPM_PIECES, "ab": ab, "bc": bc}
    tok = Tokenizer.from_metadata(spm_meta(pieces, **{"tokenizer.ggml.add_space_prefix": False,
                                                     "tokenizer.ggml.add_bos_token": False}))
    assert tok.encode(text) == spm_ids(*expected)
    assert tok.decode(tok.encode(text)) == text


def test_spm_space_prefix_and_bos():
    tok = Tokenizer.from_metadata(spm_meta())
    assert tok.add_bos and tok.add_space_prefix  # llama.cpp's SPM defaults
    ids = tok.encode("a b")  # "▁a▁b"
    assert ids == spm_ids("<s>", "\u2581a", "\u2581", "b")
    assert tok.decode(ids) == "a b"
    # after a special token the next text gets its own space prefix
    assert tok.encode("<s>a", parse_special=True) == spm_ids("<s>", "<s>", "\u2581a")
    dec = tok.stream()
    assert "".join(dec.push(t) for t in ids) + dec.flush() == "a b"


@pytest.mark.parametrize("meta,error", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, UnsupportedModel),
    ({"tokenizer.ggml.tokens": ["a"]}, FormatError),
    ({"tokenizer.ggml.model": "llama"}, FormatError),
    (gpt2_meta("no-such-pre"), UnsupportedModel),
    ({**gpt2_meta(), "tokenizer.ggml.token_type": [1]}, FormatError),
])
def test_bad_metadata(meta, error):
    with pytest.raises(error):
        Tokenizer.from_metadata(meta)


def test_bad_arguments():
    tok = Tokenizer.from_metadata(gpt2_meta())
    with pytest.raises(BadArgument, match="outside the vocabulary"):
        tok.decode([256])
    with pytest.raises(BadArgument, match="str"):
        tok.encode(b"bytes")
