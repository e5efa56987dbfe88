"""Preference objectives: DPO, ORPO, SimPO and KTO, each a loss over per-sequence log-probs and the
metrics TRL logs for it. The loop calls them through `Session.loss_fn` like SFT's cross-entropy.

    loss_sum, units, metrics = preference_loss(objective, model, tokens, mask, seq, meta, reference=...)

A batch (mlx_ft.data.preference) holds two sequences per example: rows 0..R-1 the first ones
(chosen; KTO: the example), rows R..2R-1 the second (rejected; KTO: a mismatched completion for
the KL estimate), `seq` giving each position's sequence. The policy's per-token log-probs come
from the chunked head (`losses.token_logps`, never the full logits) and are summed per sequence
over the completion tokens (`losses.sequence_sums`); the reference's come from `reference` (the
same model with its adapters bypassed, or a frozen copy, under stop_gradient), or from `meta`
when they were precomputed. The formulas are TRL's (1.16): DPOTrainer (sigmoid, hinge, ipo,
robust), the experimental ORPOTrainer, CPOTrainer with loss_type "simpo" and cpo_alpha 0, and
KTOTrainer; tests/test_objectives.py checks values and gradients against TRL's own trainers.

`loss_sum` is a sum over examples (pairs, or KTO examples) and `units` their number, so the loop's
division gives TRL's per-batch mean; `metrics` holds each metric's sum and then each one's count.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .losses import sequence_sums, token_logps
from .recipe import TrainingConfig

PREFERENCE = ("dpo", "orpo", "simpo", "kto")
DEFAULTS = {"beta": {"dpo": 0.1, "kto": 0.1, "simpo": 2.0}, "loss_type": "sigmoid", "label_smoothing": 0.0,
            "orpo_lambda": 0.1, "simpo_gamma": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.0}
"""Values of unset keys: TRL's defaults, except SimPO's beta, which is the SimPO paper's."""
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass(frozen=True)
class Objective:
    """A preference objective with every hyperparameter resolved."""

    name: str
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.name in ("dpo", "kto")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics the loss returns sums and counts of, named as TRL logs them."""
        if self.name == "kto":
            return ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")
        if self.name == "orpo":
            return REWARDS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
        return REWARDS

    def summarize(self, totals: list[float]) -> dict[str, float]:
        """Metric sums and counts (summed over micro-batches and processes) -> means by name; a metric
        with nothing counted (no undesirable example in the window) is left out."""
        k = len(self.metric_names)
        out = {name: s / c for name, s, c in zip(self.metric_names, totals[:k], totals[k:]) if c > 0}
        if self.name == "kto" and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]  # as TRL's KTO logs it
        return out


def from_config(t: TrainingConfig) -> Objective | None:
    """The recipe's objective with defaults filled in; None for SFT."""
    if t.objective not in PREFERENCE:
        return None
    values = {}
    for f in fields(Objective):
        if f.name == "name":
            continue
        v = getattr(t, f.name)
        default = DEFAULTS[f.name]
        values[f.name] = v if v is not None else (default.get(t.objective, 0.1) if isinstance(default, dict)
                                                  else default)
    return Objective(t.objective, **values)


def preference_loss(objective: Objective, model, tokens: mx.array, mask: mx.array, seq: mx.array,
                    meta: mx.array, reference=None, chunk_size: int = 512, exact_head: bool = True,
                    packed: bool = False, grad: bool = True):
    """The summed loss of a batch of examples, their number, and the metrics' sums and counts.

    Args:
        tokens, mask, seq: int32, bool, int32 [2R, W], as `data.preference.collate` lays them out;
        meta: float32 [P, 3]: label, precomputed reference log-prob of the first and second sequence;
        reference: `reference(tokens, segments) -> [2R, W-1]` per-token log-probs of the reference
            model, or None (precomputed in `meta`, or an objective without a reference);
        packed: `seq` also separates the sequences' attention (data.pack).
    Returns:
        (loss_sum, units, metrics): float32 scalars and float32 [2 x len(metric_names)].
    """
    segments = seq if packed else None
    logps = lambda t, s, g: token_logps(model, t, s, chunk_size, exact_head, g)  # noqa: E731
    ref = reference(tokens, segments) if reference is not None and objective.needs_reference else None
    policy = policy_logps(objective, logps, after(tokens, ref), segments, grad)
    return loss_from_logps(objective, policy, ref, mask, seq, meta)


def after(tokens: mx.array, reference: mx.array | None) -> mx.array:
    """`tokens`, read only once the reference's log-probs are computed. The two passes are
    independent, and MLX otherwise runs them side by side: with the policy's pass waiting, the
    reference's logits and activations are freed before it starts (measured on a float32 model
    with an 8k vocabulary, 2 pairs of 256-token rows: peak 334 MiB -> 262 MiB, what a precomputed
    reference gives; benchmarks/preference_plan_accuracy.py)."""
    return tokens if reference is None else mx.depends([tokens], [reference])[0]


def policy_logps(objective: Objective, logps, tokens: mx.array, segments: mx.array | None,
                 grad: bool) -> mx.array:
    """The policy's per-token log-probs [2R, W-1] by `logps(tokens, segments, grad)`; KTO's second half
    (the KL sequences) gets no gradient, as TRL computes them under no_grad, so it runs separately."""
    if objective.name != "kto":
        return logps(tokens, segments, grad)
    R = tokens.shape[0] // 2
    halves = [None, None] if segments is None else [segments[:R], segments[R:]]
    return mx.concatenate([logps(tokens[:R], halves[0], grad),
                           mx.stop_gradient(logps(tokens[R:], halves[1], False))])


def loss_from_logps(objective: Objective, policy: mx.array, reference: mx.array | None, mask: mx.array,
                    seq: mx.array, meta: mx.array):
    """`preference_loss` from the policy's (and the reference's) per-token log-probs [2R, W-1]; without
    `reference` an objective that needs one reads the precomputed sums in `meta`."""
    P = meta.shape[0]
    target_seq = seq[:, 1:]  # the sequence of each target token
    w = mask[:, 1:].astype(mx.float32)  # completion targets
    logps = sequence_sums(policy * w, target_seq, 2 * P)  # [2P]: first sequences, then second
    counts = mx.stop_gradient(sequence_sums(w, target_seq, 2 * P))
    if objective.needs_reference:
        if reference is not None:
            ref = mx.stop_gradient(sequence_sums(reference * w, target_seq, 2 * P))
        else:
            ref = mx.concatenate([meta[:, 1], meta[:, 2]])
    else:
        ref = mx.zeros_like(logps)
    first, second, ref1, ref2 = logps[:P], logps[P:], ref[:P], ref[P:]
    n1, n2 = counts[:P], counts[P:]
    if objective.name == "kto":
        valid = (n1 > 0).astype(mx.float32)
        return _kto(objective, first, second - ref2, first - ref1, meta[:, 0], valid)
    valid = ((n1 > 0) & (n2 > 0)).astype(mx.float32)  # padding slots of the pair capacity count 0
    if objective.name == "dpo":
        return _dpo(objective, first, second, first - ref1, second - ref2, n1, n2, valid)
    avg1, avg2 = first / mx.maximum(n1, 1.0), second / mx.maximum(n2, 1.0)
    if objective.name == "simpo":
        per = -nn.log_sigmoid(objective.beta * (avg1 - avg2) - objective.simpo_gamma)
        return _finish(objective, per, objective.beta * avg1, objective.beta * avg2, avg1, avg2, valid)
    # ORPO: the NLL of the chosen sequences over every real token (prompt included, as TRL's ORPO and
    # the paper's code), as one token mean over the batch; then the odds ratio of the mean log-probs.
    inner = (target_seq == seq[:, :-1]) & (target_seq >= 0) & (target_seq < P)  # not a sequence's first token
    inner = inner.astype(mx.float32)
    nll = -(policy * inner).sum() / mx.maximum(inner.sum(), 1.0)
    safe1 = mx.where(valid > 0, mx.minimum(avg1, -1e-7), -1.0)  # log(1 - p) needs p < 1; padding stays finite
    safe2 = mx.where(valid > 0, mx.minimum(avg2, -1e-7), -1.0)
    log_odds = (safe1 - safe2) - (_log1mexp(safe1) - _log1mexp(safe2))
    ratio = nn.log_sigmoid(log_odds)
    lam, units = objective.orpo_lambda, valid.sum()
    extra = [(nll, (units > 0).astype(mx.float32)), ((valid * ratio).sum(), units),
             ((valid * log_odds).sum(), units)]
    return _finish(objective, nll - lam * ratio, lam * avg1, lam * avg2, avg1, avg2, valid, extra)


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO computes it)."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def _dpo(o: Objective, first, second, ratio1, ratio2, n1, n2, valid):
    b, eps = o.beta, o.label_smoothing
    delta = ratio1 - ratio2  # [P]
    if o.loss_type == "sigmoid":
        per = -nn.log_sigmoid(b * delta)
    elif o.loss_type == "hinge":
        per = mx.maximum(1 - b * delta, 0.0)
    elif o.loss_type == "ipo":  # TRL divides each log-ratio by its completion's tokens
        per = (ratio1 / mx.maximum(n1, 1.0) - ratio2 / mx.maximum(n2, 1.0) - 1 / (2 * b)) ** 2
    else:  # robust
        per = (-(1 - eps) * nn.log_sigmoid(b * delta) + eps * nn.log_sigmoid(-b * delta)) / (1 - 2 * eps)
    return _finish(o, per, b * ratio1, b * ratio2, first, second, valid)


def _finish(o: Objective, per, reward1, reward2, logp1, logp2, valid, extra=()):
    """(loss sum, units, metric sums and counts) from per-example losses and the paired metrics."""
    units = valid.sum()
    r1, r2 = mx.stop_gradient(reward1), mx.stop_gradient(reward2)
    sums = [(valid * r1).sum(), (valid * r2).sum(), (valid * (r1 > r2)).sum(), (valid * (r1 - r2)).sum(),
            (valid * mx.stop_gradient(logp1)).sum(), (valid * mx.stop_gradient(logp2)).sum()]
    sums += [mx.stop_gradient(s) for s, _ in extra]
    counts = [units] * len(REWARDS) + [c for _, c in extra]
    return (valid * per).sum(), units, mx.stack([*sums, *counts]).astype(mx.float32)


def _kto(o: Objective, logp, kl_ratio, ratio, label, valid):
    """KTO (TRL's KTOTrainer, loss_type 'kto'): desirable examples are pushed above the KL estimate,
    undesirable ones below it; the estimate is the batch mean of the mismatched sequences'
    log-ratios, clamped at 0, without gradient."""
    units = valid.sum()
    kl = mx.maximum(mx.stop_gradient((valid * kl_ratio).sum() / mx.maximum(units, 1.0)), 0.0)
    good, bad = valid * label, valid * (1 - label)
    b = o.beta
    per = (good * o.desirable_weight * (1 - mx.sigmoid(b * (ratio - kl)))
           + bad * o.undesirable_weight * (1 - mx.sigmoid(b * (kl - ratio))))
    r, lp = mx.stop_gradient(b * ratio), mx.stop_gradient(logp)
    sums = [(good * r).sum(), (bad * r).sum(), (good * lp).sum(), (bad * lp).sum(), kl]
    counts = [good.sum(), bad.sum(), good.sum(), bad.sum(), (units > 0).astype(mx.float32)]
    return per.sum(), units, mx.stack([*sums, *counts]).astype(mx.float32)
