"""Generate the demo dataset: short product reviews -> a JSON verdict.

The skill is visible and checkable: after `mlxft run recipes/demo.toml` the model answers a
review with `{"sentiment": "positive"|"negative", "topic": ...}` for reviews it never saw.

The held-out set is really held out. A review is an opener, a thing and a phrase ("Honestly, the
soup was awful."); some (thing, phrase) pairs are kept out of training altogether, and valid.jsonl
is drawn from those pairs only. So no review of valid.jsonl appears in train.jsonl, not even with
another opener: the model has seen "the soup" and "was awful" there, never together, and must
combine what it learned (tests/test_demo_data.py checks the sets share no review text).

prefs-*.jsonl hold preference pairs on the same task (recipes/demo-dpo.toml).
Deterministic (seeded); run `python examples/make_demo_data.py` to rewrite examples/data/.
"""

import json
import random
from pathlib import Path

TOPICS = {
    "food": ["the pasta", "the soup", "the coffee", "the pizza", "the salad", "the bread"],
    "service": ["the waiter", "the staff", "the host", "the delivery", "the support team"],
    "price": ["the bill", "the price", "the menu prices", "the lunch deal"],
    "place": ["the room", "the terrace", "the music", "the view", "the tables"],
}
GOOD = ["was wonderful", "was excellent", "was great", "felt friendly", "was lovely", "was perfect",
        "made my day", "was a delight"]
BAD = ["was awful", "was terrible", "was cold", "felt rude", "was disappointing", "was a mess",
       "ruined the evening", "was far too slow"]
OPENERS = ["", "Honestly, ", "Well, ", "To be fair, ", "Last night ", "Overall "]
HELD_OUT_PER_THING = 3  # of the 16 phrases, per thing: 63 of the 336 (thing, phrase) pairs


def split_pairs(rng: random.Random) -> tuple[list, list]:
    """(train pairs, held-out pairs) of (topic, thing, phrase, positive); each thing keeps
    HELD_OUT_PER_THING phrases out of training, and every phrase stays in training for most things."""
    train, held = [], []
    phrases = [(p, True) for p in GOOD] + [(p, False) for p in BAD]
    for topic in sorted(TOPICS):
        for thing in TOPICS[topic]:
            out = set(rng.sample(range(len(phrases)), HELD_OUT_PER_THING))
            for k, (phrase, positive) in enumerate(phrases):
                (held if k in out else train).append((topic, thing, phrase, positive))
    return train, held


def turn(rng: random.Random, pairs: list, opener: bool = True) -> tuple[str, str]:
    """One user review and its JSON answer, from a random pair."""
    topic, thing, phrase, positive = rng.choice(pairs)
    review = f"{rng.choice(OPENERS) if opener else ''}{thing} {phrase}."
    review = review[0].upper() + review[1:]
    answer = json.dumps({"sentiment": "positive" if positive else "negative", "topic": topic})
    return f"Review: {review}", answer


def record(rng: random.Random, pairs: list) -> dict:
    review, answer = turn(rng, pairs)
    # No system prompt: the tiny random model leaves its loss plateau sooner when the review is a
    # larger share of what its (at first nearly uniform) attention spreads over.
    msgs = [{"role": "user", "content": review}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.25:  # a second turn: every assistant turn is supervised
        review, answer = turn(rng, pairs, opener=False)
        msgs += [{"role": "user", "content": review}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def reviews(rec: dict) -> list[str]:
    return [m["content"] for m in rec["messages"] if m["role"] == "user"]


def draw(rng: random.Random, pairs: list, n: int, taken: set[str]) -> list[dict]:
    """n records whose reviews are all new (not in `taken`, which grows): no duplicate text."""
    out = []
    while len(out) < n:
        rec = record(rng, pairs)
        texts = reviews(rec)
        if len(set(texts)) == len(texts) and not taken.intersection(texts):
            taken.update(texts)
            out.append(rec)
    return out


def preference(rng: random.Random, pairs: list) -> dict:
    """A preference pair on the same task (TRL's conversational format): the right verdict over a
    wrong one: the sentiment flipped, the topic wrong, or prose instead of JSON."""
    msgs = record(rng, pairs)["messages"][:2]
    answer = json.loads(msgs[1]["content"])
    kind = rng.random()
    if kind < 0.5:
        flipped = "negative" if answer["sentiment"] == "positive" else "positive"
        wrong = json.dumps({**answer, "sentiment": flipped})
    elif kind < 0.75:
        wrong = json.dumps({**answer, "topic": rng.choice(sorted(t for t in TOPICS if t != answer["topic"]))})
    else:
        wrong = f"This review is {answer['sentiment']}; it is about the {answer['topic']}."
    return {"prompt": msgs[:1], "chosen": [msgs[1]], "rejected": [{"role": "assistant", "content": wrong}]}


def main(out: Path = Path(__file__).parent / "data", n_train: int = 1000, n_valid: int = 100,
         n_pairs: int = 240, n_valid_pairs: int = 32) -> None:
    rng = random.Random(0)
    train_pairs, held_pairs = split_pairs(rng)
    taken: set[str] = set()
    splits = {"train": draw(rng, train_pairs, n_train, taken), "valid": draw(rng, held_pairs, n_valid, taken)}
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # The preference pairs (recipes/demo-dpo.toml, recipes/qwen7b-dpo.toml): their own seed, so the
    # SFT sets above do not change with them; the validation pairs come from the held-out pairs too.
    rng = random.Random(1)
    for name, pairs, n in (("prefs-train", train_pairs, n_pairs), ("prefs-valid", held_pairs, n_valid_pairs)):
        records = [preference(rng, pairs) for _ in range(n)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
