"""Record llama.cpp's token ids for a multilingual sample: the oracle tests/test_tokenizer.py reads.

    python tools/record_llama_tokens.py            # writes tests/data/tokens_{smollm2,gemma3}.json

Needs llama-cpp-python (``import llama_cpp``) and the two model files (``blockq.fetch``).  Each
file's vocabulary is loaded with ``vocab_only=True``; for every text we record llama.cpp's ids
with and without special handling, its detokenized text, and for a spread of ids the piece
``llama_token_to_piece`` gives.  The SmolLM2 vocabulary is also re-recorded under other
``tokenizer.ggml.pre`` values (a vocab-only copy of the file with that one key changed), which
checks our word-splitting regexes for those pre-tokenizers against llama.cpp's.
"""
from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from blockq import fetch  # noqa: E402

TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it? I'd've thought we'll be "
    "fine!",
    "DON'T YOU'LL WE'RE I'M HE'S they'Re",
    "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "¿Dónde está la biblioteca? ¡Mañana será otro día, señor Muñoz!",
    "日本語のテキスト。한국어 텍스트. مرحبا بالعالم. नमस्ते दुनिया।",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
    "\tprint(fib(10))  # done\n",
    "a  b   c    d\t\te\n\n\nf \n \n g     \nh",
    "   leading and trailing   ",
    "\n\n\n\n\n",
    "    ",
    " ",
    "line1\r\nline2\r\n\r\n",
    "1234567890 12 345 6789 3.14159 1,000,000 2024-01-01 ½ ² ٣ Ⅻ",
    "😀🎉👍🏽 👨‍👩‍👧‍👦 ❤️ 🇺🇸",
    "e\u0301 café naïve Zoë Ångström",
    "!!! ??? ... --- *** ((())) [[]] {{}} <<>> @#$%^&*_+=|\\~`",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "See https://example.com/path?q=1&r=2 and **bold** _it_ `code`",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> <|endoftext|> <unk> <pad>",
    "spaces before special  <|im_end|>  after",
]

# pre-tokenizers to check on the SmolLM2 vocabulary besides its own "smollm"
OTHER_PRES = ["default", "gpt-2", "llama-bpe", "qwen2", "starcoder"]


def _ids(llm, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


def _detok(vocab, ids: list[int], special: bool) -> str:
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 64)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, special)
    assert n >= 0, n
    return buf.raw[:n].decode("utf-8", errors="replace")


def _piece(vocab, tid: int, special: bool) -> str:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, len(buf), 0, special)
    assert n >= 0, n
    return buf.raw[:n].hex()


def _piece_ids(n_vocab: int, used: set[int]) -> list[int]:
    rng = np.random.default_rng(0)
    ids = set(range(min(300, n_vocab))) | used | set(rng.integers(0, n_vocab, 700).tolist())
    return sorted(ids)


def record(path: Path, texts=TEXTS, pieces: bool = True) -> dict:
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    out = {
        "n_vocab": n_vocab,
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog": [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        "cases": [],
    }
    used: set[int] = set()
    for text in texts:
        case = {"text": text,
                "plain": _ids(llm, text, False, False),
                "special": _ids(llm, text, True, True)}
        case["detok_plain"] = _detok(vocab, case["plain"], False)
        case["detok_special"] = _detok(vocab, case["special"], True)
        used.update(case["plain"])
        used.update(case["special"])
        out["cases"].append(case)
    if pieces:
        ids = _piece_ids(n_vocab, used)
        out["pieces"] = {str(t): [_piece(vocab, t, False), _piece(vocab, t, True)] for t in ids}
    llm.close()
    return out


def with_pre(path: Path, pre: str, dest: Path) -> Path:
    """A vocab-only copy of ``path`` (metadata only, no tensors) with pre-tokenizer ``pre``."""
    import gguf

    src = gguf.GGUFReader(str(path))
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dest), arch)
    for key, f in src.fields.items():
        if key == "general.architecture" or key.startswith("GGUF."):
            continue
        value = pre if key == "tokenizer.ggml.pre" else f.contents()
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def main() -> None:
    data = ROOT / "tests" / "data"
    data.mkdir(parents=True, exist_ok=True)
    smol = record(fetch.smollm2_path())
    with tempfile.TemporaryDirectory() as tmp:
        smol["other_pre"] = {}
        for pre in OTHER_PRES:
            p = with_pre(fetch.smollm2_path(), pre, Path(tmp) / f"vocab-{pre}.gguf")
            rec = record(p, pieces=False)
            keys = ("text", "plain", "special", "detok_plain")
            smol["other_pre"][pre] = {"add_bos": rec["add_bos"],
                                      "cases": [{k: c[k] for k in keys} for c in rec["cases"]]}
    gem = record(fetch.gemma3_path())
    for name, rec in (("smollm2", smol), ("gemma3", gem)):
        dest = data / f"tokens_{name}.json"
        dest.write_text(json.dumps(rec, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        print(f"{dest}: {len(rec['cases'])} texts, {dest.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
