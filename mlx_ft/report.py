"""Reporting for the training loop: progress bar, metrics.jsonl, summary.json, loss.png.

`tokens` in reports are supervised tokens (the ones the loss is computed on), so tokens/s is the
rate at which the run learns from data, comparable across padding and packing choices.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .checkpoint import LoopState


class Reporter:
    def __init__(self, run: Path, total_steps: int, loop: LoopState, callbacks, progress: bool, resumed: bool,
                 write: bool = True):
        self.run, self.total, self.loop, self.callbacks = run, total_steps, loop, list(callbacks)
        self.progress, self.resumed, self.write = progress, resumed, write
        self.metrics = None
        self.t0 = time.perf_counter()
        self.base_elapsed = loop.elapsed
        self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "t": self.t0}
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
            keep = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["step"] <= self.loop.step]
            self.rows = keep
        if self.write:
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            self.metrics = open(metrics, "a")
        self.echo(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / max(n_total, 1):.3f}%)")
        if stats:
            self.echo("data: " + ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (dict, list))))
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
            self.metrics.close()

    # -- events ----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.base_elapsed + time.perf_counter() - self.t0

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def step(self, loss: float, n_tok: int, lr: float, grad_norm: float) -> None:
        import mlx.core as mx

        self.loop.elapsed = self.elapsed()
        w = self.window
        w["loss"] += loss
        w["tokens"] += n_tok
        w["steps"] += 1
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
                "tokens": w["tokens"], "trained_tokens": self.loop.trained_tokens,
                "tokens_per_sec": w["tokens"] / max(now - w["t"], 1e-9), "peak_memory_bytes": peak,
                "elapsed": self.loop.elapsed,
            }
            self._write(row)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}",
                                     tok_s=f"{row['tokens_per_sec']:.0f}", tok=self.loop.trained_tokens,
                                     peak=f"{peak / 2**20:.0f}MB")
            if self.progress and not self.live:
                per_step = (self.loop.elapsed - self.base_elapsed) / max(self.loop.step - self.first_step, 1)
                eta = (self.total - self.loop.step) * per_step
                print(f"step {self.loop.step}/{self.total}  loss {row['loss']:.4f}  lr {lr:.2e}  "
                      f"tok/s {row['tokens_per_sec']:.0f}  trained {self.loop.trained_tokens:,}  "
                      f"peak {peak / 2**20:.0f} MB  eta {_duration(eta)}", flush=True)
            for cb in self.callbacks:
                cb.on_train_report(row)
            self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "t": now}

    def eval(self, val_loss: float, improved: bool) -> None:
        row = {"step": self.loop.step, "val_loss": val_loss, "best": improved}
        self._write(row)
        self.echo(f"step {self.loop.step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
        for cb in self.callbacks:
            cb.on_eval(row)

    def checkpoint(self, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(path)

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, adapter_dir: Path, n_trainable: int, n_total: int, stats: dict, peak_memory: int,
               extra: dict | None = None) -> dict:
        train_rows = [r for r in self.rows if "loss" in r]
        wall = self.elapsed()
        summary = {
            "steps": self.loop.step,
            "epoch": self.loop.epoch,
            "final_loss": train_rows[-1]["last_loss"] if train_rows else None,
            "best_val_loss": self.loop.best_val_loss,
            "best_step": self.loop.best_step,
            "trained_tokens": self.loop.trained_tokens,
            "wall_time_sec": wall,
            "tokens_per_sec": self.loop.trained_tokens / max(wall, 1e-9),
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
        (self.run / "summary.json").write_text(json.dumps(summary, indent=2))
        self.plot()
        for cb in self.callbacks:
            cb.on_end(summary)
        best = f", best val {summary['best_val_loss']:.4f} at step {summary['best_step']}" if summary["best_step"] else ""
        final = summary["final_loss"]
        print(f"done: {summary['steps']} steps, final loss {final:.4f}{best}, {summary['trained_tokens']:,} tokens "
              f"trained in {_duration(wall)} ({summary['tokens_per_sec']:.0f} tok/s), adapter: {adapter_dir}",
              flush=True)
        return summary

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        tr = [r for r in self.rows if "loss" in r]
        va = [r for r in self.rows if "val_loss" in r]
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
        if va:
            ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="validation")
        if all(r["loss"] > 0 for r in tr) and all(r["val_loss"] > 0 for r in va):
            ax.set_yscale("log")  # the late, small improvements stay visible
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.run.name)
        ax.legend()
        ax.grid(alpha=0.3)
        out = self.run / "loss.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out


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
