"""The training loop end to end on a tiny model: artefacts, methods, exact resume, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_ft import checkpoint as ckpt
from mlx_ft.cli import main
from mlx_ft.errors import CheckpointError, ModelError, TrainingError
from mlx_ft.recipe import _toml_value, load_recipe
from mlx_ft.runner import train
from mlx_ft.train import metal_memory_plan

from conftest import kill_then_resume  # noqa: E402


def make_recipe(tmp_path: Path, model_dir, files, name="r.toml", **sections) -> Path:
    """Write a recipe for the tiny model; `sections` = {"training": {...}, ...} override defaults."""
    train_file, valid_file = files
    tables = {
        "model": {"path": str(model_dir)},
        "adapter": {"rank": 4, "alpha": 8.0},
        "data": {"train": str(train_file), "valid": str(valid_file), "max_seq_len": 128},
        "training": {"batch_size": 4, "steps": 12, "learning_rate": 5e-3, "report_every": 2,
                     "warmup_steps": 0, "lr_schedule": "constant"},
        "output": {"dir": str(tmp_path / "run")},
    }
    for table, values in sections.items():
        tables.setdefault(table, {}).update(values)
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


ADAPTER_FILES = {"adapters.safetensors", "adapter_config.json"}


def test_run_writes_exact_run_dir_and_loss_falls(tmp_path, tiny_model_dir, chat_jsonl):
    recipe = make_recipe(tmp_path, tiny_model_dir, chat_jsonl,
                         training={"eval_every": 6, "save_every": 4, "keep_checkpoints": 2})
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    ckpt_files = {"adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json"}
    assert files_under(run) == (
        {"recipe.resolved.toml", "metrics.jsonl", "summary.json", "loss.svg", ".mlx_ft", ".mlx_ft.lock"}
        | {f"adapters/{f}" for f in ADAPTER_FILES} | {f"adapters-best/{f}" for f in ADAPTER_FILES}
        | {f"checkpoints/step-{s:06d}/{f}" for s in (4, 8) for f in ckpt_files}
    )
    assert "trainable parameters: 8,192 of" in result.output
    assert "done: 12 steps; train loss " in result.output
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]  # step 0: training.eval_at_start
    summary = json.loads((run / "summary.json").read_text())
    for key in ("final_step_loss", "final_window_loss", "initial_val_loss", "best_val_loss", "best_step",
                "trained_tokens", "wall_time_sec", "tokens_per_sec", "peak_memory_bytes",
                "trainable_parameters", "data"):
        assert summary[key] is not None, key
    assert summary["steps"] == 12 and summary["trainable_parameters"] == 8192
    assert summary["peak_memory_bytes"] > 0
    assert summary["data"]["cache"] in ("hit", "miss") or summary["data"]["cache"].startswith("partial")
    assert summary["data"]["seconds"] >= 0  # files earlier tests cached make "partial"
    svg = ET.parse(run / "loss.svg").getroot()  # one point per train report, one per evaluation
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert [len(line.get("points").split()) for line in lines] == [6, 3]
    state = json.loads((run / "checkpoints/step-000008/state.json").read_text())
    assert state["loop"]["step"] == 8 and state["recipe"]["adapter.rank"] == 4


def test_adapter_loads_in_mlx_lm_with_equal_logits(tmp_path, tiny_model_dir, chat_jsonl):
    from mlx_lm import load

    result = train(load_recipe(make_recipe(tmp_path, tiny_model_dir, chat_jsonl)), progress=False)
    theirs, _ = load(str(tiny_model_dir), adapter_path=str(result.adapter_dir))
    x = mx.array([[5, 17, 42, 9, 100, 7, 3, 250]])
    result.model.eval()
    ours = result.model(x)
    assert mx.abs(ours - theirs(x)).max().item() < 1e-5
    base, _ = load(str(tiny_model_dir))
    assert mx.abs(ours - base(x)).max().item() > 1e-3  # the adapter is not an identity


def _param_count(model_dir: Path, method: str, rank: int = 4) -> int:
    """Analytic trainable-parameter count of the tiny llama for the given method."""
    c = json.loads((model_dir / "config.json").read_text())
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # (in, out) of q,k,v,o,gate,up,down
    if method == "full":
        per = sum(a * b for a, b in shapes) + 2 * h  # + the two RMSNorm weights
    else:
        per = sum(rank * (a + b) for a, b in shapes) + (sum(b for _, b in shapes) if method == "dora" else 0)
    return per * c["num_hidden_layers"]


@pytest.mark.parametrize("method, quantize", [
    ("dora", None), ("lora", {"bits": 4, "group_size": 32}), ("lora", {"bits": 8, "group_size": 32}),
    ("dora", {"bits": 4, "group_size": 32}), ("full", None),
])
def test_methods_train_with_falling_loss(tmp_path, tiny_model_dir, chat_jsonl, method, quantize):
    model = {"path": str(tiny_model_dir)}
    if quantize:
        model["quantize"] = quantize
    lr = 2e-3 if method == "full" else 5e-3
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, chat_jsonl, model=model,
                                     adapter={"method": method}, training={"learning_rate": lr}))
    result = train(recipe, progress=False)
    assert result.summary["trainable_parameters"] == _param_count(tiny_model_dir, method)
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == method and cfg["quantize"] == (quantize and {"mode": "affine", **quantize})


def test_full_finetune_of_prequantized_base_is_refused(tmp_path, tiny_model_dir, chat_jsonl):
    import mlx_lm.utils as mu

    from mlx_ft.models import apply_adapters, quantize
    from mlx_ft.recipe import AdapterConfig

    model, _ = mu.load(str(tiny_model_dir))
    quantize(model, 4, 32)
    with pytest.raises(ModelError, match="'full' cannot train a quantized base"):
        apply_adapters(model, AdapterConfig(method="full"))


def _run_cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mlx_ft", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _adapter(path: Path) -> dict:
    return dict(mx.load(str(path / "adapters.safetensors")))


def test_sigkill_at_random_step_then_resume_is_exact(tmp_path, tiny_model_dir, chat_jsonl):
    sections = dict(training={"steps": 16, "report_every": 1, "save_every": 3, "grad_accum": 2,
                              "lr_schedule": "cosine", "warmup_steps": 2},
                    adapter={"dropout": 0.1},
                    data={"cache_dir": str(tmp_path / "data-cache")})  # the reference run fills it
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    ref = train(load_recipe(make_recipe(ref_dir, tiny_model_dir, chat_jsonl, **sections)), progress=False)
    recipe = make_recipe(cut_dir, tiny_model_dir, chat_jsonl, **sections)
    kill_after = random.Random(time.time_ns()).randint(4, 14)
    done = kill_then_resume(recipe, cut_dir / "run", kill_after)
    assert done.returncode == 0, done.stderr
    ours = {r["step"]: r["last_loss"] for r in train_rows(cut_dir / "run")}
    theirs = {r["step"]: r["last_loss"] for r in train_rows(ref.run_dir)}
    assert sorted(ours) == list(range(1, 17)), f"killed after {kill_after} rows"
    assert json.loads((cut_dir / "run" / "summary.json").read_text())["data"]["cache"] == "hit"
    assert max(abs(ours[s] - theirs[s]) for s in theirs) <= 1e-6, (kill_after, ours, theirs)
    a, b = _adapter(ref.adapter_dir), _adapter(cut_dir / "run" / "adapters")
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-6


def test_truncated_checkpoint_is_skipped_for_previous(tmp_path, tiny_model_dir, chat_jsonl):
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, chat_jsonl,
                                     training={"steps": 9, "save_every": 3}))
    first = train(recipe, progress=False)
    final = _adapter(first.adapter_dir)
    newest = tmp_path / "run/checkpoints/step-000006/adapters.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a copy cut short
    with pytest.warns(UserWarning, match="step-000006.*does not match its checksum"):
        assert ckpt.latest(tmp_path / "run").name == "step-000003"
    (tmp_path / "run/summary.json").unlink()  # pretend the process died after step 6
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        again = train(recipe, resume=True, progress=False)
    assert again.losses and len(again.losses) == 6  # steps 4..9 were redone
    assert all(mx.array_equal(final[k], v).item() for k, v in _adapter(again.adapter_dir).items())


def test_resume_refuses_changes_that_matter_and_reports_harmless_ones(tmp_path, tiny_model_dir, chat_jsonl):
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, training={"steps": 6, "save_every": 3})
    train(load_recipe(path), progress=False)
    (tmp_path / "run/summary.json").unlink()
    with pytest.raises(CheckpointError, match=r"adapter\.rank: checkpoint has 4, recipe has 8"):
        train(load_recipe(path, ["adapter.rank=8"]), resume=True, progress=False)
    with pytest.warns(UserWarning, match=r"training\.eval_every: checkpoint has None, recipe has 2"):
        train(load_recipe(path, ["training.eval_every=2"]), resume=True, progress=False)


def test_finished_run_dir_is_refused_unless_overwrite(tmp_path, tiny_model_dir, chat_jsonl):
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, training={"steps": 2})
    assert CliRunner().invoke(main, ["run", str(path)]).exit_code == 0
    again = CliRunner().invoke(main, ["run", str(path)])
    assert again.exit_code == 2
    assert "already holds a finished run; pass --resume to continue it, --overwrite" in again.output
    assert CliRunner().invoke(main, ["run", str(path), "--overwrite"]).exit_code == 0


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, chat_jsonl):
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, training={"steps": 100000, "report_every": 1})
    proc = _run_cli(["run", str(path)])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "stopped by SIGTERM at step" in err and "--resume" in err
    step = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (tmp_path / f"run/checkpoints/step-{step:06d}/state.json").is_file()


def test_nan_loss_stops_naming_the_step(tmp_path, tiny_model_dir, chat_jsonl):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = dict(mx.load(str(broken / "model.safetensors")))
    w = weights["model.layers.1.mlp.down_proj.weight"]
    weights["model.layers.1.mlp.down_proj.weight"] = mx.where(mx.arange(w.shape[1]) == 3, mx.nan, w)
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    path = make_recipe(tmp_path, broken, chat_jsonl, training={"steps": 5})
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 \(epoch 0, batch 0\); the last good "
                                            r"checkpoint is kept in .*checkpoints"):
        train(load_recipe(path), progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_early_stopping_after_patience(tmp_path, tiny_model_dir, chat_jsonl):
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl,
                       training={"learning_rate": 1e-12, "steps": 20, "eval_every": 2,
                                 "early_stopping_patience": 2})
    result = train(load_recipe(path), progress=False)
    assert result.summary["steps"] == 6  # best at step 2, no better at 4 and 6
    assert result.summary["best_step"] == 2
    assert (result.run_dir / "adapters-best" / "adapters.safetensors").is_file()


def test_targets_that_match_nothing_stop_before_any_run_dir(tmp_path, tiny_model_dir, chat_jsonl):
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, adapter={"targets": ["qq_proj"]})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    assert "adapter.targets: ['qq_proj'] matched no module in the last 2 blocks; linear modules there: " \
           "mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj, self_attn.o_proj, " \
           "self_attn.q_proj, self_attn.v_proj" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case, message", [
    ("model", "model.path: {p} does not exist"),
    ("missing", "{p}"),
    ("empty", "{p}"),
    ("not-json", "{p}:2"),
    ("no-messages", "{p}:1"),
])
def test_bad_input_is_one_clear_error_and_leaves_no_run_dir(tmp_path, tiny_model_dir, chat_jsonl, case, message):
    train_file = tmp_path / "bad.jsonl"
    model = tiny_model_dir
    if case == "model":
        model, p = tmp_path / "no-model", tmp_path / "no-model"
    else:
        p = train_file
        if case == "empty":
            train_file.write_text("")
        elif case == "not-json":
            train_file.write_text(chat_jsonl[0].read_text().splitlines()[0] + "\n{not json\n")
        elif case == "no-messages":
            train_file.write_text('{"msgs": []}\n')
    path = make_recipe(tmp_path, model, (train_file if case != "model" else chat_jsonl[0], chat_jsonl[1]))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert message.format(p=p) in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_metal_memory_plan_from_mac_values():
    # mx.device_info() of a 128 GB M4 Max on macOS 26: a 107.52 GiB recommended working set
    mac = {"architecture": "applegpu_g16s", "memory_size": 137438953472,
           "max_recommended_working_set_size": 115448725504}
    wired, throttle, stop_at = metal_memory_plan(mac)
    assert wired == 115448725504
    # MLX's default memory limit there is min(1.5 x 107.52, 0.95 x 128) GiB = 121.6 GiB, past the
    # working set; the loop lowers it under the stop line so MLX stops scheduling ahead first.
    assert throttle == int(115448725504 * 0.90) < stop_at == int(115448725504 * 0.95) < wired
    assert metal_memory_plan({"memory_size": 25769803776}) is None  # CPU backend: no working set


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "adafactor"])
def test_every_optimizer_trains(tmp_path, tiny_model_dir, chat_jsonl, optimizer):
    lr = {"sgd": 0.5, "adafactor": 1e-2}.get(optimizer, 5e-3)
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl,
                       training={"optimizer": optimizer, "learning_rate": lr, "steps": 10,
                                 "grad_checkpointing": optimizer == "adam"})
    result = train(load_recipe(path), progress=False)
    assert result.losses[-1] < result.losses[0] - 0.3, result.losses


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3, 0.0]),
    ("cosine", [0.0, 0.5, 1.0, 0.75, 0.25, 0.0]),
])
def test_schedules_warm_up_then_decay(schedule, expected):
    from mlx_ft.recipe import TrainingConfig
    from mlx_ft.step import build_optimizer

    opt = build_optimizer(TrainingConfig(learning_rate=1.0, warmup_steps=2, lr_schedule=schedule), total_steps=5)
    opt.init({"w": mx.zeros((1,))})
    lrs = []
    for _ in range(6):  # the learning rate each optimizer step uses, steps 0..5
        opt.apply_gradients({"w": mx.zeros((1,))}, {"w": mx.zeros((1,))})
        lrs.append(opt.learning_rate.item())
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_rslora_scale_and_moe_experts_train(tmp_path, chat_jsonl):
    from conftest import chat_corpus, corpus_texts
    from mlx_ft.models import lora_scale
    from mlx_ft.recipe import AdapterConfig
    from mlx_ft.tiny import build_tiny_model

    assert lora_scale(AdapterConfig(rank=16, alpha=32)) == 2.0
    assert lora_scale(AdapterConfig(rank=16, alpha=32, rslora=True)) == 8.0
    moe = build_tiny_model(tmp_path / "moe", corpus_texts(chat_corpus(100)), family="qwen3_moe")
    path = make_recipe(tmp_path, moe, chat_jsonl, adapter={"rslora": True})
    result = train(load_recipe(path), progress=False)
    keys = json.loads((result.adapter_dir / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert any("switch_mlp" in k for k in keys), keys  # the expert layers are adapted
    assert result.losses[-1] < result.losses[0] - 0.3, result.losses


def test_recipes_command_lists_bundled_recipes():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0
    assert "demo.toml" in result.output and "The offline demo" in result.output


def test_bf16_base_stays_bf16_and_packs(tmp_path, tiny_model_dir, chat_jsonl):
    """A bf16 full fine-tune keeps bf16 weights and optimizer state; packing is accepted in bf16."""
    import shutil

    bf16 = tmp_path / "bf16-model"
    shutil.copytree(tiny_model_dir, bf16)
    weights = {k: v.astype(mx.bfloat16) for k, v in mx.load(str(bf16 / "model.safetensors")).items()}
    mx.save_safetensors(str(bf16 / "model.safetensors"), weights, metadata={"format": "pt"})
    path = make_recipe(tmp_path, bf16, chat_jsonl, adapter={"method": "full"},
                       data={"pack": True}, training={"steps": 4, "save_every": 3, "learning_rate": 1e-3})
    result = train(load_recipe(path), progress=False)
    assert result.losses[-1] < result.losses[0]
    trained = mx.load(str(result.adapter_dir / "adapters.safetensors"))
    assert {v.dtype for v in trained.values()} == {mx.bfloat16}
    opt = mx.load(str(tmp_path / "run/checkpoints/step-000003/optimizer.safetensors"))
    assert {v.dtype for k, v in opt.items() if k.endswith((".m", ".v"))} == {mx.bfloat16}


def test_adapter_init_depends_on_the_seed_alone(tmp_path, chat_jsonl, monkeypatch):
    """The first run of a builtin model builds it (drawing random weights); it must not shift
    the adapter's initialisation compared with a later run that finds the model cached."""
    monkeypatch.setenv("MLX_FT_CACHE", str(tmp_path / "cache"))
    path = make_recipe(tmp_path, "builtin:tiny-llama", chat_jsonl, training={"steps": 2})
    a = _adapter(train(load_recipe(path), progress=False).adapter_dir)  # builds the model
    b = _adapter(train(load_recipe(path), overwrite=True, progress=False).adapter_dir)  # cached
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_lora_on_a_prequantized_checkpoint(tmp_path, tiny_model_dir, chat_jsonl):
    """QLoRA on a base saved 4-bit (as mlx-community repos are), with nothing in [model] quantize."""
    import contextlib
    import io

    from mlx_lm import convert

    q4 = tmp_path / "tiny-4bit"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(tiny_model_dir), str(q4), quantize=True, q_group_size=32, q_bits=4)
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    result = train(load_recipe(make_recipe(tmp_path, q4, chat_jsonl)), progress=False)
    assert result.summary["trainable_parameters"] == _param_count(tiny_model_dir, "lora")
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    with pytest.raises(ModelError, match="'full' cannot train a quantized base"):
        train(load_recipe(make_recipe(tmp_path, q4, chat_jsonl, name="full.toml", adapter={"method": "full"})),
              overwrite=True, progress=False)


def test_steps_per_epoch_are_the_ones_the_data_report_gives(tmp_path, tiny_model_dir, chat_jsonl):
    """10 batches with grad_accum 3 are 4 optimizer steps per epoch, in the loop as in the report."""
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl)
    recipe = load_recipe(path, ["training.epochs=1", "training.grad_accum=3"])  # --set epochs drops steps
    result = train(recipe, progress=False)
    assert result.summary["data"]["batching"]["batches_per_epoch"] == 10  # 40 records, batch 4
    assert result.summary["steps"] == result.summary["data"]["batching"]["steps_per_epoch"] == 4


def test_loss_normalization_sets_the_gradient_divisor(tmp_path, tiny_model_dir, chat_jsonl):
    """One SGD step from LoRA's zero B: B = -lr x (summed gradient) / divisor, so the two
    normalisations' B differ by exactly (the step's supervised tokens) / (the epoch's mean per step)."""
    runs = {}
    for norm in ("step", "epoch"):
        path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, name=f"{norm}.toml",
                           adapter={"rank": 4, "alpha": 8.0, "dropout": 0.0},
                           training={"steps": 1, "optimizer": "sgd", "learning_rate": 1.0, "max_grad_norm": 0,
                                     "report_every": 1, "loss_normalization": norm},
                           output={"dir": str(tmp_path / norm)})
        result = train(load_recipe(path), progress=False)
        b = {k: v for k, v in mx.load(str(result.adapter_dir / "adapters.safetensors")).items() if "lora_b" in k}
        runs[norm] = (b, train_rows(result.run_dir)[0]["tokens"], result.summary["data"])
    (b_step, step_tokens, stats), (b_epoch, _, _) = runs["step"], runs["epoch"]
    mean_per_step = stats["train"]["supervised_tokens"] / stats["batching"]["steps_per_epoch"]
    # the report's supervised tokens are the loss's targets: no sample supervises its first token
    from mlx_ft.data import load_datasets
    from mlx_ft.data import recipe_tokenizer

    recipe = load_recipe(tmp_path / "epoch.toml")
    samples = load_datasets(recipe, recipe_tokenizer(recipe)).train
    assert not any(s.mask[0] for s in samples)
    assert sum(sum(s.mask[1:]) for s in samples) == stats["train"]["supervised_tokens"]
    assert step_tokens != pytest.approx(mean_per_step, rel=0.05)  # the two really differ here
    for k, v in b_step.items():
        assert mx.abs(v).max().item() > 0
        np.testing.assert_allclose(np.array(b_epoch[k]), np.array(v) * step_tokens / mean_per_step,
                                   rtol=1e-4, atol=1e-7)


def test_quantizing_on_load_reads_the_float_base_one_layer_at_a_time(tmp_path):
    """QLoRA from a 16/32-bit checkpoint must not hold the whole float model first (a 70B base is
    131 GiB in bf16, more than a 128 GB Mac): the load's peak stays near the quantized size plus
    the largest single float tensor. Measured in a fresh process (the peak counts every live array)."""
    from mlx_ft.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m", [" ".join(["alpha beta gamma delta"] * 20)] * 20, family="llama",
                             hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=1024,
                             extra_config={"vocab_size": 8192})
    float_bytes = (model / "model.safetensors").stat().st_size
    code = ("import sys, mlx.core as mx; from mlx_ft.models import load_base; "
            "from mlx_ft.recipe import ModelConfig, QuantizeConfig; mx.reset_peak_memory(); "
            "loaded = load_base(ModelConfig(path=sys.argv[1], quantize=QuantizeConfig(bits=4, group_size=64))); "
            "print(mx.get_peak_memory(), mx.get_active_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, active = map(int, out.stdout.split())
    largest = 8192 * 256 * 4  # one float32 embedding matrix
    assert active < 0.25 * float_bytes, (active, float_bytes)  # 4-bit weights + scales
    assert peak < active + 1.5 * largest < 0.6 * float_bytes, (peak, active, float_bytes)


def test_run_plans_first_and_records_the_plan_beside_the_measured_peak(tmp_path, tiny_model_dir, chat_jsonl):
    recipe = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, training={"steps": 2})
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("plan: peak ") and ": fits (" in first and "replayed graph" in first, first
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    plan = summary["plan"]
    assert plan["fits"] and plan["memory_model"].startswith("replayed graph")
    assert plan["required_bytes"] <= plan["budget_bytes"]
    # The plan is the worst case, every row max_seq_len tokens; these chat rows are shorter, so the
    # run measured less (3.6 MB against 14.5 planned here). tests/test_planner_accuracy.py trains
    # full-length rows in fresh processes and holds the plan within 10 %.
    assert plan["planned_peak_bytes"] >= 0.9 * summary["peak_memory_bytes"], (plan, summary["peak_memory_bytes"])


def test_run_refuses_a_run_that_will_not_fit_before_loading_anything(tmp_path, chat_jsonl):
    # Full fine-tuning of a 70B model (bundled config, nothing downloaded): over 1 TB, no machine.
    recipe = make_recipe(tmp_path, "meta-llama/Llama-3.1-70B", chat_jsonl, adapter={"method": "full"},
                         training={"batch_size": 1, "steps": 2})
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "DOES NOT FIT" in result.output and "--force" in result.output and "mlxft plan" in result.output
    assert not (tmp_path / "run").exists()
    # --force goes on to load the model, which is not here offline: the model error, not the plan's
    forced = CliRunner().invoke(main, ["run", str(recipe), "--force"], env={"HF_HUB_OFFLINE": "1"})
    assert forced.exit_code == 2 and "DOES NOT FIT" in forced.output and "--force" not in forced.output.split("DOES NOT FIT")[1][:200]


def test_loss_figures_are_named_and_validation_starts_at_step_0(tmp_path, tiny_model_dir, chat_jsonl):
    path = make_recipe(tmp_path, tiny_model_dir, chat_jsonl, training={"steps": 5, "eval_every": 4})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "val_loss": rows[0]["val_loss"], "best": False}  # before any update
    s = json.loads((run / "summary.json").read_text())
    last = train_rows(run)[-1]
    assert last["step"] == 5 and s["final_window_steps"] == 1  # reports at 2, 4, then the last step alone
    assert s["final_step_loss"] == last["last_loss"] == s["final_loss"]
    assert s["final_window_loss"] == last["loss"]
    assert s["initial_val_loss"] == rows[0]["val_loss"] > s["final_val_loss"] == rows[-1]["val_loss"]
    assert s["best_step"] in (4, 5)  # the step-0 pass is never the "best" adapter
    assert (f"val loss {s['initial_val_loss']:.4f} at step 0 -> {s['final_val_loss']:.4f} at step 5 (best "
            in result.output)
    assert (f"train loss {s['final_window_loss']:.4f} (mean of the last 1 step; last step "
            f"{s['final_step_loss']:.4f})") in result.output
    # The step-0 pass is the loss of the untrained model: the same as a run whose updates do nothing.
    still = train(load_recipe(path, {"training.learning_rate": 1e-30, "training.eval_at_start": False,
                                     "output.dir": str(tmp_path / "still")}), progress=False)
    assert abs(still.summary["final_val_loss"] - s["initial_val_loss"]) < 1e-6
    assert still.summary["initial_val_loss"] is None
    assert [r["step"] for r in map(json.loads, (tmp_path / "still/metrics.jsonl").read_text().splitlines())
            if "val_loss" in r] == [4, 5]
