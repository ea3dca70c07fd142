"""Int8-activation kernels (blockq.kernels.cpu_int8) against the numpy reference, and the ISA
dispatcher (blockq.kernels.cpu_isa).

The reference of a product is :func:`blockq.testing.int8_reference`: ``dequantize(W) @
dequantize(Q8(x))`` in float64, with Q8(x) from the numpy activation quantizers of
:mod:`blockq.kernels.cpu_q8` / ``cpu_q8_kquant`` (Q8_1 types with a min add ``m * s``, Q8_1's
f16 block sum, as llama.cpp does).  Stated tolerance: every
output within ``1e-5 * (|W| @ |x|)`` of it -- float32 summation order only, the integer parts
are exact.  The activation quantizers must equal the numpy ones byte for byte.
"""
import json
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

from blockq.dequantize import dequantize
from blockq.errors import BadArgument
from blockq.kernels import cpu_isa
from blockq.kernels.cpu_q8 import quantize_q8
from blockq.kernels.cpu_q8_kquant import quantize_q8_k
from blockq.quantize import quantize
from blockq.testing import filled_blocks, int8_reference, random_blocks
from blockq.types import BY_NAME

AVX2 = dict(avx2=True, fma=True, f16c=True, sse4_2=True)
AVX512 = dict(AVX2, avx512f=True, avx512bw=True, avx512vl=True)
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# the dispatcher, on mocked feature sets (runs everywhere)


@pytest.mark.parametrize("features, want", [
    ({}, "float"),  # arm64, or LLVM cannot tell
    (dict(sse4_2=True, avx=True), "float"),
    (dict(avx2=True, fma=True), "float"),  # no F16C
    (AVX2, "avx2"),  # Zen 3, Haswell
    (dict(AVX2, avxvnni=True), "avxvnni"),  # Alder Lake
    (dict(AVX512, avx512vnni=True), "avx512vnni"),  # Ice Lake server, Zen 4
    (dict(AVX512, avx512vnni=True, avxvnni=True), "avx512vnni"),  # Sapphire Rapids, Zen 5
    (dict(AVX512), "avx2"),  # Skylake-X: AVX-512 without VNNI
    (dict(AVX2, avx512vnni=True), "avx2"),  # VNNI flag without AVX-512 VL: no EVEX ymm form
    (dict(AVX2, avx512f=True, avx512vl=True, avx512vnni=True, avxvnni=True), "avxvnni"),
    (dict(avxvnni=True, avx512vnni=True, avx512f=True, avx512bw=True, avx512vl=True), "float"),
])
def test_dispatcher_picks_only_what_the_cpu_has(features, want):
    assert cpu_isa.choose(features) == want
    assert set(cpu_isa.supported(features)) <= {v for v, need in cpu_isa.REQUIRES.items()
                                                  if all(features.get(f) for f in need)}


def test_dispatcher_never_picks_a_missing_feature(rng):
    """Random subsets of the features the variants need: the pick (and anything forcing
    accepts) needs only features in the subset."""
    names = sorted({f for need in cpu_isa.REQUIRES.values() for f in need})
    for _ in range(500):
        features = {f: bool(rng.random() < 0.7) for f in names}
        got = cpu_isa.choose(features)
        assert all(features[f] for f in cpu_isa.REQUIRES[got]), (features, got)
        for v in cpu_isa.REQUIRES:
            if all(features[f] for f in cpu_isa.REQUIRES[v]):
                assert cpu_isa.choose(features, v) == v
            else:
                with pytest.raises(BadArgument, match=f"{cpu_isa.ENV}={v}: this CPU lacks"):
                    cpu_isa.choose(features, v)


def test_dispatcher_forcing():
    assert cpu_isa.choose(AVX2, "float") == "float"
    assert cpu_isa.choose(AVX2, " AVX2 ") == "avx2"
    with pytest.raises(BadArgument, match="BLOCKQ_ISA=avx2: this CPU lacks avx2, fma, f16c"):
        cpu_isa.choose({}, "avx2")
    with pytest.raises(BadArgument, match="BLOCKQ_ISA=avxvnni: this CPU lacks avxvnni; it can "
                                          "run avx2, float"):
        cpu_isa.choose(AVX2, "avxvnni")
    with pytest.raises(BadArgument, match="'avx9' is unknown; use one of avx512vnni, avxvnni, "
                                          "avx2, float"):
        cpu_isa.choose(AVX2, "avx9")


def test_dispatcher_follows_numba_cpu_features():
    """Numba compiles for ``NUMBA_CPU_FEATURES`` where it is set: a feature it turns off must
    turn the variant off (its intrinsic would abort LLVM), one it adds counts."""
    host = dict(AVX512, avx512vnni=True, avxvnni=True)
    off = cpu_isa.with_numba_overrides(host, "+avx2,-avx512vnni,-avxvnni")
    assert cpu_isa.choose(off) == "avx2"
    assert cpu_isa.choose(cpu_isa.with_numba_overrides(AVX2, "+avxvnni")) == "avxvnni"
    # another CPU name: only what the string lists is known
    assert cpu_isa.choose(cpu_isa.with_numba_overrides(host, "+avx2", "haswell")) == "float"
    assert cpu_isa.with_numba_overrides(host, None) == host


@pytest.mark.parametrize("host", [dict(AVX512, avx512vnni=True, avxvnni=True, avx512vbmi=True,
                                       avx512bf16=True, amx_int8=False, sse4_2=True),
                                  dict(AVX2, avxvnni=True)])
def test_numba_features_emulate_each_variant(host):
    """``numba_features_for(v)`` makes v the best variant (the benchmark's honest figure of a
    CPU that has only v), keeping the features v needs."""
    for v in cpu_isa.supported(host):
        feats = cpu_isa.with_numba_overrides(host, cpu_isa.numba_features_for(v, host))
        assert cpu_isa.choose(feats) == (v if v != "float" else cpu_isa.choose(host))
        if v == "avx2":
            assert not any(on for k, on in feats.items() if k.startswith(("avx512", "avxvnni")))


def _run_forced(isa: str, code: str) -> str:
    env = dict(os.environ, BLOCKQ_ISA=isa)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_forced_float_never_loads_int8_kernels():
    out = _run_forced("float", (
        "import sys, numpy as np\n"
        "from blockq.kernels.cpu_matvec import QMatrix\n"
        "m = QMatrix('Q8_0', np.zeros((4, 34), np.uint8), (4, 32))\n"
        "print(m.int8, m.matvec(np.ones(32, np.float32)).tolist(),\n"
        "      'blockq.kernels.cpu_int8' in sys.modules)\n"))
    assert out.split() == ["False", "[0.0,", "0.0,", "0.0,", "0.0]", "False"]


# ---------------------------------------------------------------------------------------------
# the kernels (on CPUs with an int8 variant).  This process runs the variant cpu_isa picks (or
# BLOCKQ_ISA forces); test_each_variant_in_its_own_process runs the kernel tests below again
# once per other variant this CPU has, each in a fresh process that Numba compiles as for a CPU
# whose best variant that is (NUMBA_CPU_FEATURES from cpu_isa.numba_features_for).

needs_int8 = pytest.mark.skipif(cpu_isa.isa() == "float",
                                reason="this CPU runs the float kernels only (no AVX2+FMA+F16C)")
INT8_VARIANTS = [v for v in cpu_isa.REQUIRES if v != "float"]
CHILD = "BLOCKQ_TEST_VARIANT_CHILD"  # set in those processes: they do not recurse
KERNEL_TESTS = "variant_is or activation_blocks or product_random or extreme_codes or qmatrix"


def _lacks(variant):
    return variant not in cpu_isa.supported(cpu_isa.host_features())


@needs_int8
def test_variant_is_the_one_chosen():
    from blockq.kernels import cpu_int8

    assert cpu_int8.VARIANT == cpu_isa.isa()
    forced = os.environ.get(cpu_isa.ENV)
    if forced:
        assert cpu_isa.isa() == forced.strip().lower()


@pytest.mark.slow
@pytest.mark.parametrize("variant", INT8_VARIANTS)
def test_each_variant_in_its_own_process(variant, tmp_path):
    if os.environ.get(CHILD):
        pytest.skip("inside one variant's process already")
    if _lacks(variant):
        pytest.skip(f"this CPU lacks {variant} (a hardware absence; the variants it has are "
                    f"{', '.join(cpu_isa.supported(cpu_isa.host_features()))})")
    if variant == cpu_isa.isa():
        pytest.skip(f"{variant} is this process's variant: the kernel tests here run it")
    env = dict(os.environ, **{cpu_isa.ENV: variant, CHILD: "1",
                              "NUMBA_CPU_FEATURES": cpu_isa.numba_features_for(variant)})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "no:randomly", __file__, "-k", KERNEL_TESTS], env=env,
                       capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", r.stdout).group(1))
    assert passed >= 70 and "skipped" not in r.stdout.splitlines()[-1], tail


CACHE_PROBE = """
import ctypes, json, subprocess, tempfile
import numpy as np
from blockq.kernels import cpu_int8 as k
from blockq.testing import int8_reference, random_blocks
from blockq.types import BY_NAME
rng = np.random.default_rng(1)
res = {"variant": k.VARIANT}
for name in ("Q8_0", "Q4_0", "Q4_K"):
    w = random_blocks(name, 8 * 512 // BY_NAME[name].block_size, rng, scales=0.05).reshape(8, -1)
    w.flags.writeable = False
    X = rng.standard_normal((1, 512)).astype(np.float32)
    out = np.empty((1, 8), np.float32)
    k.product(name, w, X, out)
    ref, bound = int8_reference(name, w, X)
    addr = k._addresses(name)[1]  # the kernel's machine code, as loaded or compiled
    spans = (l.split()[0].split("-") for l in open("/proc/self/maps"))
    end = next(int(hi, 16) for lo, hi in spans if int(lo, 16) <= addr < int(hi, 16))
    with tempfile.NamedTemporaryFile() as f:
        f.write(ctypes.string_at(addr, min(4096, end - addr)))
        f.flush()
        dis = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f.name],
                             capture_output=True, text=True, check=True).stdout
    res[name] = [bool(np.all(np.abs(out - ref) <= 1e-5 * bound)), dis.count("vpdpbusd")]
print(json.dumps(res))
"""


@pytest.mark.slow
def test_numba_cache_keeps_variants_apart(tmp_path):
    """avx2, a VNNI variant, avx2, the VNNI variant again, in four processes sharing one empty
    Numba cache (same CPU, same source: only the variant differs): each compiles only the first
    time its variant runs, later loads its own code (vpdpbusd in the legacy kernels iff VNNI)
    and every result equals the reference."""
    import shutil

    vnni = next((v for v in cpu_isa.VNNI if not _lacks(v)), None)
    if _lacks("avx2") or vnni is None:
        pytest.skip("needs a CPU with AVX2 and a VNNI variant (a hardware absence)")
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils) to read the kernels' instructions")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    env.pop("NUMBA_CPU_FEATURES", None)
    for i, variant in enumerate(["avx2", vnni, "avx2", vnni]):
        env[cpu_isa.ENV] = variant
        r = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["variant"] == variant
        assert ("compiling kernels" in r.stderr) == (i < 2), (i, variant, r.stderr[-500:])
        for name in ("Q8_0", "Q4_0", "Q4_K"):
            assert got[name][0], (variant, name)
        for name in ("Q8_0", "Q4_0"):
            assert (got[name][1] > 0) == (variant in cpu_isa.VNNI), (variant, name, got)


def _k8():
    from blockq.kernels import cpu_int8
    return cpu_int8


TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def check_product(name, w, X, threads=1):
    w = w.view()  # (rows, row_bytes)
    w.flags.writeable = False
    out = np.full((X.shape[0], w.shape[0]), np.nan, np.float32)
    old, old_min = numba.get_num_threads(), _k8().PARALLEL_MIN_BYTES
    numba.set_num_threads(threads)
    if threads > 1:  # the threaded driver even for these small matrices
        _k8().PARALLEL_MIN_BYTES = 0
    try:
        _k8().product(name, w, np.ascontiguousarray(X, np.float32), out)
    finally:
        numba.set_num_threads(old)
        _k8().PARALLEL_MIN_BYTES = old_min
    ref, bound = int8_reference(name, w, X)
    err = np.abs(out - ref)
    worst = np.unravel_index(np.argmax(err - RTOL * bound), err.shape)
    assert np.all(err <= RTOL * bound + 1e-30), \
        f"{name}: output {worst} is {out[worst]}, reference {ref[worst]}"


@needs_int8
@pytest.mark.parametrize("name", TYPES)
def test_activation_blocks_equal_numpy_quantizers(name, rng):
    X = (rng.standard_normal((3, 512)) * rng.uniform(0.01, 100, (3, 1))).astype(np.float32)
    X[1, :256] = 0  # an all-zero block
    X[2, 7] = X[2, 9] = -np.abs(X[2]).max() * 2  # ties of the largest magnitude
    Y = _k8().quantize_activations(name, X)
    if _k8().activation_type(name) == "Q8_K":
        q, d, bsums = quantize_q8_k(X)
        blk = Y.reshape(-1).view(BY_NAME["Q8_K"].dtype).reshape(3, 2)
        assert np.array_equal(blk["qs"], q) and np.array_equal(blk["d"], d)
        assert np.array_equal(blk["bsums"], bsums)
    else:
        q, d, s = quantize_q8(X)
        b = Y.reshape(3, 16, 36)
        assert np.array_equal(b[..., 4:].view(np.int8), q.astype(np.int8))
        assert np.array_equal(b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32), d)
        if _k8().activation_type(name) == "Q8_1":  # ggml's f16 d * sum(q)
            assert np.array_equal(b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32),
                                  s)
        else:  # Q8_0 (which has no sum) with the exact int16 sum of its codes
            assert np.array_equal(b[..., 2:4].copy().view(np.int16)[..., 0],
                                  q.astype(np.int64).sum(-1))


@needs_int8
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows, cols, n, threads", [
    (1, 256, 1, 1), (37, 512, 1, 1), (37, 512, 3, 1), (70, 768, 17, 2), (300, 256, 1, 2)])
def test_product_random_blocks(name, rows, cols, n, threads, rng):
    t = BY_NAME[name]
    w = random_blocks(name, rows * cols // t.block_size, rng, scales=0.05).reshape(rows, -1)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    check_product(name, w, X, threads)


@needs_int8
@pytest.mark.parametrize("name", TYPES)
def test_product_extreme_codes(name, rng):
    """All-ones bytes (largest codes: Q8_0 -1, Q6_K 63, ...) and all-zero bytes, against
    activations at +-127: no int16 saturation anywhere."""
    t = BY_NAME[name]
    for fill in (0xFF, 0x00, 0x80, 0x7F):
        w = filled_blocks(t, 4, fill)
        X = np.where(rng.random((2, 512)) < 0.5, -1.0, 1.0).astype(np.float32)
        check_product(name, w, X)


def _embeddings(path, ids, cols):
    """Token embedding rows of a real file, tiled to ``cols`` values (real activation scales)."""
    from blockq.gguf.reader import read_gguf

    with read_gguf(path) as f:
        t = f.tensors["token_embd.weight"]
        E = dequantize(np.array(t.data).reshape(t.shape[0], -1)[ids].reshape(-1), t.qtype,
                       (len(ids), t.shape[1]))
    return np.ascontiguousarray(np.tile(E, (1, cols // E.shape[1] + 1))[:, :cols])


@needs_int8
@pytest.mark.realfile
@pytest.mark.parametrize("name", TYPES)
def test_product_real_rows(name, smollm2_file, gemma3_file):
    """64 rows of every real tensor of this type in both files (SmolLM2: Q4_1, Q8_0; Gemma-3:
    Q4_K, Q6_K, Q5_0, Q8_0), and real weights (SmolLM2 blk.2.ffn_down, dequantized) quantized
    to the type; activations are real token embeddings."""
    from blockq.gguf.reader import read_gguf

    for path in (smollm2_file, gemma3_file):
        with read_gguf(path) as f:
            for t in f.tensors.values():
                if t.qtype == name and len(t.shape) == 2:
                    w = np.array(t.data).reshape(t.shape[0], -1)[:64]
                    check_product(name, w, _embeddings(path, [17, 4242], t.shape[1]), threads=2)
    with read_gguf(smollm2_file) as f:
        t = f.tensors["blk.2.ffn_down.weight"]
        W = dequantize(np.array(t.data).reshape(-1), t.qtype, tuple(t.shape))[:48, :1536]
    X = _embeddings(smollm2_file, [5, 99, 30000], 1536)
    check_product(name, quantize(np.ascontiguousarray(W), name), X, threads=2)


# ---------------------------------------------------------------------------------------------
# QMatrix and a whole model on both paths


@needs_int8
@pytest.mark.parametrize("name", ["Q4_0", "Q6_K"])
def test_qmatrix_uses_int8_and_can_switch(name, rng):
    from blockq.kernels.cpu_matvec import QMatrix

    t = BY_NAME[name]
    w = random_blocks(name, 8 * 512 // t.block_size, rng, scales=0.05)
    m = QMatrix(name, w, (8, 512))
    assert m.int8
    X = rng.standard_normal((5, 512)).astype(np.float32)
    ref, bound = int8_reference(name, m.data, X)
    assert np.all(np.abs(m.matmul(X) - ref) <= RTOL * bound)
    assert np.all(np.abs(m.matvec(X[2]) - ref[2]) <= RTOL * bound[2])
    m.set_int8(False)
    W = dequantize(w.reshape(-1), name, (8, 512)).astype(np.float64)
    assert np.allclose(m.matvec(X[2]), W @ X[2], rtol=0, atol=1e-5 * np.abs(W).sum())


@needs_int8
def test_tiny_model_int8_logits_near_float(tmp_path):
    """The same tiny Q4_K/Q6_K model on both numerics: logits differ only by the 8-bit
    rounding of activations (measured: 6.4 % of the logits' spread; bound 15 %), the greedy
    token is the same, and batch and token-by-token agree on the int8 path (to what 8-bit
    rounding allows)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_model import write_tiny

    from blockq.model import Model

    path = write_tiny(tmp_path / "t.gguf", qtype="Q4_K", tied=False, out_qtype="Q6_K")
    toks = [1, 5, 9, 30, 2, 77, 100, 3]
    m8 = Model.load(path)
    mf = Model.load(path, numerics="float")
    assert m8.blk[0].attn_q.weight.int8 and not mf.blk[0].attn_q.weight.int8
    a = m8.forward(toks, m8.new_cache(32), "all")
    b = mf.forward(toks, mf.new_cache(32), "all")
    err = np.abs(a - b).max() / b.std()
    assert 0 < err < 0.15, err
    assert np.array_equal(a.argmax(-1), b.argmax(-1))
    cache = m8.new_cache(32)
    split = np.concatenate([m8.forward(toks[:3], cache, "all")] +
                           [m8.forward([t], cache) for t in toks[3:]])
    # a last-bit difference between the batch and one-token kernels may flip an 8-bit code a
    # layer later (measured: 1.5 % of the largest logit)
    np.testing.assert_allclose(split, a, rtol=0, atol=0.05 * np.abs(a).max())


@needs_int8
@pytest.mark.parametrize("names", [("Q5_0", "Q5_0", "Q8_0"), ("Q4_K", "Q6_K"), ("Q4_1", "Q5_1"),
                                   ("Q2_K", "Q3_K", "Q5_K")])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_for_the_products_of_one_input(names, threads, rng, monkeypatch):
    """Decoding's q/k/v and gate/up products in one call (one activation quantization, one
    parallel region) give exactly the separate products, which match the reference."""
    from blockq.kernels.cpu_matvec import QMatrix, matvec_many

    if threads > 1:  # the threaded drivers even for these small matrices
        monkeypatch.setattr(_k8(), "PARALLEL_MIN_BYTES", 0)

    cols = 512
    mats = []
    for i, name in enumerate(names):
        rows = (96, 37, 300)[i]
        t = BY_NAME[name]
        mats.append(QMatrix(name, random_blocks(name, rows * cols // t.block_size, rng,
                                                scales=0.05), (rows, cols)))
    x = rng.standard_normal(cols).astype(np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        got = matvec_many(mats, x)
        one_by_one = [m.matvec(x) for m in mats]
    finally:
        numba.set_num_threads(old)
    assert got is not None and len(got) == len(mats)
    for m, g, s in zip(mats, got, one_by_one):
        assert g.shape == (1, m.shape[0]) and np.array_equal(g[0], s)
        ref, bound = int8_reference(m.qtype, m.data, x[None])
        assert np.all(np.abs(g - ref) <= RTOL * bound)


@needs_int8
def test_products_of_one_input_refused_where_activations_differ(rng):
    from blockq.kernels.cpu_matvec import QMatrix, matvec_many

    a = QMatrix("Q4_K", random_blocks("Q4_K", 8, rng, scales=0.05), (4, 512))
    b = QMatrix("Q5_0", random_blocks("Q5_0", 64, rng, scales=0.05), (4, 512))
    x = rng.standard_normal(512).astype(np.float32)
    assert matvec_many([a, b], x) is None  # Q8_K and Q8_0 activation blocks
    c = QMatrix("Q4_1", random_blocks("Q4_1", 64, rng, scales=0.05), (4, 512))
    assert matvec_many([b, c], x) is None  # Q8_0 (with its exact sums) and Q8_1
    b.set_int8(False)
    assert matvec_many([a, a, b], x) is None  # float numerics on one of them
    assert matvec_many([a], x) is None
