"""Preference losses proven: equal to TRL's trainers (values, metrics and LoRA gradients) on the same
tiny model and batch; ln 2 at initialisation; gradients through the compiled step equal to a finite
difference; packed == unpacked; chunked == unchunked; precomputed reference == in-step reference."""

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_ft import data, models, objectives
from mlx_ft.recipe import recipe_from_dict, resolved_toml
from mlx_ft.runner import _reference_logps
from mlx_ft.step import as_arrays, build_optimizer, compile_step

from conftest import replayed_and_measured  # noqa: E402

L = 96  # max_seq_len: every pair of the batch fits unpacked and, four to a row, packed (L = 256)


def pref_records(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs: the chosen answer names the item's colour, the rejected one another."""
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    out = []
    for i in range(n):
        good, bad = rng.sample(colours, 2)
        out.append({"prompt": [{"role": "user", "content": f"What colour is item {i}?"}],
                    "chosen": [{"role": "assistant", "content": f"Item {i} is {good}."}],
                    "rejected": [{"role": "assistant", "content": f"Sorry, item {i} might be {bad}!"}]})
    return out


def make_recipe(tmp: Path, model_dir, objective: str, records: list[dict], **training):
    f = tmp / "prefs.jsonl"
    training = {k: v for k, v in training.items() if v is not None}
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return recipe_from_dict({
        "model": {"path": str(model_dir)}, "adapter": {"rank": 4, "alpha": 8.0},
        "data": {"train": str(f), "max_seq_len": training.pop("max_seq_len", L), "shuffle": False},
        "training": {"objective": objective, "batch_size": 4, "loss_chunk_size": 8, **training},
        "output": {"dir": str(tmp / "run")}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """The tiny model with LoRA whose B is random (so the policy differs from the reference), its
    adapter exported for PEFT, and four pairs."""
    tmp = tmp_path_factory.mktemp("objectives")
    recipe = make_recipe(tmp, tiny_model_dir, "dpo", pref_records(4))
    tokenizer = data.recipe_tokenizer(recipe)
    model, _, _ = models.load_base(recipe.model)
    mx.random.seed(1)
    cfg = models.apply_adapters(model, recipe.adapter)
    b = [(k, 0.2 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())
         if "lora_b" in k]
    model.load_weights(b, strict=False)
    models.save_adapter(model, tmp / "adapter", cfg, str(Path(tiny_model_dir).resolve()), recipe.model)
    from mlx_ft.export import export_adapter

    peft_dir = export_adapter(tmp / "adapter", to="peft", out=tmp / "peft")
    return tmp, model, tokenizer, peft_dir


def loss_and_grads(model, objective, batch, reference=True, chunk=8, packed=False):
    """(loss mean, metrics by name, gradients) of `objective` on a batch, eagerly."""
    ref = None
    if reference and objective.needs_reference:
        ref = partial(_reference_logps, model, True, chunk, True)
    fn = partial(objectives.preference_loss, objective, reference=ref, chunk_size=chunk, packed=packed)

    def mean(m, *arrays):
        s, n, metrics = fn(m, *arrays)
        return s / n, metrics

    (loss, metrics), grads = nn.value_and_grad(model, mean)(model, *as_arrays(batch))
    return loss.item(), objective.summarize(metrics.tolist()), dict(tree_flatten(grads))


def trl_model(tiny_model_dir, peft_dir):
    """The same model in transformers with the same LoRA through PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(hf, str(peft_dir), is_trainable=True)


def trl_grads(peft_model) -> dict:
    """PEFT's LoRA gradients under mlx_ft's names and layout (lora_a (in, r), lora_b (r, out))."""
    out = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name and p.grad is not None:
            ours = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".lora_a")
            out[ours.replace(".lora_B.default.weight", ".lora_b")] = p.grad.numpy().T
    return out


def assert_equal(ours, theirs, rel=1e-5):
    assert ours == pytest.approx(theirs, rel=rel, abs=rel * 1e-1), (ours, theirs)


def assert_metrics_equal(ours: dict, theirs: dict, names, rel=1e-5):
    """Rewards and KL are differences of log-prob sums tens of nats large, which float32 resolves to
    about 1e-7 of their size: each metric is held to `rel` of the larger of itself and those sums."""
    scale = max(1.0, abs(ours["logps/chosen"]), abs(ours["logps/rejected"]))
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], rel=rel, abs=rel * scale), \
            (name, ours[name], theirs[name])


def assert_grads_equal(ours: dict, theirs: dict, rel=1e-5):
    assert set(ours) == set(theirs) and len(ours) == 28  # 7 linear layers x 2 blocks, A and B each
    for k, t in theirs.items():
        o = np.array(ours[k])
        assert np.abs(t).max() > 0, k
        assert np.abs(o - t).max() <= rel * np.abs(t).max(), (k, np.abs(o - t).max(), np.abs(t).max())


def torch_inputs(batch):
    """Our collated batch as TRL's DPO/KTO collators lay it out (right padding, completion_mask)."""
    import torch

    t = {k: torch.tensor(np.array(v), dtype=torch.long) for k, v in
         (("input_ids", batch.tokens), ("attention_mask", batch.seq >= 0), ("completion_mask", batch.mask))}
    return t


def trl_args(cls, tmp, **kw):
    return cls(output_dir=str(tmp / "trl"), report_to="none", use_cpu=True, max_length=L, **kw)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", None), ("ipo", None), ("hinge", None),
                                                  ("robust", 0.1)])
def test_dpo_equals_trl(setup, tiny_model_dir, loss_type, smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tmp, model, tokenizer, peft_dir = setup
    recipe = make_recipe(tmp, tiny_model_dir, "dpo", pref_records(4), loss_type=loss_type, beta=0.5,
                         label_smoothing=smoothing)
    splits = data.load_datasets(recipe, tokenizer)
    batch = data.collate(splits.train, [[0], [1], [2], [3]], L, False)
    loss, metrics, grads = loss_and_grads(model, objectives.from_config(recipe.training), batch)

    trainer = DPOTrainer(model=trl_model(tiny_model_dir, peft_dir), processing_class=tokenizer._tokenizer,
                         args=trl_args(DPOConfig, tmp, beta=0.5, loss_type=[loss_type],
                                       label_smoothing=smoothing or 0),
                         train_dataset=Dataset.from_list(pref_records(4)))
    trainer.model.delete_adapter("ref")  # TRL copies a given adapter as the reference; ours is the base
    for i, e in enumerate(splits.train):  # TRL's own tokenization gives the same tokens
        row = trainer.train_dataset[i]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (e.prompt, e.first, e.second)
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, torch_inputs(batch))
    theirs.backward()
    assert_equal(loss, theirs.item())
    theirs_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert_metrics_equal(metrics, theirs_metrics, objectives.REWARDS)
    assert_grads_equal(grads, trl_grads(trainer.model))


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl(setup, tiny_model_dir, objective):
    import torch
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tmp, model, tokenizer, peft_dir = setup
    keys = {"orpo_lambda": 0.3} if objective == "orpo" else {"beta": 2.0, "simpo_gamma": 0.7}
    recipe = make_recipe(tmp, tiny_model_dir, objective, pref_records(4), max_seq_len=L, **keys)
    splits = data.load_datasets(recipe, tokenizer)
    batch = data.collate(splits.train, [[0], [1], [2], [3]], L, False)
    loss, metrics, grads = loss_and_grads(model, objectives.from_config(recipe.training), batch)

    if objective == "orpo":
        cls, args = ORPOTrainer, trl_args(ORPOConfig, tmp, beta=0.3)
    else:  # SimPO is TRL's CPO with loss_type "simpo" and no behaviour-cloning term
        cls, args = CPOTrainer, trl_args(CPOConfig, tmp, loss_type="simpo", cpo_alpha=0.0, beta=2.0,
                                         simpo_gamma=0.7)
    trainer = cls(model=trl_model(tiny_model_dir, peft_dir), args=args, processing_class=tokenizer._tokenizer,
                  train_dataset=Dataset.from_list(pref_records(4)))
    R = batch.tokens.shape[0] // 2
    ids, real = np.array(batch.tokens), np.array(batch.seq >= 0)
    labels = np.where(np.array(batch.mask), ids, -100)
    inputs = {f"{side}_{k}": torch.tensor(v[rows], dtype=torch.long) for side, rows in
              (("chosen", slice(0, R)), ("rejected", slice(R, None)))
              for k, v in (("input_ids", ids), ("attention_mask", real), ("labels", labels))}
    trainer.model.train()
    theirs, their_metrics = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    theirs.backward()
    assert_equal(loss, theirs.item())
    assert_metrics_equal(metrics, their_metrics, objectives.from_config(recipe.training).metric_names)
    assert_grads_equal(grads, trl_grads(trainer.model))


def test_kto_equals_trl(setup, tiny_model_dir):
    import torch
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    tmp, model, tokenizer, peft_dir = setup
    recipe = make_recipe(tmp, tiny_model_dir, "kto", pref_records(4), beta=0.3, undesirable_weight=0.8)
    splits = data.load_datasets(recipe, tokenizer)  # pairs become a desirable and an undesirable example
    assert [e.label for e in splits.train] == [True, False] * 4
    assert splits.train[1].second == splits.train[0].first[: L - len(splits.train[1].prompt)]  # KL partner
    batch = data.collate(splits.train, [[i] for i in range(4)], L, False)
    loss, metrics, grads = loss_and_grads(model, objectives.from_config(recipe.training), batch)

    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in pref_records(4) for k in ("chosen", "rejected")]
    trainer = KTOTrainer(model=trl_model(tiny_model_dir, peft_dir), processing_class=tokenizer._tokenizer,
                         args=trl_args(KTOConfig, tmp, beta=0.3, undesirable_weight=0.8,
                                       train_sampling_strategy="sequential", per_device_train_batch_size=4),
                         train_dataset=Dataset.from_list(unpaired))
    trainer.model.delete_adapter("ref")
    R = batch.tokens.shape[0] // 2
    t = torch_inputs(batch)
    inputs = {**{k: v[:R] for k, v in t.items()}, **{f"KL_{k}": v[R:] for k, v in t.items()},
              "label": torch.tensor([e.label for e in splits.train[:4]])}
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    assert_equal(loss, theirs.item())
    assert_metrics_equal(metrics, {k: v[-1] for k, v in trainer._metrics["train"].items()},
                         ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                          "logps/rejected", "kl"))
    assert_grads_equal(grads, trl_grads(trainer.model))


def test_first_dpo_loss_is_ln2_and_gradients_equal_a_finite_difference(setup, tiny_model_dir):
    """Through the compiled step the loop runs: B = 0 and no dropout make the policy the reference
    (loss exactly ln 2, rewards 0); after one SGD step the gradients are nonzero and equal to a
    central difference of the loss on one entry of A and one of B."""
    tmp, _, tokenizer, _ = setup
    recipe = make_recipe(tmp, tiny_model_dir, "dpo", pref_records(4))
    splits = data.load_datasets(recipe, tokenizer)
    model, _, _ = models.load_base(recipe.model)
    mx.random.seed(0)
    models.apply_adapters(model, recipe.adapter)
    objective = objectives.from_config(recipe.training)
    fn = partial(objectives.preference_loss, objective, chunk_size=8,
                 reference=partial(_reference_logps, model, True, 8, True))
    opt = build_optimizer(recipe.training, 10)
    opt.init(model.trainable_parameters())
    micro_step, _, _ = compile_step(model, opt, fn, 0.0)
    arrays = as_arrays(data.collate(splits.train, [[0], [1], [2], [3]], L, False))
    loss_sum, n, grads, metrics = micro_step(*arrays)
    assert n.item() == 4 and loss_sum.item() / 4 == np.float32(np.log(2))
    summary = objective.summarize(metrics.tolist())
    assert summary["rewards/chosen"] == summary["rewards/rejected"] == summary["rewards/margins"] == 0.0
    g = dict(tree_flatten(grads))
    assert all(mx.abs(v).max().item() > 0 for k, v in g.items() if "lora_b" in k)  # B gets gradient at B = 0
    # step B away from 0 so A gets gradient too, then check both against the loss itself
    model.update(tree_map_b(model, g, -50.0))
    loss_sum, _, grads, _ = micro_step(*arrays)
    g = dict(tree_flatten(grads))
    params = dict(tree_flatten(model.trainable_parameters()))
    for key in ("model.layers.1.self_attn.q_proj.lora_a", "model.layers.0.mlp.down_proj.lora_b"):
        idx = tuple(int(i) for i in np.unravel_index(np.abs(np.array(g[key])).argmax(), g[key].shape))
        assert abs(g[key][idx].item()) > 1e-4

        def at(delta, key=key, idx=idx):
            w = np.array(params[key])
            w[idx] += delta
            model.load_weights([(key, mx.array(w))], strict=False)
            value = fn(model, *arrays, grad=False)[0].item()
            model.load_weights([(key, params[key])], strict=False)
            return value

        # eps: the difference settles to 4 digits between 3e-3 and 1e-3 (measured); a float32 loss of ~1
        # then carries ~1e-7 / eps of rounding, 0.3 % of the smaller gradient here
        eps = 2e-3
        fd = (at(eps) - at(-eps)) / (2 * eps)
        assert fd == pytest.approx(g[key][idx].item(), rel=5e-3), (key, fd, g[key][idx].item())


def tree_map_b(model, grads: dict, lr: float) -> dict:
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, v + lr * grads[k]) for k, v in tree_flatten(model.trainable_parameters())
                           if "lora_b" in k])


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_packed_and_chunked_equal_unpacked_and_whole(setup, tiny_model_dir, objective):
    """The same examples in one packed row (attention kept apart by `seq`) or one per row, with the
    head in chunks of 8 positions or whole: the same loss, metrics and gradients."""
    tmp, model, tokenizer, _ = setup
    recipe = make_recipe(tmp, tiny_model_dir, objective, pref_records(4), max_seq_len=256)
    splits = data.load_datasets(recipe, tokenizer)
    obj = objectives.from_config(recipe.training)
    n = len(splits.train)
    base = loss_and_grads(model, obj, data.collate(splits.train, [[i] for i in range(n)], 256, False))
    packed_plan = data.epoch_batches(splits.train, 4, 256, True, 0, 0, False)[0]
    assert len(packed_plan) < n  # several examples share a row
    packed = loss_and_grads(model, obj, data.collate(splits.train, packed_plan, 256, True), packed=True)
    one_per_row = data.collate(splits.train, [[i] for i in range(n)], 256, False)
    whole = loss_and_grads(model, obj, one_per_row, chunk=0)
    for other in (packed, whole):
        assert other[0] == pytest.approx(base[0], rel=1e-5)
        assert_metrics_equal(other[1], base[1], base[1])
        for k, v in base[2].items():
            assert np.abs(np.array(other[2][k] - v)).max() <= 1e-5 * np.abs(np.array(v)).max() + 1e-9, k


def test_precomputed_reference_equals_the_in_step_one(setup, tiny_model_dir):
    from mlx_ft.runner import _precompute

    tmp, model, tokenizer, _ = setup
    recipe = make_recipe(tmp, tiny_model_dir, "dpo", pref_records(4), precompute_reference=True)
    splits = data.load_datasets(recipe, tokenizer)
    _precompute(tmp / "pre", splits, partial(_reference_logps, model, True, 8, True), recipe, True)
    assert (tmp / "pre" / "reference-logps.npz").is_file()
    obj = objectives.from_config(recipe.training)
    batch = data.collate(splits.train, [[0], [1], [2], [3]], L, False)
    live, pre = loss_and_grads(model, obj, batch), loss_and_grads(model, obj, batch, reference=False)
    assert pre[0] == pytest.approx(live[0], rel=1e-6)
    assert_metrics_equal(pre[1], live[1], live[1])


@pytest.mark.parametrize("kw", [{"objective": "dpo", "reference": "bypass"},
                                {"objective": "kto", "reference": "bypass"},
                                {"method": "full", "objective": "dpo", "reference": "copy", "seq_len": 63}])
def test_replayed_preference_step_is_mlx_peak(tiny_model_dir, kw):
    """The planner's traced preference step (two rows per example, the reference pass or copy), run
    compiled, peaks where the replay says (loss_chunk 0: no surrogate). Measured 0.96-1.02 of the
    replay; the full fine-tune's step, run repeatedly on the loaded 2-core machine, also came in at
    0.90 once (MLX freed earlier than its usual schedule): a plan may be that much high, never low."""
    from mlx_ft.planner import Settings
    from mlx_ft.recipe import AdapterConfig, ModelConfig

    model, _, _ = models.load_base(ModelConfig(path=str(tiny_model_dir)))
    st = Settings(**{"rank": 8, "batch_size": 2, "seq_len": 511, "loss_chunk": 0, **kw})
    models.apply_adapters(model, AdapterConfig(method=st.method, rank=st.rank))
    predicted, measured = replayed_and_measured(model, st)
    assert 0.88 * predicted <= measured <= 1.08 * predicted, (predicted, measured)


@pytest.mark.parametrize("pack", [False, True])
def test_a_checkpointed_preference_step_is_replayed(tiny_model_dir, pack):
    """With checkpointed blocks (qwen7b-dpo.toml's setting) the step is traced and replayed, not
    left to the formula: the reference pass carries no gradient (losses.token_logps, grad=False)."""
    from mlx_ft.planner import Settings
    from mlx_ft.planner.configs import load_shape
    from mlx_ft.planner.plan import predict

    st = Settings(rank=8, batch_size=2, seq_len=127, grad_checkpointing=True, pack=pack, objective="dpo",
                  reference="bypass")
    assert predict(load_shape(str(tiny_model_dir)), st).memory_model.startswith("replayed graph")


def test_plan_counts_two_rows_per_example_and_the_reference_copy(setup, tiny_model_dir, monkeypatch):
    """`mlxft plan` for every objective; a full fine-tune's DPO plans its frozen copy, and on a budget
    that SFT fits and DPO does not, says so, offers the changes that fit, and `mlxft run` refuses."""
    from click.testing import CliRunner

    from mlx_ft.cli import main
    import importlib

    from mlx_ft.planner import plan

    plan_module = importlib.import_module("mlx_ft.planner.plan")

    tmp = setup[0]
    peaks = {}
    for objective in ("sft", "dpo", "orpo", "simpo", "kto"):
        recipe = make_recipe(tmp, tiny_model_dir, objective, pref_records(4), max_seq_len=256)
        if objective == "sft":
            recipe = make_recipe(tmp, tiny_model_dir, "sft", [{"messages": r["prompt"] + r["chosen"]}
                                                             for r in pref_records(4)], max_seq_len=256)
        p = plan(recipe, machine="m4-max-128")
        assert p.estimate.memory_model.startswith("replayed graph") and p.tokens_per_epoch, objective
        # the time is for every row the model runs: both sequences of a preference example
        assert p.tokens_per_epoch == data.load_datasets(recipe, setup[2]).stats["batching"]["positions"]
        peaks[objective] = p.estimate.peak_bytes
    assert min(peaks[o] for o in ("dpo", "orpo", "simpo")) > 1.5 * peaks["sft"], peaks

    full = make_recipe(tmp, tiny_model_dir, "dpo", pref_records(4))
    full = replace(full, adapter=replace(full.adapter, method="full"))
    precomputed = replace(full, training=replace(full.training, precompute_reference=True))
    with_copy, without = plan(full, machine="m4-max-128"), plan(precomputed, machine="m4-max-128")
    copy = with_copy.estimate.breakdown["reference copy"]
    blocks = [v for k, v in tree_flatten(setup[1].parameters()) if ".layers." in k and "lora" not in k]
    assert copy == sum(v.nbytes for v in blocks)  # every block is trained: the copy holds them all
    assert "reference copy" not in without.estimate.breakdown
    budget = (with_copy.peak_bytes + without.peak_bytes) / 2 / 2**30
    tight = plan(full, machine="m4-max-128", budget_gb=budget)
    assert not tight.fits and plan(precomputed, machine="m4-max-128", budget_gb=budget).fits
    assert "training.precompute_reference" in {s["change"] for s in tight.suggestions}

    real = plan_module.get_machine
    monkeypatch.setattr(plan_module, "get_machine", lambda name, budget_gb=None: real("m4-max-128", budget))
    recipe_file = tmp / "full.toml"  # the recipe planned above, as a file for `mlxft run`
    recipe_file.write_text(resolved_toml(replace(full, output=replace(full.output, dir=str(tmp / "refused")))))
    result = CliRunner().invoke(main, ["run", str(recipe_file)])
    assert result.exit_code == 2, result.output
    assert "DOES NOT FIT" in result.output and "frozen reference copy" in result.output
    assert "training.precompute_reference = true or adapter.method = 'lora'" in result.output
    assert not (tmp / "refused").exists()
