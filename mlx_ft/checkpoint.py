"""Checkpoints for exact resume: one directory per step, written atomically.

    <run>/checkpoints/step-000200/
        adapters.safetensors    trainable weights (LoRA/DoRA matrices, or whole blocks for full)
        adapter_config.json     mlx-lm adapter config, so any checkpoint loads in mlx-lm as is
        optimizer.safetensors   optimizer state (moments, step count, scheduled learning rate)
        state.json              step, data position, best validation loss, data fingerprint,
                                sha256 of every file above, the resolved recipe

A checkpoint is written to `.step-000200.tmp-*` and renamed, so a crash leaves either the whole
directory or a temp name that is ignored and removed by the next run. A file that does not match
its recorded checksum (a truncated copy, a disk error) or a state.json without its keys makes the
checkpoint skipped with a warning in favour of the previous complete one; when none is usable,
resuming is an error, never a silent restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .atomic import TMP_TAG, atomic_dir, clean_leftovers
from .errors import CheckpointError, MlxFtWarning

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
_NAME = re.compile(r"step-\d{6,}")


@dataclass
class LoopState:
    """Where the loop is; everything needed besides weights and optimizer to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_index: int = 0  # micro-batches of `epoch` already consumed
    trained_tokens: int = 0  # supervised tokens seen
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    elapsed: float = 0.0  # training seconds before this process
    extra: dict = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(run_dir: Path, model, optimizer, loop: LoopState, adapter_config: dict, recipe_meta: dict,
         keep: int, protect: set[int] = frozenset()) -> Path:
    """Write `checkpoints/step-NNNNNN/` atomically and prune to the newest `keep` (plus `protect`)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop.step:06d}"
    with atomic_dir(final) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"),
                            dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE).write_text(json.dumps({"loop": asdict(loop), "files": files, **recipe_meta}, indent=2))
    _prune(root, keep, protect)
    return final


def _prune(root: Path, keep: int, protect: set[int]) -> None:
    steps = sorted(list_complete(root.parent, verify=False))
    for step in steps[:-keep]:
        if step not in protect:
            _remove(root / f"step-{step:06d}")
    clean_leftovers(root)  # a temp dir left by a killed process


def _remove(d: Path) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted one under its name: it is
    renamed to a temp name first (atomic), so a kill during the delete leaves a leftover that the
    next run removes, not a checkpoint without its state.json."""
    gone = d.with_name(f".{d.name}{TMP_TAG}deleted-{uuid.uuid4().hex[:8]}")
    os.replace(d, gone)
    shutil.rmtree(gone, ignore_errors=True)


def scan(run_dir: Path, verify: bool = True) -> tuple[dict[int, Path], dict[Path, str]]:
    """(step -> directory of every complete checkpoint, directory -> why it cannot be used).

    Only `step-NNNNNN` directories are checkpoints; other entries (a copy named `step-000004 copy`,
    a temp name) are not looked at. Checksums are verified when `verify`."""
    good, bad = {}, {}
    root = run_dir / "checkpoints"
    for d in sorted(root.glob("step-*")) if root.is_dir() else []:
        if not (d.is_dir() and _NAME.fullmatch(d.name)):
            continue
        problem = _problem(d) if verify else (None if (d / STATE).is_file() else f"no {STATE}")
        if problem:
            bad[d] = problem
        else:
            good[int(d.name.split("-")[1])] = d
    return good, bad


def list_complete(run_dir: Path, verify: bool = True) -> dict[int, Path]:
    """step -> directory of every complete checkpoint (checksums verified when `verify`); the others
    are skipped with a warning."""
    good, bad = scan(run_dir, verify)
    for d, problem in bad.items():
        warnings.warn(f"skipping checkpoint {d}: {problem}", MlxFtWarning, stacklevel=2)
    return good


def remove_unfinished(run_dir: Path) -> list[Path]:
    """Delete checkpoint directories without a state.json (only an interrupted delete of an older
    mlx_ft, which deleted in place, leaves one: state.json is written inside the temp directory
    before the rename) and temp leftovers of killed writes. Returns what was removed."""
    _, bad = scan(run_dir, verify=False)
    for d in bad:
        _remove(d)
    return [*bad, *clean_leftovers(run_dir / "checkpoints")]


_LOOP_KEYS = {f.name for f in fields(LoopState)}


def _problem(d: Path) -> str | None:
    try:
        meta = json.loads((d / STATE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {STATE} ({e})"
    if not (isinstance(meta, dict) and isinstance(meta.get("loop"), dict)
            and isinstance(meta.get("files"), dict)):
        return f"{STATE} lacks its `loop` or `files` table (not written by this mlx_ft, or edited)"
    missing = sorted({"step", "epoch", "batch_index"} - set(meta["loop"]))
    unknown = sorted(set(meta["loop"]) - _LOOP_KEYS)
    if missing or unknown or not isinstance(meta.get("recipe"), dict):
        what = ", ".join([*(f"missing loop.{k}" for k in missing), *(f"unknown loop.{k}" for k in unknown)]
                         + ([] if isinstance(meta.get("recipe"), dict) else ["missing recipe"]))
        return f"{STATE} does not describe a checkpoint ({what})"
    for name, digest in meta["files"].items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_complete(run_dir)
    return found[max(found)] if found else None


def load(ckpt: Path, model, optimizer) -> tuple[LoopState, dict]:
    """Restore trainable weights and optimizer state; returns (loop state, the rest of state.json)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    meta = json.loads((ckpt / STATE).read_text())
    weights = mx.load(str(ckpt / "adapters.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    bad = sorted(set(weights) ^ set(expected))
    if bad:
        raise CheckpointError(f"{ckpt}: its weights do not fit this model ({len(bad)} names differ, "
                              f"e.g. {bad[0]}); it was written by another recipe — use another output.dir "
                              "or --overwrite")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    opt_state = tree_unflatten(list(mx.load(str(ckpt / OPTIMIZER)).items()))
    optimizer.state = opt_state
    loop = LoopState(**meta.pop("loop"))
    return loop, meta


def mismatches(saved: dict, current: dict, harmless: set[str]) -> tuple[list[str], list[str]]:
    """Compare flattened recipes: (changes that forbid resuming, harmless changes to report)."""
    refused, allowed = [], []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        line = f"{key}: checkpoint has {a!r}, recipe has {b!r}"
        ok = key in harmless or key.split(".")[0] in {"output", "export", "eval"}
        (allowed if ok else refused).append(line)
    return refused, allowed
