"""The training loop, and only the loop: `train_loop(session, training, data)`.

The runner (mlx_ft.runner) plans, prepares the run directory, loads the model and data, builds the
optimizer and the objective, and hands them over in a `Session`; the loop runs compiled
micro-steps whose gradients are summed over `grad_accum` micro-batches and divided by a token
count (not a mean of per-batch means): by default the mean supervised tokens per step of an epoch,
so every token weighs the same (`training.loss_normalization`), clips, updates, and at fixed steps
reports, evaluates and checkpoints. Everything needed to continue exactly (weights, optimizer
state, data position, the RNG, which is re-seeded from (seed, step) every step) is in each
checkpoint, so a resumed run produces the same losses as an uninterrupted one.

It stops early on a non-finite loss, early stopping, Ctrl-C/SIGTERM (after a checkpoint), a Mac
whose GPU budget is nearly full (after a checkpoint), or a lost peer under mlx.launch.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import LoopState
from .errors import TrainingError
from .recipe import DataConfig, TrainingConfig


@dataclass
class Session:
    """What the runner prepared for the loop."""

    model: object
    optimizer: object
    loss_fn: Callable
    """`loss_fn(model, *batch_arrays, grad=True) -> (summed loss, supervised tokens)`, or `(summed
    loss, units, metric sums and counts)` for a preference objective (units: pairs or examples)."""
    splits: object  # data.Splits
    loop: LoopState
    total_steps: int
    reporter: object  # report.Reporter
    save_checkpoint: Callable[[], Path | None]
    """Writes a checkpoint of the current state (rank 0), returns its directory."""
    save_best: Callable[[], None]
    """Keeps the current adapter as the best one by validation loss."""
    rank: int = 0
    world: int = 1
    summarize: Callable[[list[float]], dict] | None = None
    """Metric sums and counts of a step (or a validation pass) -> metrics by name (TRL's names)."""
    frozen: tuple = ()
    """Modules the loss reads besides the model (a full fine-tune's frozen reference copy)."""


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


def _shard(plan: list, rank: int, world: int) -> tuple[list, bool]:
    """This process's rows of a global batch: (rows to collate, whether they count).

    Rows are dealt round-robin; a process left without rows (a short last batch) runs one row
    with its mask cleared, so every process still joins the gradient all-reduce."""
    rows = plan[rank::world]
    return (rows, True) if rows else (plan[:1], False)


def train_loop(s: Session, t: TrainingConfig, d: DataConfig) -> list[float]:
    """Train until `s.total_steps` (or an early stop); returns every optimizer step's train loss.

    Raises:
        TrainingError: non-finite loss, the Mac's GPU budget nearly full, a stop signal, a lost peer.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    from . import data
    from .step import as_arrays, compile_step

    model, loop, reporter, rank, world = s.model, s.loop, s.reporter, s.rank, s.world
    splits = s.splits
    run = reporter.run

    def plans_for(epoch: int):
        return data.epoch_batches(splits.train, t.batch_size, d.max_seq_len, d.pack, t.seed, epoch, d.shuffle)

    micro_step, update, state = compile_step(model, s.optimizer, s.loss_fn, t.max_grad_norm, s.frozen)
    # loss_normalization "epoch": every step divides by one number, the epoch's supervised tokens
    # (render never supervises a sample's first token, so each is a target) per optimizer step, both
    # from the data stage's report; "step": by the step's own count.
    epoch_divisor = None
    if t.loss_normalization == "epoch":  # a preference objective's loss is a mean over pairs (loss_units)
        units = splits.stats["train"].get("loss_units", splits.stats["train"]["supervised_tokens"])
        per_step = units / splits.stats["batching"]["steps_per_epoch"]
        epoch_divisor = mx.array(per_step, dtype=mx.float32)

    stop = _StopSignals()
    guard = metal_memory_plan(mx.device_info()) if mx.metal.is_available() else None
    if guard:
        limits = mx.set_wired_limit(guard[0]), mx.set_memory_limit(guard[1])  # previous values
    mx.reset_peak_memory()
    step_losses: list[float] = []
    stall = _StallGuard(rank, world) if world > 1 else None
    try:
        plans = plans_for(loop.epoch)
        while loop.step < s.total_steps:
            mx.random.seed(t.seed * 1_000_003 + loop.step)  # dropout RNG is a function of the step
            acc, loss_total, tok_total, met_total = None, mx.array(0.0), mx.array(0.0), []
            for _ in range(t.grad_accum):
                if loop.batch_index >= len(plans):
                    loop.epoch, loop.batch_index = loop.epoch + 1, 0
                    plans = plans_for(loop.epoch)
                rows, counts = _shard(plans[loop.batch_index], rank, world)
                batch = data.collate(splits.train, rows, d.max_seq_len, d.pack)
                if not counts:
                    batch.mask[:] = False
                loss_sum, n_tok, grads, *metrics = micro_step(*as_arrays(batch))
                acc = grads if acc is None else tree_map(mx.add, acc, grads)
                met_total = [m + a for m, a in zip(metrics, met_total)] if met_total else metrics
                loss_total, tok_total = loss_total + loss_sum, tok_total + n_tok
                loop.batch_index += 1
            if world > 1:  # sum gradients, loss and token counts over processes (exact for 2^k)
                acc = tree_map(lambda g: g * world, nn.average_gradients(acc))
                loss_total, tok_total = mx.distributed.all_sum(loss_total), mx.distributed.all_sum(tok_total)
                met_total = [mx.distributed.all_sum(m) for m in met_total]
            norm = update(acc, tok_total if epoch_divisor is None else epoch_divisor)
            mx.eval(state, loss_total, tok_total, norm, met_total)  # sync point: one per optimizer step
            n_tok = int(tok_total.item())
            loss = loss_total.item() / max(n_tok, 1)
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {loop.step + 1} (epoch {loop.epoch}, batch "
                                    f"{loop.batch_index - 1}); the last good checkpoint is kept in "
                                    f"{run / 'checkpoints'}. Lower training.learning_rate or set "
                                    "training.max_grad_norm (e.g. 1.0)")
            loop.step += 1
            if stall:
                stall.beat(loop.step)
            loop.trained_tokens += n_tok
            step_losses.append(loss)
            metrics = s.summarize(met_total[0].tolist()) if met_total and s.summarize else None
            reporter.step(loss, n_tok, s.optimizer.learning_rate.item(), norm.item(), metrics)
            last = loop.step == s.total_steps
            if t.eval_every and (loop.step % t.eval_every == 0) or (last and splits.valid):
                val_metrics: dict = {}
                val = evaluate_loss(model, s.loss_fn, splits.valid, t, d, rank, world, val_metrics,
                                    s.summarize)
                if val is not None:
                    improved = loop.best_val_loss is None or val < loop.best_val_loss
                    if improved:
                        loop.best_val_loss, loop.best_step, loop.evals_since_best = val, loop.step, 0
                        s.save_best()
                    else:
                        loop.evals_since_best += 1
                    reporter.eval(val, improved, val_metrics)
                    if t.early_stopping_patience and loop.evals_since_best >= t.early_stopping_patience:
                        reporter.note("early stopping: no better validation loss for "
                                      f"{loop.evals_since_best} evaluations (best {loop.best_val_loss:.4f} "
                                      f"at step {loop.best_step})")
                        break
            if t.save_every and loop.step % t.save_every == 0 and not last:
                s.save_checkpoint()
            memory_full, signalled = _agree(world, guard is not None and mx.get_active_memory() > guard[2],
                                            stop.name is not None)
            if memory_full:
                path = s.save_checkpoint()
                raise TrainingError(
                    f"memory use reached {mx.get_active_memory() / 2**30:.1f} GiB, 95% of this Mac's GPU "
                    f"budget ({guard[0] / 2**30:.1f} GiB), at step {loop.step}; saved {path}. Lower "
                    "training.batch_size or data.max_seq_len, or turn on training.grad_checkpointing "
                    "(`mlxft plan` shows what fits), then resume with --resume")
            if signalled:
                path = s.save_checkpoint()
                raise TrainingError(f"stopped by {stop.name or 'a signal to another process'} at step "
                                    f"{loop.step}; checkpoint {path}; continue with "
                                    "`mlxft run RECIPE --resume`")
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
    return step_losses


def evaluate_loss(model, loss_fn, samples, t: TrainingConfig, d: DataConfig, rank: int = 0,
                  world: int = 1, metrics: dict | None = None, summarize=None) -> float | None:
    """Mean validation loss per supervised token (per pair for a preference objective, over every
    process's share), or None. A preference objective's metrics go into `metrics` (by `summarize`)."""
    import mlx.core as mx

    from . import data
    from .step import as_arrays

    if not samples:
        return None
    plans = data.epoch_batches(samples, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, False)
    total, count, extra = mx.array(0.0), mx.array(0.0), []
    for plan in plans[: t.eval_batches]:
        rows, counts = _shard(plan, rank, world)
        batch = data.collate(samples, rows, d.max_seq_len, d.pack)
        if not counts:  # every process computes, so the metrics' sums below have the same shape everywhere
            batch.mask[:] = False
        s, n, *m = loss_fn(model, *as_arrays(batch), grad=False)
        total, count = total + s, count + n
        extra = [a + b for a, b in zip(m, extra)] if extra else m
    if world > 1:
        total, count = mx.distributed.all_sum(total), mx.distributed.all_sum(count)
        extra = [mx.distributed.all_sum(m) for m in extra]
    mx.eval(total, count, extra)  # sync point: one per validation pass
    if extra and summarize is not None and metrics is not None:
        metrics.update(summarize(extra[0].tolist()))
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
                print(f"error: process {self.rank} of {self.world} made no progress for {limit:.0f} s after "
                      f"step {self.step}; another process of the run has probably died, see its error. Fix "
                      "it and resume with --resume (MLX_FT_STALL_TIMEOUT sets the wait)", file=sys.stderr,
                      flush=True)
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
