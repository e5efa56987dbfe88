"""OpenBLAS for MLX's Linux CPU backend, in every process that imports mlx_ft.

MLX's Linux wheel (mlx[cpu]) carries the reference BLAS, whose matmul is ~80x slower than
OpenBLAS's here (1.8 against 148 GFLOP/s for 1024 x 1024 float32 on 2 cores of an AMD EPYC).
libmlx.so leaves `cblas_sgemm` and friends to the dynamic linker, which looks in the process's
global scope before the library's own dependencies. So loading Debian/Ubuntu's OpenBLAS with
RTLD_GLOBAL before mlx.core is first imported binds MLX to OpenBLAS, as LD_PRELOAD would, without
restarting Python: `import mlx_ft` does it, for the `mlxft` command, scripts and notebooks alike.

When that cannot happen, one warning per process says what to do: OpenBLAS is not installed
(`sudo apt-get install libopenblas0-pthread`), or mlx.core was imported before mlx_ft (import
mlx_ft first, or start Python with LD_PRELOAD). MLX_FT_OPENBLAS=0 turns all of this off.
Nothing here imports MLX, and nothing happens off Linux (a Mac runs MLX on Metal and Accelerate).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

PATTERN = "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"
INSTALL = "sudo apt-get install libopenblas0-pthread"


class BlasWarning(UserWarning):
    """MLX runs on its reference BLAS in this process (the message says how to fix it)."""


def openblas_path() -> str | None:
    """Debian/Ubuntu's OpenBLAS (pthread build), if installed."""
    libs = sorted(glob.glob(PATTERN))
    return libs[0] if libs else None


def openblas_loaded() -> bool:
    """Is an OpenBLAS library mapped into this process (preloaded or loaded by `prefer_openblas`)?"""
    try:
        with open("/proc/self/maps") as f:
            return "openblas" in f.read()
    except OSError:
        return False


_warned = False


def _warn(message: str) -> None:
    """At most one BLAS warning per process, whoever calls `prefer_openblas` again."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, BlasWarning, stacklevel=3)


def prefer_openblas() -> str:
    """Bind MLX to OpenBLAS if it can still be done; warn once if it cannot. Returns what happened:
    "off-linux", "disabled", "preloaded", "loaded", "missing" or "too-late"."""
    if sys.platform != "linux":
        return "off-linux"
    if os.environ.get("MLX_FT_OPENBLAS") == "0":
        return "disabled"
    if openblas_loaded():
        return "preloaded"
    lib = openblas_path()
    if lib is None:
        _warn(f"MLX's CPU backend runs matmuls on its reference BLAS here, ~80x slower than OpenBLAS "
              f"(training ~12x slower). Install OpenBLAS with `{INSTALL}` and start Python again; "
              "mlx_ft then loads it itself (MLX_FT_OPENBLAS=0 silences this)")
        return "missing"
    if "mlx.core" in sys.modules:
        _warn(f"mlx.core was imported before mlx_ft, so MLX keeps its reference BLAS (~80x slower matmuls "
              f"than OpenBLAS). Import mlx_ft before mlx (restart the kernel, put `import mlx_ft` first), or "
              f"start Python with LD_PRELOAD={lib}")
        return "too-late"
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    return "loaded"


def matmul_gflops(n: int = 1024, seconds: float = 0.5) -> float:
    """Sustained float32 GFLOP/s of an n x n matmul in this process (imports MLX)."""
    import time

    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mx.eval(a @ b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


STATUS: str | None = None  # what `prefer_openblas` did when mlx_ft was imported
