"""blockq's runtime against llama.cpp (llama-cpp-python) on the same files, text and context.

    python tools/compare_llama_cpp.py [--text FILE] [-c 512] [--chunks N] [-t THREADS]
                                      [--record] [--json-out FILE]

For each file (SmolLM2-135M-Instruct Q4_1 as llama.cpp wrote it; the same weights through
``blockq convert`` with the Q4_K_M preset: Q5_0, Q8_0, Q4_K, Q6_K; a mix requantized by
blockq whose matrices cycle through Q2_K..Q6_K, the 576-column ones taking llama.cpp's fallbacks
Q4_0/Q5_0/Q5_1/Q8_0; and the Gemma-3-270M Q4_K_M file of the test extra):

- perplexity by llama-perplexity's protocol, both engines fed the same token ids (llama.cpp's
  tokenization; blockq's is checked against it) and scored by the same code
  (``blockq.generate.chunk_nll``), so only the logits differ.  Bar: PPL within 1%.
- greedy agreement: 5 prompts, 32 tokens each, argmax decoding.  Bar: >= 4 of 5 identical.
- the noise floor of that bar: llama.cpp against itself with its KV cache in f32 instead of f16.
- the KV-cache precision closest to llama.cpp: RMS logit difference on the first chunk with
  blockq's f16 and f32 caches (llama.cpp's default cache is f16).
- the same greedy bar and an RMS logit difference (one prompt plus its 32 greedy tokens) with
  ``Model.load(numerics="llama")``, which reproduces llama.cpp's CPU roundings (8-bit
  activations, f16 attention) and should be bit-identical.  ``--numerics default`` leaves it
  out (it is slow).  llama.cpp's greedy runs ask for the last token's logits only, as llama-cli
  does (with logits for every token its last layer multiplies more rows, and some kernels pick
  their path by the row count).

``--files ~/.cache/blockq/gemma-3-270m-Q4_K_M.gguf`` compares Gemma 3 alone (the
numerics='llama' part is skipped for it: it covers SwiGLU models); ``--record-gemma3`` saves
llama.cpp's outputs on that file for tests/test_model.py.  Every file also reports the share of
scored positions where both engines' most likely token agrees (bar for Gemma 3: >= 95%), beside
the same share for llama.cpp against itself with an f32 KV cache (its noise floor).

``--record`` saves llama.cpp's greedy ids for the Q4_1 file to tests/data/llama_cpp_greedy.json
(read by tests/test_model.py) and for the Q4_K_M file to llama_cpp_greedy_q4_k_m.json.  llama-cpp-python is needed here only, never by the tests.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from blockq import fetch  # noqa: E402
from blockq.generate import chunk_nll, generate, perplexity  # noqa: E402
from blockq.model import Model  # noqa: E402
from blockq.presets import fallback  # noqa: E402
from blockq.tokenizer import Tokenizer  # noqa: E402
from make_synthetic import requantize  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Water boils at a temperature of",
]
N_GREEDY = 32
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def q4km_path() -> Path:
    """SmolLM2 requantized by ``blockq convert`` with the Q4_K_M preset (Q5_0, Q8_0, Q4_K, Q6_K
    blocks; the same tensors llama-quantize writes)."""
    dst = fetch.cache_dir() / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    if not dst.exists():
        from blockq.convert import convert
        convert(fetch.smollm2_path(), dst, "Q4_K_M", warn=lambda msg: None)
    return dst


def kmix_path() -> Path:
    """SmolLM2 requantized: layer i's matrices get K_TYPES[(i + j) % 5] (fallbacks where the
    576-wide rows are not whole 256-blocks), so ffn_down holds every k-quant."""
    dst = fetch.cache_dir() / "SmolLM2-135M-Instruct.kmix.gguf"
    if dst.exists():
        return dst

    def types(name, shape):
        if len(shape) != 2 or not name.startswith("blk."):
            return None
        layer = int(name.split(".")[1])
        j = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
             "ffn_down"].index(name.split(".")[2])
        return fallback(K_TYPES[(layer + j) % len(K_TYPES)], shape[-1])

    return requantize(fetch.smollm2_path(), dst, types=types)


class LlamaCpp:
    """The few llama.cpp calls we need: tokenize, evaluate a batch, logits."""

    def __init__(self, path: Path, n_ctx: int, threads: int, **kw):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   logits_all=True, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, **kw)
        self.bos = self.llm.token_bos()
        # greedy runs as llama-cli does: logits of the last token only (the last layer's
        # feed-forward then multiplies one row, which decides some kernels' paths)
        self.llm_last = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                        logits_all=False, n_threads=threads,
                                        n_threads_batch=threads, verbose=False, **kw)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

    def logits(self, tokens) -> np.ndarray:
        """Logits (n, n_vocab) of ``tokens`` from an empty cache."""
        self.llm.reset()
        self.llm.eval([int(t) for t in tokens])
        return np.array(self.llm.scores[:len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        import llama_cpp

        llm = self.llm_last
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(n):
            last = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            tok = int(np.argmax(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))))
            out.append(tok)
            llm.eval([tok])
        return out


def llama_cpp_perplexity(lc: LlamaCpp, tokens: np.ndarray, n_ctx: int, n_chunks: int,
                         bos: int | None, top1: list | None = None) -> tuple[float, float, int]:
    """llama-perplexity's loop around llama.cpp's logits (same scoring code as blockq);
    ``top1`` gets the argmax token of every scored position."""
    first = n_ctx // 2
    n = min(n_chunks, len(tokens) // n_ctx) if n_chunks > 0 else len(tokens) // n_ctx
    nll = nll2 = 0.0
    count = 0
    for i in range(n):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None:
            chunk[0] = bos
        logits = lc.logits(chunk)[first:n_ctx - 1]
        if top1 is not None:
            top1.extend(int(t) for t in logits.argmax(axis=1))
        v = chunk_nll(logits, tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += len(v)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(var / (count - 1)), n


class TopOne:
    """``model`` for blockq.generate.perplexity, keeping the argmax of every logits row it
    returns (the scored positions, in order)."""

    def __init__(self, model: Model):
        self.model, self.top1 = model, []

    def new_cache(self, *a, **kw):
        return self.model.new_cache(*a, **kw)

    def forward(self, tokens, cache, outputs="last"):
        logits = self.model.forward(tokens, cache, outputs)
        self.top1.extend(int(t) for t in logits.argmax(axis=1))
        return logits


def greedy_runs(model: Model, lc: LlamaCpp, tok: Tokenizer) -> list[dict]:
    out = []
    for prompt in PROMPTS:
        p_ids = lc.tokenize(prompt)
        want = lc.greedy(p_ids, N_GREEDY)
        got = list(generate(model, p_ids, n_predict=N_GREEDY,
                            cache=model.new_cache(len(p_ids) + N_GREEDY)))
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        out.append({"prompt": prompt, "prompt_ids": p_ids, "llama_cpp": want,
                    "blockq": got, "identical": got == want, "agree_first": same,
                    "text_llama_cpp": tok.decode(want)})
    return out


def compare_llama_numerics(path: Path, lc: LlamaCpp, tok: Tokenizer) -> dict:
    """blockq with numerics="llama" against llama.cpp: greedy agreement and logit RMS diff."""
    from blockq.errors import UnsupportedModel
    try:
        model = Model.load(path, numerics="llama")
    except UnsupportedModel as e:
        return {"skipped": str(e)}
    t0 = time.perf_counter()
    greedy = greedy_runs(model, lc, tok)
    ids = greedy[1]["prompt_ids"] + greedy[1]["llama_cpp"]
    ref = lc.logits(ids)
    got = model.forward(ids, model.new_cache(len(ids)), "all")
    return {"greedy_identical": sum(g["identical"] for g in greedy),
            "agree_first": [g["agree_first"] for g in greedy],
            "logit_rms_diff": float(np.sqrt(((got - ref) ** 2).mean())),
            "logits_bit_identical": bool((got == ref).all()), "logit_positions": len(ids),
            "seconds": round(time.perf_counter() - t0, 1)}


def compare_file(path: Path, text: str, n_ctx: int, n_chunks: int, threads: int,
                 numerics: str = "both") -> dict:
    lc = LlamaCpp(path, n_ctx, threads)
    model = Model.load(path)
    tok = Tokenizer.from_metadata(model.metadata)
    ids_lc = lc.tokenize(text)
    ids_bq = tok.encode(text, add_special=True)
    tokens = np.array(ids_lc, dtype=np.int64)
    bos = lc.bos if tok.add_bos else None
    res: dict = {"file": path.name, "size_mib": round(path.stat().st_size / 2**20, 1),
                 "text_tokens": len(tokens), "tokenization_identical": ids_lc == ids_bq}

    t0 = time.perf_counter()
    top_lc: list = []
    p_lc, e_lc, n = llama_cpp_perplexity(lc, tokens, n_ctx, n_chunks, bos, top_lc)
    t_lc = time.perf_counter() - t0
    t0 = time.perf_counter()
    seen = TopOne(model)
    r = perplexity(seen, tokens, n_ctx=n_ctx, n_chunks=n_chunks, bos_id=bos)
    t_bq = time.perf_counter() - t0
    # NOTE: perplexity's batches without scored rows still return their last row; keep the
    # rows of the scored positions only, which come in the same order as llama.cpp's
    per_chunk = n_ctx - 1 - n_ctx // 2
    top_bq = _scored_rows(seen.top1, n, n_ctx, per_chunk)
    res.update(chunks=n, ppl_llama_cpp=round(p_lc, 4), stderr_llama_cpp=round(e_lc, 5),
               ppl_blockq=round(r.ppl, 4), stderr_blockq=round(r.stderr, 5),
               ppl_rel_diff=round(r.ppl / p_lc - 1, 5), seconds_llama_cpp=round(t_lc, 1),
               seconds_blockq=round(t_bq, 1),
               top1_agreement=round(float(np.mean(np.array(top_bq) == np.array(top_lc))), 5),
               top1_positions=len(top_lc))

    # which KV-cache precision gets blockq's logits closest to llama.cpp's
    chunk = tokens[:n_ctx].copy()
    if bos is not None:
        chunk[0] = bos
    ref = lc.logits(chunk)
    for ct in ("f16", "f32"):
        got = model.forward(chunk, model.new_cache(n_ctx, ct), "all")
        res[f"logit_rms_diff_{ct}"] = round(float(np.sqrt(((got - ref) ** 2).mean())), 5)
    res["logit_rms"] = round(float(ref.std()), 4)

    greedy = greedy_runs(model, lc, tok)
    res["greedy"] = greedy
    res["greedy_identical"] = sum(g["identical"] for g in greedy)

    # the noise floor: llama.cpp against itself with its KV cache in f32 instead of f16
    lc32 = LlamaCpp(path, n_ctx, threads, type_k=0, type_v=0)  # GGML_TYPE_F32
    top_32: list = []
    p_32, _, _ = llama_cpp_perplexity(lc32, tokens, n_ctx, n_chunks, bos, top_32)
    res.update(ppl_llama_cpp_f32kv=round(p_32, 4), top1_llama_cpp_f32kv=round(
        float(np.mean(np.array(top_32) == np.array(top_lc))), 5))
    floor = []
    for g in greedy:
        other = lc32.greedy(list(g["prompt_ids"]), N_GREEDY)
        floor.append(next((i for i, (a, b) in enumerate(zip(other, g["llama_cpp"]))
                           if a != b), N_GREEDY))
    res["llama_cpp_f32kv_agree_first"] = floor
    res["llama_cpp_f32kv_identical"] = sum(f == N_GREEDY for f in floor)
    if numerics == "both":
        res["numerics_llama"] = compare_llama_numerics(path, lc, tok)
    return res


def _scored_rows(rows: list, n_chunks: int, n_ctx: int, per_chunk: int) -> list:
    """The argmaxes of the scored positions out of everything perplexity's forwards returned
    (a batch without scored positions returns one unscored row)."""
    from blockq.generate import N_BATCH

    first = n_ctx // 2
    out_rows = np.arange(first, n_ctx - 1)
    keep, i = [], 0
    for _ in range(n_chunks):
        for j in range(0, n_ctx, N_BATCH):
            k = int(((out_rows >= j) & (out_rows < j + N_BATCH)).sum())
            if k:
                keep.extend(rows[i:i + k])
                i += k
            else:
                i += 1
    assert len(keep) == n_chunks * per_chunk
    return keep


def record_short_ppl(path: Path, text: str, threads: int, n_ctx: int = 128,
                     n_chunks: int = 4) -> None:
    """Save llama.cpp's perplexity of a short stretch of ``text`` (with its token ids) to
    tests/data/llama_cpp_ppl.json, for a fast real-file test."""
    lc = LlamaCpp(path, n_ctx, threads)
    ids = lc.tokenize(text)[:n_ctx * n_chunks]
    tok = Tokenizer.from_metadata(Model.load(path).metadata)
    bos = lc.bos if tok.add_bos else None
    ppl, err, n = llama_cpp_perplexity(lc, np.array(ids), n_ctx, n_chunks, bos)
    rec = {"file": path.name, "n_ctx": n_ctx, "chunks": n, "bos": bos, "ppl": ppl,
           "stderr": err, "tokens": ids,
           "note": "llama.cpp perplexity of these ids (tools/compare_llama_cpp.py --record)"}
    out = ROOT / "tests" / "data" / "llama_cpp_ppl.json"
    out.write_text(json.dumps(rec))
    print(f"recorded {out}: PPL {ppl:.4f} +/- {err:.4f} over {n} chunks of {n_ctx}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--files", nargs="*", type=Path, default=None,
                    help="default: SmolLM2 Q4_1, its Q4_K_M and its k-quant mix, Gemma-3-270M "
                         "Q4_K_M")
    ap.add_argument("--record", action="store_true",
                    help="save llama.cpp's greedy ids to tests/data/llama_cpp_greedy.json")
    ap.add_argument("--record-gemma3", action="store_true",
                    help="only save llama.cpp's outputs on Gemma-3-270M to tests/data")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--numerics", choices=("default", "both"), default="both",
                    help="both: also run Model.load(numerics='llama') (slow: ~0.3 s a token)")
    a = ap.parse_args(argv)
    from blockq.cli.run import set_threads
    set_threads(a.threads)
    text = a.text.read_text(encoding="utf-8")
    if a.record_gemma3:
        return record_gemma3(text, a.threads)
    files = a.files or [fetch.smollm2_path(), q4km_path(), kmix_path(), fetch.gemma3_path()]
    report = {"text": str(a.text), "n_ctx": a.ctx_size, "threads": a.threads, "files": []}
    for f in files:
        r = compare_file(f, text, a.ctx_size, a.chunks, a.threads, a.numerics)
        report["files"].append(r)
        ok_ppl = abs(r["ppl_rel_diff"]) <= 0.01
        ok_greedy = r["greedy_identical"] >= 4
        print(f"{r['file']} ({r['size_mib']} MiB), {r['chunks']} chunks of {a.ctx_size}, "
              f"tokenization identical: {r['tokenization_identical']}")
        print(f"  PPL llama.cpp {r['ppl_llama_cpp']:.4f} +/- {r['stderr_llama_cpp']:.5f} | "
              f"blockq {r['ppl_blockq']:.4f} +/- {r['stderr_blockq']:.5f} | "
              f"diff {100 * r['ppl_rel_diff']:+.3f}% [{'ok' if ok_ppl else 'FAIL'} <= 1%]")
        print(f"  top-1 token agreement with llama.cpp: {100 * r['top1_agreement']:.2f}% of "
              f"{r['top1_positions']} scored positions "
              f"[{'ok' if r['top1_agreement'] >= 0.95 else 'FAIL'} >= 95%]; llama.cpp itself "
              f"with an f32 KV cache: {100 * r['top1_llama_cpp_f32kv']:.2f}% (its PPL "
              f"{r['ppl_llama_cpp_f32kv']:.4f})")
        print(f"  greedy 32 tokens identical: {r['greedy_identical']}/5 "
              f"(first divergence: {[g['agree_first'] for g in r['greedy']]}) "
              f"[{'ok' if ok_greedy else 'FAIL'} >= 4]; llama.cpp itself with an f32 KV "
              f"cache: {r['llama_cpp_f32kv_identical']}/5 "
              f"(first divergence: {r['llama_cpp_f32kv_agree_first']})")
        print(f"  logit RMS diff vs llama.cpp (logit RMS {r['logit_rms']}): "
              f"f16 cache {r['logit_rms_diff_f16']}, f32 cache {r['logit_rms_diff_f32']}")
        print(f"  time: llama.cpp {r['seconds_llama_cpp']} s, blockq {r['seconds_blockq']} s "
              f"(perplexity, {a.threads} thread(s))")
        ln = r.get("numerics_llama")
        if ln and "skipped" in ln:
            print(f"  numerics='llama': skipped ({ln['skipped']})")
        elif ln:
            print(f"  numerics='llama': greedy identical {ln['greedy_identical']}/5 (first "
                  f"divergence: {ln['agree_first']}); logit RMS diff {ln['logit_rms_diff']:.3g} "
                  f"over {ln['logit_positions']} positions, bit-identical: "
                  f"{ln['logits_bit_identical']} ({ln['seconds']} s)")
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=1))
    if a.record:
        record_short_ppl(files[0], text, a.threads)
        first = report["files"][0]
        rec = {"file": first["file"], "note": "llama.cpp greedy ids (tools/compare_llama_cpp.py)",
               "prompts": [{k: g[k] for k in ("prompt", "prompt_ids", "llama_cpp")}
                           for g in first["greedy"]]}
        out = ROOT / "tests" / "data" / "llama_cpp_greedy.json"
        out.write_text(json.dumps(rec, indent=1))
        print(f"recorded {out}")
        record_q4km_greedy(a.threads)


def record_gemma3(text: str, threads: int, n_ctx: int = 128, n_chunks: int = 4,
                  n_greedy: int = 16) -> None:
    """llama.cpp on the Gemma-3-270M Q4_K_M file the test extra ships: perplexity and the top-1
    token of every scored position over a short stretch of ``text``, and greedy ids of the five
    prompts, into tests/data/llama_cpp_gemma3.json (read by tests/test_model.py)."""
    path = fetch.gemma3_path()
    lc = LlamaCpp(path, max(n_ctx, 64), threads)
    ids = lc.tokenize(text)[:n_ctx * n_chunks]
    top1: list = []
    ppl, err, n = llama_cpp_perplexity(lc, np.array(ids), n_ctx, n_chunks, lc.bos, top1)
    rec = {"file": path.name, "n_ctx": n_ctx, "chunks": n, "bos": lc.bos, "ppl": ppl,
           "stderr": err, "tokens": ids, "top1": top1,
           "note": "llama.cpp on gemma-3-270m-Q4_K_M (tools/compare_llama_cpp.py --record-gemma3)",
           "prompts": [{"prompt": p, "prompt_ids": lc.tokenize(p),
                        "llama_cpp": lc.greedy(lc.tokenize(p), n_greedy)} for p in PROMPTS]}
    out = ROOT / "tests" / "data" / "llama_cpp_gemma3.json"
    out.write_text(json.dumps(rec))
    print(f"recorded {out}: PPL {ppl:.4f} +/- {err:.4f} over {n} chunks of {n_ctx}")


def record_q4km_greedy(threads: int, n: int = 12) -> None:
    """llama.cpp's greedy ids on the Q4_K_M file ``blockq convert`` makes from SmolLM2 (with
    its sha256), for a real-file test of numerics="llama" on k-quants."""
    import hashlib

    path = q4km_path()
    lc = LlamaCpp(path, 256, threads)
    prompts = [p for p in PROMPTS if len(lc.tokenize(p)) >= 8][:2]  # >= 8: the tiled kernel
    rec = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
           "note": "llama.cpp greedy ids on `blockq convert SmolLM2.Q4_1 -> Q4_K_M` "
                   "(tools/compare_llama_cpp.py --record)",
           "prompts": [{"prompt": p, "prompt_ids": lc.tokenize(p),
                        "llama_cpp": lc.greedy(lc.tokenize(p), n)} for p in prompts]}
    out = ROOT / "tests" / "data" / "llama_cpp_greedy_q4_k_m.json"
    out.write_text(json.dumps(rec, indent=1))
    print(f"recorded {out}")


if __name__ == "__main__":
    main()
