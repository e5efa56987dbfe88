"""The runner: the one place that orchestrates a run, `train(recipe)`.

    plan first -> the run directory -> load model and data -> adapters, optimizer, resume point
    -> the training loop (mlx_ft.train) -> save the adapter -> export -> summary and report

`mlxft run` and the notebook's `mlx_ft.train` call it. Each stage it calls lives below it and
knows nothing of the others: the planner does not train, the loop neither plans nor exports, the
data stage needs a tokenizer but not the model stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import checkpoint as ckpt
from .errors import CheckpointError, PlanError, TrainingError
from .recipe import Recipe, resolved_toml
from .report import Callback

# Recipe keys that may change between a checkpoint and a resume; any other change is refused.
HARMLESS_ON_RESUME = {
    "training.eval_every", "training.eval_batches", "training.save_every", "training.keep_checkpoints",
    "training.report_every", "training.early_stopping_patience", "training.resume", "data.valid",
    "data.valid_fraction", "model.revision", "model.trust_remote_code",
}

__all__ = ["Callback", "TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    summary: dict
    losses: list[float] = field(default_factory=list)  # train loss of every optimizer step
    model: object = field(default=None, repr=False)  # the trained model, adapters applied
    tokenizer: object = field(default=None, repr=False)

    def __repr__(self):
        s = self.summary
        return (f"TrainResult(steps={s['steps']}, final_loss={s['final_loss']:.4f}, "
                f"adapter_dir='{self.adapter_dir}')")


def train(recipe: Recipe, resume: bool | None = None, overwrite: bool = False,
          callbacks: list[Callback] = (), progress: bool = True, force: bool = False) -> TrainResult:
    """Train as the recipe says; returns the run directory, adapter directory and summary.

    The memory planner runs first on this machine: its verdict is printed, a run that will not fit
    is refused (unless `force`), and summary.json records the planned peak beside the measured one.

    Args:
        resume: continue from the newest complete checkpoint in `output.dir` (None: the
            recipe's `training.resume`). overwrite: delete an existing `output.dir` first.
        force: start even when the plan says the run will not fit.
    Raises:
        RecipeError, DataError, ModelError, CheckpointError, TrainingError.
    """
    import mlx.core as mx

    from . import models
    from .report import Reporter
    from .train import Session, train_loop

    t = recipe.training
    echo = print if progress else (lambda _: None)
    p = _prepare(recipe, (t.resume == "auto") if resume is None else resume, overwrite, force, echo)
    run, primary = p.run, p.rank == 0
    if primary:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.resolved.toml").write_text(resolved_toml(recipe))
    reporter = Reporter(run, p.total_steps, p.loop, callbacks, progress and primary, resumed=p.latest is not None,
                        write=primary, unit=p.splits.stats.get("unit", "tokens"))
    reporter.start(recipe, p.n_trainable, p.n_total, p.splits.stats, p.latest)
    if p.world > 1:
        rows = {"pairs": "pairs", "examples": "examples"}.get(p.splits.stats.get("unit"), "rows")
        reporter.echo(f"data parallel: {p.world} processes, global batch {t.batch_size} {rows} x grad_accum "
                      f"{t.grad_accum} ({t.batch_size // p.world} {rows} per process)")

    def save_adapter(where: str) -> None:
        if primary:  # with several processes only rank 0 writes
            models.save_adapter(p.model, run / where, p.adapter_cfg, p.base_ref, recipe.model)

    def save_checkpoint() -> Path | None:
        if not primary:
            return None
        protect = {p.loop.best_step} if p.loop.best_step is not None else set()
        path = ckpt.save(run, p.model, p.optimizer, p.loop, p.adapter_cfg, p.meta, t.keep_checkpoints, protect)
        reporter.checkpoint(path)
        return path

    session = Session(p.model, p.optimizer, p.loss_fn, p.splits, p.loop, p.total_steps, reporter,
                      save_checkpoint, partial(save_adapter, "adapters-best"), p.rank, p.world,
                      p.objective.summarize if p.objective else None, p.frozen)
    try:
        step_losses = train_loop(session, t, recipe.data)
    finally:
        reporter.close()

    adapter_dir = run / "adapters"
    save_adapter("adapters")
    summary = reporter.finish(adapter_dir, p.n_trainable, p.n_total, p.splits.stats,
                              peak_memory=mx.get_peak_memory(),
                              extra={"world_size": p.world, "global_batch_size": t.batch_size * t.grad_accum,
                                     "plan": p.planned})
    result = TrainResult(run, adapter_dir, summary, step_losses, p.model, p.tokenizer)
    if recipe.export.to and primary:
        from .export import run_exports

        summary["exports"] = [str(path) for path in run_exports(recipe, run)]
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


@dataclass
class _Prepared:
    """Everything the loop needs before its first step, and what the runner keeps for after it."""

    run: Path
    rank: int
    world: int
    model: object
    tokenizer: object
    splits: object
    adapter_cfg: dict
    base_ref: str  # what adapter_config.json records as the base: hub id or absolute local dir
    loss_fn: object
    optimizer: object
    total_steps: int
    meta: dict
    loop: ckpt.LoopState
    latest: Path | None
    n_trainable: int
    n_total: int
    planned: dict | None
    objective: object = None  # objectives.Objective of a preference run, None for SFT
    frozen: tuple = ()  # the frozen reference copy of a full fine-tune, which the step reads


def _prepare(recipe: Recipe, resume: bool, overwrite: bool, force: bool, echo) -> _Prepared:
    """Processes, the plan, run directory, model, data, adapters, optimizer, and the checkpoint to resume."""
    import mlx.core as mx

    from . import data, losses, models, objectives
    from .step import build_optimizer

    t, d = recipe.training, recipe.data
    group = _init_distributed()  # a group of one unless started by mlx.launch
    rank, world = group.rank(), group.size()
    if t.batch_size % world:
        raise TrainingError(f"training.batch_size: {t.batch_size} rows cannot be split evenly over {world} "
                            f"processes; use a multiple of {world} (it is the global batch)")
    planned = plan_first(recipe, world, force, echo if rank == 0 else (lambda _: None))
    run = prepare_run_dir(recipe, resume, overwrite, primary=rank == 0)
    model, tokenizer, model_dir = models.load_base(recipe.model, texts=lambda: data.record_texts(recipe))
    splits = data.load_datasets(recipe, tokenizer)
    # Seeded here, after loading: building the builtin demo model on first use draws from the
    # global RNG too, and the adapter's initial weights must depend on training.seed alone.
    mx.random.seed(t.seed)
    adapter_cfg = models.apply_adapters(model, recipe.adapter)
    is_local = model_dir == Path(recipe.model.path).expanduser() or recipe.model.path.startswith("builtin:")
    base_ref = str(model_dir.resolve()) if is_local else recipe.model.path
    exact_head = losses.check_architecture(model, packing=d.pack)
    if t.grad_checkpointing:
        losses.enable_grad_checkpointing(model)
    loss_fn = partial(losses.loss_sum, chunk_size=t.loss_chunk_size, exact_head=exact_head)
    objective, frozen = objectives.from_config(t), ()
    if objective is not None:
        reference = None
        if objective.needs_reference:
            # the same model with its adapters bypassed, or for `full` a frozen copy of the base (made
            # before a checkpoint's weights are loaded into the policy)
            full = recipe.adapter.method == "full"
            base = models.frozen_copy(model) if full else model
            reference = partial(_reference_logps, base, not full, t.loss_chunk_size, exact_head)
            if t.precompute_reference:
                _precompute(run, splits, reference, recipe, rank == 0)
                reference = None
            elif full:
                frozen = (base,)
        loss_fn = partial(objectives.preference_loss, objective, reference=reference,
                          chunk_size=t.loss_chunk_size, exact_head=exact_head, packed=d.pack)
    n_trainable, n_total = models.count_parameters(model)
    # The data stage already batched the first epoch for its report; one count serves both.
    total_steps = t.steps or splits.stats["batching"]["steps_per_epoch"] * (t.epochs or 1)
    optimizer = build_optimizer(t, total_steps)
    optimizer.init(model.trainable_parameters())
    meta = {"recipe": _flat(recipe), "data_fingerprint": _fingerprint(splits.train), "base_model": base_ref,
            "world_size": world}
    latest, loop = _resume_from(run, meta, model, optimizer) if resume else (None, ckpt.LoopState())
    return _Prepared(run, rank, world, model, tokenizer, splits, adapter_cfg, base_ref, loss_fn, optimizer,
                     total_steps, meta, loop, latest, n_trainable, n_total, planned, objective, frozen)


def _reference_logps(model, bypass: bool, chunk_size: int, exact_head: bool, tokens, segments):
    """Per-token log-probs of the reference model: `model` with its adapters bypassed, or a frozen copy."""
    import contextlib

    from . import losses, models

    with models.adapters_off() if bypass else contextlib.nullcontext():
        return losses.token_logps(model, tokens, segments, chunk_size, exact_head, grad=False)


REFERENCE_FILE = "reference-logps.npz"


def _precompute(run: Path, splits, reference, recipe: Recipe, primary: bool) -> None:
    """`training.precompute_reference`: the reference log-probs of both sequences of every example,
    computed once (before any checkpoint is loaded, so from the reference weights) and kept in the
    run directory, keyed by the data, for a resumed run to read."""
    import mlx.core as mx
    import numpy as np

    from . import data, losses
    from .atomic import atomic_file
    from .step import as_arrays

    key = _fingerprint(splits.train) + (_fingerprint(splits.valid) if splits.valid else "")
    path = run / REFERENCE_FILE
    try:
        saved = np.load(path)
        found = saved["key"].item() == key and {"train", "valid"} >= set(saved.files) - {"key"}
    except (OSError, ValueError, KeyError):
        found = False
    values = {}
    for name, examples in (("train", splits.train), ("valid", splits.valid)):
        if not examples:
            continue
        if found and name in saved.files and len(saved[name]) == len(examples):
            values[name] = saved[name]
        else:
            d, t = recipe.data, recipe.training
            values[name] = np.zeros((len(examples), 2), dtype=np.float32)
            for plan in data.epoch_batches(examples, t.batch_size, d.max_seq_len, False, t.seed, 0, False):
                tokens, mask, seq, meta = as_arrays(data.collate(examples, plan, d.max_seq_len, False))
                cap = meta.shape[0]
                sums = losses.sequence_sums(reference(tokens, None) * mask[:, 1:], seq[:, 1:], 2 * cap)
                mx.eval(sums)  # sync point: one per batch of this pass
                order = [i for row in plan for i in row]
                values[name][order] = np.stack([np.array(sums[:len(order)]),
                                                np.array(sums[cap:cap + len(order)])], axis=1)
        for e, (a, b) in zip(examples, values[name].tolist()):
            e.ref = (a, b)
    if primary and not found:
        run.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **values)


def plan_first(recipe: Recipe, world: int, force: bool, echo) -> dict | None:
    """Plan the run on this machine before anything is loaded; refuse one that will not fit.

    Returns:
        the plan's record for summary.json, or None when the model's config cannot be found
        (the run then goes on: loading the model says what is wrong, if anything).
    Raises:
        TrainingError: the plan does not fit and `force` is not set.
    """
    from .planner.plan import preflight

    try:
        record = preflight(recipe, world)
    except PlanError as e:
        echo(f"plan: skipped ({e})")
        return None
    echo(record["verdict"])
    if not record["fits"] and not force:
        raise TrainingError(f"{record['verdict']}. `mlxft plan RECIPE` shows where the memory goes and what to "
                            "change; `mlxft run --force` (train(..., force=True)) starts anyway")
    return {k: v for k, v in record.items() if k != "verdict"}


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool, primary: bool = True) -> Path:
    """Check the output dir is free (or resumable), before anything is written."""
    run = recipe.run_dir
    if not run.exists() or not any(run.iterdir()):
        return run
    if overwrite:
        if primary:  # with several processes only rank 0 touches the run directory
            shutil.rmtree(run)
        return run
    if resume:
        return run
    state = "a finished run" if (run / "summary.json").exists() else "an unfinished run"
    raise CheckpointError(f"output.dir: {run} already holds {state}; pass --resume to continue it, "
                          "--overwrite to replace it, or set another output.dir")


def _resume_from(run: Path, meta: dict, model, optimizer) -> tuple[Path | None, ckpt.LoopState]:
    """Load the newest complete checkpoint after checking it was made by a compatible recipe."""
    latest = ckpt.latest(run)
    if latest is None:
        return None, ckpt.LoopState()
    saved = json.loads((latest / ckpt.STATE).read_text())
    refused, allowed = ckpt.mismatches(saved["recipe"], meta["recipe"], HARMLESS_ON_RESUME)
    if saved.get("data_fingerprint") != meta["data_fingerprint"]:
        refused.append("data: the training samples differ from the checkpoint's (files changed?)")
    if saved.get("world_size", 1) != meta["world_size"]:
        refused.append(f"world size: the checkpoint was written by {saved.get('world_size', 1)} process(es), "
                       f"this run has {meta['world_size']}; resume with the same number (mlx.launch -n N)")
    if refused:
        raise CheckpointError(f"{latest}: cannot resume with this recipe:\n  " + "\n  ".join(refused)
                              + "\n(use another output.dir, or --overwrite to start again)")
    for line in allowed:
        warnings.warn(f"resuming with a changed recipe value: {line}", stacklevel=3)
    loop, _ = ckpt.load(latest, model, optimizer)
    return latest, loop


def _flat(recipe: Recipe) -> dict:
    return {f"{t}.{k}": v for t, table in recipe.to_dict().items() for k, v in table.items()}


def _fingerprint(samples) -> str:
    """Hash of the tokenized training set: resuming on different data is refused."""
    h = hashlib.sha256()
    for s in samples:
        if hasattr(s, "key"):  # a preference example
            h.update(s.key())
            continue
        h.update(bytes(str(s.tokens), "ascii"))
        h.update(bytes(str(s.mask), "ascii"))
    return h.hexdigest()[:16]


def _init_distributed(timeout: float | None = None):
    """`mx.distributed.init()`, bounded: the ring backend waits forever for a peer that died
    before connecting, so a watchdog ends this process with a clear message instead."""
    import mlx.core as mx

    timeout = timeout or float(os.environ.get("MLX_FT_CONNECT_TIMEOUT", "300"))

    def give_up():
        print(f"error: process {os.environ.get('MLX_RANK', '?')} could not connect to the other processes of "
              f"the run within {timeout:.0f} s (MLX_FT_CONNECT_TIMEOUT); one of them failed to start, see its "
              "error, or the hosts cannot reach each other", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    if os.environ.get("MLX_RANK") is not None:  # started by mlx.launch
        watchdog.start()
    try:
        return mx.distributed.init()
    finally:
        watchdog.cancel()
