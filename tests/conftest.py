"""Shared fixtures: tiny models built in-process, never the network."""

import json
import os
import random

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
