"""Record llama-quantize's per-tensor type choices for every preset into tests/data/presets_*.json.

For each model below, run llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``, the
library behind ``llama-quantize``) once per preset and read back the type it gave each tensor.
``tests/test_presets.py`` then checks that ``blockq.presets.plan`` chooses the same types, with no
llama.cpp needed at test time.

Models:
- ``smollm2``: the shipped SmolLM2-135M-Instruct Q4_1 file (requantized: allow_requantize);
  n_embd 576 is not a multiple of 256, so every k-quant preset goes through the fallbacks.
- ``synth056``: the synthetic 0.56B llama (n_embd 2048, 16 heads, 4 KV heads, ff 5632, 8 layers,
  vocab 49152, untied output), all weights zero in F16 (the choice of types depends only on
  names and shapes).
- ``qwen2_05b``: Qwen2-0.5B's shapes (896, 14 heads, 2 KV heads, ff 4864, 24 layers, q/k/v
  biases, tied), vocab cut to 1024 rows (vocab size does not enter any rule).
- ``llama80``: a tiny 80-layer llama with grouped KV heads: llama.cpp treats it as a 70B.

Each preset is recorded without an imatrix; Q4_0, Q5_0, IQ4_NL, IQ4_XS and the i-quant presets
below them also with one (it changes their rules; llama-quantize refuses most of the i-quant
presets without one, which is recorded as ``"refused": true``), and Q4_K_M once more with
``--tensor-type`` overrides.

    python tools/record_presets.py            # all models
    python tools/record_presets.py smollm2    # one
"""
from __future__ import annotations

import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockq import fetch  # noqa: E402
from blockq.gguf.reader import read_gguf  # noqa: E402
from blockq.gguf.writer import write_gguf  # noqa: E402
from blockq.presets import PRESETS  # noqa: E402
from blockq.types import qtype  # noqa: E402

OVERRIDES = [("attn_q", "Q8_0"), (r"blk\.[0-3]\.ffn_down", "Q5_K")]


# --- llama.cpp's quantizer through ctypes (shared with bench_convert.py and kld_table.py) -------
_LOG_CB = None


def quiet_llama() -> None:
    """Silence llama.cpp's log output (keeps the callback alive for the process)."""
    import llama_cpp
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def llama_quantize(src, dst, preset: str, *, nthread: int = 0, imatrix: dict | None = None,
                   overrides=(), allow_requantize: bool = True, kv: dict | None = None) -> None:
    """Quantize GGUF ``src`` to ``dst`` with llama.cpp at ``preset`` (a name from PRESETS).

    ``imatrix``: tensor name -> importance vector (in_sum2 / counts), as llama-quantize passes it.
    ``overrides``: (regex, type name) pairs as llama-quantize's --tensor-type.
    ``kv``: metadata overrides (str or int values), as llama-quantize adds the quantize.imatrix.*
    keys when given --imatrix.
    """
    import llama_cpp
    quiet_llama()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = PRESETS[preset].ftype
    p.nthread = nthread
    p.allow_requantize = allow_requantize
    keep = []  # ctypes buffers must outlive the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vec) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vec, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = arr
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (rx, t) in enumerate(overrides):
            tt[i].pattern = rx.lower().encode()
            tt[i].type = qtype(t).id
        tt[len(overrides)].pattern = None
        tt[len(overrides)].type = 39  # GGML_TYPE_COUNT, unused past the terminator
        keep.append(tt)
        p.tt_overrides = tt
    if kv:
        ko = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for i, (key, val) in enumerate(kv.items()):
            ko[i].key = key.encode()
            if isinstance(val, str):
                ko[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                ko[i].value.val_str = val.encode()[:127]
            else:
                ko[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                ko[i].value.val_i64 = int(val)
        ko[len(kv)].key = b""
        keep.append(ko)
        p.kv_overrides = ko
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {preset}) failed with {rc}")


# --- synthetic models -------------------------------------------------------------------------
def write_zero_llama(path, *, arch="llama", n_embd, n_head, n_head_kv, n_ff, n_layer, n_vocab,
                     tied=False, qkv_bias=False, dtype="F16") -> None:
    """A llama-layout GGUF with every weight zero (norms one), for recording type choices."""
    hd = n_embd // n_head
    md = {
        "general.architecture": arch, "general.name": f"zero-{arch}-{n_layer}x{n_embd}",
        f"{arch}.block_count": n_layer, f"{arch}.context_length": 2048,
        f"{arch}.embedding_length": n_embd, f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": n_vocab, "general.file_type": 1 if dtype == "F16" else 0,
    }
    shapes = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    if not tied:
        shapes.append(("output.weight", (n_vocab, n_embd)))
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (n_embd,)), (b + "attn_q.weight", (n_embd, n_embd)),
                   (b + "attn_k.weight", (n_head_kv * hd, n_embd)),
                   (b + "attn_v.weight", (n_head_kv * hd, n_embd)),
                   (b + "attn_output.weight", (n_embd, n_embd)),
                   (b + "ffn_norm.weight", (n_embd,)), (b + "ffn_gate.weight", (n_ff, n_embd)),
                   (b + "ffn_up.weight", (n_ff, n_embd)), (b + "ffn_down.weight", (n_embd, n_ff))]
        if qkv_bias:
            shapes += [(b + "attn_q.bias", (n_embd,)), (b + "attn_k.bias", (n_head_kv * hd,)),
                       (b + "attn_v.bias", (n_head_kv * hd,))]

    def item(name, shape):
        t = dtype if len(shape) == 2 else "F32"
        if len(shape) == 1:
            return name, t, shape, (lambda: np.ones(shape, np.float32))
        nbytes = int(np.prod(shape)) * qtype(t).type_size
        return name, t, shape, (lambda: np.zeros(nbytes, np.uint8))

    write_gguf(path, md, [item(n, s) for n, s in shapes])


MODELS = {
    "synth056": dict(n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_layer=8, n_vocab=49152),
    "qwen2_05b": dict(arch="qwen2", n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_layer=24,
                      n_vocab=1024, tied=True, qkv_bias=True),
    "llama80": dict(n_embd=256, n_head=8, n_head_kv=2, n_ff=512, n_layer=80, n_vocab=256),
}


def model_facts(path) -> dict:
    with read_gguf(path) as f:
        md = f.metadata
        arch = md["general.architecture"]
        return {
            "arch": arch, "n_layer": int(md[f"{arch}.block_count"]),
            "n_head": int(md[f"{arch}.attention.head_count"]),
            "n_head_kv": int(md[f"{arch}.attention.head_count_kv"]),
            "tensors": [[t.name, list(t.shape), t.qtype] for t in f.tensors.values()],
        }


def types_of(path, names) -> list:
    """The type of each of ``names`` in the GGUF file at ``path``."""
    with read_gguf(path) as f:
        return [f.tensors[n].qtype for n in names]


def record(name: str, src: Path, tmp: Path) -> dict:
    facts = model_facts(src)
    ones = {t: np.ones(s[-1], np.float32) for t, s, _ in facts["tensors"] if len(s) == 2}
    with_im = ["Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS"] + [p for p in PRESETS if p.startswith("IQ")
                                                      and not p.startswith("IQ4")]
    runs = ([(p, False, ()) for p in PRESETS] + [(p, True, ()) for p in with_im]
            + [("Q4_K_M", False, tuple(OVERRIDES))])
    cases = []
    for preset, with_imatrix, overrides in runs:
        out = tmp / f"{name}-{preset}.gguf"
        t0 = time.perf_counter()
        case = {"preset": preset, "imatrix": with_imatrix,
                "overrides": [list(o) for o in overrides]}
        try:
            llama_quantize(src, out, preset, imatrix=ones if with_imatrix else None,
                           overrides=overrides)
        except RuntimeError:  # "this quantization requires an imatrix!"
            case.update(refused=True, types=None)
        else:
            case["types"] = types_of(out, [t[0] for t in facts["tensors"]])  # facts' order
            out.unlink()
        print(f"  {preset:7s} imatrix={with_imatrix!s:5s} overrides={len(overrides)}: "
              f"{time.perf_counter() - t0:5.1f} s{' refused' if case.get('refused') else ''}",
              file=sys.stderr)
        cases.append(case)
    return {"model": name, "source": src.name, **facts, "cases": cases}


def main(argv) -> None:
    names = argv or ["smollm2", *MODELS]
    with tempfile.TemporaryDirectory(dir=ROOT / "tests" / "data") as tmpd:
        tmp = Path(tmpd)
        for name in names:
            print(f"{name}:", file=sys.stderr)
            if name == "smollm2":
                src = fetch.smollm2_path()
            else:
                src = tmp / f"{name}.gguf"
                write_zero_llama(src, **MODELS[name])
            rec = record(name, src, tmp)
            if src.parent == tmp:
                src.unlink()
            dest = ROOT / "tests" / "data" / f"presets_{name}.json"
            dest.write_text(json.dumps(rec, separators=(",", ":")) + "\n")
            print(f"  -> {dest.relative_to(ROOT)} ({dest.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
