"""The notebook API and the CLI are the same operations: for one recipe they write the same run
directory (same files, same adapter weights, same losses), the same exports, the same plan, the
same data report and the same generated text."""

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_ft
from mlx_ft.cli import main

ROOT = Path(__file__).resolve().parent.parent
STEPS = {"training.steps": 4, "training.eval_every": 2, "training.save_every": 2, "training.report_every": 2,
         "eval.max_samples": 2, "eval.max_tokens": 8}  # the [eval] table at the end, kept short


@pytest.fixture(scope="module")
def in_repo():
    """The demo recipe's data paths are relative to the repository root."""
    old = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(old)


@pytest.fixture(scope="module")
def runs(in_repo, tmp_path_factory):
    """The demo trained for 4 steps twice: by `mlxft run` and by `train()`."""
    tmp = tmp_path_factory.mktemp("api")
    cli_dir, api_dir = tmp / "cli", tmp / "api"
    sets = [f"{k}={v}" for k, v in STEPS.items()]
    args = ["run", "recipes/demo.toml", "--set", f"output.dir={cli_dir}"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recipe = mlx_ft.load_recipe("recipes/demo.toml", overrides={**STEPS, "output.dir": str(api_dir)})
    result = mlx_ft.train(recipe, progress=False)
    return cli_dir, api_dir, result


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def same_tensors(a: Path, b: Path) -> None:
    import mlx.core as mx

    ta, tb = mx.load(str(a)), mx.load(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert mx.array_equal(ta[k], tb[k]).item(), k


def test_train_writes_the_same_run_directory(runs):
    cli_dir, api_dir, result = runs
    assert result.run_dir == api_dir and result.adapter_dir == api_dir / "adapters"
    assert files(cli_dir) == files(api_dir)
    assert {"adapters/adapters.safetensors", "summary.json", "metrics.jsonl", "recipe.resolved.toml",
            "eval.json", "eval_samples.jsonl"} <= files(api_dir)
    same_tensors(cli_dir / "adapters" / "adapters.safetensors", api_dir / "adapters" / "adapters.safetensors")
    cli_summary = json.loads((cli_dir / "summary.json").read_text())
    assert cli_summary.keys() == result.summary.keys()
    assert cli_summary["final_loss"] == result.summary["final_loss"] and result.summary["steps"] == 4
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(cli_dir) == losses(api_dir)
    assert "TrainResult(steps=4" in repr(result)


def test_fuse_and_export_adapter_write_the_same_files(runs, tmp_path):
    cli_dir, api_dir, _ = runs
    res = CliRunner().invoke(main, ["fuse", str(cli_dir), "--to", "safetensors", "--out", str(tmp_path / "cli-fused")])
    assert res.exit_code == 0, res.output
    out = mlx_ft.fuse(api_dir, to="safetensors", out=tmp_path / "api-fused")
    assert out == tmp_path / "api-fused" and files(out) == files(tmp_path / "cli-fused")
    same_tensors(tmp_path / "cli-fused" / "model.safetensors", out / "model.safetensors")

    res = CliRunner().invoke(main, ["export-adapter", str(cli_dir), "--to", "peft", "--out", str(tmp_path / "cli-peft")])
    assert res.exit_code == 0, res.output
    out = mlx_ft.export_adapter(api_dir, to="peft", out=tmp_path / "api-peft")
    assert files(out) == files(tmp_path / "cli-peft")
    same_tensors(tmp_path / "cli-peft" / "adapter_model.safetensors", out / "adapter_model.safetensors")


def test_generate_gives_the_cli_text(runs):
    cli_dir, api_dir, result = runs
    system, prompt = "Classify the review. Reply with JSON only.", "Review: The soup was cold."
    res = CliRunner().invoke(main, ["generate", str(cli_dir), "--system", system, "--prompt", prompt,
                                    "--max-tokens", "16"])
    assert res.exit_code == 0, res.output
    from_disk = mlx_ft.generate(api_dir, prompt, system=system, max_tokens=16)
    in_memory = mlx_ft.generate(result, prompt, system=system, max_tokens=16)
    assert res.output == from_disk.text + "\n"
    assert in_memory.text == from_disk.text


def test_plan_is_the_cli_plan(in_repo):
    res = CliRunner().invoke(main, ["plan", "recipes/qwen32b-qlora.toml", "--machine", "m4-max-128",
                                    "--tokens", "1000000", "--json"])
    assert res.exit_code == 0, res.output
    p = mlx_ft.plan(mlx_ft.load_recipe("recipes/qwen32b-qlora.toml"), machine="m4-max-128", tokens=1_000_000)
    assert json.loads(res.output) == json.loads(json.dumps(p.to_dict()))
    text = CliRunner().invoke(main, ["plan", "recipes/qwen32b-qlora.toml", "--machine", "m4-max-128",
                                     "--tokens", "1000000"]).output
    assert text.strip() == p.render().strip()
    page = p._repr_html_()  # Jupyter: the breakdown as a table, the verdict and the time
    # every term of the breakdown is a row or named on the "under 0.1 %" row; then total and budget
    assert all(k in page for k, v in p.breakdown().items() if v) and page.count("<tr>") >= 4
    assert "total peak" in page and "machine budget" in page
    assert "fits with" in page.lower() and "time per epoch" in page and "<script" not in page


def test_a_plan_that_does_not_fit_renders_its_advice_in_html(in_repo):
    p = mlx_ft.plan(mlx_ft.load_recipe("recipes/llama3-8b-lora.toml"), machine="m4-pro-24", tokens=1_000_000)
    assert not p.fits and p.suggestions
    page = p._repr_html_()
    assert "DOES NOT FIT" in page and "Any one of these fits" in page and "#cf222e" in page


def test_inspect_data_is_the_cli_report(in_repo):
    res = CliRunner().invoke(main, ["data", "inspect", "recipes/demo.toml", "--json", "--show", "2"])
    assert res.exit_code == 0, res.output
    report = mlx_ft.inspect_data("recipes/demo.toml", show=2)
    cli, api = json.loads(res.output), json.loads(json.dumps(report.to_dict()))
    assert cli.pop("seconds") >= 0 and api.pop("seconds") >= 0  # the data stage's time: 0.00 or 0.01 s
    assert cli == api
    text = CliRunner().invoke(main, ["data", "inspect", "recipes/demo.toml", "--show", "2"]).output

    def untimed(t):
        return re.sub(r"data stage [\d.]+ s", "data stage ? s", t).strip()

    assert untimed(repr(report)) == untimed(text)  # not a terminal: supervised text in [[ ]]
    page = report._repr_html_()
    assert "background:#d4f7d4" in page and "[[" not in page
    assert report["train"]["samples"] == 1000


def test_lazy_names_are_the_functions():
    from mlx_ft import evaluate, export_adapter, fuse, generate, inspect_data, plan, train

    import mlx_ft.evaluate  # noqa: F401
    import mlx_ft.generate  # noqa: F401  the submodule import must not shadow the function
    import mlx_ft.train  # noqa: F401

    assert callable(train) and train.__module__ == "mlx_ft.runner"  # the runner; mlx_ft.train is the loop
    assert mlx_ft.train is train and mlx_ft.generate is generate and mlx_ft.evaluate is evaluate
    assert [f.__name__ for f in (plan, inspect_data, fuse, export_adapter)] == \
        ["plan", "inspect_data", "fuse", "export_adapter"]
