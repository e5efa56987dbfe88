"""`mlxft eval` / `evaluate()`: figures checked against hand-computed expectations.

Two tiny models are trained (full fine-tune, a few seconds each) on the same three prompts: one
to give the reference answers, one to give chosen wrong ones. Their exact, normalised and JSON
figures are then known in advance, and the loss is checked against a NumPy cross-entropy of the
model's own logits.
"""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_ft import evaluate, recipe_from_dict, train
from mlx_ft.cli import main
from mlx_ft.evaluate import normalize, score

SYSTEM = {"role": "system", "content": "Answer with JSON."}


def conv(*pairs):
    msgs = [SYSTEM]
    for user, answer in pairs:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def dialogue(answers):
    """Three records, four assistant turns: the third record has a follow-up question."""
    a1, a2, a3, a4 = answers
    return [conv(("What colour is item 1?", a1)), conv(("What colour is item 2?", a2)),
            conv(("What colour is item 3?", a3), ("Sure?", a4))]


RIGHT = ['{"colour": "red", "size": "big"}', '{"colour": "green", "size": "small"}',
         '{"colour": "blue", "size": "big"}', "Yes, blue."]
WRONG = ['{"colour": "red", "size": "small"}',   # valid JSON, colour right, size wrong
         "green and small",                      # not JSON, no field right
         '{"Colour": "blue", "size": "big"}',    # equal once normalised; JSON differs (key case); size right
         "yes, blue"]                            # equal once normalised


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_dir(tmp_path_factory, model_dir, name, answers, at_end=False):
    tmp = tmp_path_factory.mktemp(name)
    right = write(tmp / "right.jsonl", dialogue(RIGHT))
    trained_on = write(tmp / "train.jsonl", dialogue(answers))
    recipe = recipe_from_dict({
        "model": {"path": str(model_dir)}, "adapter": {"method": "full"},
        "data": {"train": str(trained_on), "valid": str(right)},
        "training": {"steps": 60, "batch_size": 3, "learning_rate": 3e-3, "lr_schedule": "constant",
                     "report_every": 60},
        "output": {"dir": str(tmp / "run")}, "eval": {"at_end": at_end}})
    return train(recipe, progress=False)


@pytest.fixture(scope="module")
def exact(tmp_path_factory, tiny_model_dir):
    """Trained on the references; its run evaluates itself at the end ([eval] at_end)."""
    return run_dir(tmp_path_factory, tiny_model_dir, "exact", RIGHT, at_end=True)


@pytest.fixture(scope="module")
def wrong(tmp_path_factory, tiny_model_dir):
    return run_dir(tmp_path_factory, tiny_model_dir, "wrong", WRONG)


def test_a_model_that_answers_exactly(exact):
    figures = json.loads((exact.run_dir / "eval.json").read_text())  # written by the [eval] table
    assert exact.summary["eval"] == figures
    assert (figures["records"], figures["turns"]) == (3, 4)
    assert figures["exact_match"] == figures["normalized_match"] == 1.0
    assert figures["json_valid"] == figures["json_match"] == figures["field_accuracy"] == 1.0
    assert figures["fields"] == {"colour": 1.0, "size": 1.0}
    lines = [json.loads(x) for x in (exact.run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in lines] == RIGHT and [s["turn"] for s in lines] == [2, 2, 2, 4]


def test_a_model_that_answers_wrong(wrong):
    res = evaluate(wrong.run_dir)
    assert [s["answer"] for s in res.samples] == WRONG  # it learned the wrong answers; now score them
    f = res.figures
    assert f["counts"] == {"exact": 0, "normalized": 2, "json_turns": 3, "json_valid": 2, "json_match": 0,
                           "fields": {"colour": [1, 3], "size": [1, 3]}}
    assert (f["exact_match"], f["normalized_match"]) == (0.0, 0.5)
    assert (f["json_valid"], f["json_match"]) == (round(2 / 3, 6), 0.0)
    assert f["fields"] == {"colour": round(1 / 3, 6), "size": round(1 / 3, 6)}
    assert f["field_accuracy"] == round(2 / 6, 6)


def reference_loss(result, path):
    """Mean cross-entropy per supervised token from the model's full logits, in float64 NumPy."""
    import mlx.core as mx

    from mlx_ft.data.formats import read_file
    from mlx_ft.data.render import render
    from mlx_ft.recipe import DataConfig

    total, count = 0.0, 0
    for rec in read_file(path, DataConfig())[1]:
        tokens, mask = render(rec, result.tokenizer, "assistant")
        logits = np.array(result.model(mx.array([tokens[:-1]])).astype(mx.float32), dtype=np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(1, len(tokens)):
            if mask[t]:
                total -= logp[t - 1, tokens[t]]
                count += 1
    return total / count, count


@pytest.mark.parametrize("which", ["exact", "wrong"])
def test_loss_and_perplexity_are_the_cross_entropy(which, request):
    result = request.getfixturevalue(which)
    f = evaluate(result, write=False).figures
    loss, count = reference_loss(result, result.run_dir.parent / "right.jsonl")
    assert f["supervised_tokens"] == count
    assert f["loss"] == pytest.approx(loss, rel=1e-5)
    assert f["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_cli_json_samples_and_base_table(exact, wrong):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(wrong.run_dir), "--json", "--max-samples", "2"])
    assert res.exit_code == 0, res.output
    f = json.loads(res.output)
    assert f == json.loads((wrong.run_dir / "eval.json").read_text())
    assert (f["records"], f["turns"], f["counts"]["exact"]) == (2, 2, 0)
    assert len((wrong.run_dir / "eval_samples.jsonl").read_text().splitlines()) == 2
    assert not [p for p in wrong.run_dir.iterdir() if ".tmp-" in p.name]

    res = runner.invoke(main, ["eval", str(exact.run_dir), "--base"])  # eval.json: the [eval] table's
    assert res.exit_code == 0, res.output
    base = json.loads((exact.run_dir / "eval-base.json").read_text())
    assert base["adapter"] is None and base["exact_match"] == 0.0
    assert base["loss"] > exact.summary["eval"]["loss"] + 1
    assert "base  fine-tuned" in res.output and "exact match" in res.output
    assert [ln.split()[-2:] for ln in res.output.splitlines() if "exact match" in ln] == [["0.0%", "100.0%"]]


def test_user_errors_exit_2(exact, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "no adapter_config.json" in res.output
    res = runner.invoke(main, ["eval", str(exact.adapter_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "nope.jsonl does not exist" in res.output
    res = runner.invoke(main, ["eval", str(exact.run_dir), "--max-samples", "0"])
    assert res.exit_code == 2 and "--max-samples: must be >= 1" in res.output


def test_score_rules():
    assert normalize("  Yes,\tBLUE!! ") == "yes blue" == normalize("yes blue")
    assert score('{"a": 1, "b": [2]}', '{"b": [2], "a": 1}') == {
        "exact": False, "normalized": False, "json_valid": True, "json_match": True,
        "fields": {"a": True, "b": True}}
    assert score('[1, 2]', "[1,2]") == {"exact": False, "normalized": True, "json_valid": True,
                                        "json_match": True}
    assert score("42", "42") == {"exact": True, "normalized": True}  # a JSON scalar is scored as text
