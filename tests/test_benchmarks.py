"""The benchmark scripts run end to end in their smoke versions and print their tables.

No speed is asserted: timings on a shared CI machine mean nothing; the figures live in
docs/benchmarks.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
def test_vs_mlx_lm_smoke_prints_every_column_and_ratio(tmp_path):
    # One scenario: the others run the same code on other data (each costs two processes, ~12 s).
    out = run("vs_mlx_lm.py", "--smoke", "--only", "skewed", "--json", str(tmp_path / "r.json"))
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0] == "| scenario | tool | epoch s | sup tok/s | peak MB | valid loss |"
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    for scenario in ("skewed",):
        tools = [r[1] for r in rows if r[0] == scenario]
        assert tools[0] == "mlx_lm.lora" and "mlx_ft" in tools and "**mlx_ft / mlx_lm**" in tools, tools
    for r in rows:
        assert len(r) == 6 and all(r), r
        if r[1].startswith("**"):  # ratio rows: four ratios
            assert all(c.startswith("**") and c.endswith("x**") for c in r[2:]), r
        else:
            float(r[2]), float(r[3]), float(r[4]), float(r[5])
    results = json.loads((tmp_path / "r.json").read_text())
    # The same data for both tools: one held-out loss each, finite and of the same order.
    for res in results:
        lm, ft = res["runs"]["mlx_lm"]["valid_loss"], res["runs"]["mlx_ft"]["valid_loss"]
        assert 0 < ft < 2 * lm and 0 < lm < 2 * ft


@pytest.mark.slow
def test_flops_smoke_reports_a_fraction_of_matmul_throughput():
    out = run("flops.py", "--smoke")
    assert "GFLOP/s" in out and "the best matmul" in out
