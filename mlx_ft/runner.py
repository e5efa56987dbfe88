"""The runner: the one place that orchestrates a run, `train(recipe)`.

    validate the run dir -> plan first -> load model and data -> claim the run dir (lock, then
    --overwrite, leftovers) -> adapters, optimizer, resume point -> validation loss at step 0 ->
    the training loop (mlx_ft.train) -> save the adapter -> export -> summary and report

`mlxft run` and the notebook's `mlx_ft.train` call it. Each stage it calls lives below it and
knows nothing of the others: the planner does not train, the loop neither plans nor exports, the
data stage needs a tokenizer but not the model stage.

Everything that can be checked (recipe, run directory, model, data, adapters) is checked before
anything in the run directory is deleted; mlx_ft deletes only what it wrote there (ownership.py),
and one run at a time holds the directory's lock.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import tomllib
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import checkpoint as ckpt
from .atomic import check_writable, clean_leftovers, is_write_failure, storage_error, write_text
from .errors import CheckpointError, MlxFtError, MlxFtWarning, PlanError, StorageError, TrainingError
from .ownership import (LOCK, MARKER, REFERENCE_FILE, RESOLVED, RunLock, check_not_in_use, clear_run_dir,
                        kind_of, mark)
from .recipe import Recipe, resolved_toml
from .report import Callback

# Recipe keys that may change between a checkpoint and a resume; any other change is refused.
# More steps or epochs continue the run (a checkpoint beyond the new total is refused).
HARMLESS_ON_RESUME = {
    "training.eval_every", "training.eval_batches", "training.save_every", "training.keep_checkpoints",
    "training.report_every", "training.early_stopping_patience", "training.resume", "data.valid",
    "data.valid_fraction", "model.revision", "model.trust_remote_code", "training.eval_at_start",
    "training.steps", "training.epochs", "data.cache", "data.cache_dir",
}

__all__ = ["Callback", "TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    summary: dict
    losses: list[float] = field(default_factory=list)  # train loss of every optimizer step of this call
    model: object = field(default=None, repr=False)  # the trained model, adapters applied
    tokenizer: object = field(default=None, repr=False)

    def __repr__(self):
        s = self.summary
        loss = s.get("final_window_loss")
        shown = f"{loss:.4f}" if loss is not None else "None"
        return (f"TrainResult(steps={s.get('steps')}, final_window_loss={shown}, "
                f"adapter_dir='{self.adapter_dir}')")


def train(recipe: Recipe, resume: bool | None = None, overwrite: bool = False,
          callbacks: list[Callback] = (), progress: bool = True, force: bool = False) -> TrainResult:
    """Train as the recipe says; returns the run directory, adapter directory and summary.

    The memory planner runs first on this machine: its verdict is printed, a run that will not fit
    is refused (unless `force`), and summary.json records the planned peak beside the measured one.

    Args:
        resume: continue from the newest complete checkpoint in `output.dir` (None: the
            recipe's `training.resume`). A finished run is returned as it is, unless the recipe
            asks for more steps or epochs. overwrite: remove what an earlier run of mlx_ft wrote in
            `output.dir` first (only after the recipe, model and data were checked).
        force: start even when the plan says the run will not fit.
    Raises:
        RecipeError, DataError, ModelError, CheckpointError, TrainingError, StorageError.
    """
    echo = print if progress else (lambda _: None)
    resume = (recipe.training.resume == "auto") if resume is None else resume
    if recipe.export.to:
        from .export import check_exports

        check_exports(recipe)  # a missing GGUF quantizer is found before training, not after
    p = _prepare(recipe, resume, overwrite, force, echo)
    try:
        if p.finished is not None:
            return _finished(p, echo)
        return _run(recipe, p, callbacks, progress)
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise _stopped(storage_error(e, Path(e.filename or p.run), ""), p) from None
    except StorageError as e:
        raise _stopped(e, p) from None
    finally:
        if p.lock is not None:
            p.lock.release()


def _run(recipe: Recipe, p: "_Prepared", callbacks, progress: bool) -> TrainResult:
    import mlx.core as mx

    from . import models
    from .report import Reporter
    from .trackers import close_all, trackers_for
    from .train import Session, evaluate_loss, train_loop

    t = recipe.training
    run, primary = p.run, p.rank == 0
    if primary:
        write_text(run / RESOLVED, resolved_toml(recipe))
    trackers = trackers_for(recipe, run) if primary else []  # output.report_to
    reporter = Reporter(run, p.total_steps, p.loop, [*callbacks, *trackers], progress and primary,
                        resumed=p.latest is not None, write=primary,
                        unit=p.splits.stats.get("unit", "tokens"))
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
        path = ckpt.save(run, p.model, p.optimizer, p.loop, p.adapter_cfg, p.meta, t.keep_checkpoints,
                         protect)
        reporter.checkpoint(path)
        return path

    try:
        # The validation loss before any update, so "how much did it learn" needs no arithmetic. Here
        # and not in the loop: it trains nothing, and a resumed run has it in its checkpoint already.
        if t.eval_at_start and p.loop.step == 0 and p.splits.valid:
            metrics: dict = {}
            val = evaluate_loss(p.model, p.loss_fn, p.splits.valid, t, recipe.data, p.rank, p.world, metrics,
                                p.objective.summarize if p.objective else None)
            p.loop.extra["initial_val_loss"] = val
            reporter.initial_eval(val, metrics)
        session = Session(p.model, p.optimizer, p.loss_fn, p.splits, p.loop, p.total_steps, reporter,
                          save_checkpoint, partial(save_adapter, "adapters-best"), p.rank, p.world,
                          p.objective.summarize if p.objective else None, p.frozen)
        step_losses = train_loop(session, t, recipe.data)
    except BaseException:
        close_all(trackers, failed=True)  # a failed run ends its tracker runs as failed
        raise
    finally:
        reporter.close()

    adapter_dir = run / "adapters"
    save_adapter("adapters")
    summary = reporter.finish(adapter_dir, p.n_trainable, p.n_total, p.splits.stats,
                              peak_memory=mx.get_peak_memory(),
                              extra={"total_steps": p.total_steps, "world_size": p.world,
                                     "global_batch_size": t.batch_size * t.grad_accum, "plan": p.planned,
                                     "base_model": p.base_ref,
                                     "data_fingerprint": p.meta["data_fingerprint"]})
    result = TrainResult(run, adapter_dir, summary, step_losses, p.model, p.tokenizer)
    failed = True
    try:
        if recipe.eval.at_end and primary:  # the [eval] table: held-out answers scored
            from .evaluate import run_eval_table

            summary["eval"] = run_eval_table(recipe, result, trackers,
                                             echo=print if progress else (lambda _: None))
            write_text(run / "summary.json", json.dumps(summary, indent=2))
        if recipe.export.to and primary:
            from .export import run_exports

            try:
                summary["exports"] = [str(path) for path in run_exports(recipe, run)]
            except StorageError as e:  # training is done and kept: say so, not "the run stopped"
                raise StorageError(f"{e}. Training finished: the adapter is in {adapter_dir}; export it "
                                   "again with `mlxft fuse` or `mlxft export-adapter`") from None
            write_text(run / "summary.json", json.dumps(summary, indent=2))
        failed = False
    finally:  # trackers end with the run
        close_all(trackers, failed=failed)
    return result


def _finished(p: "_Prepared", echo) -> TrainResult:
    """A finished run asked to resume with nothing more to do: its result, the trained model loaded."""
    from .models import ADAPTER_WEIGHTS

    s = p.finished
    adapter_dir = p.run / "adapters"
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{p.run}: summary.json says the run finished, but "
                              f"{adapter_dir / ADAPTER_WEIGHTS} is missing; start again with --overwrite, "
                              "or set another output.dir")
    p.model.load_weights(str(adapter_dir / ADAPTER_WEIGHTS), strict=False)
    echo(f"output.dir {p.run} holds a finished run ({s.get('steps')} of "
         f"{s.get('total_steps', s.get('steps'))} steps); "
         "nothing to train. To train it further, raise training.steps or training.epochs and resume again; "
         f"adapter: {adapter_dir}")
    return TrainResult(p.run, adapter_dir, s, [], p.model, p.tokenizer)


def _stopped(e: StorageError, p: "_Prepared") -> StorageError:
    """A write failed mid-run: say what the run directory still holds and how to continue."""
    if e.path is None:  # not a failed write (a directory in use, not mlx_ft's): said as it is
        return e
    good, _ = ckpt.scan(p.run, verify=False) if p.run.is_dir() else ({}, {})
    kept = (f"its newest complete checkpoint is {good[max(good)]}" if good else
            "it had written no checkpoint yet (training.save_every sets how often)")
    return StorageError(f"cannot write {e.path}: {e.reason}. The run stopped at step {p.loop.step}; {kept}. "
                        "Free space or fix the permissions, then continue with `mlxft run RECIPE --resume`",
                        path=e.path, reason=e.reason)


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
    lock: RunLock | None = None  # held by rank 0 for the whole run
    finished: dict | None = None  # summary.json of a finished run there is nothing more to train for
    objective: object = None  # objectives.Objective of a preference run, None for SFT
    frozen: tuple = ()  # the frozen reference copy of a full fine-tune, which the step reads


def _prepare(recipe: Recipe, resume: bool, overwrite: bool, force: bool, echo) -> _Prepared:
    """Processes, the plan, run directory, model, data, adapters, optimizer, and the checkpoint to resume."""
    import mlx.core as mx

    from . import data, losses, models, objectives
    from .hub import check_local_model
    from .step import build_optimizer

    t, d = recipe.training, recipe.data
    resume = resume and not overwrite
    group = _init_distributed()  # a group of one unless started by mlx.launch
    rank, world = group.rank(), group.size()
    if t.batch_size % world:
        raise TrainingError(f"training.batch_size: {t.batch_size} rows cannot be split evenly over {world} "
                            f"processes; use a multiple of {world} (it is the global batch)")
    run = recipe.run_dir
    if rank == 0:
        check_run_dir(run, resume, overwrite)  # fails at once, before the minutes of loading
    check_local_model(recipe.model.path)  # a typo in model.path says so, without a plan line first
    # The data first (it needs the tokenizer, not the weights): the plan is made for its batches, a
    # bad record is named in seconds, not after a 70B model has loaded, and the rendering processes
    # of a cold pass are gone before the model takes memory.
    splits, unread = None, None
    try:
        splits = data.load_datasets(recipe, data.recipe_tokenizer(recipe),
                                    progress=echo is print and rank == 0)
    except MlxFtError as e:  # reported after the plan, which still says whether the model would fit
        unread = e
    planned = plan_first(recipe, world, force, echo if rank == 0 else (lambda _: None),
                         splits.train if splits else None)
    if unread is not None:
        raise unread
    model, tokenizer, model_dir = models.load_base(recipe.model, texts=lambda: data.record_texts(recipe))
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
    objective, frozen, precompute = objectives.from_config(t), (), None
    if objective is not None:
        reference = None
        if objective.needs_reference:
            # the same model with its adapters bypassed, or for `full` a frozen copy of the base (made
            # before a checkpoint's weights are loaded into the policy)
            full = recipe.adapter.method == "full"
            base = models.frozen_copy(model) if full else model
            reference = partial(_reference_logps, base, not full, t.loss_chunk_size, exact_head)
            if t.precompute_reference:  # once the run directory is claimed, before a checkpoint loads
                precompute, reference = reference, None
            elif full:
                frozen = (base,)
        loss_fn = partial(objectives.preference_loss, objective, reference=reference,
                          chunk_size=t.loss_chunk_size, exact_head=exact_head, packed=d.pack)
    n_trainable, n_total = models.count_parameters(model)
    # The data stage already batched the first epoch for its report; one count serves both.
    total_steps = t.steps or splits.stats["batching"]["steps_per_epoch"] * (t.epochs or 1)
    optimizer = build_optimizer(t, total_steps)
    optimizer.init(model.trainable_parameters())
    meta = {"recipe": _flat(recipe), "data_fingerprint": splits.fingerprint, "base_model": base_ref,
            "world_size": world}
    # Everything is checked: now the run directory may be changed.
    lock = _claim(run, resume, overwrite, echo) if rank == 0 else None
    try:
        finished = _finished_run(run, meta, total_steps, splits) if resume else None
        latest, loop = None, ckpt.LoopState()
        if precompute is not None and finished is None:
            _precompute(run, splits, precompute, recipe, rank == 0)
        if finished is None and resume:
            latest, loop = _resume_from(run, meta, model, optimizer, total_steps, echo, splits)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return _Prepared(run, rank, world, model, tokenizer, splits, adapter_cfg, base_ref, loss_fn, optimizer,
                     total_steps, meta, loop, latest, n_trainable, n_total, planned, lock, finished,
                     objective, frozen)


def _reference_logps(model, bypass: bool, chunk_size: int, exact_head: bool, tokens, segments):
    """Per-token log-probs of the reference model: `model` with its adapters bypassed, or a frozen copy."""
    import contextlib

    from . import losses, models

    with models.adapters_off() if bypass else contextlib.nullcontext():
        return losses.token_logps(model, tokens, segments, chunk_size, exact_head, grad=False)


def _precompute(run: Path, splits, reference, recipe: Recipe, primary: bool) -> None:
    """`training.precompute_reference`: the reference log-probs of both sequences of every example,
    computed once (before any checkpoint is loaded, so from the reference weights) and kept in the
    run directory, keyed by the data, for a resumed run to read."""
    import mlx.core as mx
    import numpy as np

    from . import data, losses
    from .atomic import atomic_file
    from .step import as_arrays

    from .data.preference import fingerprint

    key = splits.fingerprint + (fingerprint(splits.valid) if splits.valid else "")
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


def plan_first(recipe: Recipe, world: int, force: bool, echo, samples=None) -> dict | None:
    """Plan the run on this machine before the model is loaded, at the widest batch `samples` make
    (at max_seq_len without them); refuse a run whose own plan will not fit.

    Returns:
        the plan's record for summary.json, or None when the model's config cannot be found
        (the run then goes on: loading the model says what is wrong, if anything).
    Raises:
        TrainingError: the plan does not fit and `force` is not set.
    """
    from .planner.plan import preflight

    try:
        record = preflight(recipe, world, samples)
    except PlanError as e:
        first = str(e).splitlines()[0]
        echo(f"plan: skipped ({first[:150] + '...' if len(first) > 150 else first})")
        return None
    echo(record["verdict"])
    if not record["fits"] and not force:
        raise TrainingError(f"{record['verdict'].splitlines()[0]}. `mlxft plan RECIPE` shows where the "
                            "memory goes and what to change; `mlxft run --force` (train(..., force=True)) "
                            "starts anyway")
    return {k: v for k, v in record.items() if k != "verdict"}


def _entries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name not in (MARKER, LOCK)) if run.is_dir() else []


def check_run_dir(run: Path, resume: bool, overwrite: bool, locked: bool = False) -> None:
    """Check that the run may use `run` (nothing is written): a new or empty directory, or one of
    mlx_ft's own runs that is not in use, to resume or to --overwrite.

    Raises:
        StorageError: not a directory, not writable, not mlx_ft's, or in use by another run.
        CheckpointError: an earlier run is there and neither resume nor overwrite was asked for.
    """
    if run.exists() and not run.is_dir():
        raise StorageError(f"output.dir: {run} is a file, not a directory; set output.dir to a directory")
    check_writable(run, "output.dir", inside=True)
    if not locked and run.is_dir():
        check_not_in_use(run)
    if not _entries(run):
        return
    kind = kind_of(run)
    if kind != "run":
        what = f"an mlx_ft {kind} export" if kind else "files that mlx_ft did not write (no .mlx_ft marker)"
        raise StorageError(f"output.dir: {run} holds {what}; mlx_ft trains only into a new or empty "
                           "directory or one of its own runs, and never deletes what it did not create, "
                           "--overwrite included. Set another output.dir")
    if resume or overwrite:
        return
    state = "a finished run" if (run / "summary.json").exists() else "an unfinished run"
    raise CheckpointError(f"output.dir: {run} already holds {state}; pass --resume to continue it, "
                          "--overwrite to replace it, or set another output.dir")


def _claim(run: Path, resume: bool, overwrite: bool, echo) -> RunLock:
    """Take the run directory: create it, lock it, check it again (another run may have written there
    while this one loaded), clear it for --overwrite and remove leftovers of killed runs."""
    from .ownership import _describe

    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, run, "Nothing was written.") from None
    lock = RunLock(run).acquire()
    try:
        check_run_dir(run, resume, overwrite, locked=True)
        if lock.took_over:
            echo(f"took over {run}'s lock from {_describe(lock.took_over)}, which no longer runs")
        if overwrite and _entries(run):
            kept = clear_run_dir(run)
            if kept:
                entries = f"{len(kept)} entr{'y' if len(kept) == 1 else 'ies'}"
                echo(f"--overwrite kept {entries} of {run} that mlx_ft did not write: "
                     f"{', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}")
        gone = [*clean_leftovers(run), *ckpt.remove_unfinished(run)]
        for sub in [run / "export", *sorted((run / "export").glob("*/"))]:
            gone += clean_leftovers(sub)
        if gone:
            echo(f"removed {len(gone)} leftover(s) of an interrupted run in {run}: "
                 + ", ".join(str(g.relative_to(run)) for g in gone[:3]) + (" ..." if len(gone) > 3 else ""))
        mark(run, "run")
    except BaseException:
        lock.release()
        raise
    return lock


def _compare(saved: dict, meta: dict, where: Path, splits, warn: bool = True) -> None:
    """Refuse to continue `saved` (a checkpoint's or finished run's record) with a recipe, data or
    base that changed; warn about the harmless changes."""
    refused, allowed = ckpt.mismatches(saved["recipe"], meta["recipe"], HARMLESS_ON_RESUME)
    if saved.get("data_fingerprint") is not None and \
            not _same_data(saved["data_fingerprint"], meta["data_fingerprint"], splits):
        refused.append("data: the training samples differ from the run's (files changed?)")
    if saved.get("world_size", 1) != meta["world_size"]:
        refused.append(f"world size: the checkpoint was written by {saved.get('world_size', 1)} process(es), "
                       f"this run has {meta['world_size']}; resume with the same number (mlx.launch -n N)")
    if refused:
        raise CheckpointError(f"{where}: cannot resume with this recipe:\n  " + "\n  ".join(refused)
                              + "\n(use another output.dir, or --overwrite to start again)")
    for line in allowed if warn else []:
        warnings.warn(f"resuming with a changed recipe value: {line}", MlxFtWarning, stacklevel=4)


def _finished_run(run: Path, meta: dict, total_steps: int, splits) -> dict | None:
    """summary.json of a finished run when the recipe asks for no more steps than it trained; None
    for an unfinished run, or a finished one to continue. A changed recipe, data or base is refused."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        resolved = tomllib.loads((run / RESOLVED).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{run}: cannot read the finished run's summary.json or {RESOLVED} ({e}); "
                              "start again with --overwrite, or set another output.dir") from None
    saved = {**summary, "recipe": {f"{t}.{k}": v for t, table in resolved.items() for k, v in table.items()}}
    _compare(saved, meta, run, splits, warn=False)  # a continued run warns when it compares its checkpoint
    done = summary.get("total_steps") or summary.get("steps") or 0
    return summary if total_steps <= done else None


def _resume_from(run: Path, meta: dict, model, optimizer, total_steps: int, echo,
                 splits) -> tuple[Path | None, ckpt.LoopState]:
    """Load the newest complete checkpoint after checking it was made by a compatible recipe."""
    good, bad = ckpt.scan(run)
    if (run / "summary.json").is_file() and not good:
        raise CheckpointError(f"{run}: the recipe asks for {total_steps} steps, more than the finished run "
                              "trained, but there is no checkpoint to continue from (training.save_every was "
                              "not set); start again with --overwrite or set another output.dir")
    if not good and bad:
        raise CheckpointError(f"{run / 'checkpoints'}: no checkpoint can be resumed from:\n"
                              + "\n".join(f"  {d.name}: {why}" for d, why in bad.items())
                              + "\nrestore a good copy, or start again with --overwrite (which deletes them)")
    if not good:
        echo(f"no checkpoint in {run} yet: starting from step 0")
        return None, ckpt.LoopState()
    for d, why in bad.items():
        warnings.warn(f"skipping checkpoint {d}: {why}", MlxFtWarning, stacklevel=3)
    latest = good[max(good)]
    saved = json.loads((latest / ckpt.STATE).read_text())
    _compare(saved, meta, latest, splits)
    if saved["loop"]["step"] > total_steps:
        raise CheckpointError(f"{latest}: the checkpoint is at step {saved['loop']['step']}, past the "
                              f"{total_steps} steps the recipe asks for; raise training.steps or "
                              "training.epochs, or start again with --overwrite")
    loop, _ = ckpt.load(latest, model, optimizer)
    return latest, loop


def _flat(recipe: Recipe) -> dict:
    return {f"{t}.{k}": v for t, table in recipe.to_dict().items() for k, v in table.items()}


def _same_data(saved: str | None, current: str, splits) -> bool:
    """The checkpoint was trained on these samples. Checkpoints from before the data cache hold
    a hash of every sample's tokens instead of the cache's fingerprint: that is computed then."""
    from .data.dataset import legacy_fingerprint

    if saved == current:
        return True
    return bool(saved) and not saved.startswith("v2:") and saved == legacy_fingerprint(splits.train)


def _init_distributed(timeout: float | None = None):
    """`mx.distributed.init()`, bounded: the ring backend waits forever for a peer that died
    before connecting, so a watchdog ends this process with a clear message instead."""
    import mlx.core as mx

    timeout = timeout or float(os.environ.get("MLX_FT_CONNECT_TIMEOUT", "300"))

    def give_up():
        print(f"error: process {os.environ.get('MLX_RANK', '?')} could not connect to the other processes of "
              f"the run within {timeout:.0f} s (MLX_FT_CONNECT_TIMEOUT); one of them failed to start, see "
              "its error, or the hosts cannot reach each other", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    if os.environ.get("MLX_RANK") is not None:  # started by mlx.launch
        watchdog.start()
    try:
        return mx.distributed.init()
    finally:
        watchdog.cancel()
