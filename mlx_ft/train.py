"""The training loop: one readable function, `train(recipe)`.

It loads the model and data, injects adapters, then runs compiled micro-steps whose gradients are
summed over `grad_accum` micro-batches and divided by a token count (not a mean of per-batch
means): by default the mean supervised tokens per step of an epoch, so every token weighs the
same (`training.loss_normalization`), clips, updates, and at fixed steps reports, evaluates and
checkpoints. Everything needed to continue exactly (weights, optimizer state, data position, the
RNG, which is re-seeded from (seed, step) every step) is in each checkpoint, so a resumed run
produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import checkpoint as ckpt
from .errors import CheckpointError, TrainingError
from .recipe import Recipe, TrainingConfig, resolved_toml

# Recipe keys that may change between a checkpoint and a resume; any other change is refused.
HARMLESS_ON_RESUME = {
    "training.eval_every", "training.eval_batches", "training.save_every", "training.keep_checkpoints",
    "training.report_every", "training.early_stopping_patience", "training.resume", "data.valid",
    "data.valid_fraction", "model.revision", "model.trust_remote_code",
}


class Callback:
    """Hooks called by `train`; subclass and override what you need."""

    def on_train_report(self, row: dict) -> None:
        """After every `report_every` steps, with the row written to metrics.jsonl."""

    def on_eval(self, row: dict) -> None:
        """After each validation pass."""

    def on_checkpoint(self, path: Path) -> None:
        """After a checkpoint directory is complete."""

    def on_end(self, summary: dict) -> None:
        """Once, with the content of summary.json."""


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


def build_optimizer(t: TrainingConfig, total_steps: int):
    """The optimizer with its schedule: linear warm-up, then constant, linear or cosine decay."""
    import mlx.optimizers as optim

    decay_steps = max(total_steps - t.warmup_steps, 1)
    if t.lr_schedule == "cosine":
        main = optim.cosine_decay(t.learning_rate, decay_steps, t.learning_rate * t.min_lr_ratio)
    elif t.lr_schedule == "linear":
        main = optim.linear_schedule(t.learning_rate, 0.0, decay_steps)
    else:
        main = optim.linear_schedule(t.learning_rate, t.learning_rate, 1)  # constant, as an array
    lr = main
    if t.warmup_steps:
        warm = optim.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
        lr = optim.join_schedules([warm, main], [t.warmup_steps])
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if t.optimizer == "sgd":
        return optim.SGD(learning_rate=lr)
    return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False)


def metal_memory_plan(device_info: dict, stop_fraction: float = 0.95,
                      throttle_fraction: float = 0.90) -> tuple[int, int, int] | None:
    """On a Mac: (wired limit, MLX memory limit, active bytes at which to stop) from `mx.device_info()`.

    The wired limit is Metal's recommended working set (about 75-84% of RAM depending on macOS;
    `sudo sysctl iogpu.wired_limit_mb` raises it). Past it the GPU pages and the Mac swaps, so
    the loop checkpoints and stops at `stop_fraction` of it instead.

    MLX allocates an op's output when it schedules the op, up to ~100 ops ahead of the ones
    computing, and holds back only when active memory passes its memory limit, which defaults
    to min(1.5 x working set, 0.95 x RAM): above the working set. Left there, memory that is
    only scheduled early could cross the stop line of a run whose real need fits. At
    `throttle_fraction` of the working set MLX waits for running work instead (measured on the
    CPU backend, batch 4 x 512, vocab 16k: peak 825 MiB unthrottled, 714 at a 700 MiB limit in
    the same time, 697 at 500 MiB with 7 % more time; no limit goes below that 697).
    Returns None off Metal.
    """
    budget = device_info.get("max_recommended_working_set_size")
    if not budget:
        return None
    return int(budget), int(budget * throttle_fraction), int(budget * stop_fraction)


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
        refused.append(f"world size: the checkpoint was written by {saved.get('world_size', 1)} process(es), this run "
                       f"has {meta['world_size']}; resume with the same number (mlx.launch -n N)")
    if refused:
        raise CheckpointError(f"{latest}: cannot resume with this recipe:\n  " + "\n  ".join(refused)
                              + "\n(use another output.dir, or --overwrite to start again)")
    for line in allowed:
        warnings.warn(f"resuming with a changed recipe value: {line}", stacklevel=3)
    loop, _ = ckpt.load(latest, model, optimizer)
    return latest, loop


def _shard(plan: list, rank: int, world: int) -> tuple[list, bool]:
    """This process's rows of a global batch: (rows to collate, whether they count).

    Rows are dealt round-robin; a process left without rows (a short last batch) runs one row
    with its mask cleared, so every process still joins the gradient all-reduce."""
    rows = plan[rank::world]
    return (rows, True) if rows else (plan[:1], False)


def _flat(recipe: Recipe) -> dict:
    return {f"{t}.{k}": v for t, table in recipe.to_dict().items() for k, v in table.items()}


@dataclass
class _Prepared:
    """Everything `train` needs before its first step."""

    run: Path
    rank: int
    world: int
    model: object
    tokenizer: object
    splits: object
    adapter_cfg: dict
    base_ref: str  # what adapter_config.json records as the base: hub id or absolute local dir
    exact_head: bool
    optimizer: object
    total_steps: int
    meta: dict
    loop: ckpt.LoopState
    latest: Path | None
    n_trainable: int
    n_total: int
    planned: dict | None


def apply_update(model, optimizer, grads, divisor, max_grad_norm: float):
    """One optimizer step on summed gradients: divide by `divisor` (at least 1), clip to
    `max_grad_norm` (0 = no clipping), update the model. Returns the gradient norm before clipping
    (0 when not clipping)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    # In each gradient's own dtype: a float32 divisor would silently turn a bf16 full
    # fine-tune's weights and optimizer state into float32 after the first update.
    grads = tree_map(lambda g: g / mx.maximum(divisor, 1.0).astype(g.dtype), grads)
    norm = mx.array(0.0)
    if max_grad_norm:
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
    optimizer.update(model, grads)
    return norm


def plan_first(recipe: Recipe, world: int, force: bool, echo) -> dict | None:
    """Plan the run on this machine before anything is loaded; refuse one that will not fit.

    Returns:
        the plan's record for summary.json, or None when the model's config cannot be found
        (the run then goes on: loading the model says what is wrong, if anything).
    Raises:
        TrainingError: the plan does not fit and `force` is not set.
    """
    from .errors import PlanError
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


def _prepare(recipe: Recipe, resume: bool, overwrite: bool, force: bool = False, echo=print) -> _Prepared:
    """Processes, the plan, run directory, model, data, adapters, optimizer, and the checkpoint to resume."""
    import mlx.core as mx

    from . import data, losses, models

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
    n_trainable, n_total = models.count_parameters(model)
    # The data stage already batched the first epoch for its report; one count serves both.
    total_steps = t.steps or splits.stats["batching"]["steps_per_epoch"] * (t.epochs or 1)
    optimizer = build_optimizer(t, total_steps)
    optimizer.init(model.trainable_parameters())
    meta = {"recipe": _flat(recipe), "data_fingerprint": _fingerprint(splits.train), "base_model": base_ref,
            "world_size": world}
    latest, loop = _resume_from(run, meta, model, optimizer) if resume else (None, ckpt.LoopState())
    return _Prepared(run, rank, world, model, tokenizer, splits, adapter_cfg, base_ref, exact_head, optimizer,
                     total_steps, meta, loop, latest, n_trainable, n_total, planned)


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
    import mlx.nn as nn
    from mlx.utils import tree_map

    from . import data, losses, models
    from .report import Reporter
    from .trackers import close_all, trackers_for

    t, d = recipe.training, recipe.data
    p = _prepare(recipe, (t.resume == "auto") if resume is None else resume, overwrite, force,
                 echo=print if progress else (lambda _: None))
    run, rank, world, model, optimizer, loop = p.run, p.rank, p.world, p.model, p.optimizer, p.loop
    splits, adapter_cfg, total_steps, primary = p.splits, p.adapter_cfg, p.total_steps, p.rank == 0
    if primary:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.resolved.toml").write_text(resolved_toml(recipe))
    trackers = trackers_for(recipe, run) if primary else []  # [firsthour] output.report_to; for the runner
    reporter = Reporter(run, total_steps, loop, [*callbacks, *trackers], progress and primary,
                        resumed=p.latest is not None, write=primary)
    reporter.start(recipe, p.n_trainable, p.n_total, splits.stats, p.latest)
    if world > 1:
        reporter.echo(f"data parallel: {world} processes, global batch {t.batch_size} rows x grad_accum "
                      f"{t.grad_accum} ({t.batch_size // world} rows per process)")

    def plans_for(epoch: int):
        return data.epoch_batches(splits.train, t.batch_size, d.max_seq_len, d.pack, t.seed, epoch, d.shuffle)

    # -- compiled steps -----------------------------------------------------------------------
    state = [model.state, optimizer.state, mx.random.state]
    loss_fn = partial(losses.loss_sum, chunk_size=t.loss_chunk_size, exact_head=p.exact_head)
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(tokens, mask, *segments):
        (loss_sum, n_tok), grads = grad_fn(model, tokens, mask, *segments)
        return loss_sum, n_tok, grads

    # loss_normalization "epoch": every step divides by one number, the epoch's supervised tokens
    # (render never supervises a sample's first token, so each is a target) per optimizer step, both
    # from the data stage's report; "step": by the step's own count.
    epoch_divisor = None
    if t.loss_normalization == "epoch":
        per_step = splits.stats["train"]["supervised_tokens"] / splits.stats["batching"]["steps_per_epoch"]
        epoch_divisor = mx.array(per_step, dtype=mx.float32)

    update = mx.compile(partial(apply_update, model, optimizer, max_grad_norm=t.max_grad_norm),
                        inputs=state, outputs=state)

    def save_checkpoint() -> Path | None:
        if not primary:
            return None
        protect = {loop.best_step} if loop.best_step is not None else set()
        path = ckpt.save(run, model, optimizer, loop, adapter_cfg, p.meta, t.keep_checkpoints, protect)
        reporter.checkpoint(path)
        return path

    stop = _StopSignals()
    guard = metal_memory_plan(mx.device_info()) if mx.metal.is_available() else None
    if guard:
        limits = mx.set_wired_limit(guard[0]), mx.set_memory_limit(guard[1])  # previous values
    mx.reset_peak_memory()
    step_losses: list[float] = []
    stall = _StallGuard(rank, world) if world > 1 else None
    try:
        plans = plans_for(loop.epoch)
        while loop.step < total_steps:
            mx.random.seed(t.seed * 1_000_003 + loop.step)  # dropout RNG is a function of the step
            acc, loss_total, tok_total = None, mx.array(0.0), mx.array(0.0)
            for _ in range(t.grad_accum):
                if loop.batch_index >= len(plans):
                    loop.epoch, loop.batch_index = loop.epoch + 1, 0
                    plans = plans_for(loop.epoch)
                rows, counts = _shard(plans[loop.batch_index], rank, world)
                batch = data.collate(splits.train, rows, d.max_seq_len, d.pack)
                if not counts:
                    batch.mask[:] = False
                loss_sum, n_tok, grads = micro_step(*_as_arrays(batch))
                acc = grads if acc is None else tree_map(mx.add, acc, grads)
                loss_total, tok_total = loss_total + loss_sum, tok_total + n_tok
                loop.batch_index += 1
            if world > 1:  # sum gradients, loss and token counts over processes (exact for 2^k)
                acc = tree_map(lambda g: g * world, nn.average_gradients(acc))
                loss_total, tok_total = mx.distributed.all_sum(loss_total), mx.distributed.all_sum(tok_total)
            norm = update(acc, tok_total if epoch_divisor is None else epoch_divisor)
            mx.eval(state, loss_total, tok_total, norm)  # sync point: one per optimizer step
            n_tok = int(tok_total.item())
            loss = loss_total.item() / max(n_tok, 1)
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {loop.step + 1} (epoch {loop.epoch}, batch "
                                    f"{loop.batch_index - 1}); the last good checkpoint is kept in {run / 'checkpoints'}. "
                                    "Lower training.learning_rate or set training.max_grad_norm (e.g. 1.0)")
            loop.step += 1
            if stall:
                stall.beat(loop.step)
            loop.trained_tokens += n_tok
            step_losses.append(loss)
            reporter.step(loss, n_tok, optimizer.learning_rate.item(), norm.item())
            last = loop.step == total_steps
            if t.eval_every and (loop.step % t.eval_every == 0) or (last and splits.valid):
                val = _evaluate(model, loss_fn, splits.valid, recipe, rank, world)
                if val is not None:
                    improved = loop.best_val_loss is None or val < loop.best_val_loss
                    if improved:
                        loop.best_val_loss, loop.best_step, loop.evals_since_best = val, loop.step, 0
                        if primary:
                            models.save_adapter(model, run / "adapters-best", adapter_cfg, p.base_ref, recipe.model)
                    else:
                        loop.evals_since_best += 1
                    reporter.eval(val, improved)
                    if t.early_stopping_patience and loop.evals_since_best >= t.early_stopping_patience:
                        reporter.note(f"early stopping: no better validation loss for "
                                      f"{loop.evals_since_best} evaluations (best {loop.best_val_loss:.4f} at step {loop.best_step})")
                        break
            if t.save_every and loop.step % t.save_every == 0 and not last:
                save_checkpoint()
            memory_full, signalled = _agree(world, guard is not None and mx.get_active_memory() > guard[2],
                                            stop.name is not None)
            if memory_full:
                path = save_checkpoint()
                raise TrainingError(f"memory use reached {mx.get_active_memory() / 2**30:.1f} GiB, 95% of this Mac's "
                                    f"GPU budget ({guard[0] / 2**30:.1f} GiB), at step {loop.step}; saved {path}. "
                                    "Lower training.batch_size or data.max_seq_len, or turn on training.grad_checkpointing "
                                    "(`mlxft plan` shows what fits), then resume with --resume")
            if signalled:
                path = save_checkpoint()
                raise TrainingError(f"stopped by {stop.name or 'a signal to another process'} at step {loop.step}; checkpoint {path}; "
                                    "continue with `mlxft run RECIPE --resume`")
    except RuntimeError as e:
        # Under mlx.launch, MLX raises from whichever collective is waiting when a peer dies: the
        # step's sync, the stop vote (_agree) or validation's sums; any of them can be the one.
        if world == 1:
            raise
        raise TrainingError(f"process {rank} of {world} lost contact with the others after step {loop.step} "
                            f"({e}); another process stopped, see its error. Fix it and resume with "
                            "--resume") from None
    finally:
        if stall:
            stall.close()
        if guard:  # a notebook's later work gets MLX's limits back
            mx.set_wired_limit(limits[0])
            mx.set_memory_limit(limits[1])
        stop.restore()
        reporter.close()
        if sys.exc_info()[0] is not None:  # [firsthour] a failed run ends its tracker runs as failed
            close_all(trackers, failed=True)

    adapter_dir = run / "adapters"
    if primary:
        models.save_adapter(model, adapter_dir, adapter_cfg, p.base_ref, recipe.model)
    summary = reporter.finish(adapter_dir, p.n_trainable, p.n_total, splits.stats, peak_memory=mx.get_peak_memory(),
                              extra={"world_size": world, "global_batch_size": t.batch_size * t.grad_accum,
                                     "plan": p.planned})
    result = TrainResult(run, adapter_dir, summary, step_losses, model, p.tokenizer)
    try:
        if recipe.eval.at_end and primary:  # [firsthour] the [eval] table; for the runner
            from .evaluate import run_eval_table

            echo = print if progress else (lambda _: None)
            summary["eval"] = run_eval_table(recipe, result, trackers, echo=echo)
            (run / "summary.json").write_text(json.dumps(summary, indent=2))
        if recipe.export.to and primary:
            from .export import run_exports

            summary["exports"] = [str(path) for path in run_exports(recipe, run)]
            (run / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:  # [firsthour] trackers end with the run
        close_all(trackers, failed=sys.exc_info()[0] is not None)
    return result


def _as_arrays(batch) -> list:
    """A collated batch as the compiled step's arguments (collate pads rows to a multiple of 8,
    which keeps the compiled step's shapes few)."""
    import mlx.core as mx

    args = [mx.array(batch.tokens), mx.array(batch.mask)]
    if batch.segments is not None:
        args.append(mx.array(batch.segments))
    return args


def _evaluate(model, loss_fn, samples, recipe: Recipe, rank: int, world: int) -> float | None:
    """Mean validation loss per supervised token (over every process's share), or None."""
    import mlx.core as mx

    from . import data

    if not samples:
        return None
    t, d = recipe.training, recipe.data
    plans = data.epoch_batches(samples, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, False)
    total, count = mx.array(0.0), mx.array(0.0)
    for plan in plans[: t.eval_batches]:
        rows, counts = _shard(plan, rank, world)
        if counts:
            s, n = loss_fn(model, *_as_arrays(data.collate(samples, rows, d.max_seq_len, d.pack)), grad=False)
            total, count = total + s, count + n
    if world > 1:
        total, count = mx.distributed.all_sum(total), mx.distributed.all_sum(count)
    mx.eval(total, count)  # sync point: one per validation pass
    return total.item() / max(count.item(), 1.0)


class _StopSignals:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks after each step (it then saves a
    checkpoint and stops); the previous handlers come back with `restore`."""

    def __init__(self):
        self.name: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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


class _StallGuard:
    """Ends a process of a distributed run that stops making progress.

    When a peer dies mid-step, MLX's ring backend usually raises "connection to a peer was
    lost", but we have seen the all-reduce wait forever instead (and a Python signal handler
    cannot run while it does). A thread therefore ends this process with a clear message when no
    step completes within max(MLX_FT_STALL_TIMEOUT, 20 x the slowest step so far) seconds."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.step = rank, world, 0
        self.floor = float(os.environ.get("MLX_FT_STALL_TIMEOUT", "600"))
        self.slowest, self.last = 0.0, time.monotonic()
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self, step: int) -> None:
        now = time.monotonic()
        self.slowest, self.last, self.step = max(self.slowest, now - self.last), now, step

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            limit = max(self.floor, 20 * self.slowest)
            if time.monotonic() - self.last > limit:
                print(f"error: process {self.rank} of {self.world} made no progress for {limit:.0f} s after step "
                      f"{self.step}; another process of the run has probably died, see its error. Fix it and "
                      "resume with --resume (MLX_FT_STALL_TIMEOUT sets the wait)", file=sys.stderr, flush=True)
                os._exit(2)

    def close(self) -> None:
        self.done.set()


def _agree(world: int, *flags: bool) -> list[bool]:
    """Stop decisions every process takes together: a flag raised on any process counts for all."""
    if world == 1:
        return list(flags)
    import mlx.core as mx

    votes = mx.distributed.all_sum(mx.array([float(f) for f in flags]))
    return [v > 0 for v in votes.tolist()]


def _fingerprint(samples) -> str:
    """Hash of the tokenized training set: resuming on different data is refused."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(bytes(str(s.tokens), "ascii"))
        h.update(bytes(str(s.mask), "ascii"))
    return h.hexdigest()[:16]
