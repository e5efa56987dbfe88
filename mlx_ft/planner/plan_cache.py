"""Replayed estimates, kept: a replay takes seconds (12 s for a 70B model), and `mlxft run`, `mlxft
plan` and the docs ask the same question again and again.

An entry is keyed by everything the replayed answer depends on: the model's config, the settings,
the source of every module the trace and replay run (a change to any of them is a new key), MLX's
and mlx-lm's versions and the device MLX traces for. So a cached answer is the answer the replay
gives now, never an older one (tests/test_planner_cache.py checks cached == replayed).

Entries are looked up in `$MLX_FT_CACHE/plans/` (written there after a replay, atomically) and
then in `plan_cache.json` next to this file, shipped with mlx_ft for the bundled recipes and the
tables of docs/choosing.md (`python scripts/update_plan_quotes.py` rewrites it; an entry whose
key no longer matches is never read).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Callable

from ..atomic import atomic_file
from ..cache import cache_root
from .settings import Estimate, Settings

SHIPPED = Path(__file__).with_name("plan_cache.json")
# What a replayed estimate is computed by: the planner's trace and replay, and the parts of the
# training step they build (losses, the update, the chunk rule, the preference objectives; the
# quantization, adapters, reference bypass and copy and adapter defaults of the model stage, by the
# source of those functions and classes only; the optimizer's state is set by Settings.optimizer).
_SOURCES = ["planner/trace.py", "planner/replay.py", "planner/schedule.py", "planner/settings.py",
            "planner/formula.py", "planner/configs.py", "losses.py", "step.py", "chunking.py",
            "objectives.py"]
_OBJECTS = {"models": ["quantize", "is_quantized", "_linear_types", "num_adapted_layers", "target_keys",
                       "lora_scale", "apply_adapters", "adapters_off", "frozen_copy"],
            "recipe": ["QuantizeConfig", "AdapterConfig"]}


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """Hash of the planner's sources, MLX's and mlx-lm's versions and the device traced for."""
    import mlx.core as mx
    import mlx_lm

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    for module, names in _OBJECTS.items():
        mod = importlib.import_module(f"mlx_ft.{module}")
        for name in names:
            h.update(f"{module}.{name}".encode() + b"\0" + inspect.getsource(getattr(mod, name)).encode())
    h.update(f"mlx {mx.__version__} mlx-lm {mlx_lm.__version__} metal {mx.metal.is_available()}".encode())
    return h.hexdigest()[:20]


def key(config: dict, settings: Settings) -> str:
    doc = {"planner": fingerprint(), "config": config, "settings": dataclasses.asdict(settings)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _shipped() -> dict:
    try:
        return json.loads(SHIPPED.read_text())
    except (OSError, ValueError):
        return {}


def cached(config: dict, settings: Settings, compute: Callable[[], Estimate]) -> Estimate:
    """`compute()`'s estimate for (config, settings), from the cache when this planner made it."""
    k = key(config, settings)
    user = cache_root() / "plans" / f"{k}.json"
    doc = None
    try:
        doc = json.loads(user.read_text())
    except (OSError, ValueError):  # absent, or a torn file from another version: replay again
        doc = _shipped().get(k)
    if doc is not None:
        return Estimate(**doc)
    est = compute()
    try:
        with atomic_file(user) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(est)))
    except OSError:  # a read-only or full cache costs only the time to replay again
        pass
    return est


def entries() -> dict:
    """Every entry of the cache directory (scripts/update_plan_quotes.py runs with an empty one and
    ships what it filled)."""
    out = {}
    for f in sorted((cache_root() / "plans").glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    return out
