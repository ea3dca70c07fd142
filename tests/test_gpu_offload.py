"""Per-layer offload plumbing.  The device code runs against an array module: here numpy with
the CPU matrices stands in for CuPy, so the split at every N, the device KV cache and the
crossings are checked on any machine; tests/test_gpu.py runs the real kernels where a GPU is."""
import numpy as np
import pytest
from click.testing import CliRunner

from blockq.cli import cli
from blockq.errors import BadArgument
from blockq.gpu import gpu_status
from blockq.gpu.offload import auto_layers, parse_gpu_layers
from blockq.model import Model
from tiny_model import write_tiny

TOKENS = [5, 17, 3, 250, 99, 42, 7, 7, 128, 64, 1, 200]
N_LAYER = 3


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    return write_tiny(d / "m.gguf", qtype="Q4_K", tied=False, out_qtype="Q6_K", n_layer=N_LAYER)


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload-gemma")
    return write_tiny(d / "g.gguf", arch="gemma3", qtype="Q8_0", n_layer=N_LAYER,
                      sliding_window=5)


@pytest.fixture(scope="module")
def paths(tiny_path, gemma_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("offload-phi3")
    # Phi-3 (fused qkv / gate+up) with long rope factors: 64 tokens exceed the original 32
    phi3 = write_tiny(d / "p.gguf", arch="phi3", qtype="Q8_0", n_layer=N_LAYER,
                      rope_factors=True,
                      extra_md={"phi3.rope.scaling.original_context_length": 32,
                                "phi3.rope.scaling.attn_factor": 1.1})
    return {"llama": tiny_path, "gemma3": gemma_path, "phi3": phi3}


def _host_offload(model, n):
    model.offload(n, xp=np, to_device=lambda q: q)  # the "device" is the host


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize("n_gpu", list(range(N_LAYER + 1)))
def test_split_at_every_n_gives_cpu_logits(paths, n_gpu, arch):
    model = Model.load(paths[arch])
    want = model.forward(TOKENS, model.new_cache(64), "all")
    _host_offload(model, n_gpu)
    got = model.forward(TOKENS, model.new_cache(64), "all")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize("n_gpu", list(range(N_LAYER + 1)))
def test_split_decode_token_by_token_and_greedy(paths, n_gpu, arch):
    model = Model.load(paths[arch])

    def greedy(m):
        cache = m.new_cache(64)
        logits = m.forward(TOKENS[:4], cache)
        out = []
        for _ in range(8):
            t = int(np.argmax(logits[-1]))
            out.append(t)
            logits = m.forward([t], cache)
        return out

    want = greedy(model)
    _host_offload(model, n_gpu)
    assert greedy(model) == want


@pytest.mark.parametrize("n_gpu", [0, 2, N_LAYER])
def test_observer_sees_every_product_on_either_side(tiny_path, n_gpu):
    from blockq.imatrix import observe_matmuls

    model = Model.load(tiny_path)
    _host_offload(model, n_gpu)
    seen = []
    with observe_matmuls(model, lambda name, x: seen.append((name, x.shape))):
        model.forward(TOKENS, model.new_cache(64), "all")
    names = [n for n, _ in seen]
    assert names == [lin.name for _, lin in model.linears()]
    assert all(shape[0] == len(TOKENS) for _, shape in seen)
    model.forward(TOKENS, model.new_cache(64), "all")
    assert len(seen) == len(names)  # the hook is gone after the block


def test_parse_gpu_layers():
    assert parse_gpu_layers("all", 30) == 30
    assert parse_gpu_layers("auto", 30) == "auto"
    assert parse_gpu_layers("7", 30) == 7
    assert parse_gpu_layers(None, 30) == 0
    assert parse_gpu_layers("99", 30) == 30  # as llama.cpp's -ngl 99: every layer
    for bad in ("-1", "many"):
        with pytest.raises(BadArgument, match="gpu-layers"):
            parse_gpu_layers(bad, 30)


def test_auto_fits_layers_last_first(tiny_path):
    model = Model.load(tiny_path)
    from blockq.gpu.offload import layer_bytes
    a = model.args
    kv = 2 * a.n_head_kv * 64 * a.head_dim * 4
    per = layer_bytes(model, 0) + kv
    assert auto_layers(model, 64, 0) == 0
    assert auto_layers(model, 64, int(per * 2.2 * 1.1)) == 2
    assert auto_layers(model, 64, 10**12) == N_LAYER


@pytest.mark.skipif(gpu_status()[0], reason="a GPU is present")
def test_gpu_layers_without_gpu_is_one_clear_error(tiny_path):
    r = CliRunner().invoke(cli, ["generate", str(tiny_path), "-p", "hi", "-n", "2",
                                 "--gpu-layers", "all"])
    assert r.exit_code != 0
    assert "needs a usable GPU" in str(r.exception) + r.output
