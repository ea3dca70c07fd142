"""The GPU kernels' block decoders, checked without a GPU.

blocks.cuh is written __host__ __device__: here a host C++ compiler builds it into a tiny program
that dequantizes random blocks of every type, compared bit-exactly with gguf-py (the oracle).
When nvcc is on the machine, the whole CUDA module is compiled for Hopper to catch errors in
the kernels themselves.
"""
import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from blockq.gpu.source import GPU_TYPES, decoders_source, kernel_suffix, kernels_source
from blockq.testing import random_blocks
from blockq.types import BY_NAME

_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
// usage: harness TYPE N_BLOCKS < blocks > floats
int main(int argc, char** argv) {
    const char* name = argv[1];
    long nb = atol(argv[2]);
#define RUN(tn, QK, TS)                                                              \
    if (!strcmp(name, #tn)) {                                                          \
        std::vector<uint8_t> in(nb * TS);                                              \
        if (fread(in.data(), 1, in.size(), stdin) != in.size()) return 2;              \
        std::vector<float> out(nb * QK);                                               \
        for (long b = 0; b < nb; b++)                                                  \
            for (int off = 0; off < QK; off += 8) dq8_##tn(&in[b * TS], off, &out[b * QK + off]); \
        fwrite(out.data(), 4, out.size(), stdout);                                     \
        return 0;                                                                      \
    }
    BQ_TYPES(RUN)
    return 3;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the decoder harness")
    d = tmp_path_factory.mktemp("gpu_harness")
    (d / "h.cpp").write_text(decoders_source() + _HARNESS)
    subprocess.run([cxx, "-O1", "-std=c++17", "-o", str(d / "h"), str(d / "h.cpp")], check=True)
    return d / "h"


@pytest.mark.parametrize("name", [t.name for t in GPU_TYPES])
def test_decoder_matches_gguf(harness, name, rng):
    t = BY_NAME[name]
    n = 64 if t.is_quantized else 512
    raw = random_blocks(t, n, rng, 1.0)
    n_kernel_blocks = n if t.is_quantized else n // 8  # float types: pseudo-blocks of 8
    out = subprocess.run([str(harness), kernel_suffix(t), str(n_kernel_blocks)],
                         input=raw.tobytes(), capture_output=True, check=True).stdout
    got = np.frombuffer(out, dtype=np.float32)
    if name == "Q8_K":  # gguf-py has no Q8_K dequantizer: w = d (f32) * q (int8)
        b = raw.view(t.dtype).reshape(n)
        want = (b["d"][:, None] * b["qs"].astype(np.float32)).reshape(-1)
    else:
        want = quants.dequantize(raw, GGMLQuantizationType[name]).reshape(-1).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.slow
def test_kernels_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on this machine")
    src = tmp_path / "k.cu"
    src.write_text(kernels_source())
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
