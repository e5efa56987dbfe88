"""The plan reads as advice: headroom and small rows explained, the token count's origin named,
changes ordered by what they cost, a caution under a 10 % margin, exit status 3 when it does not
fit, every Mac (M5 Neural Accelerators, projected M5 Ultra), and one line offline, no retries."""

import socket
import time

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.planner import Settings, get_machine, plan_model
from mlx_ft.planner.machines import GIB, list_machines, machine_from_device_info
from mlx_ft.planner.timing import GEMM_EFFICIENCY, flops_per_token

FORMULA = dict(memory_model="formula")  # the advice logic is the same whichever model gives the peak


def test_llama_8b_lora_on_24gb_gets_checkpointing_and_qlora_not_one_adapted_block():
    """The issue's case: the old first suggestion was `adapter.layers = 1` (fits, trains almost nothing)."""
    p = plan_model("meta-llama/Llama-3.1-8B", Settings(rank=16, batch_size=4, seq_len=2047), machine="m4-pro-24",
                   **FORMULA)
    assert not p.fits and [s["change"] for s in p.suggestions] == ["combined"]
    assert "grad checkpointing, 4-bit QLoRA, batch_size = 1 with grad_accum = 4" in p.suggestions[0]["text"]


CHEAPEST_FIRST = ["training.grad_checkpointing", "training.batch_size", "iogpu.wired_limit_mb", "model.quantize",
                  "adapter.method", "data.max_seq_len", "adapter.layers", "combined"]


def test_changes_come_cheapest_first():
    st = Settings(rank=16, batch_size=8, seq_len=1023)
    p = plan_model("Qwen/Qwen2.5-7B", st, machine="m4-max-64", **FORMULA)
    order = [s["change"] for s in p.suggestions]
    assert order[:2] == ["training.grad_checkpointing", "training.batch_size"] and "adapter.layers" in order, order
    assert order == sorted(order, key=CHEAPEST_FIRST.index)
    assert all(s["peak_bytes"] <= p.machine.budget_bytes for s in p.suggestions)
    layers = next(s for s in p.suggestions if s["change"] == "adapter.layers")
    assert layers["value"] >= 28 / 4, layers  # never under a quarter of the blocks while others fit


def test_under_a_quarter_of_the_blocks_only_when_nothing_else_fits_and_says_so():
    # rank 256 on every linear of a 4-bit 70B: the adapters and their AdamW state outweigh the rest,
    # so only adapting fewer blocks helps; the budget is set just under what a quarter would need.
    base = Settings(quant_bits=4, rank=256, batch_size=1, seq_len=255, grad_checkpointing=True)
    quarter = plan_model("meta-llama/Llama-3.1-70B", Settings(**{**base.__dict__, "layers": 20}),
                         machine="m2-ultra-64", **FORMULA).peak_bytes
    p = plan_model("meta-llama/Llama-3.1-70B", base, machine="m2-ultra-64", budget_gb=(quarter - 2**20) / GIB,
                   **FORMULA)
    (only,) = p.suggestions
    assert only["change"] == "adapter.layers" and only["value"] < 20
    assert "under a quarter of it, it trains little: nothing else fits" in only["cost"]


def test_thin_margin_is_cautioned_with_what_would_leave_10_percent():
    st = Settings(quant_bits=4, rank=16, batch_size=2, seq_len=2047, grad_checkpointing=True)
    need = plan_model("Qwen/Qwen2.5-7B", st, machine="m4-max-64", **FORMULA).peak_bytes
    p = plan_model("Qwen/Qwen2.5-7B", st, machine="m4-max-64", budget_gb=need / 0.95 / GIB, tokens=10**6,
                   **FORMULA)
    assert p.fits and p.thin_margin and p.suggestions
    assert all(s["peak_bytes"] <= 0.9 * p.machine.budget_bytes for s in p.suggestions
               if s["change"] != "iogpu.wired_limit_mb")  # that one raises the budget instead
    text = p.render()
    assert "FITS, but only" in text and "(5% of the budget; keep 10%)" in text
    assert "Any one of these leaves 10% free, cheapest first:" in text


def test_the_breakdown_explains_itself():
    p = plan_model("meta-llama/Llama-3.1-70B", Settings(quant_bits=4, batch_size=1, seq_len=2047,
                                                        grad_checkpointing=True), machine="m4-max-128",
                   tokens=5_000_000, tokens_source="given with --tokens", **FORMULA)
    text = p.render()
    headroom = next(line for line in text.splitlines() if "framework headroom" in line)
    assert "outside MLX's count: Python, Metal, the allocator's cache (1 GiB + 5%)" in headroom
    assert " 0.0 MiB" not in text and "[given]" not in text
    assert "[tokens per epoch: given with --tokens]" in text
    assert all(k in text for k, v in p.breakdown().items() if v)  # listed, or named as under 0.1 %


def test_does_not_fit_exits_3_and_fits_exits_0():
    args = ["plan", "--model", "Qwen/Qwen2.5-7B", "--method", "qlora", "--grad-checkpointing",
            "--memory-model", "formula"]
    assert CliRunner().invoke(main, args + ["--machine", "m1-8"]).exit_code == 3
    assert CliRunner().invoke(main, args + ["--machine", "m4-max-128"]).exit_code == 0
    assert "3 it does not fit" in CliRunner().invoke(main, ["plan", "--help"]).output.replace("\n", " ")


def test_m5_matmuls_run_at_the_neural_accelerators_rate():
    st = Settings(quant_bits=4, batch_size=1, seq_len=2047, grad_checkpointing=True)
    m5, m4 = (plan_model("Qwen/Qwen2.5-32B", st, machine=m, tokens=10**8, **FORMULA)
              for m in ("m5-max-128", "m4-max-128"))
    flops = 10**8 * flops_per_token(m5.shape, st)
    assert m5.machine.matmul_tflops == (26.0, 70.0) and m4.machine.matmul_tflops is None
    assert m5.seconds_per_epoch == pytest.approx(flops / 26e12 + flops / (GEMM_EFFICIENCY * 22.8e12))
    assert m5.seconds_per_epoch_high == pytest.approx(flops / 70e12 + flops / (GEMM_EFFICIENCY * 22.8e12))
    assert m4.seconds_per_epoch == pytest.approx(flops / (0.4 * 18.4e12))  # M1-M4 unchanged
    assert m5.seconds_per_epoch < m4.seconds_per_epoch
    text = m5.render()
    assert "matmuls on M5 Max's Neural Accelerators: 26 TFLOP/s" in text and "70 TFLOP/s" in text


def test_m5_ultra_profiles_are_projected_everywhere_they_are_shown():
    ultras = [m for m in list_machines() if m.chip == "M5 Ultra"]
    assert {m.memory_bytes // GIB for m in ultras} == {192, 256, 512, 768}
    assert all(m.projected and "2 x M5 Max" in m.projected and m.gpu_cores == 80 for m in ultras)
    assert all(m.projected is None for m in list_machines() if m.chip != "M5 Ultra")
    listing = CliRunner().invoke(main, ["machines"]).output
    assert all(line.rstrip().endswith("projected") for line in listing.splitlines() if line.startswith("m5-ultra"))
    p = plan_model("Qwen/Qwen2.5-7B", Settings(quant_bits=4), machine="m5-ultra-256", **FORMULA)
    assert "PROJECTED" in p.render().splitlines()[2] and "note: m5-ultra-256 is projected: 256 GB" in p.render()
    # a real M5 Ultra read by --machine auto: its own memory and budget, the rates still the projection's
    real = machine_from_device_info({"device_name": "Apple M5 Ultra", "memory_size": 256 * GIB,
                                     "max_recommended_working_set_size": 230 * GIB})
    assert real.budget_bytes == 230 * GIB and real.matmul_tflops == get_machine("m5-ultra-256").matmul_tflops
    assert real.projected.startswith("memory and budget read from this Mac; rates projected")


def test_gpt_oss_120b_is_bundled_and_planned_on_its_mxfp4_experts():
    p = plan_model("openai/gpt-oss-120b", Settings(quant_bits=4, batch_size=1, seq_len=2047,
                                                   grad_checkpointing=True), machine="m5-ultra-192", **FORMULA)
    sh = p.shape
    assert (sh.experts, sh.experts_per_tok, sh.sliding_window, sh.sinks) == (128, 4, 128, True)
    assert p.settings.quant_bits is None  # --method qlora trains on the checkpoint's own MXFP4
    assert sh.total_params() == pytest.approx(116.8e9, rel=0.01)  # OpenAI: 117B, 5.1B active
    assert sh.total_params(active=True) - sh.vocab * sh.hidden == pytest.approx(5.1e9, rel=0.02)
    weights = p.estimate.breakdown["weights"] + p.estimate.breakdown["quantization overhead"]
    assert weights / 1e9 == pytest.approx(65.3, rel=0.02)  # the published checkpoint's safetensors
    assert "MXFP4 checkpoint (experts only" in p.render()


def test_offline_fails_fast_in_one_line(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a local port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["plan", "--model", "nobody/not-bundled", "--machine", "m4-max-128"])
    assert time.monotonic() - t0 < 5 and r.exit_code == 2
    assert r.output.count("\n") == 1 and "Retrying" not in r.output
    assert f"127.0.0.1:{port} cannot be reached" in r.output and "hf download nobody/not-bundled" in r.output
    from mlx_ft.errors import ModelError
    from mlx_ft.hub import resolve_model_path

    t0 = time.monotonic()
    with pytest.raises(ModelError, match=f"127.0.0.1:{port} cannot be reached.*not in the local cache"):
        resolve_model_path("nobody/not-bundled")  # the model stage (mlxft run) too
    assert time.monotonic() - t0 < 5
