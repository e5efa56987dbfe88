"""llama.cpp's own Python side (convert_hf_to_gguf.py, its conversion/ package and bundled gguf-py,
the vocabulary GGUFs and chat templates of its test suite), from the llama-cpp-python sdist of the
installed version: the reference mlx_ft's GGUF export is compared with.

Fetched once with pip into $MLX_FT_CACHE/llama-cpp-src/<version> and reused by later runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-", "models/templates/")


def llama_cpp_dir() -> Path:
    """The vendored llama.cpp tree of the installed llama-cpp-python's sdist (only the files used)."""
    import llama_cpp

    version = llama_cpp.__version__
    cache = Path(os.environ.get("MLX_FT_CACHE", Path.home() / ".cache" / "mlx_ft")) / "llama-cpp-src" / version
    root = cache / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    sdist = next(cache.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        # pip prepares the sdist's metadata in an isolated build env: ~50 s, once per version.
        proc = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                               "--no-deps", "--no-binary", ":all:", "-d", str(cache)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip download llama-cpp-python=={version} failed:\n{proc.stderr[-2000:]}")
        sdist = next(cache.glob("llama_cpp_python-*.tar.gz"))
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = cache / "llama.cpp.tmp"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(WANTED)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(root)
    sdist.unlink()  # 77 MB; the extracted files are what later runs use
    return root
