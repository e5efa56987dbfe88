"""The plan as text (and as HTML for Jupyter): what a new user reads, so every line says what it is."""

from __future__ import annotations

import html

from .advice import THIN_MARGIN
from .settings import HEADROOM_FIXED, HEADROOM_FRACTION

SMALL_ROW = 0.001
"""Breakdown rows under this share of the total peak are named on one line instead of listed."""
EXPLAIN = {
    "framework headroom": f"outside MLX's count: Python, Metal, the allocator's cache "
                          f"({HEADROOM_FIXED / 2**30:.0f} GiB + {HEADROOM_FRACTION:.0%})",
    "loss/backward overlap": "the loss and the block backward peak at different moments",
}


def gib(n: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    n = float(n)
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def quant_text(bits: int, mode: str) -> str:
    return f"{bits}-bit" if mode == "affine" else mode.upper()


def _rows(p) -> tuple[list[tuple[str, int]], list[str]]:
    """(rows to list, names of the rows too small to matter)."""
    total = max(p.peak_bytes, 1)
    rows, small = [], []
    for k, v in p.breakdown().items():
        if not v:
            continue
        (small if abs(v) < SMALL_ROW * total else rows).append((k, v))
    return rows, [k for k, _ in small]


def render(p) -> str:
    lines = _header_lines(p) + [""]
    rows, small = _rows(p)
    for k, v in rows:
        why = f"   {EXPLAIN[k]}" if k in EXPLAIN else ""
        lines.append(f"  {k:<26} {gib(v):>10}{why}")
    if small:
        lines.append(f"  {'(under 0.1 % each: ' + ', '.join(small) + ')'}")
    m = p.machine
    lines += [f"  {'-' * 38}",
              f"  {'total peak':<26} {gib(p.peak_bytes):>10}   (MLX peak {gib(p.estimate.peak_bytes)} "
              f"+ headroom; {p.estimate.memory_model})",
              f"  {'machine budget':<26} {gib(m.budget_bytes):>10}", ""]
    return "\n".join(lines + verdict_lines(p) + _tail_lines(p))


def render_html(p) -> str:
    """Jupyter shows the plan as a table of the breakdown between the header and the verdict."""
    rows, small = _rows(p)
    rows = [(k + (f" <small>({html.escape(EXPLAIN[k])})</small>" if k in EXPLAIN else ""), gib(v))
            for k, v in rows]
    if small:
        rows.append((f"<small>under 0.1 % each: {', '.join(small)}</small>", ""))
    rows += [("<b>total peak</b>", f"<b>{gib(p.peak_bytes)}</b>"),
             ("machine budget", gib(p.machine.budget_bytes))]
    cells = "".join(f"<tr><td style='text-align:left'>{k}</td><td style='text-align:right'>{v}</td></tr>"
                    for k, v in rows)
    colour = "#1a7f37" if p.fits and not p.thin_margin else "#9a6700" if p.fits else "#cf222e"
    verdict, *advice = verdict_lines(p)
    return (f"<pre>{html.escape(chr(10).join(_header_lines(p)))}</pre><table>{cells}</table>"
            f"<p style='color:{colour}'><b>{html.escape(verdict)}</b></p>"
            f"<pre>{html.escape(chr(10).join(advice + _tail_lines(p)).strip())}</pre>")


def _header_lines(p) -> list[str]:
    st, sh, m = p.settings, p.shape, p.machine
    if st.quant_bits:
        method = f"{st.method} on a {quant_text(st.quant_bits, st.quant_mode)} base (QLoRA)"
    elif sh.quantized_bits:
        method = (f"{st.method} on a {quant_text(sh.quantized_bits, sh.quantized_mode)} checkpoint"
                  + (" (experts only; the rest " + sh.dtype + ")" if sh.float_modules else ""))
    else:
        method = f"{st.method} on a {sh.dtype} base"
    layers = "all" if st.layers is None else f"last {st.layers} of"
    moe = (f", {sh.total_params(active=True) / 1e6:,.1f}M active: {sh.experts} experts, "
           f"top-{sh.experts_per_tok}" if sh.is_moe else "")
    reference = {"bypass": "reference: the base, adapters off", "copy": "reference: a frozen copy",
                 "precomputed": "reference: precomputed"}.get(st.reference)
    objective = "" if st.objective == "sft" else f"{st.objective}{f' ({reference})' if reference else ''}, "
    rows = ("" if st.objective == "sft"
            else (" pairs" if st.objective != "kto" else " examples") + " x 2 sequences")
    if p.batches:
        b = p.batches
        batch = (f"batches up to {st.batch_size}{rows} x {st.seq_len + 1} tokens (the widest of the epoch's "
                 f"{b.batches}: {'packed rows' if st.pack else f'longest sample {b.longest} tokens'}; "
                 f"max_seq_len {p.max_seq_len})")
    else:
        batch = f"batch {st.batch_size}{rows} x {st.seq_len + 1} tokens{', packed' if st.pack else ''}"
    projected = "; PROJECTED: not announced, figures from 2 x M5 Max and press reports" if m.projected else ""
    return [
        f"model    {sh.name}  ({p.estimate.total_params / 1e6:,.1f}M params{moe}, {sh.layers} blocks; "
        f"config: {sh.source})",
        f"training {objective}{method}, rank {st.rank}, {layers} {sh.layers} blocks, {batch}, "
        f"grad checkpointing {'on' if st.grad_checkpointing else 'off'}, "
        f"loss chunk {st.loss_chunk or 'off'}; {p.estimate.trainable_params / 1e6:.2f}M trainable",
        f"machine  {m.name} ({m.chip}, {m.memory_bytes / 2**30:.0f} GiB{projected}); budget "
        f"{m.budget_bytes / 2**30:.2f} GiB = {m.budget_source}",
    ]


def verdict_lines(p) -> list[str]:
    """The verdict, the max_seq_len worst case, then what to change when it does not fit."""
    budget = p.machine.budget_bytes
    if not p.fits:
        lines = [f"DOES NOT FIT: {gib(-p.margin_bytes)} over the budget"]
    elif p.thin_margin:
        lines = [f"FITS, but only {gib(p.margin_bytes)} to spare ({p.margin_bytes / budget:.0%} of the "
                 f"budget; keep {THIN_MARGIN:.0%}): other apps, MLX's buffer cache or a batch wider than "
                 "planned can push it over, and macOS then swaps or stops the run"]
    else:
        lines = [f"FITS with {gib(p.margin_bytes)} to spare ({p.margin_bytes / budget:.0%} of the budget)"]
    if p.worst is not None:
        w, ws = p.worst.required_bytes, p.worst_settings
        lines.append(f"if a batch were {ws.batch_size} x {ws.seq_len + 1} tokens (max_seq_len; this data "
                     f"never makes one): {gib(w)}, {'fits' if w <= budget else 'would not fit'}")
    if p.suggestions:
        lines.append("Any one of these fits, cheapest first:" if not p.fits else
                     f"Any one of these leaves {THIN_MARGIN:.0%} free, cheapest first:")
        for s in p.suggestions:
            if s["change"] == "iogpu.wired_limit_mb":
                lines.append(f"  - {s['text']}")
            else:
                lines.append(f"  - {s['text']}  -> {gib(s['peak_bytes'])}  ({s['cost']})")
    elif not p.fits:
        lines.append("No single change fits; this model needs a machine with more memory.")
    return lines


def _tail_lines(p) -> list[str]:
    """Notes, the probe's correction, the time per epoch and the several-Macs estimate."""
    lines = [f"note: {note}" for note in p.estimate.notes]
    if p.machine.projected:
        lines.append(f"note: {p.machine.name} is projected: {p.machine.projected}")
    if p.calibration:
        c = p.calibration
        lines.append(f"probe: measured {c['measured_bytes'] / 2**20:.0f} MiB vs predicted "
                     f"{c['predicted_bytes'] / 2**20:.0f} MiB at batch {c['batch_size']} x {c['seq_len']} "
                     f"tokens; activation terms scaled by {c['scale']:.3f}")
    lines += ["", time_text(p)]
    if p.cluster:
        from .cluster import cluster_text

        lines.append(cluster_text(p.cluster))
    return lines


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.1f} s"


def time_text(p) -> str:
    from .timing import EFFICIENCY, GEMM_EFFICIENCY

    if p.seconds_per_epoch is None:
        why = p.tokens_source or "no token count; pass --tokens N"
        return f"time per epoch: unknown ({why})"
    tf, m = p.tflops, p.machine
    where = f"   [tokens per epoch: {p.tokens_source}]"
    if not m.matmul_tflops:
        return (f"time per epoch ~ {_hours(p.seconds_per_epoch)}  = tokens x FLOPs/token / "
                "(efficiency x peak FLOP/s)\n"
                f"  = {p.tokens_per_epoch:,} x {p.flops_per_token / 1e9:.3g} GFLOP / "
                f"({EFFICIENCY} x {tf:.3g} TFLOP/s)"
                + where)
    low, high = m.matmul_tflops
    return (f"time per epoch ~ {_hours(p.seconds_per_epoch)}  = tokens x FLOPs/token x (1 / matmul rate + "
            f"1 / rate of the rest)\n"
            f"  = {p.tokens_per_epoch:,} x {p.flops_per_token / 1e9:.3g} GFLOP x (1 / {low:.3g} TFLOP/s + "
            f"1 / ({GEMM_EFFICIENCY} x {tf:.3g} TFLOP/s)){where}\n"
            f"  matmuls on {m.chip}'s Neural Accelerators: {low:.3g} TFLOP/s, MLX's bf16 GEMM measured on an "
            f"M5 and scaled to {m.gpu_cores} GPU cores; published figures reach {high:.3g} TFLOP/s "
            f"(architectural peak), which gives {_hours(p.seconds_per_epoch_high)}. The rest of the step "
            "(element-wise ops, softmax, memory traffic) takes as long as on M1-M4. `mlxft plan --probe` on "
            "the Mac measures it")
