"""Every shipped recipe validates and fits the machine its header names, by the planner's own
numbers; the header's stated verdict is the planner's; the recipe reference is current."""

import re
from pathlib import Path

import pytest

from mlx_ft.planner import plan
from mlx_ft.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# Recipes for real models: each names its machine and an example dataset size in its header.
PLANNED = sorted(p.name for p in RECIPES.glob("*.toml") if not p.name.startswith("demo"))  # demo*: no machine
CHILDREN = [n for n in PLANNED if n != "base.toml"]
MIN_MARGIN = 0.10  # share of the budget left free: the memory model is calibrated to ~±15%
GIB = 2**30


def header(name: str) -> str:
    text = (RECIPES / name).read_text()
    return text[: text.index("\n\n[") if "\n\n[" in text else len(text)]


def test_the_real_model_recipes_are_there():
    expected = {"qwen32b-qlora.toml", "llama3-8b-lora.toml", "mistral7b-qlora.toml", "gemma2-9b-qlora.toml",
                "qwen7b-dora.toml", "llama70b-qlora.toml", "qwen0.5b-full.toml", "qwen3-30b-a3b-qlora.toml"}
    assert expected <= set(CHILDREN)


@pytest.mark.parametrize("name", [*PLANNED, "demo.toml", "demo-dpo.toml"])
def test_recipe_validates(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.model.path and recipe.data.train


@pytest.mark.parametrize("name", PLANNED)
def test_recipe_extends_base_and_documents_itself(name):
    text = (RECIPES / name).read_text()
    if name != "base.toml":
        assert re.search(r'^extends = "base.toml"$', text, re.M)
        # each names its model itself, never the base's by accident
        assert load_recipe(RECIPES / name).provenance["model.path"].startswith("file ")
    h = header(name)
    assert f"mlxft run  recipes/{name}" in h and f"mlxft plan recipes/{name} --machine" in h
    assert "# Choices:" in h


@pytest.mark.parametrize("name", PLANNED)
def test_recipe_fits_its_machine_as_its_header_says(name):
    h = header(name)
    m = re.search(r"--machine (\S+) --tokens (\d+)", h)
    p = plan(load_recipe(RECIPES / name), machine=m[1], tokens=int(m[2]))
    assert p.fits, p.render()
    assert p.margin_bytes >= MIN_MARGIN * p.machine.budget_bytes, p.render()
    # The comment block quotes the planner: after a memory-model change, run
    # `python scripts/update_plan_quotes.py` and read the diff.
    said = re.search(r"# Planner: peak ([\d.]+) GiB of a ([\d.]+) GiB budget: fits, (\d+)% of the budget to spare", h)
    assert said, f"{name}: no '# Planner: peak X GiB of a Y GiB budget: fits, Z% ...' line"
    assert float(said[1]) == pytest.approx(p.peak_bytes / GIB, abs=0.06)
    assert float(said[2]) == pytest.approx(p.machine.budget_bytes / GIB, abs=0.06)
    assert int(said[3]) == round(100 * p.margin_bytes / p.machine.budget_bytes)
    t = re.search(r"# Time per epoch: ~([\d.]+) (h|min) for", h)
    hours = float(t[1]) / (60 if t[2] == "min" else 1)
    assert hours == pytest.approx(p.seconds_per_epoch / 3600, rel=0.05)


def test_recipe_reference_is_current():
    from mlx_ft.recipe_reference import markdown

    checked_in = (RECIPES.parent / "docs" / "recipes.md").read_text()
    assert checked_in == markdown(), "docs/recipes.md is stale: run `mlxft recipes --reference > docs/recipes.md`"


def test_recipe_reference_covers_every_key():
    from mlx_ft.recipe import field_docs, table_classes
    from mlx_ft.recipe_reference import markdown

    md = markdown()
    for table, cls in table_classes().items():
        assert f"## [{table}]" in md
        for key, doc in field_docs(cls).items():
            assert f"| `{key}` |" in md and " ".join(doc.split())[:40].replace("|", "\\|") in md


@pytest.mark.parametrize("argv", [[], ["--no-checkpointing"], ["--seeds"]])
def test_choosing_page_tables_are_the_planners(argv, monkeypatch, capsys):
    """docs/choosing.md quotes examples/plan_matrix.py (the seeds' table too); a planner change
    shows up here."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["plan_matrix.py", *argv])
    runpy.run_path(str(RECIPES.parent / "examples" / "plan_matrix.py"), run_name="__main__")
    table = capsys.readouterr().out.strip()
    assert table in (RECIPES.parent / "docs" / "choosing.md").read_text(), \
        f"docs/choosing.md is stale: run python scripts/update_plan_quotes.py\n{table}"
