"""The wheel is complete: built, installed into a fresh virtual environment (not editable), it
finds every file it reads at run time (the CUDA sources) and runs ``blockq generate``."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tiny_model import write_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out),
                    str(ROOT)], check=True, cwd=out)
    (whl,) = out.glob("blockq-*.whl")
    return whl


def test_wheel_lists_runtime_files_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"blockq/gpu/kernels.cu", "blockq/gpu/blocks.cuh"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    # every non-Python file in the package directory travels with the wheel
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "blockq").rglob("*")
              if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert wanted <= names


@pytest.mark.slow
def test_installed_wheel_reads_cuda_sources_and_generates(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # system site-packages give the dependencies (numpy, numba, ...) without a download
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], check=True)
    work = tmp_path / "elsewhere"  # not the checkout, so the checkout's blockq is not imported
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    check = subprocess.run(
        [py, "-c", "import blockq, blockq.gpu.source as s; print(blockq.__file__); "
                   "print(len(s.kernels_source()))"],
        cwd=work, env=env, capture_output=True, text=True, check=True)
    where, n_chars = check.stdout.split()
    assert Path(where).is_relative_to(env_dir)  # the wheel's copy, not an editable one
    assert int(n_chars) > len((ROOT / "blockq/gpu/kernels.cu").read_text())
    tiny = write_tiny(work / "tiny.gguf", qtype="Q8_0")
    res = subprocess.run([env_dir / "bin" / "blockq", "generate", "-m", tiny, "-p", "the fox",
                          "-n", "4", "--temp", "0", "-c", "64"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and "tok/s" in res.stderr
    # a fresh install has no compiled kernels yet: the first run says so before compiling
    assert "compiling the kernels (first run" in res.stderr


def test_gpu_install_hint_matches_readme():
    from blockq.gpu import INSTALL_HINT

    readme = (ROOT / "README.md").read_text()
    for needle in ("pip install -e '.[gpu]'", "cupy-cuda12x", "cupy-cuda13x"):
        assert needle in INSTALL_HINT and needle in readme
