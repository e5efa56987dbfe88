"""Mixture-of-experts models in the planner: shapes read like mlx-lm builds them, parameter counts
as published, the weights and trainable parameters of a real loaded tiny MoE counted exactly, time
from the active parameters, and the shipped MoE recipe's settings training a tiny qwen3_moe."""

from dataclasses import replace
from pathlib import Path

import pytest

from mlx_ft.planner import Settings, estimate, load_shape, plan_model
from mlx_ft.planner.configs import shape_from_config
from mlx_ft.planner.timing import flops_per_token

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "qwen3-30b-a3b-qlora.toml"
EXPERTS_NOT_ROUTER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("model,total,active", [
    # model cards: Qwen3-30B-A3B "30.5B in total and 3.3B activated" (29.9B non-embedding);
    # Mixtral-8x7B 46.7B total, 12.9B active.
    ("Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9), ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46.7e9, 12.9e9)])
def test_bundled_moe_configs_match_published_parameter_counts(model, total, active):
    sh = load_shape(model)
    assert sh.total_params() == pytest.approx(total, rel=0.01)
    # the card's 3.3B is rounded down from the 3.35B its config gives (embedding and head counted)
    assert sh.total_params(active=True) == pytest.approx(active, rel=0.02)


def test_qwen3_moe_layout_follows_mlx_lm():
    cfg = {"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
           "num_attention_heads": 4, "vocab_size": 1000, "num_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 64, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    sh = shape_from_config(cfg, "x", "test")
    # mlx-lm: MoE iff layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
    assert [sh.moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert "mlp.switch_mlp.up_proj" in sh.linears(1) and sh.linears(1)["mlp.gate"] == (128, 8)
    assert sh.linears(0)["mlp.up_proj"] == (128, 512)
    mixtral = shape_from_config({**cfg, "model_type": "mixtral", "num_experts": None, "num_local_experts": 4,
                                 "decoder_sparse_step": None, "mlp_only_layers": None}, "m", "test")
    assert mixtral.linears()["block_sparse_moe.switch_mlp.down_proj"] == (64, 128)


def build_moe(root: Path, family: str) -> Path:
    """A 3-block MoE of `family`, widths quantizable at group 64; the qwen3_moe one has a dense
    first block (mlp_only_layers)."""
    from conftest import chat_corpus, corpus_texts
    from mlx_ft.tiny import build_tiny_model

    extra = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "mlp_only_layers": [0]}
    return build_tiny_model(root / family, corpus_texts(chat_corpus(100)), family=family, hidden_size=128,
                            num_layers=3, intermediate_size=256, extra_config=extra if family == "qwen3_moe" else None)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_moe(tmp_path_factory.mktemp("moe"), "qwen3_moe")


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("targets", ["all-linear", list(EXPERTS_NOT_ROUTER)])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_weights_and_trainable_parameters_of_a_real_tiny_moe(tiny_moe, tmp_path, family, bits, targets):
    from mlx.utils import tree_flatten

    from mlx_ft.models import apply_adapters, count_parameters, load_base
    from mlx_ft.recipe import AdapterConfig, ModelConfig, QuantizeConfig

    path = tiny_moe if family == "qwen3_moe" else build_moe(tmp_path, family)
    model, _, _ = load_base(ModelConfig(path=str(path), quantize=QuantizeConfig(bits=bits) if bits else None))
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    sh = load_shape(str(path))
    st = Settings(quant_bits=bits, rank=4, targets=(targets,) if isinstance(targets, str) else tuple(targets))
    e = estimate(sh, st)
    # every expert's weights, the router at 8 bits (qwen3_moe's quant_predicate; Mixtral's at the
    # recipe's bits), scales and biases
    assert e.breakdown["weights"] + e.breakdown["quantization overhead"] == held
    apply_adapters(model, AdapterConfig(rank=4, targets=targets))
    trainable, total = count_parameters(model)
    assert e.trainable_params == trainable  # LoRASwitchLinear: an A and a B per expert
    if not bits:
        assert sh.total_params() == total  # mlx-lm counts the base only


def test_time_counts_the_active_experts_only():
    sh = load_shape("Qwen/Qwen3-30B-A3B")
    st = Settings(quant_bits=4, batch_size=1, seq_len=2047)
    more = replace(sh, experts_per_tok=16)
    # 8 more experts per token: forward (2 N) and backward to the inputs (2 N_span), 48 blocks
    expert = 3 * sh.hidden * sh.moe_intermediate
    assert flops_per_token(more, st) - flops_per_token(sh, st) == 4 * 8 * expert * 48
    dense_equivalent = 2 * sh.total_params()  # the forward alone if every expert ran
    assert flops_per_token(sh, st) < 0.5 * dense_equivalent


def test_moe_breakdown_and_dora_on_experts():
    from mlx_ft.errors import PlanError

    # the formula (the replay of the same plan, tests/test_planner_replay.py, drops the note below)
    p = plan_model("Qwen/Qwen3-30B-A3B", Settings(quant_bits=4, rank=16, targets=EXPERTS_NOT_ROUTER,
                                                  grad_checkpointing=True, batch_size=1, seq_len=2047),
                   machine="m3-ultra-96", memory_model="formula")
    # 4-bit experts: ~17 GB like mlx-community's 4-bit conversion, not the 61 GB of bf16
    assert 15.5 < (p.estimate.breakdown["weights"] + p.estimate.breakdown["quantization overhead"]) / 2**30 < 17
    assert p.estimate.trainable_params == 48 * 16 * (4096 + 2048 + 2 * (2048 + 512) + 4096 + 2048
                                                     + 128 * 3 * (2048 + 768))
    assert any("128 experts, top-8" in n for n in p.estimate.notes)
    # the configuration the MoE grid rows 60, 69, 70 under-predicted says so; adapting the router does not
    assert any("frozen router measured up to 15 %" in n for n in p.estimate.notes)
    adapted_router = plan_model("Qwen/Qwen3-30B-A3B", Settings(quant_bits=4, rank=16, grad_checkpointing=True,
                                                               batch_size=1, seq_len=2047), machine="m3-ultra-96",
                                memory_model="formula")
    assert not any("frozen router" in n for n in adapted_router.estimate.notes)
    with pytest.raises(PlanError, match="DoRA cannot adapt mixture-of-experts"):
        plan_model("Qwen/Qwen3-30B-A3B", Settings(method="dora"), machine="m3-ultra-96")
    plan_model("Qwen/Qwen3-30B-A3B", Settings(method="dora", targets=("q_proj", "v_proj")), machine="m3-ultra-96")


def test_the_moe_recipe_settings_train_a_tiny_qwen3_moe(tiny_moe, tmp_path, chat_jsonl):
    """recipes/qwen3-30b-a3b-qlora.toml's adapter, quantization and checkpointing on a tiny qwen3_moe:
    QLoRA on the experts (4-bit QuantizedSwitchLinear under LoRASwitchLinear), router left alone."""
    import json

    from mlx_ft.recipe import load_recipe, recipe_from_dict
    from mlx_ft.runner import train

    shipped = load_recipe(RECIPE)
    doc = shipped.to_dict()
    doc["model"]["path"] = str(tiny_moe)
    doc["data"].update(train=str(chat_jsonl[0]), valid=str(chat_jsonl[1]), max_seq_len=128)
    doc["training"].pop("epochs", None)
    doc["training"].update(steps=6, grad_accum=1, batch_size=2, learning_rate=5e-3, warmup_steps=0,
                           report_every=2, eval_every=100, save_every=100)
    doc["output"]["dir"] = str(tmp_path / "run")
    recipe = recipe_from_dict(doc)
    assert (recipe.model.quantize.bits, recipe.training.grad_checkpointing) == (4, True)
    result = train(recipe, progress=False)
    keys = json.loads((result.adapter_dir / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert {"mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"} <= set(keys)
    assert "mlp.gate" not in keys, keys
    assert result.losses[-1] < result.losses[0], result.losses


@pytest.mark.parametrize("quantize,training,seq_len", [
    (None, {"batch_size": 2}, 256),
    ({"bits": 4, "group_size": 64}, {"batch_size": 1, "grad_checkpointing": True}, 384),
])
def test_predicted_peak_of_a_tiny_moe_within_10_percent(tiny_moe, tmp_path, quantize, training, seq_len):
    """The MoE terms against a real `mlx_ft.train` in a fresh process (benchmarks/planner_accuracy.py
    has the grid), with the MoE recipe's targets: attention and experts, not the router."""
    from test_planner_accuracy import measure_in_fresh_process

    from mlx_ft.planner import settings_from_recipe
    from mlx_ft.probe import probe_recipe
    from mlx_ft.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"path": str(tiny_moe), **({"quantize": quantize} if quantize else {})},
                               "adapter": {"rank": 16, "targets": list(EXPERTS_NOT_ROUTER)},
                               "data": {"train": "unused.jsonl"}, "training": training,
                               "output": {"dir": str(tmp_path / "run")}})
    short = probe_recipe(recipe, seq_len, tmp_path)
    predicted = estimate(load_shape(str(tiny_moe)), settings_from_recipe(short)).peak_bytes
    measured = measure_in_fresh_process(recipe, seq_len)
    print(f"predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)
