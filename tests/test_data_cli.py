"""`mlxft data inspect` through click's CliRunner."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import chat_corpus  # noqa: E402


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_corpus(30)))
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": f"Item {i} is red. " * (1 + i % 7)}) + "\n" for i in range(10)))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[model]
path = "{tiny_model_dir}"
[data]
cache_dir = "{tmp_path / 'cache'}"
train = ["{data}", "{text}"]
weights = [3, 1]
valid_fraction = 0.1
max_seq_len = 48
truncation = "drop"
[training]
batch_size = 2
grad_accum = 2
""")
    return recipe


def test_inspect_text_report(recipe_file):
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe_file), "--show", "2"])
    print(result.output)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sources:" in out and "train.jsonl" in out and "notes.jsonl" in out
    assert "token lengths (train):" in out and "33-48" in out
    assert "dropped (longer than max_seq_len)" in out
    assert "steps per epoch (grad_accum 2)" in out and "% padding" in out
    # Not a terminal: supervised text is marked with plain brackets, no ANSI colour codes.
    assert "[[Item" in out and "<|im_end|>]]" in out and "\x1b[" not in out
    assert out.count("--- sample") == 2
    assert f"cache: miss, {recipe_file.parent / 'cache'}; data stage" in out
    again = CliRunner().invoke(main, ["data", "inspect", str(recipe_file), "--show", "0"])
    assert f"cache: hit, {recipe_file.parent / 'cache'}" in again.output


def test_inspect_json_report(recipe_file):
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe_file), "--json", "--show", "1",
                                       "--set", "data.pack=true"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    chat, notes = report["sources"]
    assert chat["format"] == "chat" and notes["format"] == "text" and notes["weight"] == 1
    assert chat["records"] == 27 and notes["records"] == 9  # 10% of each carved for validation
    assert chat["dropped"] > 0 and report["dropped"] == chat["dropped"] + notes["dropped"]
    assert chat["epoch_samples"] + notes["epoch_samples"] == report["train"]["samples"]
    assert chat["epoch_samples"] == round(report["train"]["samples"] * 3 / 4)
    assert sum(b["count"] for b in report["length_histogram"]) == report["train"]["samples"]
    assert 0 < report["supervised_fraction"] < 1
    b = report["batching"]
    assert b["pack"] and b["steps_per_epoch"] == -(-b["batches_per_epoch"] // 2)
    pieces = report["samples"][0]["pieces"]
    assert any(p["supervised"] for p in pieces) and not pieces[0]["supervised"]


def test_inspect_bad_data_exits_2_with_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_corpus(1)[0]) + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{tiny_model_dir}"\n[data]\ntrain = "{bad}"\n')
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe)])
    assert result.exit_code == 2
    assert f"error: {bad}:2: messages[0]: unknown role 'robot'" in result.output
    assert "Traceback" not in result.output
