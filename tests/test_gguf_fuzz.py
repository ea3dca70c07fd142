"""Fuzz the reader with hypothesis: mutated and truncated GGUF files may only raise FormatError.

The mutations and the seeds are those of ``tools/fuzz_gguf.py`` (which runs >= 10,000 cases);
here a few hundred run: a small valid file written by blockq (so the success path, lazy
decoding and inspect's summary are exercised) and the header region of each real file.
"""
import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

_spec = importlib.util.spec_from_file_location(
    "fuzz_gguf", Path(__file__).resolve().parents[1] / "tools" / "fuzz_gguf.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

MUTATIONS = st.lists(st.tuples(st.sampled_from(fuzz.KINDS), st.booleans(),
                               st.integers(0, 2**32 - 1),
                               st.one_of(st.integers(0, 2**20 - 1), st.integers(0, 2**64 - 1))),
                     min_size=1, max_size=4)


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def synthetic():
    buf = fuzz.synthetic_seed()
    return buf, fuzz.hot_offsets(buf)


@pytest.fixture(scope="module")
def smollm2_header(smollm2_file):
    buf = fuzz.header_seed(smollm2_file)
    return buf, fuzz.hot_offsets(buf)


@pytest.fixture(scope="module")
def gemma3_header(gemma3_file):
    buf = fuzz.header_seed(gemma3_file)
    return buf, fuzz.hot_offsets(buf)


def test_seeds_are_what_the_fuzzer_assumes(synthetic):
    buf, hot = synthetic
    assert fuzz.exercise(buf) == "ok" and len(hot) > 100
    with fuzz.read_gguf(buf) as f:
        end = max(t.offset + t.nbytes for t in f.tensors.values())
    assert fuzz.exercise(buf[:end - 1]) == "error"  # last tensor cut short


def test_fuzz_synthetic(synthetic):
    seed, hot = synthetic
    outcomes = set()

    @_settings(250)
    @given(MUTATIONS)
    def run(muts):
        outcomes.add(fuzz.exercise(fuzz.mutate(seed, hot, muts)))

    run()
    assert outcomes == {"ok", "error"}  # both paths were exercised


@pytest.mark.realfile
@pytest.mark.parametrize("which,n", [("smollm2_header", 120), ("gemma3_header", 40)])
def test_fuzz_real_header(which, n, request):
    seed, hot = request.getfixturevalue(which)
    assert fuzz.exercise(seed) == "error"  # truncated: the tensors run past the end

    @_settings(n)
    @given(MUTATIONS)
    def run(muts):
        fuzz.exercise(fuzz.mutate(seed, hot, muts))

    run()
