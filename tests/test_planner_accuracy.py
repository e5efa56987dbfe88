"""Predicted peak vs the peak a real `mlx_ft.train.train` measures, on tiny models (fast subset of
benchmarks/planner_accuracy.py, which runs the full grid)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_ft.planner import estimate, load_shape, settings_from_recipe
from mlx_ft.probe import probe_recipe
from mlx_ft.planner.replay import replay_estimate
from mlx_ft.recipe import recipe_from_dict


def measure_in_fresh_process(recipe, seq_len: int) -> int:
    """measure_peak in a new process: mx.get_peak_memory() counts every live array of the process,
    and inside a test session earlier tests' arrays are still alive (measured: +3 to +5 MiB)."""
    code = ("import json, sys; from mlx_ft.recipe import recipe_from_dict; "
            "from mlx_ft.probe import measure_peak; "
            "print(measure_peak(recipe_from_dict(json.loads(sys.argv[1])), int(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(recipe.to_dict()), str(seq_len)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("adapter,training,seq_len", [
    ({"method": "lora", "rank": 8}, {"batch_size": 2, "loss_chunk_size": 0}, 256),  # the one-piece loss
    ({"method": "dora", "rank": 4, "layers": 1}, {"batch_size": 1, "grad_checkpointing": True}, 384),
    ({"method": "full"}, {"batch_size": 2, "loss_chunk_size": 64}, 192),
])
def test_predicted_peak_within_10_percent(tmp_path, tiny_model_dir, adapter, training, seq_len):
    recipe = recipe_from_dict({"model": {"path": str(tiny_model_dir)}, "adapter": adapter,
                               "data": {"train": "unused.jsonl"}, "training": training,
                               "output": {"dir": str(tmp_path / "run")}})
    short = probe_recipe(recipe, seq_len, tmp_path)
    shape, st = load_shape(str(tiny_model_dir)), settings_from_recipe(short)
    formula = estimate(shape, st).peak_bytes
    replayed = replay_estimate(shape, st)
    assert replayed.memory_model.startswith("replayed graph")
    measured = measure_in_fresh_process(recipe, seq_len)
    assert formula == pytest.approx(measured, rel=0.10), (formula, measured)
    assert replayed.peak_bytes == pytest.approx(measured, rel=0.10), (replayed.peak_bytes, measured)
