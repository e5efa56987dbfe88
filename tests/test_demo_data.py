"""The demo's held-out set is held out: no review of examples/data/valid.jsonl is in train.jsonl, not
even the same thing and phrase behind another opener; the files are what the generator writes."""

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def reviews(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]


def pair(review: str, generator) -> tuple[str, str]:
    """(thing, phrase) of a review: what the generator holds out together."""
    text = review.removeprefix("Review: ").rstrip(".").lower()
    thing = next(t for ts in generator.TOPICS.values() for t in ts if re.search(rf"\b{t}\b", text))
    return thing, text.split(thing, 1)[1].strip()


def generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "examples" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_reviews_share_no_text_with_train():
    train, valid = reviews(load("train.jsonl")), reviews(load("valid.jsonl"))
    assert len(valid) >= 100 and not set(valid) & set(train)
    assert len(set(valid)) == len(valid)  # deduplicated within the held-out set too
    gen = generator()
    assert not {pair(r, gen) for r in valid} & {pair(r, gen) for r in train}


def test_files_are_what_the_generator_writes(tmp_path):
    generator().main(tmp_path)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name


def test_the_documented_held_out_review_is_held_out():
    path = ROOT / "scripts" / "command_examples.py"
    spec = importlib.util.spec_from_file_location("command_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HELD_OUT in reviews(load("valid.jsonl"))
    assert module.HELD_OUT not in reviews(load("train.jsonl"))
