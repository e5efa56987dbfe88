"""Recipes: collected validation, extends, --set, provenance, every shipped recipe is valid."""

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.errors import RecipeError
from mlx_ft.recipe import field_docs, load_recipe, resolved_toml, table_classes

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes, "recipes/ is empty"
    # The real-model recipes name data/train.jsonl, which a clone does not have: point them at the demo's.
    demo = ROOT / "examples" / "data"
    result = CliRunner().invoke(main, ["validate", *map(str, recipes),
                                       "--set", f"data.train={demo / 'train.jsonl'}",
                                       "--set", f"data.valid={demo / 'valid.jsonl'}"])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok") == len(recipes)


def test_validate_names_a_missing_data_file(tmp_path):
    rec = write(tmp_path / "r.toml", f'[model]\npath = "x/y"\n[data]\ntrain = "{tmp_path / "t.jsonl"}"\n'
                                      'valid = "nowhere/valid.jsonl"\n')
    (tmp_path / "t.jsonl").write_text("{}\n")
    result = CliRunner().invoke(main, ["validate", str(rec)])
    assert result.exit_code == 2, result.output
    assert f"{rec}: 1 problem:\n  - data.valid: nowhere/valid.jsonl does not exist" in result.output
    assert "--set data.valid=PATH" in result.output and "Traceback" not in result.output


def test_validate_deep_reads_every_record_and_renders_the_first(tmp_path, tiny_model_dir, chat_jsonl):
    train, valid = chat_jsonl
    rec = write(tmp_path / "r.toml", f'[model]\npath = "{tiny_model_dir}"\n[data]\ntrain = "{train}"\n'
                                      f'valid = "{valid}"\n')
    result = CliRunner().invoke(main, ["validate", str(rec), "--deep"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{rec}: ok (48 records read in 2 sources, the first 3 of each rendered)\n"
    with open(valid, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}\n')
    result = CliRunner().invoke(main, ["validate", str(rec), "--deep"])
    assert result.exit_code == 2
    assert f"{valid}:9: messages[1] (assistant): 'content' must be a string" in result.output


@pytest.mark.parametrize("method, base", [("qlora", "lora"), ("QDoRA", "dora")])
def test_a_quantized_method_name_gets_the_recipe_for_it(method, base):
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes" / "demo.toml", [f"adapter.method={method}"])
    (problem,) = e.value.problems
    assert f"set adapter.method = '{base}' and model.quantize = {{ bits = 4, group_size = 64 }}" in problem
    assert "did you mean" not in problem


def test_recipes_lists_relative_paths_aligned_with_whole_sentences(monkeypatch):
    from mlx_ft.cli import first_sentence

    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0
    entries: list[list[str]] = []
    for line in result.output.splitlines():
        if line.startswith(" "):
            entries[-1].append(line)
        else:
            entries.append([line])
    files = sorted((ROOT / "recipes").glob("*.toml"))
    assert [e[0].split()[0] for e in entries] == [f"recipes/{f.name}" for f in files]
    col = len(entries[0][0]) - len(entries[0][0].split(maxsplit=1)[1])
    for entry, f in zip(entries, files):
        assert all(len(ln) - len(ln.lstrip()) == col for ln in entry[1:])  # continuation under the text
        text = " ".join([entry[0][col:], *(ln.strip() for ln in entry[1:])])
        assert len(entry[0]) - len(entry[0][col:]) == col and text == first_sentence(f.read_text())
        assert text.endswith(".")


def test_misspelled_key_names_key_path_and_suggestion(tmp_path):
    bad = write(tmp_path / "bad.toml", '[model]\npth = "x/y"\n[data]\ntrain = "t.jsonl"\n')
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "model.pth: unknown key in [model]; did you mean 'model.path'?" in result.output
    assert "model.path: required, but missing" in result.output
    assert str(bad) in result.output
    assert "Traceback" not in result.output


def test_all_problems_reported_together(tmp_path):
    bad = write(tmp_path / "r.toml", """
rank = 8
[model]
path = "m"
quantize = { bits = 3, group_size = 60 }
[adapter]
method = "ful"
rank = "8"
dropout = 1.5
[data]
train = "t.jsonl"
max_seq_len = 1.5
[training]
batch_sise = 3
epochs = 1
steps = 3
""")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert e.value.problems == [
        "rank: unknown key in the top level; did you mean 'adapter.rank'?",
        "adapter.method: expected one of 'lora', 'dora', 'full', found string \"ful\"; did you mean 'full'?",
        "adapter.rank: expected an integer, found string \"8\"",
        "data.max_seq_len: expected an integer, found number 1.5",
        "training.batch_sise: unknown key in [training]; did you mean 'training.batch_size'?",
        "model.quantize.group_size: expected 32, 64 or 128, found 60",
        "adapter.dropout: must be in [0, 1), found 1.5",
        "training.steps: conflicts with training.epochs; give one of them",
    ]


def test_full_finetune_of_quantized_base_is_refused(tmp_path):
    bad = write(tmp_path / "r.toml", '[model]\npath = "m"\nquantize = { bits = 4 }\n'
                                     '[adapter]\nmethod = "full"\n[data]\ntrain = "t.jsonl"\n')
    with pytest.raises(RecipeError, match="'full' fine-tuning cannot train a quantized base"):
        load_recipe(bad)


def test_extends_merges_tables_key_by_key_with_provenance(tmp_path):
    base = write(tmp_path / "base.toml", '[model]\npath = "org/base"\n[training]\nbatch_size = 2\n'
                                         'learning_rate = 1e-4\n[data]\ntrain = "a.jsonl"\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub / "child.toml", 'extends = "../base.toml"\n[training]\nlearning_rate = 3e-4\n')
    r = load_recipe(child, ["training.batch_size=8", "adapter.targets=[\"q_proj\", \"v_proj\"]"])
    assert (r.model.path, r.training.batch_size, r.training.learning_rate) == ("org/base", 8, 3e-4)
    assert r.adapter.targets == ["q_proj", "v_proj"]
    assert r.provenance["model.path"] == f"extends {base}"
    assert r.provenance["training.learning_rate"] == f"file {child}"
    assert r.provenance["training.batch_size"] == "--set"
    assert r.provenance["adapter.rank"] == "default"
    assert r.output.dir == "runs/child"
    text = resolved_toml(r)
    assert 'path = "org/base"  # extends ' in text
    assert "batch_size = 8  # --set" in text
    # the resolved recipe is itself a valid recipe that gives the same values
    again = load_recipe(write(tmp_path / "resolved.toml", text))
    assert again.to_dict() == r.to_dict()


def test_later_layer_replaces_alternative_key(tmp_path):
    rec = write(tmp_path / "r.toml", '[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n[training]\nepochs = 3\n')
    r = load_recipe(rec, ["training.steps=10"])
    assert (r.training.epochs, r.training.steps) == (None, 10)
    assert r.provenance["training.epochs"].startswith("dropped")


def test_extends_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.toml")
    write(tmp_path / "c.toml", 'extends = "nope.toml"\n')
    with pytest.raises(RecipeError, match=r"recipe file not found \(named by `extends` in"):
        load_recipe(tmp_path / "c.toml")


def test_bad_set_value_is_reported_with_origin(tmp_path):
    rec = write(tmp_path / "r.toml", '[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(rec, ["training.learning_rate=-1"])
    assert e.value.problems == ["training.learning_rate (from --set): must be > 0, found -1.0"]
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(rec, ["training.learning_rate"])


def test_every_field_has_help_text():
    for table, cls in table_classes().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{table}.{f.name} has no docstring"


@pytest.mark.parametrize("content, message", [
    (None, "recipe file not found"),
    ('[model\npath = "x"', "TOML syntax error"),
    ('[model]\npath = 3\n[data]\ntrain = "t.jsonl"\n', 'model.path: expected a string, found integer 3'),
])
def test_cli_bad_recipe_one_block_exit_2(tmp_path, content, message):
    path = tmp_path / "r.toml"
    if content is not None:
        path.write_text(content)
    for cmd in (["validate", str(path)], ["run", str(path)]):
        result = CliRunner().invoke(main, cmd)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path / "r.toml", '[model]\npath = "x"\n\n[data\n')
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert "at line 4" in result.output
