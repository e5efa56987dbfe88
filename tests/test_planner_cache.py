"""Replayed estimates are cached by everything they depend on: a cached answer equals a fresh replay,
another setting or another planner source is another key, and the shipped cache is current."""

import dataclasses
import json

import pytest

from mlx_ft.planner import Settings, load_shape, plan_cache
from mlx_ft.planner.plan import predict
from mlx_ft.planner.replay import replay_estimate

TINY = dict(batch_size=2, seq_len=63, rank=4, loss_chunk=32)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FT_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_cache, "_shipped", lambda: {})
    return tmp_path / "plans"


def test_cached_estimate_is_the_replayed_one(empty_cache, tiny_model_dir):
    shape, st = load_shape(str(tiny_model_dir)), Settings(**TINY)
    first = predict(shape, st)  # replays and stores
    assert len(list(empty_cache.glob("*.json"))) == 1
    again = predict(shape, st)  # from the file
    fresh = replay_estimate(shape, st)
    assert dataclasses.asdict(again) == dataclasses.asdict(first) == dataclasses.asdict(fresh)
    assert "replayed graph" in again.memory_model


def test_each_input_is_part_of_the_key(tiny_model_dir, monkeypatch):
    shape = load_shape(str(tiny_model_dir))
    base = plan_cache.key(shape.config, Settings(**TINY))
    assert plan_cache.key(shape.config, Settings(**TINY)) == base
    assert plan_cache.key(shape.config, Settings(**{**TINY, "batch_size": 3})) != base
    assert plan_cache.key({**shape.config, "hidden_size": 128}, Settings(**TINY)) != base
    monkeypatch.setattr(plan_cache, "fingerprint", lambda: "another planner")
    assert plan_cache.key(shape.config, Settings(**TINY)) != base


def test_a_torn_cache_file_is_replayed_again(empty_cache, tiny_model_dir):
    shape, st = load_shape(str(tiny_model_dir)), Settings(**TINY)
    good = predict(shape, st)
    (f,) = empty_cache.glob("*.json")
    f.write_text(f.read_text()[:20])  # a half-written file (another process killed mid-write)
    assert dataclasses.asdict(predict(shape, st)) == dataclasses.asdict(good)
    assert json.loads(f.read_text())["peak_bytes"] == good.peak_bytes


def test_the_shipped_cache_answers_the_bundled_recipes_and_tables():
    """scripts/update_plan_quotes.py rewrites plan_cache.json; after a planner change it is stale
    (every key changes), which makes the docs checks replay everything (minutes): run the script."""
    from pathlib import Path

    from mlx_ft.planner.plan import read_run_batches, settings_for_batches, settings_from_recipe
    from mlx_ft.recipe import load_recipe

    shipped = json.loads(plan_cache.SHIPPED.read_text())
    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))
    for path in recipes:
        if path.name == "base.toml" or path.name.startswith("demo"):  # demo-dpo: a model the demo writes
            continue
        r = load_recipe(path)
        shape = load_shape(r.model.path)
        # planned at its own batches when its data can be read here (qwen7b-dpo's shipped pairs)
        st = settings_for_batches(settings_from_recipe(r), read_run_batches(r)[0])
        assert plan_cache.key(shape.config, st) in shipped, \
            f"{path.name}: mlx_ft/planner/plan_cache.json is stale: run python scripts/update_plan_quotes.py"
