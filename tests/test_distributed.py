"""Data-parallel training with mlx.launch (ring backend, 2 local processes) equals one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from test_train import files_under, make_recipe, train_rows

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: Path, n: int = 2, *extra, env: dict | None = None) -> subprocess.Popen:
    """Start `mlx.launch -n 2 ... mlxft run`; its output goes to files beside the recipe
    (pipes left unread while the test waits could fill and stall the processes)."""
    cmd = ["mlx.launch", "-n", str(n), "--backend", "ring", "-p", str(free_port()), "--",
           sys.executable, "-m", "mlx_ft", "run", str(recipe), *extra]
    out = open(recipe.parent / "launch.out", "w")
    err = open(recipe.parent / "launch.err", "w")
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=out, stderr=err, text=True, start_new_session=True)


def outputs(recipe: Path) -> tuple[str, str]:
    return (recipe.parent / "launch.out").read_text(), (recipe.parent / "launch.err").read_text()


SECTIONS = dict(training={"batch_size": 4, "steps": 6, "report_every": 1, "save_every": 3,
                          "eval_every": 3, "grad_accum": 2})


def test_two_processes_match_one_process(tmp_path, tiny_model_dir, chat_jsonl):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = subprocess.run([sys.executable, "-m", "mlx_ft", "run",
                             str(make_recipe(one, tiny_model_dir, chat_jsonl, **SECTIONS))],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    recipe = make_recipe(two, tiny_model_dir, chat_jsonl, **SECTIONS)
    proc = launch(recipe)
    proc.wait(timeout=300)
    out, err = outputs(recipe)
    assert proc.returncode == 0, err
    assert "data parallel: 2 processes, global batch 4 rows x grad_accum 2 (2 rows per process)" in out
    assert out.count("done: 6 steps") == 1, out  # only rank 0 reports
    a = {r["step"]: r["last_loss"] for r in train_rows(one / "run")}
    b = {r["step"]: r["last_loss"] for r in train_rows(two / "run")}
    assert sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5 * max(a.values()), (a, b)
    wa = mx.load(str(one / "run/adapters/adapters.safetensors"))
    wb = mx.load(str(two / "run/adapters/adapters.safetensors"))
    # Adam divides by sqrt(v): where a gradient is near zero, summation-order noise in it moves
    # the update by a visible fraction of the learning rate, so compare against the weights' scale.
    scale = max(mx.abs(wa[k]).max().item() for k in wa)
    assert max(mx.abs(wa[k] - wb[k]).max().item() for k in wa) <= 1e-3 * scale
    # one writer: the same files as a single-process run, and no file from a second rank
    assert files_under(one / "run") == files_under(two / "run")
    summary = json.loads((two / "run/summary.json").read_text())
    assert (summary["world_size"], summary["global_batch_size"]) == (2, 8)
    # a different world size cannot resume this run's checkpoints
    (two / "run/summary.json").unlink()
    again = subprocess.run([sys.executable, "-m", "mlx_ft", "run", str(two / "r.toml"), "--resume"],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "the checkpoint was written by 2 process(es), this run has 1" in again.stderr


def _rank_pids(marker: str, rank: int) -> list[int]:
    pids = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = env_file.read_bytes().split(b"\0")
            cmdline = (env_file.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and marker.encode() in cmdline:
            pids.append(int(env_file.parent.name))
    return pids


def test_a_dead_rank_stops_the_others_with_a_clear_error(tmp_path, tiny_model_dir, chat_jsonl):
    recipe = make_recipe(tmp_path, tiny_model_dir, chat_jsonl,
                         training={"batch_size": 4, "steps": 100000, "report_every": 1})
    proc = launch(recipe, env={"MLX_FT_STALL_TIMEOUT": "20"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300  # both processes import, load and compile first
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    assert metrics.exists(), "training never started"
    victims = _rank_pids(str(recipe), rank=1)
    assert victims, "rank 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("rank 0 kept waiting for a dead peer:\n" + outputs(recipe)[1][-3000:])
    out, err = outputs(recipe)
    # MLX's ring backend either raises (then the loop says so) or keeps waiting (then the stall
    # guard ends the process after MLX_FT_STALL_TIMEOUT seconds); both name the cause.
    said = out + err
    assert ("process 0 of 2 lost contact with the others after step" in said
            or "process 0 of 2 made no progress for 20 s after step" in said), err[-3000:]
    assert "Traceback" not in err
