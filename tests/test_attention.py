"""The threaded prompt attention (ops.attend_prompt) against the reference ``ops.attention``.

Tolerance: float32 summation order only -- every output within 2e-6 of the reference times
the largest |v| (outputs are convex combinations of value rows).
"""
import numba
import numpy as np
import pytest

from blockq.ops import attend_prompt, attention


@pytest.mark.parametrize("n, p0, n_head, n_kv, hd, window, softcap, threads", [
    (2, 0, 4, 2, 16, 0, 0.0, 1),  # shorter than a block of queries
    (7, 0, 4, 2, 16, 0, 0.0, 2),  # not a multiple of the block
    (9, 5, 4, 1, 32, 4, 0.0, 2),  # sliding window, shorter than the context
    (13, 3, 8, 2, 16, 0, 30.0, 1),  # soft-capped scores (gemma2)
    (21, 40, 8, 8, 64, 16, 50.0, 2),  # window and cap together, no grouping
    (64, 0, 9, 3, 64, 0, 0.0, 2),  # SmolLM2's heads
    (6, 10, 4, 2, 256, 3, 0.0, 1),  # gemma3-sized heads, window < block span
    (11, 2, 4, 2, 80, 0, 0.0, 2),  # a head dimension past a multiple of 16: the scalar tail
    (37, 0, 2, 1, 24, 9, 0.0, 1),  # more keys than a 16-key tile, window across tiles
])
def test_attend_prompt_matches_reference(n, p0, n_head, n_kv, hd, window, softcap, threads):
    rng = np.random.default_rng(n * 1000 + p0)
    T, n_ctx = p0 + n, p0 + n + 7
    q = rng.standard_normal((n, n_head, hd)).astype(np.float32)
    kc = np.full((n_kv, n_ctx, hd), np.nan, np.float32)  # slots past T must never be read
    vc = np.full((n_kv, n_ctx, hd), np.nan, np.float32)
    kc[:, :T] = rng.standard_normal((n_kv, T, hd)) * 2
    vc[:, :T] = rng.standard_normal((n_kv, T, hd))
    scale = 1 / np.sqrt(hd)
    ref = attention(q.copy(), kc[:, :T], vc[:, :T], p0, scale, window, softcap=softcap)
    out = np.full((n, n_head * hd), np.nan, np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        attend_prompt(q, kc, vc, p0, np.float32(scale), window, np.float32(softcap), out)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(vc[:, :T]).max())


def test_attend_prompt_window_sees_only_its_keys():
    """With a window of 1 every query sees only its own key: the output is its value row."""
    rng = np.random.default_rng(5)
    n, hd = 10, 8
    q = rng.standard_normal((n, 2, hd)).astype(np.float32)
    kc = rng.standard_normal((1, n, hd)).astype(np.float32)
    vc = rng.standard_normal((1, n, hd)).astype(np.float32)
    out = np.empty((n, 2 * hd), np.float32)
    attend_prompt(q, kc, vc, 0, np.float32(0.3), 1, np.float32(0), out)
    assert np.allclose(out[:, :hd], vc[0], atol=1e-6) and np.allclose(out[:, hd:], vc[0], atol=1e-6)


def test_prompts_run_where_only_the_float_kernels_do(tmp_path):
    """A CPU without an int8 variant (arm64, or BLOCKQ_ISA=float) still runs prompts: the prompt
    attention's 16-lane vectors are generic LLVM and must not pull in the x86-only int8 modules
    (an import of cpu_int8_gemm there once made ``import blockq.ops`` fail)."""
    import json
    import os
    import subprocess
    import sys
    code = f"""
import sys, json, numpy as np
sys.path.insert(0, {os.path.dirname(__file__)!r})
from tiny_model import write_tiny
from blockq.kernels.cpu_isa import isa
from blockq.model import Model
m = Model.load(write_tiny({str(tmp_path / 'm.gguf')!r}, qtype="Q8_0"))
c = m.new_cache(32)
a = m.forward([5, 200, 17, 88, 260, 3, 141, 99], c, "all")
b = m.forward([12], c)
print(json.dumps({{"isa": isa(), "int8": "blockq.kernels.cpu_int8" in sys.modules,
                  "finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
                  "last": a[-1, :4].tolist()}}))
"""
    env = dict(os.environ, BLOCKQ_ISA="float", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["isa"] == "float" and not got["int8"] and got["finite"], got
