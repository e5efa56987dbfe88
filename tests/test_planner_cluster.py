"""Several Macs: the planner's data-parallel speed-up from world size, link and gradient size."""

import json

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.planner.cluster import cluster_estimate


def test_speedup_formula():
    # 1 GiB of gradients over 10 GbE (9 Gb/s usable) between 2 Macs: 2 * 1/2 * 2^30 B / 1.125e9 B/s
    c = cluster_estimate(2, "10gbe", step_seconds=10.0, gradient_bytes=2**30)
    assert c["allreduce_seconds"] == pytest.approx(2**30 / 1.125e9 + 2 * 50e-6)
    assert c["step_seconds"] == pytest.approx(5.0 + c["allreduce_seconds"])
    assert c["speedup"] == pytest.approx(10.0 / c["step_seconds"])


def test_lora_scales_and_full_finetune_is_link_bound():
    base = ["plan", "--model", "Qwen/Qwen2.5-7B", "--machine", "m3-ultra-256", "--tokens", "1000000",
            "--json", "--nodes", "4"]
    lora = json.loads(CliRunner().invoke(main, base + ["--method", "lora", "--link", "tb5"]).output)["cluster"]
    full = json.loads(CliRunner().invoke(main, base + ["--method", "full", "--link", "1gbe"]).output)["cluster"]
    assert lora["speedup"] > 3.5  # adapters' gradients are small: close to 4x
    assert full["speedup"] < 1.0  # every weight's gradient over 1 GbE: slower than one Mac
    assert full["gradient_bytes"] > 50 * lora["gradient_bytes"]


def test_nodes_without_a_time_estimate_is_a_clear_error():
    result = CliRunner().invoke(main, ["plan", "--model", "Qwen/Qwen2.5-7B", "--machine", "m4-max-128",
                                       "--nodes", "2"])
    assert result.exit_code == 2
    assert "--nodes needs a time estimate: give --tokens N" in result.output
