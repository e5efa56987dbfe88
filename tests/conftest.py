"""Shared fixtures: tiny models built in-process, never the network."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def chat_corpus(n: int = 64, seed: int = 0) -> list[dict]:
    """Small multi-turn chat records with a learnable pattern (answers echo a colour)."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    out = []
    for i in range(n):
        c = rng.choice(colours)
        msgs = [{"role": "user", "content": f"What colour is item {i}?"},
                {"role": "assistant", "content": f"Item {i} is {c}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Answer briefly."}] + msgs + [
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": f"Yes, {c}."}]
        out.append({"messages": msgs})
    return out


def corpus_texts(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"]]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer llama (hidden 64) with a BPE tokenizer trained on the chat corpus."""
    from mlx_ft.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    return build_tiny_model(out, corpus_texts(chat_corpus(200)), family="llama")


@pytest.fixture
def chat_jsonl(tmp_path):
    """Write the chat corpus as train.jsonl/valid.jsonl; returns (train, valid) paths."""
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    recs = chat_corpus(48)
    train.write_text("\n".join(json.dumps(r) for r in recs[:40]) + "\n")
    valid.write_text("\n".join(json.dumps(r) for r in recs[40:]) + "\n")
    return train, valid


def kill_then_resume(recipe: Path, run: Path, kill_after: int) -> subprocess.CompletedProcess:
    """`mlxft run RECIPE` in a subprocess, SIGKILLed once metrics.jsonl has `kill_after` rows, then
    `mlxft run RECIPE --resume` to the end; returns the second run's result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_ft", "run", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it was killed"
    return subprocess.run([sys.executable, "-m", "mlx_ft", "run", str(recipe), "--resume"],
                          capture_output=True, text=True, env=env)


def replayed_and_measured(model, st) -> tuple[int, int]:
    """The planner's replayed peak of the step `step_function` traces for (model, st), and MLX's peak
    running that step compiled (both with the step's evaluated inputs)."""
    import mlx.core as mx

    from mlx_ft.planner.replay import replay
    from mlx_ft.planner.trace import step_function, trace_step

    step, args, held, _ = step_function(model, st)
    mx.eval(args)
    predicted = sum(held.values()) + replay(trace_step(model, st)).peak_bytes
    compiled = mx.compile(step)
    mx.eval(compiled(*args))  # the first call compiles
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(compiled(*args))
    return predicted, mx.get_peak_memory() - base + sum(held.values())
