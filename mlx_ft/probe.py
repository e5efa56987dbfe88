"""Probe mode (`mlxft plan --probe`): run two real training steps at a short length here, and
calibrate the plan's estimate.

The planner itself never trains; this module sits above it and the runner, and uses both. The
probe trains the recipe's model, adapters and settings through the runner (`mlx_ft.train`) for two
steps on synthetic rows that fill `seq_len` tokens (so the row length is known), reads the
peak that `train` measures with mx.get_peak_memory(), and compares it with the memory model at
the same settings. The ratio of the measured to the predicted activation-dependent terms then
scales those terms at the full settings; weights and optimizer state are not scaled.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from pathlib import Path

from .errors import MlxFtError, PlanError
from .planner.settings import HEADROOM_FIXED, HEADROOM_FRACTION, STATIC_TERMS, Estimate

_WORDS = ("the of and to in is was for on that with as by at from his an were are which this be "
          "have had one their not but all they has been more she also its after who new first two").split()


def probe_recipe(recipe, seq_len: int, work: Path):
    """The recipe, cut down to 2 steps on synthetic rows of `seq_len` tokens, writing under `work`."""
    from .recipe import recipe_from_dict

    rng = random.Random(0)
    rows = max(recipe.training.batch_size * recipe.training.grad_accum * 2, 2)
    data = work / "probe.jsonl"

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    pairs = recipe.training.objective != "sft"  # both sequences of a pair fill seq_len after the prompt
    with data.open("w") as f:
        for _ in range(rows):  # ~2 words per token budget: every row is truncated to seq_len
            record = {"text": words(seq_len * 2)}
            if pairs:
                record = {"prompt": words(seq_len // 8), "chosen": words(seq_len * 2),
                          "rejected": words(seq_len * 2)}
            f.write(json.dumps(record) + "\n")
    doc = recipe.to_dict()
    fmt = {"format": "auto", "train_on": "assistant"} if pairs else {"format": "text", "train_on": "all"}
    doc["data"] = {**doc["data"], "train": str(data), "valid": None, "valid_fraction": 0.0, "weights": None,
                   **fmt, "max_seq_len": seq_len, "truncation": "truncate"}
    doc["training"] = {**doc["training"], "steps": 2, "epochs": None, "eval_every": None, "save_every": None,
                       "early_stopping_patience": None, "resume": "never", "report_every": 1}
    doc["output"] = {"dir": str(work / "run")}
    doc["export"] = {**doc["export"], "to": []}
    return recipe_from_dict({t: {k: v for k, v in tab.items() if v is not None} for t, tab in doc.items()})


def measure_peak(recipe, seq_len: int) -> int:
    """mx.get_peak_memory() over 2 real training steps of `recipe` at rows of `seq_len` tokens."""
    from .runner import train

    with tempfile.TemporaryDirectory(prefix="mlxft-probe-") as tmp:
        short = probe_recipe(recipe, seq_len, Path(tmp))
        try:
            result = train(short, overwrite=True, progress=False, force=True)
        except MlxFtError as e:
            raise PlanError(f"--probe: the probe run failed: {e}") from None
        return int(result.summary["peak_memory_bytes"])


def calibrate(full: Estimate, at_probe: Estimate, measured: int) -> tuple[Estimate, dict]:
    """Scale the activation-dependent terms of `full` by measured/predicted at the probe."""
    static = sum(v for k, v in at_probe.breakdown.items() if k in STATIC_TERMS)
    dynamic = at_probe.peak_bytes - static
    scale = (measured - static) / dynamic if dynamic > 0 else 1.0
    scale = min(max(scale, 0.5), 2.0)  # a probe this far off means something else is going on
    bd = {k: (v if k in STATIC_TERMS else int(v * scale)) for k, v in full.breakdown.items()}
    peak = sum(bd.values())
    est = dataclasses.replace(full, breakdown=bd, peak_bytes=peak,
                              headroom_bytes=int(HEADROOM_FIXED + HEADROOM_FRACTION * peak))
    return est, {"measured_bytes": measured, "predicted_bytes": at_probe.peak_bytes, "scale": scale}


def probe_plan(p, recipe, seq_len: int | None = None):
    """Run the probe for Plan `p` (made from `recipe`) and return it calibrated."""
    from .planner.plan import predict, settings_from_recipe, suggest

    L = seq_len or min(256, recipe.data.max_seq_len)
    short = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_seq_len=L))
    model = "formula" if p.estimate.memory_model == "formula" else "replay"
    at_probe = predict(p.shape, settings_from_recipe(short), model)
    measured = measure_peak(recipe, L)
    p.estimate, info = calibrate(p.estimate, at_probe, measured)
    p.calibration = {**info, "seq_len": L, "batch_size": recipe.training.batch_size}
    p.suggestions = [] if p.fits else suggest(p.shape, p.settings, p.machine, p.estimate)
    return p
