"""`import mlx_ft` binds MLX's Linux CPU backend to OpenBLAS: a plain Python process, without
LD_PRELOAD, gets the matmul speed of the `mlxft` command; when it cannot, one warning says how."""

import json
import os
import subprocess
import sys

import pytest

from mlx_ft.blas import openblas_path

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate and Metal on macOS")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code_or_args, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_FT_OPENBLAS")}
    env.update(env_changes)
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True)


def plain(**env) -> tuple[str, float]:
    code = "import mlx_ft, mlx_ft.blas as b; print(b.STATUS, b.matmul_gflops(512, 0.3))"
    out = run(code, **env).stdout.split()
    return out[0], float(out[1])


def cli() -> float:
    """The rate `mlxft plan` measures on this machine (`tflops` of --machine auto), in GFLOP/s."""
    out = run(["-m", "mlx_ft", "plan", "--model", "Qwen/Qwen2.5-0.5B", "--memory-model", "formula",
               "--batch-size", "1", "--max-seq-len", "512", "--json"])  # fits: exit 0, not 3
    return json.loads(out.stdout)["tflops"] * 1e3


def test_plain_python_gets_the_cli_matmul_speed():
    if openblas_path() is None:
        pytest.skip("OpenBLAS is not installed here (apt-get install libopenblas0-pthread; .ci/run does)")
    # Alternated, best of two each: other work on the machine moves single figures by 2x.
    rates = {"plain": [], "cli": [], "reference": []}
    for _ in range(2):
        status, rate = plain()
        assert status == "loaded"
        rates["plain"].append(rate)
        rates["cli"].append(cli())
        status, rate = plain(MLX_FT_OPENBLAS="0")
        assert status == "disabled"
        rates["reference"].append(rate)
    best = {k: max(v) for k, v in rates.items()}
    # OpenBLAS against the reference BLAS is 30-100x here (benchmarks/blas.py): equal rates up to the
    # machine's noise pass, the reference BLAS in either process would fail by far.
    assert best["plain"] >= 0.3 * best["cli"], rates
    assert best["plain"] >= 5 * best["reference"], rates  # MLX's own BLAS really was replaced


def test_too_late_or_missing_is_one_warning_with_the_fix():
    res = run("import mlx.core, mlx_ft, mlx_ft.blas as b; print(b.STATUS); b.prefer_openblas()")
    if openblas_path() is not None:
        assert res.stdout.split() == ["too-late"]
        assert res.stderr.count("BlasWarning") == 1  # the second call is silenced as a repeat
        assert f"Import mlx_ft before mlx" in res.stderr and f"LD_PRELOAD={openblas_path()}" in res.stderr
    res = run("import os; os.environ['MLX_FT_OPENBLAS'] = '0'; import mlx_ft.blas as b; "
              "del os.environ['MLX_FT_OPENBLAS']; b.PATTERN = '/nowhere/libblas.so.3'; "
              "print(b.prefer_openblas())")
    assert res.stdout.split() == ["missing"]
    assert res.stderr.count("BlasWarning") == 1 and "sudo apt-get install libopenblas0-pthread" in res.stderr
