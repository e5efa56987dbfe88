"""Reporting for the training loop: progress bar, metrics.jsonl, summary.json, loss.svg.

`tokens` in reports are supervised tokens (the ones the loss is computed on), so tokens/s is the
rate at which the run learns from data, comparable across padding and packing choices.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .atomic import storage_error, write_text
from .checkpoint import LoopState
from .errors import MlxFtWarning


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (a process killed or a disk filled mid-write by
    an older mlx_ft) is dropped silently; any other line that is not a JSON row is skipped with a
    warning naming file:line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
                continue
        except ValueError:
            if i == len(lines):
                continue
        if line.strip():
            warnings.warn(f"{path}:{i}: not a metrics row, skipped", MlxFtWarning, stacklevel=2)
    return rows


def append_line(fd: int, text: str, path: Path) -> None:
    """Append one line whole or not at all: a short write (disk full) is cut back off the file, so
    metrics.jsonl never ends in half a row."""
    data = text.encode()
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(28, "No space left on device")  # a short write is what a full disk gives
    except OSError as e:
        try:
            os.ftruncate(fd, end)
        except OSError:
            pass
        raise storage_error(e, path, f"{path.name} keeps every whole row before this one.") from None


class Callback:
    """Hooks called during `train`; subclass and override what you need."""

    def on_train_report(self, row: dict) -> None:
        """After every `report_every` steps, with the row written to metrics.jsonl."""

    def on_eval(self, row: dict) -> None:
        """After each validation pass."""

    def on_checkpoint(self, path: Path) -> None:
        """After a checkpoint directory is complete."""

    def on_end(self, summary: dict) -> None:
        """Once, with the content of summary.json."""


class Reporter:
    """Progress bar or lines, metrics.jsonl, summary.json and loss.svg of a run; calls the callbacks."""

    def __init__(self, run: Path, total_steps: int, loop: LoopState, callbacks, progress: bool, resumed: bool,
                 write: bool = True, unit: str = "tokens"):
        self.run, self.total, self.loop, self.callbacks = run, total_steps, loop, list(callbacks)
        # What the loss is a mean over: supervised tokens, or a preference objective's pairs/examples;
        # it names the count keys of metrics.jsonl and summary.json (`tokens`, `pairs_per_sec`, ...).
        self.unit = unit
        self.progress, self.resumed, self.write = progress, resumed, write
        self.metrics = None
        self.t0 = time.perf_counter()
        self.base_elapsed = loop.elapsed
        self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "t": self.t0, "metrics": {}}
        self.rows: list[dict] = []
        self.bar = None
        self.report_every = 10
        self.first_step = loop.step

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, recipe, n_trainable: int, n_total: int, stats: dict, resumed_from) -> None:
        from tqdm.auto import tqdm

        self.report_every = recipe.training.report_every
        metrics = self.run / "metrics.jsonl"
        if self.resumed and metrics.exists():  # drop rows written after the checkpoint
            self.rows = [r for r in read_rows(metrics) if r["step"] <= self.loop.step]
        if self.write:
            write_text(metrics, "".join(json.dumps(r) + "\n" for r in self.rows))
            self.metrics = os.open(metrics, os.O_WRONLY | os.O_APPEND)
        self.echo(f"trainable parameters: {n_trainable:,} of {n_total:,} "
                  f"({100 * n_trainable / max(n_total, 1):.3f}%)")
        if stats:
            self.echo("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()
                                           if not isinstance(v, (dict, list))))
        if resumed_from is not None:
            self.echo(f"resuming from {resumed_from} (step {self.loop.step}, epoch {self.loop.epoch})")
        # A live bar on a terminal or in Jupyter; one plain line per report in logs and pipes.
        self.live = self.progress and (sys.stderr.isatty() or _in_notebook())
        self.bar = tqdm(total=self.total, initial=self.loop.step, desc="train", unit="step",
                        disable=not self.live, dynamic_ncols=True)

    def echo(self, msg: str) -> None:
        if not self.progress:
            return
        if self.bar is not None and self.live:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    note = echo

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            os.close(self.metrics)
            self.metrics = None

    # -- events ----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.base_elapsed + time.perf_counter() - self.t0

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self.metrics is not None:
            append_line(self.metrics, json.dumps(row) + "\n", self.run / "metrics.jsonl")

    def _units(self, key: str) -> str:
        return key.replace("tokens", self.unit)

    def step(self, loss: float, n_tok: int, lr: float, grad_norm: float, metrics: dict | None = None) -> None:
        """One optimizer step: its loss, its tokens (or pairs), and the objective's metrics by name."""
        import mlx.core as mx

        self.loop.elapsed = self.elapsed()
        w = self.window
        w["loss"] += loss
        w["tokens"] += n_tok
        w["steps"] += 1
        for name, value in (metrics or {}).items():  # averaged over the report window, as the loss
            total, n = w["metrics"].get(name, (0.0, 0))
            w["metrics"][name] = (total + value, n + 1)
        peak = mx.get_peak_memory()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok=self.loop.trained_tokens,
                                 peak=f"{peak / 2**20:.0f}MB", refresh=False)
        if self.loop.step % self.report_every == 0 or self.loop.step == self.total:
            now = time.perf_counter()
            row = {
                "step": self.loop.step, "epoch": self.loop.epoch, "loss": w["loss"] / w["steps"],
                "last_loss": loss, "learning_rate": lr, "grad_norm": grad_norm,
                self._units("tokens"): w["tokens"], self._units("trained_tokens"): self.loop.trained_tokens,
                self._units("tokens_per_sec"): w["tokens"] / max(now - w["t"], 1e-9),
                "peak_memory_bytes": peak,
                "elapsed": self.loop.elapsed,
                **{name: total / n for name, (total, n) in w["metrics"].items()},
            }
            rate = row[self._units("tokens_per_sec")]
            self._write(row)
            if self.bar is not None:
                shown = {_SHORT[k]: f"{row[k]:.3f}" for k in _SHORT if k in row}
                self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", **shown,
                                     tok_s=f"{rate:.0f}", tok=self.loop.trained_tokens,
                                     peak=f"{peak / 2**20:.0f}MB")
            if self.progress and not self.live:
                per_step = (self.loop.elapsed - self.base_elapsed) / max(self.loop.step - self.first_step, 1)
                eta = (self.total - self.loop.step) * per_step
                shown = "".join(f"{k} {row[k]:.3f}  " for k in _SHORT if k in row)
                unit, digits = ("tok", 0) if self.unit == "tokens" else (self.unit, 2)
                print(f"step {self.loop.step}/{self.total}  loss {row['loss']:.4f}  {shown}lr {lr:.2e}  "
                      f"{unit}/s {rate:.{digits}f}  trained {self.loop.trained_tokens:,}  "
                      f"peak {peak / 2**20:.0f} MB  eta {_duration(eta)}", flush=True)
            for cb in self.callbacks:
                cb.on_train_report(row)
            self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "t": now, "metrics": {}}

    def initial_eval(self, val_loss: float, metrics: dict | None = None) -> None:
        """The validation loss (and objective's metrics) before the first update (never a "best":
        nothing was trained)."""
        row = {"step": 0, "val_loss": val_loss, "best": False,
               **{f"eval_{k}": v for k, v in (metrics or {}).items()}}
        self._write(row)
        shown = "".join(f", {k} {row[f'eval_{k}']:.3f}" for k in _SHORT if f"eval_{k}" in row)
        self.echo(f"step 0: val loss {val_loss:.4f}{shown} (before training)")
        for cb in self.callbacks:
            cb.on_eval(row)

    def eval(self, val_loss: float, improved: bool, metrics: dict | None = None) -> None:
        """A validation pass: its loss and the objective's metrics (written as TRL does, `eval_<name>`)."""
        metrics = {f"eval_{k}": v for k, v in (metrics or {}).items()}
        row = {"step": self.loop.step, "val_loss": val_loss, "best": improved, **metrics}
        self._write(row)
        shown = "".join(f", {k} {row[f'eval_{k}']:.3f}" for k in _SHORT if f"eval_{k}" in row)
        self.echo(f"step {self.loop.step}: val loss {val_loss:.4f}{shown}" + (" (best)" if improved else ""))
        for cb in self.callbacks:
            cb.on_eval(row)

    def checkpoint(self, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(path)

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, adapter_dir: Path, n_trainable: int, n_total: int, stats: dict, peak_memory: int,
               extra: dict | None = None) -> dict:
        train_rows = [r for r in self.rows if "loss" in r]
        evals = [r for r in self.rows if "val_loss" in r and r["step"] > 0]
        wall = self.elapsed()
        last = train_rows[-1] if train_rows else None
        window = last["step"] - (train_rows[-2]["step"] if len(train_rows) > 1 else 0) if last else 0
        summary = {
            "steps": self.loop.step,
            "epoch": self.loop.epoch,
            "final_step_loss": last["last_loss"] if last else None,  # the last optimizer step's train loss
            # the mean train loss of the last report window (the last progress line's figure)
            "final_window_loss": last["loss"] if last else None,
            "final_window_steps": window,
            "final_loss": last["last_loss"] if last else None,  # = final_step_loss, for 0.1's readers
            "initial_val_loss": self.loop.extra.get("initial_val_loss"),  # before any update
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "best_val_loss": self.loop.best_val_loss,
            "best_step": self.loop.best_step,
            self._units("trained_tokens"): self.loop.trained_tokens,
            "wall_time_sec": wall,
            self._units("tokens_per_sec"): self.loop.trained_tokens / max(wall, 1e-9),
            **({"final_metrics": {k: v for k, v in train_rows[-1].items() if "/" in k or k in _EXTRA}}
               if train_rows and self.unit != "tokens" else {}),
            "peak_memory_bytes": int(peak_memory),
            "trainable_parameters": n_trainable,
            "total_parameters": n_total,
            "adapter_dir": str(adapter_dir),
            "best_adapter_dir": str(self.run / "adapters-best") if self.loop.best_step else None,
            **(extra or {}),
            "data": stats,
        }
        if not self.write:
            return summary
        write_text(self.run / "summary.json", json.dumps(summary, indent=2))
        self.plot()
        for cb in self.callbacks:
            cb.on_end(summary)
        print(final_line(summary, evals[-1]["step"] if evals else None, wall, self.unit), flush=True)
        return summary

    def plot(self) -> Path:
        """loss.svg: train loss per report and validation loss per evaluation against the step.

        Plain SVG text, no plotting library: importing and rendering with matplotlib took ~1 s per
        run, 8 % of a short benchmark epoch. The y axis is logarithmic when every loss is
        positive, so late small improvements stay visible."""
        tr = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        text = loss_svg(self.run.name, {"train": tr, "validation": va})
        panels = [(label, {name: [(r["step"], r[key]) for r in self.rows if key in r]
                           for name, key in series}) for label, series in _PANELS]
        panels = [(label, series) for label, series in panels if any(series.values())]
        if panels:  # a preference objective: its rewards and accuracy under the loss
            text = stacked_svg([text] + [loss_svg(self.run.name, series, ylabel=label, log=False)
                                         for label, series in panels])
        return write_text(self.run / "loss.svg", text)


def final_line(s: dict, val_step: int | None, wall: float, unit: str = "tokens") -> str:
    """The last line of a run: each loss figure named for what it is, validation before and after."""
    parts = [f"done: {s['steps']} steps"]
    if s["final_window_loss"] is not None:
        n = s["final_window_steps"]
        steps = f"{n} step{'s' if n != 1 else ''}"
        parts.append(f"train loss {s['final_window_loss']:.4f} (mean of the last {steps}; "
                     f"last step {s['final_step_loss']:.4f})")
    if s["final_val_loss"] is not None:
        before = f"{s['initial_val_loss']:.4f} at step 0 -> " if s["initial_val_loss"] is not None else ""
        best = f" (best {s['best_val_loss']:.4f} at step {s['best_step']})" if s["best_step"] else ""
        parts.append(f"val loss {before}{s['final_val_loss']:.4f} at step {val_step}{best}")
    rate, short = s[f"{unit}_per_sec"], "tok" if unit == "tokens" else unit
    parts.append(f"{s[f'trained_{unit}']:,} {unit} trained in {_duration(wall)} "
                 f"({rate:.{0 if unit == 'tokens' else 2}f} {short}/s)")
    parts.append(f"adapter: {s['adapter_dir']}")
    return "; ".join(parts)


# Metrics shown in the progress line, by their TRL names, and their short names on a live bar.
_SHORT = {"rewards/accuracies": "acc", "rewards/margins": "margin", "kl": "kl"}
_EXTRA = ("nll_loss", "log_odds_ratio", "log_odds_chosen", "kl")
# Panels under the loss in loss.svg for a preference objective: (y label, [(series, metrics key)]).
_PANELS = [("reward", [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                       ("rewards/margins", "rewards/margins")]),
           ("reward accuracy", [("train", "rewards/accuracies"), ("validation", "eval_rewards/accuracies")])]


def stacked_svg(charts: list[str]) -> str:
    """SVG documents of the same width, one under the other, as one document."""
    import re

    heights = [int(re.search(r'height="(\d+)"', c)[1]) for c in charts]
    width = re.search(r'width="(\d+)"', charts[0])[1]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{sum(heights)}">']
    for c, y in zip(charts, [sum(heights[:i]) for i in range(len(heights))]):
        parts.append(c.replace("<svg ", f'<svg y="{y}" ', 1).strip())
    return "\n".join(parts + ["</svg>"]) + "\n"


def loss_svg(title: str, series: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 360,
             ylabel: str = "loss", log: bool | None = None) -> str:
    """A line chart of (step, value) series as an SVG document (first series a line, the others
    lines with dots); log-scaled y when all values are positive (unless `log` says otherwise)."""
    pts = [p for ps in series.values() for p in ps if math.isfinite(p[1])]
    left, right, top, bottom = 60, 20, 30, 40
    w, h = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in pts] or [0, 1], [p[1] for p in pts] or [0, 1]
    log = min(ys) > 0 if log is None else log and min(ys) > 0
    f = math.log10 if log else (lambda v: v)
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = f(min(ys)), f(max(ys))
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    y0, y1 = y0 - 0.03 * (y1 - y0), y1 + 0.03 * (y1 - y0)  # keep end points off the frame

    def X(v):
        return left + (v - x0) / (x1 - x0) * w

    def Y(v):
        return top + (y1 - f(v)) / (y1 - y0) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    for v in _ticks(min(ys), max(ys), log):
        if y0 - 1e-9 <= f(v) <= y1 + 1e-9:
            parts.append(f'<line x1="{left}" x2="{left + w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                         f'<text x="{left - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for v in _ticks(x0, x1, False):
        if x0 <= v <= x1 and v == int(v):
            parts.append(f'<text x="{X(v):.1f}" y="{top + h + 15}" text-anchor="middle">{int(v)}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">step</text>'
                 f'<text x="14" y="{top + h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + h / 2})">'
                 f'{html.escape(ylabel)}{" (log scale)" if log else ""}</text>')
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    for k, (name, ps) in enumerate((n, [p for p in ps if math.isfinite(p[1])]) for n, ps in series.items()):
        if not ps:
            continue
        c = colours[k % len(colours)]
        line = " ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in ps)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        if k:
            parts += [f'<circle cx="{X(a):.1f}" cy="{Y(b):.1f}" r="3" fill="{c}"/>' for a, b in ps]
        ly = top + 14 + 16 * k
        parts.append(f'<line x1="{left + w - 110}" x2="{left + w - 90}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{c}" stroke-width="2"/><text x="{left + w - 85}" y="{ly}">{name}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """About five round values covering [lo, hi]: 1-2-5 steps, or 1, 2, 5 x powers of ten on a log axis."""
    if log:
        out = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
               for m in (1, 2, 5)]
        out = [v for v in out if lo / 1.0001 <= v <= hi * 1.0001]
        if len(out) >= 2:
            return out  # else a narrow range: round linear steps, placed on the log axis
    raw = ((hi - lo) or 1.0) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _duration(sec: float) -> str:
    m, s = divmod(int(round(sec)), 60)
    return f"{m}m{s:02d}s" if m else f"{sec:.1f}s"
