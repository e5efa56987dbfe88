"""Put it together: recipe -> model shape + settings -> estimate vs machine budget -> advice."""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace

from ..errors import PlanError
from .configs import ModelShape, load_shape
from .machines import Machine, get_machine
from .formula import estimate
from .settings import STATIC_TERMS, Estimate, Settings, adapted_layers, adapted_modules, reference_kind


def settings_from_recipe(recipe) -> Settings:
    """The memory-relevant choices of a Recipe, at the worst-case row length."""
    a, d, t, q = recipe.adapter, recipe.data, recipe.training, recipe.model.quantize
    # the widest row collate makes is max_seq_len (packed or not); the loss feeds tokens[:, :-1]
    L = d.max_seq_len
    return Settings(
        method=a.method, quant_bits=q.bits if q else None, quant_group=q.group_size if q else 64,
        rank=a.rank, layers=None if a.layers == "all" else int(a.layers),
        targets=(a.targets,) if isinstance(a.targets, str) else tuple(a.targets),
        batch_size=t.batch_size, seq_len=L - 1, pack=d.pack, grad_checkpointing=t.grad_checkpointing,
        loss_chunk=t.loss_chunk_size, optimizer=t.optimizer, grad_accum=t.grad_accum, objective=t.objective,
        reference=reference_kind(t.objective, a.method, t.precompute_reference))


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
    flops_per_token: float = 0.0
    tflops: float | None = None
    calibration: dict | None = None
    cluster: dict | None = None  # several Macs: see `with_cluster`

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

    def breakdown(self) -> dict[str, int]:
        return {**self.estimate.breakdown, "framework headroom": self.estimate.headroom_bytes}

    def to_dict(self) -> dict:
        st = self.settings
        return {
            "model": self.shape.name, "model_config_source": self.shape.source,
            "machine": self.machine.name, "chip": self.machine.chip,
            "memory_bytes": self.machine.memory_bytes,
            "budget_bytes": self.machine.budget_bytes, "budget_source": self.machine.budget_source,
            "peak_bytes": self.peak_bytes, "mlx_peak_bytes": self.estimate.peak_bytes,
            "fits": self.fits, "margin_bytes": self.margin_bytes,
            "breakdown": self.breakdown(),
            "trainable_params": self.estimate.trainable_params, "total_params": self.estimate.total_params,
            "settings": {**st.__dict__, "targets": list(st.targets)},
            "suggestions": self.suggestions,
            "tokens_per_epoch": self.tokens_per_epoch, "tokens_source": self.tokens_source,
            "flops_per_token": self.flops_per_token, "tflops": self.tflops,
            "efficiency": EFFICIENCY,
            "seconds_per_epoch": self.seconds_per_epoch,
            "notes": self.estimate.notes,
            "memory_model": self.estimate.memory_model,
            "calibration": self.calibration,
            "cluster": self.cluster,
        }

    def render(self) -> str:
        return render(self)

    def with_cluster(self, nodes: int, link: str) -> "Plan":
        """Add the expected speed-up of `nodes` such Macs training data-parallel over `link`."""
        from .cluster import cluster_estimate

        if nodes < 2:
            return self
        if self.seconds_per_epoch is None or not self.tokens_per_epoch:
            raise PlanError("--nodes needs a time estimate: give --tokens N (or a recipe whose data can be counted)")
        st = self.settings
        step_tokens = st.rows * st.grad_accum * (st.seq_len + 1)
        step_seconds = self.seconds_per_epoch * step_tokens / self.tokens_per_epoch
        grad_bytes = self.estimate.trainable_params * (self.shape.dtype_bytes if st.method == "full" else 4)
        self.cluster = cluster_estimate(nodes, link, step_seconds, grad_bytes)
        return self

    def __repr__(self) -> str:  # a terminal or `print(plan)` shows the report
        return self.render()

    def _repr_html_(self) -> str:
        """Jupyter shows the plan as a table of the breakdown between the header and the verdict."""
        rows = [(k, _gib(v)) for k, v in self.breakdown().items() if v]
        rows += [("<b>total peak</b>", f"<b>{_gib(self.peak_bytes).strip()}</b>"),
                 ("machine budget", _gib(self.machine.budget_bytes))]
        cells = "".join(f"<tr><td style='text-align:left'>{k}</td><td style='text-align:right'>{v.strip()}</td></tr>"
                        for k, v in rows)
        colour = "#1a7f37" if self.fits else "#cf222e"
        verdict, *advice = _verdict_lines(self)
        return (f"<pre>{html.escape(chr(10).join(_header_lines(self)))}</pre><table>{cells}</table>"
                f"<p style='color:{colour}'><b>{html.escape(verdict)}</b></p>"
                f"<pre>{html.escape(chr(10).join(advice + _tail_lines(self)).strip())}</pre>")


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
            raise PlanError(f"--memory-model replay: cannot trace this step: {type(e).__name__}: {e}") from None
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
    check_settings(shape, settings)
    return _finish(shape, settings, mach, tokens, tokens_source, memory_model)


def plan(recipe, machine: str | Machine = "auto", tokens: int | None = None, budget_gb: float | None = None,
         memory_model: str = "auto") -> Plan:
    """Plan the run a recipe (path or Recipe) describes; counts the dataset's tokens when it can.

    Raises:
        RecipeError, PlanError.
    """
    from ..recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    st = settings_from_recipe(recipe)
    source = "given"
    if tokens is None:
        tokens, source = count_epoch_tokens(recipe)
    shape = load_shape(recipe.model.path, recipe.model.revision)
    mach = machine if isinstance(machine, Machine) else get_machine(machine, budget_gb)
    check_settings(shape, st)
    return _finish(shape, st, mach, tokens, source, memory_model)


def preflight(recipe, world: int = 1) -> dict:
    """The plan `mlxft run` makes before it loads anything: this machine, the recipe's settings
    (each of `world` processes holds batch_size / world rows), no time estimate.

    Returns:
        {"verdict": one line, "fits", "planned_peak_bytes" (MLX's peak, comparable with the run's
        peak_memory_bytes), "required_bytes" (with headroom), "budget_bytes", "machine", "memory_model"}.
    Raises:
        PlanError: the model's config cannot be found, or the settings are impossible.
    """
    st = settings_from_recipe(recipe)
    if world > 1:
        st = replace(st, batch_size=max(1, st.batch_size // world))
    shape = load_shape(recipe.model.path, recipe.model.revision)
    mach = get_machine("auto")
    check_settings(shape, st)
    est = predict(shape, st)
    need, budget = est.required_bytes, mach.budget_bytes
    fits = need <= budget
    how = "fits" if fits else "DOES NOT FIT"
    verdict = (f"plan: peak {_gib(need).strip()} of a {_gib(budget).strip()} budget on {mach.name}: {how} "
               f"({abs(budget - need) / budget:.0%} {'to spare' if fits else 'over'}; {est.memory_model})")
    copy = est.breakdown.get("reference copy", 0)
    if copy and not fits:
        verdict += (f"; it counts a frozen reference copy of the trained weights ({_gib(copy).strip()}) that "
                    f"training.objective = {st.objective!r} needs with adapter.method = 'full': "
                    "training.precompute_reference = true or adapter.method = 'lora' avoids it")
    return {"verdict": verdict, "fits": fits, "planned_peak_bytes": est.peak_bytes, "required_bytes": need,
            "budget_bytes": budget, "machine": mach.name, "memory_model": est.memory_model}


def check_settings(shape: ModelShape, st: Settings) -> None:
    """Reject settings no run could have, naming the option and the limit."""
    problems = []
    if st.method != "full" and st.rank > shape.hidden:
        problems.append(f"rank {st.rank} is larger than the hidden size {shape.hidden} of {shape.name}; "
                        f"use a rank well below it (8-64 is typical)")
    if st.layers is not None and not 1 <= st.layers <= shape.layers:
        problems.append(f"layers {st.layers}: the model has {shape.layers} blocks; use 1..{shape.layers} or all")
    if st.method == "full" and (st.quant_bits or shape.quantized_bits):
        problems.append("method 'full' cannot train a quantized base; use lora/dora (QLoRA) or a float base")
    if st.batch_size < 1 or st.seq_len < 1:
        problems.append(f"batch size {st.batch_size} and max_seq_len {st.seq_len + 1} must be positive")
    if st.method == "dora" and any(shape.copies(m) > 1 for layer in adapted_layers(shape, st)
                                   for m in adapted_modules(shape, st, layer)):
        problems.append("DoRA cannot adapt mixture-of-experts expert layers (mlx-lm has no DoRA SwitchLinear); "
                        "use method 'lora', or targets without the experts' gate_proj/up_proj/down_proj")
    if st.method not in ("lora", "dora", "full"):
        problems.append(f"method {st.method!r}: expected lora, dora, qlora or full")
    if problems:
        raise PlanError("impossible settings: " + "; ".join(problems))


def _finish(shape, st, mach, tokens, tokens_source, memory_model="auto") -> Plan:
    est = predict(shape, st, memory_model)
    p = Plan(shape, st, mach, est, tokens_per_epoch=tokens, tokens_source=tokens_source,
             flops_per_token=flops_per_token(shape, st))
    p.tflops = mach.tflops(shape.dtype)
    if p.tflops is None and not mach.is_mac:
        p.tflops = measure_cpu_tflops()
    if tokens:
        p.seconds_per_epoch = seconds_per_epoch(shape, st, mach, tokens, p.tflops)
    if not p.fits:
        p.suggestions = suggest(shape, st, mach, est)
    return p


def _static(e: Estimate) -> int:
    return sum(v for k, v in e.breakdown.items() if k in STATIC_TERMS)


def suggest(shape: ModelShape, st: Settings, mach: Machine, current: Estimate | None = None) -> list[dict]:
    """Concrete single changes that make the plan fit, each re-checked with the memory model.

    The searches use the formula (a replay takes seconds); when the plan's peak came from the
    replay, the formula's step terms are scaled to agree with it at the plan's own settings."""
    from .settings import HEADROOM_FIXED, HEADROOM_FRACTION

    budget = mach.budget_bytes
    out: list[dict] = []
    scale = 1.0
    if current is not None and current.memory_model != "formula":
        f = estimate(shape, st)
        scale = (current.peak_bytes - _static(current)) / max(f.peak_bytes - _static(f), 1)

    def _required(shape, new) -> int:
        f = estimate(shape, new)
        peak = _static(f) + scale * (f.peak_bytes - _static(f))
        return int(peak + HEADROOM_FIXED + HEADROOM_FRACTION * peak)

    def add(key: str, value, text: str, new: Settings):
        need = _required(shape, new)
        out.append({"change": key, "value": value, "peak_bytes": need, "fits": need <= budget, "text": text})

    fitting_b = [b for b in range(st.batch_size - 1, 0, -1) if _required(shape, replace(st, batch_size=b)) <= budget]
    if fitting_b:
        b = fitting_b[0]
        add("training.batch_size", b, f"training.batch_size = {b} (with grad_accum = "
            f"{-(-st.batch_size * st.grad_accum // b)} for the same tokens per step)", replace(st, batch_size=b))
    L = _largest(lambda n: _required(shape, replace(st, seq_len=n - 1)) <= budget, 32, st.seq_len)
    if L:
        add("data.max_seq_len", L, f"data.max_seq_len = {L} (longer samples are truncated or dropped)",
            replace(st, seq_len=L - 1))
    if not st.grad_checkpointing:
        add("training.grad_checkpointing", True, "training.grad_checkpointing = true (~30% slower)",
            replace(st, grad_checkpointing=True))
    if st.method != "full" and not (st.quant_bits or shape.quantized_bits):
        add("model.quantize", {"bits": 4, "group_size": 64}, "QLoRA: model.quantize = { bits = 4, group_size = 64 }",
            replace(st, quant_bits=4, quant_group=64))
    if st.method == "full":
        no_copy = (" (the reference is then the base with the adapters off: no copy)"
                   if st.reference == "copy" else "")
        add("adapter.method", "lora", f"adapter.method = 'lora' instead of full fine-tuning{no_copy}",
            replace(st, method="lora", reference="bypass" if st.reference == "copy" else st.reference))
    if st.reference == "copy":
        add("training.precompute_reference", True, "training.precompute_reference = true (the reference's "
            "log-probs are computed once before training, so no frozen copy is held)",
            replace(st, reference="precomputed"))
    n_now = st.layers or shape.layers
    n = _largest(lambda k: _required(shape, replace(st, layers=k)) <= budget, 1, n_now - 1)
    if n:
        add("adapter.layers", n, f"adapter.layers = {n} (adapt only the last {n} block{'s' if n > 1 else ''})", replace(st, layers=n))
    if not any(s["fits"] for s in out):
        combo = replace(st, grad_checkpointing=True, quant_bits=st.quant_bits or (4 if st.method != "full" else None))
        b = next((b for b in range(st.batch_size, 0, -1) if _required(shape, replace(combo, batch_size=b)) <= budget), 1)
        combo = replace(combo, batch_size=b)
        Lc = _largest(lambda k: _required(shape, replace(combo, seq_len=k - 1)) <= budget, 32, combo.seq_len + 1)
        if Lc:
            combo = replace(combo, seq_len=Lc - 1)
            add("combined", {"grad_checkpointing": True, "quant_bits": combo.quant_bits, "batch_size": b, "max_seq_len": Lc},
                f"together: grad checkpointing{', 4-bit QLoRA' if combo.quant_bits and not st.quant_bits else ''}, "
                f"batch_size = {b}, max_seq_len = {Lc}", combo)
    cmd = sysctl_advice(mach, _required(shape, st))
    if cmd:
        out.append({"change": "iogpu.wired_limit_mb", "value": int(cmd.split("=")[1].split()[0]),
                    "peak_bytes": _required(shape, st), "fits": True, "text": cmd})
    # Only changes that fit are worth printing, and the ones that do not say why they are missing.
    return [s for s in out if s["fits"]]


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


def count_epoch_tokens(recipe) -> tuple[int | None, str]:
    """Padded tokens of one epoch, by running the data pipeline, when the tokenizer is at hand."""
    try:
        from ..data import load_datasets
        from ..data import recipe_tokenizer

        splits = load_datasets(recipe, recipe_tokenizer(recipe))
        # the data stage batched the first epoch for its report: rows x padded width, as collate pads
        batching = splits.stats["batching"]
        padded, real = batching["positions"], splits.stats["train"]["tokens"]
        return int(padded), f"{real:,} dataset tokens, {padded:,} with padding, in {batching['batches_per_epoch']} batches"
    except Exception as e:  # no tokenizer offline, data missing: the plan still stands without time
        return None, f"dataset not counted ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); pass --tokens N"


def _gib(n: float) -> str:
    return f"{n / 2**30:7.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:7.1f} MiB"


def render(p: Plan) -> str:
    lines = _header_lines(p) + [""]
    for k, v in p.breakdown().items():
        if v:
            lines.append(f"  {k:<26} {_gib(v)}")
    m = p.machine
    lines += [f"  {'-' * 38}",
              f"  {'total peak':<26} {_gib(p.peak_bytes)}   (MLX peak {_gib(p.estimate.peak_bytes).strip()} + headroom;"
              f" {p.estimate.memory_model})",
              f"  {'machine budget':<26} {_gib(m.budget_bytes)}", ""]
    return "\n".join(lines + _verdict_lines(p) + _tail_lines(p))


def _header_lines(p: Plan) -> list[str]:
    st, sh, m = p.settings, p.shape, p.machine
    method = st.method + (f" on a {st.quant_bits}-bit base (QLoRA)" if st.quant_bits else
                          f" on a {sh.quantized_bits}-bit checkpoint" if sh.quantized_bits else f" on a {sh.dtype} base")
    layers = "all" if st.layers is None else f"last {st.layers} of"
    reference = {"bypass": "reference: the base, adapters off", "copy": "reference: a frozen copy",
                 "precomputed": "reference: precomputed"}.get(st.reference)
    objective = "" if st.objective == "sft" else f"{st.objective}{f' ({reference})' if reference else ''}, "
    rows = "" if st.objective == "sft" else " pairs" if st.objective != "kto" else " examples"
    rows += " x 2 sequences" if st.objective != "sft" else ""
    moe = (f", {sh.total_params(active=True) / 1e6:,.1f}M active: {sh.experts} experts, top-{sh.experts_per_tok}"
           if sh.is_moe else "")
    return [
        f"model    {sh.name}  ({p.estimate.total_params / 1e6:,.1f}M params{moe}, {sh.layers} blocks; config: {sh.source})",
        f"training {objective}{method}, rank {st.rank}, {layers} {sh.layers} blocks, "
        f"batch {st.batch_size}{rows} x {st.seq_len + 1} tokens"
        f"{', packed' if st.pack else ''}, grad checkpointing {'on' if st.grad_checkpointing else 'off'}, "
        f"loss chunk {st.loss_chunk or 'off'}; {p.estimate.trainable_params / 1e6:.2f}M trainable",
        f"machine  {m.name} ({m.chip}, {m.memory_bytes / 2**30:.0f} GiB); budget {m.budget_bytes / 2**30:.2f} GiB "
        f"= {m.budget_source}",
    ]


def _verdict_lines(p: Plan) -> list[str]:
    """The verdict, then what to change when it does not fit."""
    if p.fits:
        return [f"FITS with {_gib(p.margin_bytes).strip()} to spare ({p.margin_bytes / p.machine.budget_bytes:.0%} of the budget)"]
    lines = [f"DOES NOT FIT: {_gib(-p.margin_bytes).strip()} over the budget"]
    if p.suggestions:
        lines.append("Any one of these fits:")
        lines += [f"  - {s['text']}" + ("" if s["change"] == "iogpu.wired_limit_mb" else
                  f"  -> {_gib(s['peak_bytes']).strip()}") for s in p.suggestions]
    else:
        lines.append("No single change fits; this model needs a machine with more memory.")
    return lines


def _tail_lines(p: Plan) -> list[str]:
    """Notes, the probe's correction, the time per epoch and the several-Macs estimate."""
    lines = [f"note: {note}" for note in p.estimate.notes]
    if p.calibration:
        c = p.calibration
        lines.append(f"probe: measured {c['measured_bytes'] / 2**20:.0f} MiB vs predicted {c['predicted_bytes'] / 2**20:.0f} MiB "
                     f"at batch {c['batch_size']} x {c['seq_len']} tokens; activation terms scaled by {c['scale']:.3f}")
    lines += ["", time_text(p)]
    if p.cluster:
        from .cluster import cluster_text

        lines.append(cluster_text(p.cluster))
    return lines


def time_text(p: Plan) -> str:
    tf = p.tflops
    if p.seconds_per_epoch is None:
        why = p.tokens_source or "no token count; pass --tokens N"
        return f"time per epoch: unknown ({why})"
    s = p.seconds_per_epoch
    human = f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.1f} s"
    return (f"time per epoch ~ {human}  = tokens x FLOPs/token / (efficiency x peak FLOP/s)\n"
            f"  = {p.tokens_per_epoch:,} x {p.flops_per_token / 1e9:.3g} GFLOP / ({EFFICIENCY} x {tf:.3g} TFLOP/s)"
            f"   [{p.tokens_source}]")


from .machines import sysctl_advice  # noqa: E402
from .timing import EFFICIENCY, flops_per_token, measure_cpu_tflops, seconds_per_epoch  # noqa: E402
