"""Predicted peak vs the peak a real `mlx_ft.train.train` measures, on tiny models (fast subset of
benchmarks/planner_accuracy.py, which runs the full grid)."""

from pathlib import Path

import pytest

from mlx_ft.planner import estimate, load_shape, settings_from_recipe
from mlx_ft.planner.probe import measure_peak, probe_recipe
from mlx_ft.recipe import recipe_from_dict


@pytest.mark.parametrize("adapter,training,seq_len", [
    # loss_chunk_size 0: the one-piece loss; the chunked path is being reworked in mlx_ft.losses
    ({"method": "lora", "rank": 8}, {"batch_size": 2, "loss_chunk_size": 0}, 256),
    ({"method": "dora", "rank": 4, "layers": 1}, {"batch_size": 1, "grad_checkpointing": True}, 384),
    ({"method": "full"}, {"batch_size": 2, "loss_chunk_size": 64}, 192),
])
def test_predicted_peak_within_10_percent(tmp_path, tiny_model_dir, adapter, training, seq_len):
    recipe = recipe_from_dict({"model": {"path": str(tiny_model_dir)}, "adapter": adapter,
                               "data": {"train": "unused.jsonl"}, "training": training,
                               "output": {"dir": str(tmp_path / "run")}})
    short = probe_recipe(recipe, seq_len, tmp_path)
    predicted = estimate(load_shape(str(tiny_model_dir)), settings_from_recipe(short)).peak_bytes
    measured = measure_peak(recipe, seq_len)
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)
