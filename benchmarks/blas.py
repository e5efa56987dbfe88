"""Does `import mlx_ft` give a plain Python process OpenBLAS's matmul speed? (Linux, mlx[cpu])

    python benchmarks/blas.py [--rounds 5] [--n 1024]

Runs fresh Python processes without LD_PRELOAD, alternating, and prints the median float32
n x n matmul GFLOP/s of each way MLX can get its BLAS:
  import mlx_ft      mlx_ft loads Debian's OpenBLAS with RTLD_GLOBAL before mlx.core (mlx_ft/blas.py)
  LD_PRELOAD         OpenBLAS preloaded by the dynamic linker (what `mlxft` used to re-execute itself with)
  reference BLAS     MLX_FT_OPENBLAS=0: the BLAS bundled in the mlx[cpu] wheel
  mlx first          mlx.core imported before mlx_ft: too late to switch (mlx_ft warns)
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys

from mlx_ft.blas import openblas_path

CODE = {
    "import mlx_ft": "import mlx_ft, mlx_ft.blas as b",
    "LD_PRELOAD": "import mlx_ft, mlx_ft.blas as b",
    "reference BLAS": "import mlx_ft, mlx_ft.blas as b",
    "mlx first": ("import warnings; warnings.simplefilter('ignore'); "
                  "import mlx.core, mlx_ft, mlx_ft.blas as b"),
}


def measure(way: str, n: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_FT_OPENBLAS")}
    if way == "LD_PRELOAD":
        env["LD_PRELOAD"] = openblas_path()
    if way == "reference BLAS":
        env["MLX_FT_OPENBLAS"] = "0"
    out = subprocess.run([sys.executable, "-c", f"{CODE[way]}; print(b.matmul_gflops({n}, 1.0))"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1024)
    args = ap.parse_args()
    if openblas_path() is None:
        sys.exit("OpenBLAS is not installed (sudo apt-get install libopenblas0-pthread)")
    runs = {way: [] for way in CODE}
    for _ in range(args.rounds):
        for way in CODE:
            runs[way].append(measure(way, args.n))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores; float32 {args.n} x {args.n} matmul, "
          f"median of {args.rounds} processes")
    for way, values in runs.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {way:<16} {statistics.median(values):8.1f} GFLOP/s   (runs: {runs})")


if __name__ == "__main__":
    main()
