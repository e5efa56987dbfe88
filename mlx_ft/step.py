"""One optimizer step, as the training loop runs it and the planner traces it.

The loop (mlx_ft.train) and the planner's trace (mlx_ft.planner.trace) both need the optimizer
with its schedule, the update (divide the summed gradients, clip, apply) and the compiled
micro-step; they live here, below both, so the planner never imports the loop.

    micro_step, update, state = compile_step(model, optimizer, loss_fn, max_grad_norm)
    loss_sum, n_tok, grads, *metrics = micro_step(*as_arrays(batch))  # per micro-batch; grads summed
    norm = update(grads, divisor)                             # once per optimizer step
    mx.eval(state, ...)
"""

from __future__ import annotations

from functools import partial

from .recipe import TrainingConfig


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


def compile_step(model, optimizer, loss_fn, max_grad_norm: float, frozen=()):
    """The compiled micro-step and update over [model.state, optimizer.state, mx.random.state] (and
    the state of `frozen`: other modules the loss reads, e.g. a full fine-tune's reference copy).

    Args:
        loss_fn: `loss_fn(model, *batch_arrays) -> (summed loss, supervised tokens)`, e.g.
            `partial(losses.loss_sum, chunk_size=..., exact_head=...)`, or `(summed loss, units,
            metric sums)` (a preference objective, `objectives.preference_loss`).
    Returns:
        (micro_step, update, state): `micro_step(*arrays) -> (loss_sum, n_tok, grads[, metrics])`,
        `update(summed_grads, divisor) -> grad_norm`, and the state list to `mx.eval`.
    """
    import mlx.core as mx
    import mlx.nn as nn

    state = [model.state, optimizer.state, mx.random.state, *(m.state for m in frozen)]
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(*arrays):
        (loss_sum, n_tok, *metrics), grads = grad_fn(model, *arrays)
        return [loss_sum, n_tok, grads, *metrics]

    update = mx.compile(partial(apply_update, model, optimizer, max_grad_norm=max_grad_norm),
                        inputs=state, outputs=state)
    return micro_step, update, state


def as_arrays(batch) -> list:
    """A collated batch as the compiled step's arguments (collate pads rows to a multiple of 8,
    which keeps the compiled step's shapes few)."""
    import mlx.core as mx

    if hasattr(batch, "arrays"):  # a preference batch (mlx_ft.data.preference.PrefBatch)
        return [mx.array(a) for a in batch.arrays()]
    args = [mx.array(batch.tokens), mx.array(batch.mask)]
    if batch.segments is not None:
        args.append(mx.array(batch.segments))
    return args
