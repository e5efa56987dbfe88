"""What to change when a plan does not fit (or fits with too little to spare): single changes,
each re-priced with the memory model, cheapest for the user first.

Order, by what a change costs the user: gradient checkpointing (time only; the same training), a
smaller batch with more accumulation (the same tokens per step, somewhat slower), raising macOS's
GPU limit (nothing about the training; less memory for everything else), QLoRA (the adapter learns
against a quantized base), LoRA instead of full fine-tuning, shorter rows (samples truncated or
dropped), fewer adapted blocks (less is trained), several changes together. Adapting fewer than a
quarter of the blocks trains little: it is offered only when nothing else fits, and says so.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .configs import ModelShape
from .formula import estimate
from .machines import Machine, sysctl_advice
from .settings import HEADROOM_FIXED, HEADROOM_FRACTION, STATIC_TERMS, Estimate, Settings

THIN_MARGIN = 0.10
"""A plan that fits with less than this share of the budget to spare gets a warning (and the changes
that would leave this much): other apps, MLX's cache and a longer batch than planned share it."""


def thin_margin(required: int, budget: int) -> bool:
    return budget - required < THIN_MARGIN * budget


def _static(e: Estimate) -> int:
    return sum(v for k, v in e.breakdown.items() if k in STATIC_TERMS)


def suggest(shape: ModelShape, st: Settings, mach: Machine, current: Estimate | None = None,
            batches=None) -> list[dict]:
    """Single changes that make the plan fit (or, when it fits with under 10 % to spare, leave 10 %),
    cheapest for the user first; each {"change", "value", "peak_bytes", "fits", "text", "cost"}.

    The searches use the formula (a replay takes seconds); when the plan's peak came from the
    replay, the formula's step terms are scaled to agree with it at the plan's own settings.
    `batches` (plan.RunBatches) lets a shorter max_seq_len say how many samples it would cut."""
    from .timing import flops_per_token

    budget = mach.budget_bytes
    if current is not None and current.required_bytes <= budget:
        budget = int((1 - THIN_MARGIN) * budget)  # fits, but thinly: what would leave 10 % free
    scale = 1.0
    if current is not None and current.memory_model != "formula":
        f = estimate(shape, st)
        scale = (current.peak_bytes - _static(current)) / max(f.peak_bytes - _static(f), 1)

    def required(new: Settings) -> int:
        f = estimate(shape, new)
        peak = _static(f) + scale * (f.peak_bytes - _static(f))
        return int(peak + HEADROOM_FIXED + HEADROOM_FRACTION * peak)

    out: list[dict] = []

    def add(key: str, value, text: str, cost: str, new: Settings):
        out.append(_priced(required, budget, key, value, text, cost, new))

    if not st.grad_checkpointing:
        ckpt = replace(st, grad_checkpointing=True)
        slower = flops_per_token(shape, ckpt) / flops_per_token(shape, st) - 1
        add("training.grad_checkpointing", True, "training.grad_checkpointing = true",
            f"~{slower:.0%} more time per epoch, each adapted block runs forward twice; trains the same",
            ckpt)
    fitting_b = next((b for b in _batches(st)[1:] if required(replace(st, batch_size=b)) <= budget), None)
    if fitting_b:
        accum = st.batch_size * st.grad_accum // fitting_b
        add("training.batch_size", fitting_b,
            f"training.batch_size = {fitting_b} with training.grad_accum = {accum}",
            "the same tokens per optimizer step; smaller matmuls run somewhat slower",
            replace(st, batch_size=fitting_b))
    if not any(s["fits"] for s in out):  # both together still train the same, only slower
        _together(st, shape, budget, required, add, qlora=False)
    need_now = required(st)
    cmd = sysctl_advice(mach, math.ceil(need_now * mach.budget_bytes / budget))  # budget / limit: 1 or 0.9
    if cmd:  # a budget that holds the plan (with 10 % to spare when that was the question)
        out.append({"change": "iogpu.wired_limit_mb", "value": int(cmd.split("=")[1].split()[0]),
                    "peak_bytes": need_now, "fits": True, "text": cmd,
                    "cost": "nothing about the training; macOS and other apps get less memory"})
    if st.method != "full" and not (st.quant_bits or shape.quantized_bits):
        add("model.quantize", {"bits": 4, "group_size": 64},
            "QLoRA: model.quantize = { bits = 4, group_size = 64 }",
            "the adapter learns against a 4-bit copy of the base (fuse dequantizes it)",
            replace(st, quant_bits=4, quant_group=64, quant_mode="affine"))
    if not any(s["fits"] for s in out if s["change"] != "iogpu.wired_limit_mb"):
        _together(st, shape, budget, required, add, qlora=True)
    if st.method == "full":
        no_copy = (" (the reference is then the base with the adapters off: no copy)"
                   if st.reference == "copy" else "")
        add("adapter.method", "lora", f"adapter.method = 'lora' instead of full fine-tuning{no_copy}",
            "trains low-rank adapters, not every weight",
            replace(st, method="lora", reference="bypass" if st.reference == "copy" else st.reference))
    if st.reference == "copy":
        add("training.precompute_reference", True, "training.precompute_reference = true",
            "the reference's log-probs are computed once before training, so no frozen copy is held",
            replace(st, reference="precomputed"))
    # Rows cut below a quarter of their length (and 256 tokens), or fewer than a quarter of the blocks
    # adapted, leave little to train: offered last, only when nothing else fits, and saying so.
    last_resort: list[tuple] = []
    L = _largest(lambda n: required(replace(st, seq_len=n - 1)) <= budget, 32, st.seq_len)
    if L:
        cut = (f"{batches.longer_than(L):,} of {batches.samples:,} samples are longer: truncated, or dropped "
               "with data.truncation = 'drop'" if batches else "longer samples are truncated, or dropped")
        item = ("data.max_seq_len", L, f"data.max_seq_len = {L}", cut, replace(st, seq_len=L - 1))
        if L < min(256, (st.seq_len + 1) // 4):
            last_resort.append(item)
        else:
            add(*item)
    quarter = math.ceil(shape.layers / 4)
    n = _largest(lambda k: required(replace(st, layers=k)) <= budget, 1, (st.layers or shape.layers) - 1)
    if n:
        item = ("adapter.layers", n, f"adapter.layers = {n}",
                f"adapts {'only ' * (n < quarter)}the last {n} of {shape.layers} blocks: less is trained",
                replace(st, layers=n))
        if n < quarter:
            last_resort.append(item)
        else:
            add(*item)
    if not any(s["fits"] for s in out):
        _together(st, shape, budget, required, add, qlora=True, shorter=True)
    if not any(s["fits"] for s in out):
        for key, value, text, cost, new in last_resort:
            add(key, value, text, cost + "; under a quarter of it, it trains little: nothing else fits", new)
    return [s for s in out if s["fits"]]


def _priced(required, budget: int, key: str, value, text: str, cost: str, new: Settings) -> dict:
    need = required(new)
    return {"change": key, "value": value, "peak_bytes": need, "fits": need <= budget, "text": text,
            "cost": cost}


def _together(st: Settings, shape: ModelShape, budget: int, required, add, qlora: bool,
              shorter: bool = False) -> None:
    """Checkpointing and the largest batch that fits (with QLoRA when `qlora`, with the longest rows
    that fit when `shorter`), as one suggestion when that combination fits."""
    combo = replace(st, grad_checkpointing=True)
    qlora = qlora and st.method != "full" and not (st.quant_bits or shape.quantized_bits)
    if qlora:
        combo = replace(combo, quant_bits=4, quant_group=64, quant_mode="affine")
    if combo == st:
        return
    b = next((b for b in _batches(st) if required(replace(combo, batch_size=b)) <= budget), 1)
    combo = replace(combo, batch_size=b)
    L = st.seq_len + 1
    if shorter:
        L = _largest(lambda k: required(replace(combo, seq_len=k - 1)) <= budget, 32, combo.seq_len + 1)
        if not L:
            return
        combo = replace(combo, seq_len=L - 1)
    if required(combo) > budget:
        return
    parts = ["grad checkpointing"] * (not st.grad_checkpointing) + ["4-bit QLoRA"] * qlora
    if b < st.batch_size:
        parts.append(f"batch_size = {b} with grad_accum = {st.batch_size * st.grad_accum // b}")
    if L <= st.seq_len:
        parts.append(f"max_seq_len = {L}")
    costs = ["more time per epoch"] + ["a 4-bit base"] * qlora + ["shorter rows"] * (L <= st.seq_len)
    add("combined", {"grad_checkpointing": True, "quant_bits": combo.quant_bits, "batch_size": b,
                     "max_seq_len": L},
        "together: " + ", ".join(parts), "costs: " + ", ".join(costs), combo)


def _batches(st: Settings) -> list[int]:
    """Batch sizes that keep the rows of an optimizer step (batch x grad_accum) exact, largest first."""
    rows = st.batch_size * st.grad_accum
    return [b for b in range(st.batch_size, 0, -1) if rows % b == 0]


def _largest(ok, lo: int, hi: int) -> int | None:
    """Largest multiple of 32 (or integer when lo == 1) in [lo, hi] with ok(n); None if none."""
    step = 32 if lo == 32 else 1
    cands = list(range(lo, hi + 1, step))
    if not cands or not ok(cands[0]):
        return None
    a, b = 0, len(cands) - 1
    while a < b:  # memory grows with n: binary search for the last fitting candidate
        m = (a + b + 1) // 2
        a, b = (m, b) if ok(cands[m]) else (a, m - 1)
    return cands[a]
