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
