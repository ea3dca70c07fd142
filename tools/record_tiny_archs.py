"""llama.cpp's outputs on tiny random models of every architecture blockq runs, for
tests/test_archs_llama_cpp.py.

    python tools/record_tiny_archs.py [-t THREADS] [--cases NAME,...]

Each case is written by blockq's writer in llama.cpp's layout (tests/tiny_model.py's
``write_tiny``, fixed seed), loaded by llama.cpp (llama-cpp-python), and fed 5 prompts of random
token ids: the last position's logits and 32 greedy tokens (prompt in one batch, then one token
at a time, logits of the last token only) are saved to tests/data/llama_cpp_tiny_archs.json with
the file's sha256, so the test can check it rebuilt the same file before replaying.  The
``CONVERTED`` cases are tiny Hugging Face folders (tests/test_convert.py's ``make_hf``) that
blockq converts first: llama.cpp loading them checks the keys and tensor names convert writes.
``--cases`` re-records only those cases and keeps the others as recorded.
llama-cpp-python is needed here only, never by the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_model import N_VOCAB, write_tiny  # noqa: E402

# name -> write_tiny arguments; the same table is read back by the test
# (untied outputs where llama.cpp allows them: a random tied model just repeats its last token)
CASES = {
    "llama": dict(arch="llama", n_layer=2, tied=False),
    "qwen2": dict(arch="qwen2", n_layer=2, biases=True, tied=False),
    "qwen3": dict(arch="qwen3", n_layer=2, head_dim=96, tied=False),
    # every other layer local, with a window shorter than prompt + continuation (Gemma 2's
    # output is always the embedding table)
    "gemma2": dict(arch="gemma2", n_layer=2, sliding_window=8),
    # 7 layers: 6 local ones with a window shorter than prompt + continuation, 1 global
    "gemma3": dict(arch="gemma3", n_layer=7, n_head_kv=1, sliding_window=8, tied=False),
    # Phi-3 long-context rope: the 64-token context (256 once llama.cpp rounds it up) is beyond
    # the original 128, so the long factors apply; cos and sin times attn_factor.  (A name
    # with "phi3" in it makes llama.cpp's vocabulary look up Phi-3's own special tokens.)
    "phi3": dict(arch="phi3", n_layer=2, tied=False, rope_factors=True,
                 extra_md={"general.name": "tiny-p3", "phi3.rope.scaling.attn_factor": 1.19,
                           "phi3.rope.scaling.original_context_length": 128}),
    # ... and within the original context (256), the short factors
    "phi3-short": dict(arch="phi3", n_layer=2, tied=False, rope_factors=True, seed=1,
                       extra_md={"general.name": "tiny-p3",
                                 "phi3.rope.scaling.original_context_length": 256}),
    # llama 3.x: rope_freqs.weight frequency factors
    "llama-rope-freqs": dict(arch="llama", n_layer=2, tied=False, rope_freqs=True, seed=2),
    # YaRN: 4x context extension of an original 64-token context, attn_factor on top
    "llama-yarn": dict(arch="llama", n_layer=2, tied=False, seed=3,
                       extra_md={"llama.rope.scaling.type": "yarn",
                                 "llama.rope.scaling.factor": 4.0,
                                 "llama.rope.scaling.original_context_length": 64,
                                 "llama.rope.scaling.attn_factor": 0.9}),
    "qwen3-yarn": dict(arch="qwen3", n_layer=2, tied=False, seed=4,
                       extra_md={"qwen3.rope.scaling.type": "yarn",
                                 "qwen3.rope.scaling.factor": 2.0,
                                 "qwen3.rope.scaling.original_context_length": 32}),
    # Mistral-style sliding window on arch llama: llama.cpp's llama reads no window (every
    # layer sees all keys), and neither does blockq; the window is shorter than the prompts
    "llama-swa": dict(arch="llama", n_layer=2, tied=False, seed=5,
                      extra_md={"llama.attention.sliding_window": 4}),
}
# name -> tests/test_convert.py make_hf arguments: tiny Hugging Face folders converted by blockq
# (F32) and then loaded by llama.cpp.  The folder's name becomes general.name ("p3", not
# "phi3": see above)
CONVERTED = {
    "hf-p3": dict(arch="Phi3ForCausalLM", config="PHI3_CFG"),
    "hf-gemma2": dict(arch="Gemma2ForCausalLM", tied=True, n_layer=3, config="GEMMA2_CFG"),
    # (Gemma 2's output is always the embedding table: a random one repeats the last token)
    "hf-gemma3": dict(arch="Gemma3ForCausalLM", tied=False, n_layer=7, n_head=2, n_head_kv=1,
                      head_dim=128, config="GEMMA3_CFG"),
    "hf-qwen3": dict(arch="Qwen3ForCausalLM", head_dim=96),
    # SentencePiece vocabularies (tokenizer.model): llama's with a space prefix, Gemma's without
    "hf-llama-sp": dict(arch="LlamaForCausalLM", sentencepiece=True, n_vocab=274,
                        config={"bos_token_id": 1, "eos_token_id": 2}),
    "hf-gemma3-sp": dict(arch="Gemma3ForCausalLM", sentencepiece=True, n_vocab=274, n_layer=7,
                         n_head=2, n_head_kv=1, head_dim=128, tied=False,
                         config="GEMMA3_CFG+SP_IDS"),
    # a name with "phi3": llama.cpp's Phi-3 token attributes (special tokens and </s> eat the
    # spaces after them; <unk>, <s>, <|endoftext|> do not), which need those four tokens
    "hf-phi3-sp": dict(arch="Phi3ForCausalLM", sentencepiece=True, n_vocab=274,
                       config="PHI3_CFG+SP_IDS",
                       sp_added={"272": ["<|endoftext|>", True], "273": ["<|user|>", True]}),
}
# texts whose token ids (no BOS; without and with special parsing) are recorded for the
# converted cases
TEXTS = ["the cat", " the  cat", "hat ü 😀", "<user>the", "cathe\nat",
         "<|user|>\n the cat</s>  \nat<s> the<|endoftext|>\tcat<user>\n\nhe<unk> at"]
N_PROMPTS, PROMPT_LEN, N_GREEDY = 5, 6, 32


def convert_hf(d: Path, name: str, kw: dict) -> Path:
    """Write case ``name``'s HF folder under ``d`` and convert it to F32 GGUF."""
    import test_convert
    from blockq.convert import convert

    kw = dict(kw)
    if isinstance(kw.get("config"), str):  # config.json additions named in test_convert
        kw["config"] = test_convert.named_config(kw["config"])
    test_convert.make_hf(d / name, **kw)
    return convert(d / name, d / f"{name}.gguf", "F32", warn=lambda s: None).path


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(0, 256, PROMPT_LEN)] for _ in range(N_PROMPTS)]


def llama_cpp_tokens(path: Path) -> dict[str, dict[str, list[int]]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    return {f"tokens{'_special' if sp else ''}": {
        t: llm.tokenize(t.encode(), add_bos=False, special=sp) for t in TEXTS}
        for sp in (False, True)}


def llama_cpp_run(path: Path, prompt: list[int], threads: int) -> tuple[np.ndarray, list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=False, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def last() -> np.ndarray:
        p = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(llm.n_vocab(),)).copy()

    llm.eval(prompt)
    logits = last()
    out = []
    for _ in range(N_GREEDY):
        out.append(int(np.argmax(last())))
        llm.eval([out[-1]])
    return logits, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--cases", help="comma-separated case names to re-record (default: all, "
                    "converted ones included)")
    a = ap.parse_args(argv)
    out = ROOT / "tests" / "data" / "llama_cpp_tiny_archs.json"
    rec = {"note": "llama.cpp on blockq-written tiny models (tools/record_tiny_archs.py)",
           "n_vocab": N_VOCAB, "cases": {}}
    names = list(CASES) + list(CONVERTED)
    if a.cases:
        names = a.cases.split(",")
        unknown = [n for n in names if n not in CASES and n not in CONVERTED]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
        rec = json.loads(out.read_text())
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            kw = CASES.get(name) or CONVERTED[name]
            path = (write_tiny(Path(d) / f"{name}.gguf", **kw) if name in CASES
                    else convert_hf(Path(d), name, kw))
            runs = []
            for p in prompts():
                logits, greedy = llama_cpp_run(path, p, a.threads)
                runs.append({"prompt_ids": p, "last_logits": [float(x) for x in logits],
                             "greedy": greedy})
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            if name in CASES:
                rec["cases"][name] = {"write_tiny": kw, "runs": runs, "sha256": sha}
            else:
                rec.setdefault("converted", {})[name] = {"make_hf": kw, "runs": runs,
                                                         "sha256": sha,
                                                         **llama_cpp_tokens(path)}
            print(f"{name}: greedy {[r['greedy'][:8] for r in runs]}")
    rec["cases"] = {n: rec["cases"][n] for n in CASES if n in rec["cases"]}
    rec["converted"] = {n: rec["converted"][n] for n in CONVERTED if n in rec.get("converted", {})}
    out.write_text(json.dumps(rec))
    print(f"recorded {out}")


if __name__ == "__main__":
    main()
