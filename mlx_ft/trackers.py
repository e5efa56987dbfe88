"""Experiment trackers: `output.report_to = ["tensorboard", "wandb", "mlflow", "trackio"]`.

Each tracker gets what metrics.jsonl and summary.json hold: every metrics row (`train/loss`,
`train/learning_rate`, `train/tokens_per_sec`, ...), every validation pass (`val/loss`), the
`[eval]` results (`eval/exact_match`, ...), the resolved recipe as the run's config, and the final
summary. All of them work without an account or a network:

- tensorboard: event files in `<run>/tensorboard` (`tensorboard --logdir runs`); written with
  the `tensorboard` package alone, no TensorFlow or torch.
- wandb: offline mode (files in `<run>/wandb`, `wandb sync` uploads them later) unless you are
  logged in (`wandb login` or WANDB_API_KEY); WANDB_MODE, WANDB_PROJECT and WANDB_ENTITY apply.
- mlflow: MLFLOW_TRACKING_URI when set, else a local SQLite store `<run>/mlflow.db`
  (`mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db`); MLflow 3 refuses its old
  `./mlruns` file store unless MLFLOW_ALLOW_FILE_STORE=true, and SQLite is its default local store.
- trackio: its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio;
  `trackio show --project mlx_ft`).

Every tracker has the hooks of `mlx_ft.train.Callback` plus `start(recipe, run_dir)` and `close()`;
`trackers_for(recipe, run_dir)` gives the started trackers a run attaches. Only rank 0 reports.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

from .errors import MlxFtError

PROJECT = "mlx_ft"  # W&B project, MLflow experiment and trackio project unless the environment names one


def _missing(extra: str) -> str:
    return (f"output.report_to: {extra!r} needs its library, which is not installed; "
            f"pip install -e \".[{extra}]\" (or pip install {extra})")


def _require(module: str, extra: str):
    """Import a tracker's library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MlxFtError(_missing(extra)) from None


def missing_trackers(recipe) -> list[str]:
    """A problem for each tracker of `output.report_to` whose library is not installed (no import:
    what `mlxft validate` reports before a run would find out after loading the model)."""
    return [_missing(name) for name in recipe.output.report_to if importlib.util.find_spec(name) is None]


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """The numbers of a metrics row, named for a tracker: `loss` -> `train/loss`, `val_loss` ->
    `val/loss`; names that already hold a "/" (eval results: `eval/exact_match`) stay as they are.
    The step and booleans are left out."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        name = k if "/" in k else prefix + (k[4:] if k.startswith("val_") else k)
        out[name] = float(v)
    return out


def summary_scalars(summary: dict) -> dict[str, float]:
    """The top-level numbers of summary.json, as `summary/<key>`."""
    return scalars({k: v for k, v in summary.items() if k != "step"}, "summary/")


class Tracker:
    """What every tracker does with the run's events; subclasses write them to their library."""

    name = ""

    def __init__(self):
        self.step, self.failed, self.closed = 0, False, False

    def start(self, recipe, run_dir: Path) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def end(self, summary: dict) -> None:
        self.log(summary_scalars(summary), summary.get("steps", self.step))

    def finish(self, failed: bool) -> None:
        raise NotImplementedError

    # -- the Callback hooks: a tracker that fails is reported once and dropped, the run goes on ------
    def _safely(self, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # a tracker's server, disk or library: never worth a training run
            self.failed = True
            warnings.warn(f"output.report_to: {self.name} failed ({type(e).__name__}: {e}); the run goes on "
                          f"without it (metrics.jsonl and summary.json have everything)", stacklevel=2)

    def on_train_report(self, row: dict) -> None:
        self.step = row["step"]
        self._safely(self.log, scalars(row, "train/"), row["step"])

    def on_eval(self, row: dict) -> None:
        self.step = max(self.step, row["step"])
        self._safely(self.log, scalars(row, "val/"), row["step"])

    def on_checkpoint(self, path: Path) -> None:
        """Checkpoints stay in the run directory; trackers do not copy them."""

    def on_end(self, summary: dict) -> None:
        self._safely(self.end, summary)

    def close(self, failed: bool = False) -> None:
        """End the tracker's run (marked failed when the training run failed); once."""
        if not self.closed:
            self.closed = True
            self._safely(self.finish, failed)


class TensorBoardTracker(Tracker):
    """Scalars and two text entries (the resolved recipe, the summary) in <run>/tensorboard."""

    name = "tensorboard"

    def start(self, recipe, run_dir: Path) -> None:
        _require("tensorboard", "tensorboard")
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        from .recipe import resolved_toml

        self.writer = EventFileWriter(str(run_dir / "tensorboard"))
        self._text("recipe", resolved_toml(recipe), 0)

    def _event(self, values: list, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()  # a crashed run still shows every row written so far

    def log(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        if values:
            self._event([Summary.Value(tag=k, simple_value=v) for k, v in values.items()], step)

    def _text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.text.metadata import create_summary_metadata

        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        meta = create_summary_metadata(display_name=tag, description="")
        self._event([Summary.Value(tag=tag, metadata=meta, tensor=tensor)], step)

    def end(self, summary: dict) -> None:
        super().end(summary)
        # Markdown: a fenced block keeps the JSON's layout.
        text = "```\n" + json.dumps(summary, indent=2) + "\n```"
        self._text("summary", text, summary.get("steps", self.step))

    def finish(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in <run>/wandb: offline unless logged in, the recipe as config."""

    name = "wandb"

    def start(self, recipe, run_dir: Path) -> None:
        wandb = _require("wandb", "wandb")
        mode = None  # WANDB_MODE, when set, is wandb's to read
        if not os.environ.get("WANDB_MODE"):
            mode = "online" if wandb.login(verify=False, prompt=False) else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                              dir=str(run_dir), config=recipe.to_dict(), mode=mode, reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def end(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(Tracker):
    """An MLflow run: metrics by step, the recipe as params and as an artifact, the summary as
    metrics and an artifact. Uses MlflowClient, not the fluent API, so no global run is left open."""

    name = "mlflow"

    def start(self, recipe, run_dir: Path) -> None:
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        from .recipe import resolved_toml

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        exp = self.client.get_experiment_by_name(name)
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else str((run_dir / "mlartifacts").resolve())
        eid = exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=local)
        self.run_id = self.client.create_run(eid, run_name=run_dir.name).info.run_id
        flat = {f"{t}.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                for t, table in recipe.to_dict().items() for k, v in table.items()}
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in sorted(flat.items())])
        self.client.log_text(self.run_id, resolved_toml(recipe), "recipe.resolved.toml")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if values:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def end(self, summary: dict) -> None:
        super().end(summary)
        self.client.log_dict(self.run_id, summary, "summary.json")

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TrackioTracker(Tracker):
    """A trackio run in its local store, the recipe as config."""

    name = "trackio"

    def start(self, recipe, run_dir: Path) -> None:
        trackio = _require("trackio", "trackio")
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_dir.name,
                                config=recipe.to_dict(), embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def finish(self, failed: bool) -> None:
        import trackio
        from trackio import context_vars

        if context_vars.current_run.get() is self.run:
            trackio.finish()  # also clears trackio's current run: its exit hook has nothing left to finish
        else:
            self.run.finish()


TRACKERS = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)}


def trackers_for(recipe, run_dir: Path) -> list[Tracker]:
    """The trackers `output.report_to` names, started (each has the recipe as its config).

    Raises:
        MlxFtError: a tracker's library is not installed (naming the extra to install); the ones
            already started are closed first.
    """
    started: list[Tracker] = []
    try:
        for name in recipe.output.report_to:
            tracker = TRACKERS[name]()
            tracker.start(recipe, Path(run_dir))
            started.append(tracker)
    except BaseException:
        close_all(started, failed=True)
        raise
    return started


def close_all(trackers: list[Tracker], failed: bool = False) -> None:
    """Close every tracker (a failed run is marked failed where the library has the notion)."""
    for t in trackers:
        t.close(failed)
