"""Put it together: recipe -> model shape + settings -> estimate vs machine budget -> advice.

A recipe whose data can be read is planned at the batches its run will make: the widest batch of an
epoch (length buckets pad each batch to its longest sample; packed rows are max_seq_len wide), with
the max_seq_len worst case beside it. Without the data (no tokenizer offline, files elsewhere) the
plan is that worst case, every row max_seq_len tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import PlanError
from .advice import suggest, thin_margin
from .configs import ModelShape, load_shape
from .formula import estimate
from .machines import Machine, get_machine
from .settings import Estimate, Settings, adapted_layers, adapted_modules, reference_kind
from .timing import EFFICIENCY, flops_per_token, measure_cpu_tflops, seconds_per_epoch

__all__ = ["Plan", "RunBatches", "check_settings", "plan", "plan_model", "predict", "preflight",
           "run_batches", "settings_from_recipe", "suggest"]


def settings_from_recipe(recipe) -> Settings:
    """The memory-relevant choices of a Recipe, at the worst-case row length."""
    a, d, t, q = recipe.adapter, recipe.data, recipe.training, recipe.model.quantize
    # the widest row collate makes is max_seq_len (packed or not); the loss feeds tokens[:, :-1]
    L = d.max_seq_len
    return Settings(
        method=a.method, quant_bits=q.bits if q else None, quant_group=q.group_size if q else 64,
        quant_mode=q.mode if q else "affine",
        rank=a.rank, layers=None if a.layers == "all" else int(a.layers),
        targets=(a.targets,) if isinstance(a.targets, str) else tuple(a.targets),
        batch_size=t.batch_size, seq_len=L - 1, pack=d.pack, grad_checkpointing=t.grad_checkpointing,
        loss_chunk=t.loss_chunk_size, optimizer=t.optimizer, grad_accum=t.grad_accum, objective=t.objective,
        reference=reference_kind(t.objective, a.method, t.precompute_reference))


@dataclass(frozen=True)
class RunBatches:
    """The batches one epoch of a run makes, from its data (`data.epoch_batches`, `data.row_width`)."""

    rows: int
    """The most samples a batch has (batch_size, fewer when the data makes fewer; preference
    examples, each two rows of the batch: Settings.rows doubles them)."""
    width: int
    """The widest batch's padded row length: its longest sample rounded up to 8, or max_seq_len packed."""
    batches: int
    positions: int
    """Rows x width summed over the epoch: the padded tokens the model runs over (both sequences of
    a preference example)."""
    attention_width: float
    """Token-weighted mean width: each batch's attention runs over its own width."""
    tokens: int
    samples: int
    longest: int
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False)

    def longer_than(self, n: int) -> int:
        """Samples longer than n tokens: what a max_seq_len of n would truncate or drop."""
        return int(np.count_nonzero(self.lengths > n))


def run_batches(recipe, samples) -> RunBatches:
    """The first epoch's batches of `samples` as the recipe batches them (every epoch makes the same
    widest batch: the one holding the longest sample)."""
    from ..data import item_lengths, item_tokens
    from ..data.batching import epoch_batches, row_width

    d, t = recipe.data, recipe.training
    lengths = item_lengths(samples)  # a preference example batches by its longer sequence
    plans = epoch_batches(lengths, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, d.shuffle)
    shapes = [(len(p), row_width(lengths, p, d.max_seq_len, d.pack)) for p in plans]
    padded = sum(b * w for b, w in shapes)
    sequences = 1 if t.objective == "sft" else 2  # each preference example is two rows of the batch
    return RunBatches(rows=max(b for b, _ in shapes), width=max(w for _, w in shapes), batches=len(plans),
                      positions=sequences * padded,
                      attention_width=sum(b * w * w for b, w in shapes) / padded,
                      tokens=int(item_tokens(samples).sum()), samples=len(samples),
                      longest=int(lengths.max()), lengths=lengths)


def read_run_batches(recipe) -> tuple[RunBatches | None, str]:
    """(the run's batches, a line saying where they come from), or (None, why not) when the data
    or the tokenizer cannot be read here."""
    try:
        from ..data import load_datasets, recipe_tokenizer

        batches = run_batches(recipe, load_datasets(recipe, recipe_tokenizer(recipe)).train)
    except Exception as e:  # no tokenizer offline, data elsewhere: plan the worst case instead
        why = str(e).splitlines()[0][:160] if str(e) else ""
        return None, f"data not read ({type(e).__name__}: {why})"
    return batches, (f"{batches.tokens:,} dataset tokens, {batches.positions:,} with padding, "
                     f"in {batches.batches} batches")


def settings_for_batches(st: Settings, batches: RunBatches | None, world: int = 1) -> Settings:
    """`st` at the widest batch the run makes (each of `world` processes holds its share of the rows)."""
    rows = batches.rows if batches else st.batch_size
    width = batches.width if batches else st.seq_len + 1
    return replace(st, batch_size=max(1, math.ceil(rows / world)), seq_len=width - 1)


@dataclass(repr=False)
class Plan:
    """The planner's answer: breakdown, verdict against the budget, advice, and time per epoch."""

    shape: ModelShape
    settings: Settings
    machine: Machine
    estimate: Estimate
    suggestions: list[dict] = field(default_factory=list)
    tokens_per_epoch: int | None = None
    tokens_source: str = ""
    seconds_per_epoch: float | None = None
    seconds_per_epoch_high: float | None = None
    """At the high end of a published matmul range (M5 family), where the sources disagree."""
    flops_per_token: float = 0.0
    tflops: float | None = None
    calibration: dict | None = None
    cluster: dict | None = None  # several Macs: see `with_cluster`
    batches: RunBatches | None = None
    """The run's own batches, when the data was read; `settings` are then at its widest batch."""
    worst: Estimate | None = None
    """The max_seq_len worst case (`worst_settings`), when the run's batches are narrower."""
    worst_settings: Settings | None = None
    max_seq_len: int | None = None

    @property
    def peak_bytes(self) -> int:
        """What must fit the budget: MLX's predicted peak plus framework headroom."""
        return self.estimate.required_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.machine.budget_bytes

    @property
    def margin_bytes(self) -> int:
        return self.machine.budget_bytes - self.peak_bytes

    @property
    def thin_margin(self) -> bool:
        """Fits, with under 10 % of the budget to spare."""
        return self.fits and thin_margin(self.peak_bytes, self.machine.budget_bytes)

    def breakdown(self) -> dict[str, int]:
        return {**self.estimate.breakdown, "framework headroom": self.estimate.headroom_bytes}

    def to_dict(self) -> dict:
        st, m = self.settings, self.machine
        worst = None if self.worst is None else {
            "peak_bytes": self.worst.required_bytes, "mlx_peak_bytes": self.worst.peak_bytes,
            "fits": self.worst.required_bytes <= m.budget_bytes,
            "batch_size": self.worst_settings.batch_size, "seq_len": self.worst_settings.seq_len + 1}
        return {
            "model": self.shape.name, "model_config_source": self.shape.source,
            "machine": m.name, "chip": m.chip, "memory_bytes": m.memory_bytes, "projected": m.projected,
            "budget_bytes": m.budget_bytes, "budget_source": m.budget_source,
            "peak_bytes": self.peak_bytes, "mlx_peak_bytes": self.estimate.peak_bytes,
            "fits": self.fits, "margin_bytes": self.margin_bytes, "thin_margin": self.thin_margin,
            "breakdown": self.breakdown(),
            "trainable_params": self.estimate.trainable_params, "total_params": self.estimate.total_params,
            "settings": {**st.__dict__, "targets": list(st.targets)},
            "batches": None if self.batches is None else {k: v for k, v in self.batches.__dict__.items()
                                                          if k != "lengths"},
            "worst_case": worst,
            "suggestions": self.suggestions,
            "tokens_per_epoch": self.tokens_per_epoch, "tokens_source": self.tokens_source,
            "flops_per_token": self.flops_per_token, "tflops": self.tflops,
            "matmul_tflops": m.matmul_tflops, "efficiency": EFFICIENCY,
            "seconds_per_epoch": self.seconds_per_epoch,
            "seconds_per_epoch_high": self.seconds_per_epoch_high,
            "notes": self.estimate.notes,
            "memory_model": self.estimate.memory_model,
            "calibration": self.calibration,
            "cluster": self.cluster,
        }

    def render(self) -> str:
        from .render import render

        return render(self)

    def with_cluster(self, nodes: int, link: str) -> "Plan":
        """Add the expected speed-up of `nodes` such Macs training data-parallel over `link`."""
        from .cluster import cluster_estimate

        if nodes < 2:
            return self
        if self.seconds_per_epoch is None or not self.tokens_per_epoch:
            raise PlanError("--nodes needs a time estimate: give --tokens N (or a recipe whose data can be "
                            "counted)")
        st = self.settings
        step_tokens = st.rows * st.grad_accum * (st.seq_len + 1)
        step_seconds = self.seconds_per_epoch * step_tokens / self.tokens_per_epoch
        grad_bytes = self.estimate.trainable_params * (self.shape.dtype_bytes if st.method == "full" else 4)
        self.cluster = cluster_estimate(nodes, link, step_seconds, grad_bytes)
        return self

    def __repr__(self) -> str:  # a terminal or `print(plan)` shows the report
        return self.render()

    def _repr_html_(self) -> str:
        from .render import render_html

        return render_html(self)


def predict(shape: ModelShape, st: Settings, memory_model: str = "auto") -> Estimate:
    """The peak of one training step: from the replayed graph of the step (`planner.replay`) when
    the model can be traced, else from the formula (`formula.estimate`).

    Args:
        memory_model: "auto" (the replay, the formula when the step cannot be traced), "replay"
            or "formula".
    Raises:
        PlanError: memory_model "replay" and the step cannot be traced, or an unknown memory_model.
    """
    from .plan_cache import cached
    from .replay import replay_estimate

    if memory_model not in ("auto", "replay", "formula"):
        raise PlanError(f"memory model {memory_model!r}: expected auto, replay or formula")
    if memory_model == "formula":
        return estimate(shape, st)
    try:
        if shape.config is None:
            return replay_estimate(shape, st)  # raises: nothing to build the model from
        return cached(shape.config, st, lambda: replay_estimate(shape, st))
    except Exception as e:  # TraceError, or anything tracing an untested architecture/backend raises
        if memory_model == "replay":
            raise PlanError(f"--memory-model replay: cannot trace this step: {type(e).__name__}: "
                            f"{e}") from None
        est = estimate(shape, st)
        why = str(e).splitlines()[0][:160] if str(e) else ""
        est.notes.append(f"peak from the formula: the step could not be traced ({type(e).__name__}: {why})")
        return est


def plan_model(model: str, settings: Settings, machine: str | Machine = "auto", tokens: int | None = None,
               tokens_source: str = "", revision: str | None = None, budget_gb: float | None = None,
               memory_model: str = "auto") -> Plan:
    """Plan a run of `model` (hub id, local dir or bundled name) with these settings.

    Raises:
        PlanError: unknown machine, config not found offline, impossible settings.
    """
    shape = load_shape(model, revision)
    mach = machine if isinstance(machine, Machine) else get_machine(machine, budget_gb)
    if settings.quant_bits and shape.quantized_bits:  # --method qlora on gpt-oss: its own MXFP4 is the base
        settings = replace(settings, quant_bits=None, quant_group=64, quant_mode="affine")
    check_settings(shape, settings)
    return _finish(shape, settings, mach, tokens, tokens_source or ("given" if tokens else ""), memory_model)


def plan(recipe, machine: str | Machine = "auto", tokens: int | None = None, budget_gb: float | None = None,
         memory_model: str = "auto") -> Plan:
    """Plan the run a recipe (path or Recipe) describes: at its own batches when its data can be
    read (the max_seq_len worst case beside them), else at that worst case.

    Args:
        tokens: training tokens per epoch for the time estimate (default: counted from the data).
    Raises:
        RecipeError, PlanError.
    """
    from ..recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    worst = settings_from_recipe(recipe)
    shape = load_shape(recipe.model.path, recipe.model.revision)
    mach = machine if isinstance(machine, Machine) else get_machine(machine, budget_gb)
    check_settings(shape, worst)
    batches, source = read_run_batches(recipe)
    if tokens is not None:
        source = "given with --tokens"
    elif batches is not None:
        tokens = batches.positions
    else:
        source += "; pass --tokens N"
    return _finish(shape, settings_for_batches(worst, batches), mach, tokens, source, memory_model, batches,
                   worst, recipe.data.max_seq_len)


def preflight(recipe, world: int = 1, samples=None) -> dict:
    """The plan `mlxft run` makes before it loads the model: this machine, the recipe's settings at
    the widest batch `samples` make (each of `world` processes holding its share of the rows), or
    at max_seq_len without them; no time estimate.

    Returns:
        {"verdict": the lines to print, "fits" (the run's own plan), "planned_peak_bytes" (MLX's peak,
        comparable with the run's peak_memory_bytes), "required_bytes" (with headroom), "budget_bytes",
        "machine", "memory_model", "batch" [rows, width], "worst_case_bytes" (None when the same),
        "worst_case_fits"}.
    Raises:
        PlanError: the model's config cannot be found, or the settings are impossible.
    """
    from .render import gib

    worst = settings_from_recipe(recipe)
    batches = run_batches(recipe, samples) if samples else None
    st = settings_for_batches(worst, batches, world)
    worst = settings_for_batches(worst, None, world)
    shape = load_shape(recipe.model.path, recipe.model.revision)
    mach = get_machine("auto")
    check_settings(shape, worst)
    est = predict(shape, st)
    need, budget = est.required_bytes, mach.budget_bytes
    fits = need <= budget
    how = "fits" if fits else "DOES NOT FIT"
    shape_text = (f"batches up to {st.batch_size} x {st.seq_len + 1} tokens" if batches else
                  f"every batch {st.batch_size} x {st.seq_len + 1} tokens (max_seq_len; the data was not "
                  "read)")
    lines = [f"plan: peak {gib(need)} of a {gib(budget)} budget on {mach.name}: {how} "
             f"({abs(budget - need) / budget:.0%} {'to spare' if fits else 'over'}; {shape_text}; "
             f"{est.memory_model})"]
    worst_need = None
    if st != worst:
        worst_need = predict(shape, worst).required_bytes
        lines.append(f"plan: if a batch were {worst.batch_size} x {worst.seq_len + 1} tokens (max_seq_len): "
                     f"{gib(worst_need)}, {'fits' if worst_need <= budget else 'would not fit'}")
    copy = est.breakdown.get("reference copy", 0)
    if copy and not fits:
        lines.append(f"plan: it counts a frozen reference copy of the trained weights ({gib(copy)}) that "
                     f"training.objective = {st.objective!r} needs with adapter.method = 'full': "
                     "training.precompute_reference = true or adapter.method = 'lora' avoids it")
    return {"verdict": "\n".join(lines), "fits": fits, "planned_peak_bytes": est.peak_bytes,
            "required_bytes": need,
            "budget_bytes": budget, "machine": mach.name, "memory_model": est.memory_model,
            "batch": [st.batch_size, st.seq_len + 1], "worst_case_bytes": worst_need,
            "worst_case_fits": None if worst_need is None else worst_need <= budget}


def check_settings(shape: ModelShape, st: Settings) -> None:
    """Reject settings no run could have, naming the option and the limit."""
    from .render import quant_text

    problems = []
    if st.method != "full" and st.rank > shape.hidden:
        problems.append(f"rank {st.rank} is larger than the hidden size {shape.hidden} of {shape.name}; "
                        f"use a rank well below it (8-64 is typical)")
    if st.layers is not None and not 1 <= st.layers <= shape.layers:
        problems.append(f"layers {st.layers}: the model has {shape.layers} blocks; use 1..{shape.layers} "
                        "or all")
    if st.method == "full" and (st.quant_bits or shape.quantized_bits):
        problems.append("method 'full' cannot train a quantized base; use lora/dora (QLoRA) or a float base")
    if st.quant_bits and shape.quantized_bits:
        problems.append(f"{shape.name} is already quantized "
                        f"({quant_text(shape.quantized_bits, shape.quantized_mode)}"
                        "); remove model.quantize: a pre-quantized base trains as QLoRA as it is")
    if st.batch_size < 1 or st.seq_len < 1:
        problems.append(f"batch size {st.batch_size} and max_seq_len {st.seq_len + 1} must be positive")
    if st.method == "dora" and any(shape.copies(m) > 1 for layer in adapted_layers(shape, st)
                                   for m in adapted_modules(shape, st, layer)):
        problems.append("DoRA cannot adapt mixture-of-experts expert layers (mlx-lm has no DoRA "
                        "SwitchLinear); use method 'lora', or targets without the experts' "
                        "gate_proj/up_proj/down_proj")
    if st.method not in ("lora", "dora", "full"):
        problems.append(f"method {st.method!r}: expected lora, dora, qlora or full")
    if problems:
        raise PlanError("impossible settings: " + "; ".join(problems))


def _finish(shape, st, mach, tokens, tokens_source, memory_model="auto", batches=None, worst=None,
            max_seq_len=None) -> Plan:
    est = predict(shape, st, memory_model)
    attention = batches.attention_width - 1 if batches else None
    p = Plan(shape, st, mach, est, tokens_per_epoch=tokens, tokens_source=tokens_source,
             flops_per_token=flops_per_token(shape, st, attention), batches=batches, max_seq_len=max_seq_len)
    if worst is not None and worst != st:
        p.worst, p.worst_settings = predict(shape, worst, memory_model), worst
    p.tflops = mach.tflops(shape.dtype)
    if p.tflops is None and not mach.is_mac:
        p.tflops = measure_cpu_tflops()
    if tokens:
        low, high = mach.matmul_tflops or (None, None)
        p.seconds_per_epoch = seconds_per_epoch(shape, st, mach, tokens, p.tflops, low, attention)
        if high:
            p.seconds_per_epoch_high = seconds_per_epoch(shape, st, mach, tokens, p.tflops, high, attention)
    if not p.fits or p.thin_margin:
        p.suggestions = suggest(shape, st, mach, est, batches)
    return p
