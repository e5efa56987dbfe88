"""Generate the demo dataset: short product reviews -> a JSON verdict.

The skill is visible and checkable: after `mlxft run recipes/demo.toml` the model answers a
review with `{"sentiment": "positive"|"negative", "topic": ...}` for reviews it never saw.
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
SYSTEM = "Classify the review. Reply with JSON only."


def record(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TOPICS))
    thing = rng.choice(TOPICS[topic])
    positive = rng.random() < 0.5
    phrase = rng.choice(GOOD if positive else BAD)
    review = f"{rng.choice(OPENERS)}{thing} {phrase}."
    review = review[0].upper() + review[1:]
    answer = json.dumps({"sentiment": "positive" if positive else "negative", "topic": topic})
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Review: {review}"},
            {"role": "assistant", "content": answer}]
    if rng.random() < 0.25:  # a second turn: every assistant turn is supervised
        other = rng.choice(sorted(t for t in TOPICS if t != topic))
        follow_pos = rng.random() < 0.5
        follow = f"Review: {rng.choice(TOPICS[other]).capitalize()} {rng.choice(GOOD if follow_pos else BAD)}."
        msgs += [{"role": "user", "content": follow},
                 {"role": "assistant", "content": json.dumps(
                     {"sentiment": "positive" if follow_pos else "negative", "topic": other})}]
    return {"messages": msgs}


def preference(rng: random.Random) -> dict:
    """A preference pair on the same task (TRL's conversational format): the right verdict over a
    wrong one: the sentiment flipped, the topic wrong, or prose instead of JSON."""
    msgs = record(rng)["messages"][:3]
    answer = json.loads(msgs[2]["content"])
    kind = rng.random()
    if kind < 0.5:
        flipped = "negative" if answer["sentiment"] == "positive" else "positive"
        wrong = json.dumps({**answer, "sentiment": flipped})
    elif kind < 0.75:
        wrong = json.dumps({**answer, "topic": rng.choice(sorted(t for t in TOPICS if t != answer["topic"]))})
    else:
        wrong = f"This review is {answer['sentiment']}; it is about the {answer['topic']}."
    return {"prompt": msgs[:2], "chosen": [msgs[2]], "rejected": [{"role": "assistant", "content": wrong}]}


def main(out: Path = Path(__file__).parent / "data", n_train: int = 480, n_valid: int = 48,
         n_pairs: int = 240, n_valid_pairs: int = 32) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(record(rng)) + "\n")
    rng = random.Random(1)  # the preference pairs: recipes/demo-dpo.toml and recipes/qwen7b-dpo.toml
    for name, n in (("prefs-train", n_pairs), ("prefs-valid", n_valid_pairs)):
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(preference(rng)) + "\n")


if __name__ == "__main__":
    main()
