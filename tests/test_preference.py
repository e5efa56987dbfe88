"""Preference tuning end to end: TRL's formats, `mlxft data inspect`, runs that learn, exact resume
after SIGKILL, the full fine-tune's frozen reference, and every bad input as one clear error."""

import json
import math
import random
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.recipe import _toml_value, load_recipe
from mlx_ft.runner import train

from conftest import kill_then_resume  # noqa: E402

GOOD = ["red", "green", "blue", "white", "black", "pink", "gold", "silver"]
BAD = ["yellow", "purple", "orange", "brown", "grey", "cyan", "beige", "olive"]


def colour_pairs(first: int, n: int, seed: int = 0) -> list[dict]:
    """A learnable preference: the chosen answer names a colour of GOOD, the rejected one of BAD."""
    rng = random.Random(seed + first)
    return [{"prompt": [{"role": "user", "content": f"What colour is item {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Item {i} is {rng.choice(GOOD)}."}],
             "rejected": [{"role": "assistant", "content": f"Item {i} is {rng.choice(BAD)}."}]}
            for i in range(first, first + n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_recipe(tmp: Path, model_dir, train_records, valid_records=None, name="r.toml", **sections) -> Path:
    tables = {
        "model": {"path": str(model_dir)},
        "adapter": {"rank": 4, "alpha": 8.0},
        "data": {"train": str(write_jsonl(tmp / "train.jsonl", train_records)), "max_seq_len": 64},
        "training": {"objective": "dpo", "batch_size": 4, "steps": 6, "learning_rate": 1e-3,
                     "report_every": 1, "lr_schedule": "constant"},
        "output": {"dir": str(tmp / "run")},
    }
    if valid_records:
        tables["data"]["valid"] = str(write_jsonl(tmp / "valid.jsonl", valid_records))
    for table, values in sections.items():
        tables.setdefault(table, {}).update(values)
    path = tmp / name
    path.write_text("".join(f"[{t}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in vals.items())
                            for t, vals in tables.items()))
    return path


def rows(run: Path, key: str = "loss") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_formats_render_as_trl_extracts_and_tokenizes_them(tmp_path, tiny_model_dir):
    """Standard, conversational and implicit-prompt pairs of the same content give the same tokens,
    with a chat template; without one, standard pairs are plain text with EOS, as TRL tokenizes them."""
    from trl.data_utils import extract_prompt

    from mlx_ft import data
    from mlx_ft.data.preference import detect, normalise, render

    conv = colour_pairs(0, 1)[0]
    implicit = {"chosen": conv["prompt"] + conv["chosen"], "rejected": conv["prompt"] + conv["rejected"]}
    standard = {k: v[0]["content"] for k, v in conv.items()}
    kinds = {"conversational": conv, "implicit prompt": implicit, "standard": standard}
    assert {k: detect(r) for k, r in kinds.items()} == {k: k for k in kinds}
    assert normalise(implicit, "implicit prompt", "x:1").prompt == extract_prompt(implicit)["prompt"]
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, [conv]))
    tok = data.recipe_tokenizer(recipe)
    rendered = {k: render(normalise(r, detect(r), "x:1"), tok) for k, r in kinds.items()}
    assert rendered["conversational"] == rendered["implicit prompt"] == rendered["standard"]
    prompt, chosen, rejected = rendered["standard"]
    assert tok.decode(chosen) == "Item 0 is " + conv["chosen"][0]["content"].split(" is ")[1] + "<|im_end|>\n"
    # a base model's tokenizer (no chat template): TRL's plain-text path
    tok._tokenizer.chat_template, tok.has_chat_template = None, False
    prompt, chosen, rejected = render(normalise(standard, "standard", "x:1"), tok)
    hf = tok._tokenizer
    assert prompt == hf(standard["prompt"])["input_ids"]
    assert prompt + chosen == hf(standard["prompt"] + standard["chosen"] + "<|im_end|>")["input_ids"]
    with pytest.raises(Exception, match="no chat template, so conversational records cannot be rendered"):
        render(normalise(conv, "conversational", "x:1"), tok)


def test_data_inspect_marks_the_chosen_and_rejected_completions(tmp_path, tiny_model_dir):
    pairs = colour_pairs(0, 6) + [{**colour_pairs(6, 1)[0], "rejected": colour_pairs(6, 1)[0]["chosen"]}]
    recipe = make_recipe(tmp_path, tiny_model_dir, pairs)
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe), "--show", "1"])
    assert result.exit_code == 0, result.output
    out = result.output  # the CLI prints the warning as one line
    assert re.search(r"warning: 1 preference pair\(s\) have the same chosen and rejected completion "
                     r"\(the first at .*train.jsonl:7\)", out), out
    assert "train: 6 pairs (2 sequences each)" in out and "1 with chosen == rejected (left out)" in out
    chosen, rejected = out.split("--- sample 0 chosen")[1].split("--- sample 0 rejected")
    for text, pair in ((chosen, pairs[0]["chosen"]), (rejected, pairs[0]["rejected"])):
        assert "What colour is item 0?<|im_end|>" in text  # the prompt, not supervised
        assert f"[[{pair[0]['content']}<|im_end|>\n]]" in text


@pytest.mark.parametrize("case, message", [
    ("sft record", "{p}:1: training.objective is 'dpo', which needs preference records"),
    ("mixed", "{p}:2: this record is not a preference record (['messages']) but the file's earlier records "
              "({p}:1) are; keep SFT and preference records in separate files"),
    ("long prompt", "{p}:1: the prompt alone is"),
    ("kto label", "{p}:1: 'label' must be true (desirable) or false (undesirable), found int 1"),
    ("unpaired for dpo", "{p}:1: an unpaired record (prompt, completion, label); training.objective = 'dpo' "
                         "needs chosen/rejected pairs"),
    ("pairs for sft", "{p}:1: a preference record (['prompt', 'chosen', 'rejected']), but "
                      "training.objective is 'sft'"),
    ("no prompt", "{p}:1: 'chosen' and 'rejected' share no first message"),
])
def test_bad_preference_data_is_one_clear_error(tmp_path, tiny_model_dir, case, message):
    sft = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    pair = colour_pairs(0, 1)[0]
    objective = "kto" if case == "kto label" else "sft" if case == "pairs for sft" else "dpo"
    records = {"sft record": [sft], "mixed": [pair, sft],
               "long prompt": [{**pair, "prompt": [{"role": "user", "content": "colour " * 80}]}],
               "kto label": [{"prompt": "Hi", "completion": "Hello", "label": 1}],
               "unpaired for dpo": [{"prompt": "Hi", "completion": "Hello", "label": True}],
               "pairs for sft": [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}],
               "no prompt": [{"chosen": pair["chosen"], "rejected": pair["rejected"]}]}[case]
    recipe = make_recipe(tmp_path, tiny_model_dir, records, training={"objective": objective})
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert message.format(p=tmp_path / "train.jsonl") in result.output, result.output


@pytest.mark.parametrize("sets, message", [
    (["training.beta=0.2"], "training.beta (from --set): only used with training.objective = 'dpo' or "
                            "'kto' or 'simpo', but training.objective is 'sft'"),
    (["training.objective=dpo", "training.label_smoothing=0.1"],
     "training.label_smoothing (from --set): only the 'robust' loss uses it (as in TRL), but "
     "training.loss_type is 'sigmoid'"),
    (["training.objective=orpo", "training.precompute_reference=true"],
     "training.precompute_reference (from --set): only used with training.objective = 'dpo' or 'kto', "
     "but training.objective is 'orpo'"),
    (["training.objective=dpo", "training.loss_type=robust", "training.label_smoothing=0.5"],
     "training.label_smoothing (from --set): must be in [0, 0.5)"),
    (["training.objective=dpo", "eval.at_end=true"],
     "eval.at_end (from --set): training.objective = 'dpo' validates on preference pairs, which [eval] "
     "does not score"),
])
def test_preference_keys_are_checked_against_the_objective(tmp_path, tiny_model_dir, sets, message):
    recipe = make_recipe(tmp_path, tiny_model_dir, colour_pairs(0, 1), training={"objective": "sft"})
    result = CliRunner().invoke(main, ["validate", str(recipe), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 2 and message in result.output, result.output


def test_dpo_learns_a_preference_and_reports_trl_metrics(tmp_path, tiny_model_dir):
    """Held-out reward accuracy: ~0.6 after the first step, >= 0.9 after eight (colours of GOOD over
    BAD; measured 0.62 -> 0.98). The first loss is exactly ln 2 with zero rewards (B = 0)."""
    path = make_recipe(tmp_path, tiny_model_dir, colour_pairs(0, 64), colour_pairs(100, 32),
                       training={"steps": 8, "eval_every": 1, "eval_batches": 8})
    result = train(load_recipe(path), progress=False)
    train_rows, evals = rows(result.run_dir), rows(result.run_dir, "val_loss")
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert train_rows[0]["rewards/chosen"] == train_rows[0]["rewards/margins"] == 0.0
    acc = [r["eval_rewards/accuracies"] for r in evals]
    assert acc[0] <= 0.75 and acc[-1] >= 0.9, acc
    keys = {"pairs", "trained_pairs", "pairs_per_sec", "rewards/rejected", "logps/chosen"}
    assert keys <= set(train_rows[-1])
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["trained_pairs"] == 32 and summary["final_metrics"]["rewards/accuracies"] >= 0.9
    svg = ET.parse(result.run_dir / "loss.svg").getroot()  # loss, rewards, accuracy: three charts
    assert len(svg.findall("{http://www.w3.org/2000/svg}svg")) == 3


@pytest.mark.parametrize("objective, method, extra", [
    ("kto", "lora", {"precompute_reference": True}),
    ("dpo", "full", {}),
    ("simpo", "dora", {}),
])
def test_objectives_and_references_train(tmp_path, tiny_model_dir, objective, method, extra):
    """KTO against precomputed reference log-probs, DPO of a full fine-tune against its frozen copy
    (loss ln 2 at the start: the copy is the policy), SimPO on DoRA: each trains, loss falling."""
    path = make_recipe(tmp_path, tiny_model_dir, colour_pairs(0, 16), adapter={"method": method},
                       training={"objective": objective, "steps": 6, "learning_rate": 2e-4 if method == "full"
                                 else 2e-3, **extra})
    result = train(load_recipe(path), progress=False)
    if objective == "dpo":
        assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert result.losses[-1] < result.losses[0], result.losses
    if extra:
        assert (result.run_dir / "reference-logps.npz").is_file()


def test_sigkill_then_resume_is_exact_with_packed_pairs(tmp_path, tiny_model_dir):
    sections = dict(training={"steps": 8, "save_every": 2, "grad_accum": 2, "batch_size": 2},
                    data={"pack": True, "max_seq_len": 128})
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    pairs = colour_pairs(0, 40)
    ref = train(load_recipe(make_recipe(ref_dir, tiny_model_dir, pairs, **sections)), progress=False)
    recipe = make_recipe(cut_dir, tiny_model_dir, pairs, **sections)
    kill_after = random.Random(time.time_ns()).randint(3, 7)
    done = kill_then_resume(recipe, cut_dir / "run", kill_after)
    assert done.returncode == 0, done.stderr
    ours = {r["step"]: r for r in rows(cut_dir / "run")}
    theirs = {r["step"]: r for r in rows(ref.run_dir)}
    assert sorted(ours) == list(range(1, 9)), f"killed after {kill_after} rows"
    for step, r in theirs.items():
        for key in ("last_loss", "rewards/margins", "logps/chosen"):
            assert abs(ours[step][key] - r[key]) <= 1e-6 * max(1.0, abs(r[key])), (kill_after, step, key)
    a = dict(mx.load(str(ref.adapter_dir / "adapters.safetensors")))
    b = dict(mx.load(str(cut_dir / "run" / "adapters" / "adapters.safetensors")))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-6


def test_dpo_with_checkpointed_blocks_trains_as_without(tmp_path, tiny_model_dir):
    """Checkpointed blocks take the trainable weights as inputs even with the adapters switched
    off, so the reference pass must carry no gradient: the backward pass would recompute it with
    the adapters on (and MLX refused the step: a VJP with respect to the tokens). Same losses."""
    losses = {}
    for checkpointing in (False, True):
        where = tmp_path / f"checkpointing-{checkpointing}"
        where.mkdir()
        path = make_recipe(where, tiny_model_dir, colour_pairs(0, 16),
                           training={"steps": 3, "grad_checkpointing": checkpointing})
        losses[checkpointing] = [r["loss"] for r in rows(train(load_recipe(path), progress=False).run_dir)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6), losses


def test_mlxft_eval_of_a_preference_run_says_what_it_scores(tmp_path, tiny_model_dir):
    path = make_recipe(tmp_path, tiny_model_dir, colour_pairs(0, 8), colour_pairs(100, 4), training={"steps": 1})
    run = train(load_recipe(path), progress=False).run_dir
    result = CliRunner().invoke(main, ["eval", str(run)])
    assert result.exit_code == 2 and "a dpo run's validation data are preference pairs, which `mlxft eval` " \
        "does not score" in result.output and "Traceback" not in result.output, result.output
