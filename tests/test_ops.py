"""The CPU set's elementwise kernels: ``cpu_exp.exp32`` / ``silu32`` against numpy, and the
prompt-row kernels of ``ops.CPUOps`` (rms_norm, rope + cache store) against ``ops.ArrayOps``."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from blockq.kernels.cpu_exp import X_HI, X_LO, exp32, silu32
from blockq.model import Model
from blockq.models.base import RMSNorm
from blockq.ops import _f16_round
from tiny_model import write_tiny


@njit(cache=True, fastmath=True, error_model="numpy")
def _map_exp(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


@njit(cache=True, fastmath=True, error_model="numpy")
def _map_silu(x, out):
    for i in range(x.size):
        out[i] = silu32(x[i])


def _ulps(got, x):
    ref = np.exp(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - ref) / np.spacing(ref.astype(np.float32))


def test_exp32_is_within_two_ulp_over_its_range():
    x = np.linspace(X_LO, X_HI, 3_000_001, dtype=np.float32)
    x = np.concatenate([x, np.float32(1e-3) * np.arange(-2000, 2000, dtype=np.float32)])
    out = np.empty_like(x)
    _map_exp(x, out)
    assert _ulps(out, x).max() < 2.0
    assert exp32(np.float32(0.0)) == np.float32(1.0)


def test_exp32_clamps_instead_of_overflowing():
    x = np.array([-np.inf, -1e30, -100, X_LO, 100, 1e30, np.inf], np.float32)
    out = np.empty_like(x)
    _map_exp(x, out)
    assert np.all(np.isfinite(out))
    assert np.all(out[:4] < 1.2e-38) and np.all(out[:4] > 0)  # no subnormals, no zeros
    assert np.all(out[4:] > 2e38)


def test_silu32_matches_the_formula():
    x = np.linspace(-90, 90, 200_001, dtype=np.float32)
    out = np.empty_like(x)
    _map_silu(x, out)
    ref = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(out, ref, rtol=3e-7, atol=1e-36)  # past -87: ~4e-37, not ~7e-38


def test_prompt_rms_norm_matches_the_reference():
    from blockq.ops import ArrayOps, CPUOps
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 96)) * 5).astype(np.float32)
    norm = RMSNorm(rng.standard_normal(96).astype(np.float32), 1e-6)
    got = CPUOps().rms_norm(x, norm)
    np.testing.assert_allclose(got, ArrayOps().rms_norm(x, norm), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got[2:3], CPUOps().rms_norm(x[2:3], norm), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # pairs (2i, 2i+1); NeoX pairs (i, i+h)
@pytest.mark.parametrize("cache_type", ["f16", "f32"])
def test_prompt_rope_store_matches_the_reference(tmp_path, arch, cache_type):
    """CPUOps' fused RoPE + store against ArrayOps' numpy rotation and KVCache.store."""
    from blockq.model import Step
    from blockq.ops import ArrayOps, CPUOps
    model = Model.load(write_tiny(tmp_path / "m.gguf", arch=arch), numerics="float")
    a = model.args
    rng = np.random.default_rng(4)
    n, p0 = 6, 3
    q = rng.standard_normal((n, a.n_head * a.head_dim)).astype(np.float32)
    k = rng.standard_normal((n, a.n_head_kv * a.head_dim)).astype(np.float32)
    v = rng.standard_normal((n, a.n_head_kv * a.head_dim)).astype(np.float32)
    outs = []
    for rope_store in (ArrayOps.rope_store, CPUOps.rope_store):  # the numpy steps, the fused
        cache = model.new_cache(16, cache_type)
        got = rope_store(CPUOps(), 0, q.copy(), k.copy(), v.copy(),
                         Step(model, p0, n, cache, None))
        outs.append([np.array(x) for x in got])
    for ref, got in zip(*outs):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert np.any(outs[1][1][:, p0:p0 + n] != 0) and not np.any(outs[1][1][:, :p0])


@njit(cache=True)
def _map_f16(x, out):
    for i in range(x.size):
        out[i] = _f16_round(x[i])


def test_f16_rounding_matches_numpy_on_every_exponent():
    """The KV cache's f16 rounding against numpy's float32 -> float16 -> float32, on random bit
    patterns over the whole float32 range (subnormal halves, ties, overflow to inf, nan)."""
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0x33000000, 0x47800000, 20_000).astype(np.uint32) & ~np.uint32(0x1FFF)) \
        | np.uint32(0x1000)  # exactly halfway between two halves
    x = np.concatenate([bits, ties]).view(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, 65504, 65520, -65520, np.inf, -np.inf])])
    out = np.empty_like(x)
    _map_f16(x, out)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    same = (out == want) | (np.isnan(out) & np.isnan(want))
    assert same.all(), x[~same][:5]
