"""The planner plans the run's own batches: the widest batch its data makes (length buckets or packed
rows), with the max_seq_len worst case beside it, and `mlxft run` refuses a run only on its own plan."""

import json
import math
import os
import subprocess
import sys

from mlx_ft.data import load_datasets, recipe_tokenizer
from mlx_ft.data.batching import epoch_batches, row_width
from mlx_ft.planner import plan
from mlx_ft.recipe import recipe_from_dict


def chat_recipe(model_dir, train, tmp_path, batch_size=4, **data):
    return recipe_from_dict({"model": {"path": str(model_dir)}, "adapter": {"rank": 4},
                             "data": {"train": str(train), **data},
                             "training": {"batch_size": batch_size, "steps": 2},
                             "output": {"dir": str(tmp_path / "run")}})


def test_short_samples_are_planned_at_the_widest_batch_with_the_worst_case_beside(tmp_path, tiny_model_dir,
                                                                                 chat_jsonl):
    recipe = chat_recipe(tiny_model_dir, chat_jsonl[0], tmp_path, max_seq_len=512)
    samples = load_datasets(recipe, recipe_tokenizer(recipe)).train
    plans = epoch_batches(samples, 4, 512, False, 0, 0, True)
    widest = max(row_width(samples, b, 512, False) for b in plans)
    assert widest == 8 * math.ceil(max(len(s.tokens) for s in samples) / 8) < 100  # ~26-token chats

    p = plan(recipe, machine="m4-max-128")
    assert (p.settings.batch_size, p.settings.seq_len + 1) == (4, widest)
    assert p.tokens_per_epoch == sum(len(b) * row_width(samples, b, 512, False) for b in plans)
    assert (p.worst_settings.batch_size, p.worst_settings.seq_len + 1) == (4, 512)
    assert p.worst.peak_bytes > 2 * p.estimate.peak_bytes  # what the old plan said for these rows
    text = p.render()
    assert f"batches up to 4 x {widest} tokens (the widest of the epoch's {len(plans)}" in text
    assert "if a batch were 4 x 512 tokens (max_seq_len; this data never makes one)" in text
    assert p.to_dict()["worst_case"]["seq_len"] == 512


def test_packed_rows_are_max_seq_len_wide_and_as_many_as_the_data_fills(tmp_path, tiny_model_dir, chat_jsonl):
    recipe = chat_recipe(tiny_model_dir, chat_jsonl[0], tmp_path, max_seq_len=256, pack=True, batch_size=16)
    p = plan(recipe, machine="m4-max-128")
    # 40 chats of ~26 tokens fill 5 rows of 256: a batch of 16 rows never happens
    assert p.settings.seq_len + 1 == 256 and p.settings.batch_size == p.batches.rows < 16
    assert (p.worst_settings.batch_size, p.worst_settings.seq_len + 1) == (16, 256)


def test_run_refuses_only_on_its_own_plan_and_the_plan_holds_within_10_percent(tmp_path, tiny_model_dir,
                                                                             chat_jsonl):
    """max_seq_len 65536 at batch 4 would need over a terabyte (no machine has it); the chats make
    batches under 100 tokens, so the run starts, and its plan is within 10 % of the peak it measures
    (in a fresh process: mx.get_peak_memory() counts every array of the process)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{tiny_model_dir}"\n[adapter]\nrank = 4\n'
                      f'[data]\ntrain = "{chat_jsonl[0]}"\nmax_seq_len = 65536\n'
                      f'[training]\nbatch_size = 4\nepochs = 1\n[output]\ndir = "{tmp_path / "run"}"\n')
    out = subprocess.run([sys.executable, "-m", "mlx_ft", "run", str(recipe)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    first, second = out.stdout.splitlines()[:2]
    assert ": fits (" in first and "batches up to 4 x " in first, first
    assert second.startswith("plan: if a batch were 4 x 65536 tokens") and second.endswith("would not fit"), second
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    planned, measured = summary["plan"]["planned_peak_bytes"], summary["peak_memory_bytes"]
    assert summary["plan"]["worst_case_fits"] is False and summary["plan"]["batch"][1] < 100
    assert abs(planned / measured - 1) <= 0.10, (planned, measured)
