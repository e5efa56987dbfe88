"""The planner: verdicts that must hold, published measurements, JSON shape, Mac logic, bad input."""

import json

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.planner import Settings, estimate, get_machine, load_shape, plan_model
from mlx_ft.planner.machines import GIB, list_machines, machine_from_device_info, sysctl_advice


def run(*args):
    return CliRunner().invoke(main, list(args))


# -- verdicts (issue 5) ----------------------------------------------------------------------------

def test_qlora_70b_with_checkpointing_fits_a_128gb_mac():
    p = plan_model("meta-llama/Llama-3.1-70B", Settings(quant_bits=4, rank=16, batch_size=1, seq_len=2047,
                                                        grad_checkpointing=True), machine="m4-max-128")
    assert p.fits, p.render()
    # planner-facts §3.1: Llama-3.1-70B at 4-bit gs64 is 39.7 GB with scales and biases
    assert p.estimate.breakdown["weights"] + p.estimate.breakdown["quantization overhead"] == pytest.approx(39.7e9, rel=0.01)


def test_16bit_lora_of_13b_does_not_fit_24gb_and_says_what_would():
    p = plan_model("meta-llama/Llama-2-13b-hf", Settings(rank=8, batch_size=1, seq_len=511), machine="auto",
                   budget_gb=24)
    assert not p.fits
    assert p.estimate.breakdown["weights"] > 24 * GIB  # 13B x 2 bytes alone is over the budget
    changes = {s["change"] for s in p.suggestions}
    assert "model.quantize" in changes  # QLoRA is the fix
    assert all(s["fits"] and s["peak_bytes"] <= 24 * GIB for s in p.suggestions)


def test_suggestions_are_largest_settings_that_fit():
    st = Settings(quant_bits=4, rank=16, batch_size=2, seq_len=4095, grad_checkpointing=True)
    p = plan_model("Qwen/Qwen2.5-7B", st, machine="m4-pro-24", memory_model="formula")
    assert not p.fits
    by = {s["change"]: s for s in p.suggestions}
    L = by["data.max_seq_len"]["value"]
    budget = p.machine.budget_bytes
    assert estimate(p.shape, Settings(**{**st.__dict__, "seq_len": L - 1})).required_bytes <= budget
    assert estimate(p.shape, Settings(**{**st.__dict__, "seq_len": L + 31})).required_bytes > budget


def test_memory_model_mechanisms():
    sh = load_shape("Qwen/Qwen2.5-7B")
    base = Settings(rank=16, batch_size=2, seq_len=1024)
    e = estimate(sh, base)
    assert estimate(sh, Settings(**{**base.__dict__, "grad_checkpointing": True})).peak_bytes < e.peak_bytes
    assert estimate(sh, Settings(**{**base.__dict__, "quant_bits": 4})).peak_bytes < e.peak_bytes
    assert estimate(sh, Settings(**{**base.__dict__, "layers": 8})).peak_bytes < e.peak_bytes
    # attention scores are quadratic in the row length, activations linear
    e2 = estimate(sh, Settings(**{**base.__dict__, "seq_len": 2048}))
    assert e2.breakdown["attention scores"] == pytest.approx(4 * e.breakdown["attention scores"], rel=0.01)
    assert e2.breakdown["activations"] == pytest.approx(2 * e.breakdown["activations"], rel=0.01)
    # QDoRA keeps dequantized weights of every DoRA layer
    qlora = estimate(sh, Settings(**{**base.__dict__, "quant_bits": 4}))
    qdora = estimate(sh, Settings(**{**base.__dict__, "quant_bits": 4, "method": "dora"}))
    assert qdora.breakdown["activations"] - qlora.breakdown["activations"] > 0.9 * 28 * sum(
        i * o for i, o in sh.linears().values()) * 2


def test_loss_chunk_is_the_one_mlx_ft_losses_picks():
    """The planner and mlx_ft.losses share mlx_ft.chunking (pure Python: `mlxft plan` needs no mlx)."""
    from mlx_ft.chunking import MIN_CHUNK
    from mlx_ft.planner import formula

    sh = load_shape("Qwen/Qwen2.5-7B")  # 152,064-entry vocabulary
    assert formula.loss_chunk_positions(sh, Settings(batch_size=1, seq_len=4095, loss_chunk=512)) == 55
    assert formula.loss_chunk_positions(sh, Settings(batch_size=8, seq_len=4095, loss_chunk=512)) == MIN_CHUNK
    assert formula.loss_chunk_positions(sh, Settings(batch_size=1, seq_len=40, loss_chunk=512)) == 40
    assert formula.loss_chunk_positions(sh, Settings(batch_size=1, seq_len=4095, loss_chunk=0)) == 4095


def test_loss_term_replays_mlx_evaluator():
    """The fused loss's memory comes from replaying its compiled graph the way MLX's eval_impl runs
    it (planner/schedule.py). Peaks of the loss alone measured on MLX 0.32.4's CPU backend
    (benchmarks/loss_schedule.py: 1023 positions, hidden 128), with MLX's defaults and with the
    evaluator's breadth-first width changed (MLX_BFS_MAX_WIDTH), which the model must follow."""
    from mlx_ft.planner.schedule import loss_peak_bytes

    measured = {  # (chunk, vocab, dtype bytes, BFS width) -> peak bytes
        (64, 8192, 2, 20): 62.3e6, (64, 8192, 2, 1): 35.2e6, (64, 8192, 2, 100): 97.7e6,
        (128, 24576, 2, 20): 364.9e6, (32, 24576, 2, 20): 118.2e6, (256, 8192, 4, 20): 143.0e6}
    for (chunk, vocab, s, width), peak in measured.items():
        assert loss_peak_bytes(1, 1023, chunk, vocab, 128, s, width) == pytest.approx(peak, rel=0.05)
    # Each chunk's dL/dh is slice-updated into a [B, L, hidden] array before they are summed: on long
    # rows with small chunks that dominates (measured 2.91 GB at 8191 positions, chunks of 16, hidden 512).
    assert loss_peak_bytes(1, 8191, 16, 1024, 512, 2) == pytest.approx(2908.5e6, rel=0.05)


@pytest.mark.parametrize("model,params", [
    ("meta-llama/Llama-3.1-8B", 8.03e9), ("meta-llama/Llama-3.1-70B", 70.55e9), ("Qwen/Qwen2.5-7B", 7.62e9),
    ("Qwen/Qwen2.5-32B", 32.76e9), ("Qwen/Qwen3-8B", 8.19e9), ("mistralai/Mistral-7B-v0.3", 7.25e9),
    ("google/gemma-2-9b", 9.24e9)])
def test_bundled_configs_match_published_parameter_counts(model, params):
    assert load_shape(model).total_params() == pytest.approx(params, rel=0.01)


# -- published Mac measurements (planner-facts §4; the analytic model is held to +-25% there) -----

def test_agrees_with_mlx_tune_qwen3_0_6b_4096():
    # #9: Qwen3-0.6B bf16 LoRA, B=1, 4096 tokens, no checkpointing, M4 Pro: 18 GB peak (mlx-lm loss).
    e = estimate(load_shape("Qwen/Qwen3-0.6B"), Settings(rank=8, layers=16, batch_size=1, seq_len=4096,
                                                         loss_impl="mlx_lm"))
    assert e.peak_bytes / 1e9 == pytest.approx(18, rel=0.25)


def test_agrees_with_llama3_8b_qlora_on_m1_max():
    # #3: Llama-3-8B 4-bit QLoRA, B=2, WikiSQL (~128-token rows), 6.816M q/v params: 5.40 GB.
    e = estimate(load_shape("meta-llama/Meta-Llama-3-8B"),
                 Settings(quant_bits=4, rank=32, layers=16, targets=("q_proj", "v_proj"), batch_size=2,
                          seq_len=128, loss_impl="mlx_lm"))
    assert e.trainable_params == 6_815_744
    assert e.peak_bytes / 1e9 == pytest.approx(5.40, rel=0.25)


# -- machines -----------------------------------------------------------------------------------

def test_machine_table_covers_m1_to_m5():
    chips = {m.chip for m in list_machines()}
    for c in ["M1", "M1 Pro", "M1 Max", "M1 Ultra", "M2 Ultra", "M3 Max", "M3 Ultra", "M4", "M4 Pro", "M4 Max",
              "M5", "M5 Pro", "M5 Max"]:
        assert c in chips
    m = get_machine("m4-max-128")
    assert m.budget_bytes / GIB == pytest.approx(107.52, abs=0.01)  # macOS 26 measured value


def test_mac_device_info_is_the_budget():
    # What mx.device_info() returns on an M4 Max 128 GB with macOS 26 (planner-facts §2.1)
    info = {"device_name": "Apple M4 Max", "architecture": "applegpu_g16s", "memory_size": 128 * GIB,
            "max_recommended_working_set_size": int(107.52 * GIB), "max_buffer_length": 86 * GIB,
            "resource_limit": 499000}
    m = machine_from_device_info(info)
    assert (m.chip, m.is_mac, m.budget_bytes, m.fp32_tflops) == ("M4 Max", True, int(107.52 * GIB), 18.4)
    # after `sudo sysctl iogpu.wired_limit_mb=114688` Metal reports 112 GiB
    m = machine_from_device_info({**info, "max_recommended_working_set_size": 114688 * 2**20})
    assert m.budget_bytes == 112 * GIB
    cmd = sysctl_advice(m, 115 * GIB)
    assert cmd.startswith("sudo sysctl iogpu.wired_limit_mb=117760") and "swaps" in cmd
    assert sysctl_advice(m, 125 * GIB) is None  # would leave macOS less than 8 GB


def test_non_mac_uses_local_memory():
    m = machine_from_device_info({"architecture": "x86_64", "device_name": "AMD EPYC", "memory_size": 32 * GIB,
                                  "mlx_memory_limit": int(0.8 * 32 * GIB)})
    assert not m.is_mac and m.budget_bytes == int(0.8 * 32 * GIB)
    assert sysctl_advice(m, 30 * GIB) is None
    assert get_machine("auto").memory_bytes > 0


# -- CLI ----------------------------------------------------------------------------------------

def test_plan_json_shape():
    r = run("plan", "--model", "Qwen/Qwen2.5-7B", "--method", "qlora", "--batch-size", "2", "--max-seq-len", "1024",
            "--machine", "m4-max-64", "--tokens", "1000000", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for k in ("peak_bytes", "budget_bytes", "fits", "breakdown", "seconds_per_epoch"):
        assert k in d
    assert d["fits"] is True and d["peak_bytes"] == sum(d["breakdown"].values())
    assert {"weights", "quantization overhead", "adapters", "gradients", "optimizer state", "activations",
            "attention scores", "logits and loss", "framework headroom"} <= set(d["breakdown"])
    assert 0 < d["seconds_per_epoch"] < 1e6


def test_plan_text_when_it_does_not_fit():
    r = run("plan", "--model", "Qwen/Qwen2.5-32B", "--method", "lora", "--machine", "m4-max-64")
    assert r.exit_code == 3, r.output  # "does not fit" is exit status 3 (mlxft plan --help)
    # 65 GB of bf16 weights cannot fit a 52 GiB budget: only QLoRA plus smaller settings do
    assert "DOES NOT FIT" in r.output and "together: grad checkpointing, 4-bit QLoRA" in r.output
    assert "time per epoch: unknown" in r.output


def test_plan_recipe_counts_tokens(tmp_path, tiny_model_dir, chat_jsonl):
    train, _ = chat_jsonl
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{tiny_model_dir}"\n[data]\ntrain = "{train}"\nmax_seq_len = 128\n'
                      '[training]\nbatch_size = 2\n')
    r = run("plan", str(recipe), "--machine", "m1-8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["fits"] and d["tokens_per_epoch"] > 0 and d["seconds_per_epoch"] > 0
    # the positions the loop's batches really have, padding included
    from mlx_ft.data import load_datasets
    from mlx_ft.data.batching import collate, epoch_batches
    from mlx_ft.data import recipe_tokenizer
    from mlx_ft.recipe import load_recipe

    rec = load_recipe(recipe)
    samples = load_datasets(rec, recipe_tokenizer(rec)).train
    batches = epoch_batches(samples, 2, 128, False, rec.training.seed, 0, rec.data.shuffle)
    assert d["tokens_per_epoch"] == sum(collate(samples, b, 128, False).tokens.size for b in batches)


def test_planned_row_is_the_widest_row_collate_makes():
    """Unpacked widths round up to a multiple of 8 but never past max_seq_len."""
    from mlx_ft.data.batching import Sample, row_width
    from mlx_ft.planner import settings_from_recipe
    from mlx_ft.recipe import recipe_from_dict

    longest = [Sample(list(range(100)), [True] * 100)]
    assert row_width(longest, [[0]], 100, pack=False) == 100
    r = recipe_from_dict({"model": {"path": "x"}, "data": {"train": "t.jsonl", "max_seq_len": 100}})
    assert settings_from_recipe(r).seq_len + 1 == 100


@pytest.mark.parametrize("args,expect", [
    (["--model", "Qwen/Qwen2.5-7B", "--machine", "m9-ultra-1024"], "known machines: m1-8"),
    (["--model", "nobody/no-such-model-xyz", "--machine", "m4-max-128"], "hf download nobody/no-such-model-xyz config.json"),
    (["--model", "Qwen/Qwen2.5-0.5B", "--rank", "4096", "--machine", "m4-max-128"], "larger than the hidden size 896"),
    ([], "give a RECIPE"),
])
def test_plan_bad_input_exits_2(args, expect, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("plan", *args)
    assert r.exit_code == 2, r.output
    assert expect in r.output


def test_machines_command():
    r = run("machines")
    assert r.exit_code == 0 and "m4-max-128" in r.output and "107.5" in r.output


def test_probe_calibration_scales_only_activation_terms():
    from mlx_ft.planner.settings import STATIC_TERMS
    from mlx_ft.probe import calibrate

    sh = load_shape("Qwen/Qwen2.5-0.5B")
    full = estimate(sh, Settings(rank=8, batch_size=4, seq_len=2047))
    small = estimate(sh, Settings(rank=8, batch_size=4, seq_len=255))
    static = sum(small.breakdown.get(k, 0) for k in STATIC_TERMS)
    measured = static + int(1.2 * (small.peak_bytes - static))  # the probe saw 20% more
    est, info = calibrate(full, small, measured)
    assert info["scale"] == pytest.approx(1.2, rel=1e-6)
    assert est.breakdown["weights"] == full.breakdown["weights"]
    assert est.breakdown["activations"] == pytest.approx(1.2 * full.breakdown["activations"], rel=1e-6)
    assert est.peak_bytes == sum(est.breakdown.values())
