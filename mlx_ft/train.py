"""The training loop: one readable function, `train(recipe)`.

It loads the model and data, injects adapters, then runs compiled micro-steps whose gradients are
summed over `grad_accum` micro-batches and divided by the number of supervised tokens in all of
them (not a mean of per-batch means), clips, updates, and at fixed steps reports, evaluates and
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
import time
import warnings
from dataclasses import asdict, dataclass, field
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


def metal_memory_plan(device_info: dict, stop_fraction: float = 0.95) -> tuple[int, int] | None:
    """On a Mac: (wired limit to set, active bytes at which to stop) from `mx.device_info()`.

    The wired limit is Metal's recommended working set (about 75-84% of RAM depending on macOS;
    `sudo sysctl iogpu.wired_limit_mb` raises it). Past it the GPU pages and the Mac swaps, so
    the loop checkpoints and stops at `stop_fraction` of it instead. Returns None off Metal.
    """
    budget = device_info.get("max_recommended_working_set_size")
    if not budget:
        return None
    return int(budget), int(budget * stop_fraction)


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    """Check the output dir is free (or resumable), before anything is written."""
    run = recipe.run_dir
    if not run.exists() or not any(run.iterdir()):
        return run
    if overwrite:
        shutil.rmtree(run)
        return run
    if resume:
        return run
    state = "a finished run" if (run / "summary.json").exists() else "an unfinished run"
    raise CheckpointError(f"output.dir: {run} already holds {state}; pass --resume to continue it, "
                          "--overwrite to replace it, or set another output.dir")


def _flat(recipe: Recipe) -> dict:
    return {f"{t}.{k}": v for t, table in recipe.to_dict().items() for k, v in table.items()}


def train(recipe: Recipe, resume: bool | None = None, overwrite: bool = False,
          callbacks: list[Callback] = (), progress: bool = True) -> TrainResult:
    """Train as the recipe says; returns the run directory, adapter directory and summary.

    Args:
        resume: continue from the newest complete checkpoint in `output.dir` (None: the
            recipe's `training.resume`). overwrite: delete an existing `output.dir` first.
    Raises:
        RecipeError, DataError, ModelError, CheckpointError, TrainingError.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_map

    from . import data, losses, models
    from .report import Reporter

    t, d = recipe.training, recipe.data
    resume = (t.resume == "auto") if resume is None else resume
    run = prepare_run_dir(recipe, resume, overwrite)
    mx.random.seed(t.seed)
    model, tokenizer, model_dir = models.load_base(recipe.model, texts=lambda: data.record_texts(recipe))
    splits = data.load_datasets(recipe, tokenizer)
    adapter_cfg = models.apply_adapters(model, recipe.adapter)
    base_ref = recipe.model.path if model_dir != Path(recipe.model.path).expanduser() and \
        not recipe.model.path.startswith("builtin:") else str(model_dir.resolve())
    exact_head = losses.check_architecture(model, packing=d.pack)
    if t.grad_checkpointing:
        losses.enable_grad_checkpointing(model)
    n_trainable, n_total = models.count_parameters(model)

    def plans_for(epoch: int):
        return data.epoch_batches(splits.train, t.batch_size, d.max_seq_len, d.pack, t.seed, epoch, d.shuffle)

    micro_per_epoch = len(plans_for(0))
    steps_per_epoch = max(micro_per_epoch // t.grad_accum, 1)
    total_steps = t.steps or steps_per_epoch * (t.epochs or 1)
    optimizer = build_optimizer(t, total_steps)
    optimizer.init(model.trainable_parameters())
    fingerprint = _fingerprint(splits.train)
    meta = {"recipe": _flat(recipe), "data_fingerprint": fingerprint, "base_model": base_ref}

    loop = ckpt.LoopState()
    latest = ckpt.latest(run) if resume else None
    if latest is not None:
        saved = json.loads((latest / ckpt.STATE).read_text())
        refused, allowed = ckpt.mismatches(saved["recipe"], meta["recipe"], HARMLESS_ON_RESUME)
        if saved.get("data_fingerprint") != fingerprint:
            refused.append("data: the training samples differ from the checkpoint's (files changed?)")
        if refused:
            raise CheckpointError(f"{latest}: cannot resume with this recipe:\n  " + "\n  ".join(refused)
                                  + "\n(use another output.dir, or --overwrite to start again)")
        for line in allowed:
            warnings.warn(f"resuming with a changed recipe value: {line}", stacklevel=2)
        loop, _ = ckpt.load(latest, model, optimizer)
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.resolved.toml").write_text(resolved_toml(recipe))
    reporter = Reporter(run, total_steps, loop, callbacks, progress, resumed=latest is not None)
    reporter.start(recipe, n_trainable, n_total, splits.stats, latest)

    # -- compiled steps -----------------------------------------------------------------------
    state = [model.state, optimizer.state, mx.random.state]
    loss_fn = partial(losses.loss_sum, chunk_size=t.loss_chunk_size, exact_head=exact_head)
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(tokens, mask, *segments):
        (loss_sum, n_tok), grads = grad_fn(model, tokens, mask, *segments)
        return loss_sum, n_tok, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads, n_tok):
        grads = tree_map(lambda g: g / mx.maximum(n_tok, 1.0), grads)  # token-normalised
        norm = mx.array(0.0)
        if t.max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, t.max_grad_norm)
        optimizer.update(model, grads)
        return norm

    def as_arrays(batch):
        # collate pads rows to a multiple of 8, which keeps the compiled step's shapes few.
        args = [mx.array(batch.tokens), mx.array(batch.mask)]
        if batch.segments is not None:
            args.append(mx.array(batch.segments))
        return args

    def evaluate() -> float | None:
        if not splits.valid:
            return None
        plans = data.epoch_batches(splits.valid, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, False)
        total, count = mx.array(0.0), mx.array(0.0)
        for plan in plans[: t.eval_batches]:
            s, n = loss_fn(model, *as_arrays(data.collate(splits.valid, plan, d.max_seq_len, d.pack)))
            total, count = total + s, count + n
        mx.eval(total, count)  # sync point: one per validation pass
        return total.item() / max(count.item(), 1.0)

    def save_checkpoint() -> Path:
        protect = {loop.best_step} if loop.best_step is not None else set()
        path = ckpt.save(run, model, optimizer, loop, adapter_cfg, meta, t.keep_checkpoints, protect)
        reporter.checkpoint(path)
        return path

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    handlers = {}
    if _in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)
    guard = metal_memory_plan(mx.device_info()) if mx.metal.is_available() else None
    if guard:
        mx.set_wired_limit(guard[0])
    mx.reset_peak_memory()
    step_losses: list[float] = []
    try:
        plans = plans_for(loop.epoch)
        while loop.step < total_steps:
            mx.random.seed(t.seed * 1_000_003 + loop.step)  # dropout RNG is a function of the step
            acc, loss_total, tok_total = None, mx.array(0.0), mx.array(0.0)
            for _ in range(t.grad_accum):
                if loop.batch_index >= len(plans):
                    loop.epoch, loop.batch_index = loop.epoch + 1, 0
                    plans = plans_for(loop.epoch)
                batch = data.collate(splits.train, plans[loop.batch_index], d.max_seq_len, d.pack)
                loss_sum, n_tok, grads = micro_step(*as_arrays(batch))
                acc = grads if acc is None else tree_map(mx.add, acc, grads)
                loss_total, tok_total = loss_total + loss_sum, tok_total + n_tok
                loop.batch_index += 1
            norm = update(acc, tok_total)
            mx.eval(state, loss_total, tok_total, norm)  # sync point: one per optimizer step
            n_tok = int(tok_total.item())
            loss = loss_total.item() / max(n_tok, 1)
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {loop.step + 1} (epoch {loop.epoch}, batch "
                                    f"{loop.batch_index - 1}); the last good checkpoint is kept in {run / 'checkpoints'}. "
                                    "Lower training.learning_rate or set training.max_grad_norm")
            loop.step += 1
            loop.trained_tokens += n_tok
            step_losses.append(loss)
            lr = float(optimizer.learning_rate.item()) if hasattr(optimizer.learning_rate, "item") else optimizer.learning_rate
            reporter.step(loss, n_tok, lr, float(norm.item()))
            last = loop.step == total_steps
            if t.eval_every and (loop.step % t.eval_every == 0) or (last and splits.valid):
                val = evaluate()
                if val is not None:
                    improved = loop.best_val_loss is None or val < loop.best_val_loss
                    if improved:
                        loop.best_val_loss, loop.best_step, loop.evals_since_best = val, loop.step, 0
                        models.save_adapter(model, run / "adapters-best", adapter_cfg, base_ref, recipe.model)
                    else:
                        loop.evals_since_best += 1
                    reporter.eval(val, improved)
                    if t.early_stopping_patience and loop.evals_since_best >= t.early_stopping_patience:
                        reporter.note(f"early stopping: no better validation loss for "
                                      f"{loop.evals_since_best} evaluations (best {loop.best_val_loss:.4f} at step {loop.best_step})")
                        break
            if t.save_every and loop.step % t.save_every == 0 and not last:
                save_checkpoint()
            if guard and mx.get_active_memory() > guard[1]:
                path = save_checkpoint()
                raise TrainingError(f"memory use reached {mx.get_active_memory() / 2**30:.1f} GiB, 95% of this Mac's "
                                    f"GPU budget ({guard[0] / 2**30:.1f} GiB), at step {loop.step}; saved {path}. "
                                    "Lower training.batch_size or data.max_seq_len, or turn on training.grad_checkpointing "
                                    "(`mlxft plan` shows what fits), then resume with --resume")
            if stop["signal"]:
                path = save_checkpoint()
                raise TrainingError(f"stopped by {stop['signal']} at step {loop.step}; checkpoint {path}; "
                                    "continue with `mlxft run RECIPE --resume`")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        reporter.close()

    adapter_dir = models.save_adapter(model, run / "adapters", adapter_cfg, base_ref, recipe.model)
    summary = reporter.finish(adapter_dir, n_trainable, n_total, splits.stats,
                              peak_memory=mx.get_peak_memory())
    result = TrainResult(run, adapter_dir, summary, step_losses, model, tokenizer)
    if recipe.export.to:
        from .export import run_exports

        summary["exports"] = [str(p) for p in run_exports(recipe, run)]
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _fingerprint(samples) -> str:
    """Hash of the tokenized training set: resuming on different data is refused."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(bytes(str(s.tokens), "ascii"))
        h.update(bytes(str(s.mask), "ascii"))
    return h.hexdigest()[:16]


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
