"""output.report_to: one tiny run reports to all four trackers at once, offline, and each tracker's
own reader gives back exactly what metrics.jsonl, eval.json and summary.json hold."""

import json
import math
import struct
import sys

import pytest
from click.testing import CliRunner

from mlx_ft import recipe_from_dict, train
from mlx_ft.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("trackers")
    wb = str(tmp / "wb")
    env = {"TRACKIO_DIR": str(tmp / "trackio"), "NETRC": str(tmp / "netrc"), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": wb, "WANDB_CACHE_DIR": wb, "WANDB_DATA_DIR": wb}
    answers = [json.dumps({"colour": ["red", "blue"][i % 2]}) for i in range(12)]
    records = [{"messages": [{"role": "user", "content": f"Colour of item {i}?"},
                             {"role": "assistant", "content": a}]} for i, a in enumerate(answers)]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = recipe_from_dict({
        "model": {"path": str(tiny_model_dir)}, "adapter": {"rank": 4},
        "data": {"train": str(data), "valid": str(data)},
        "training": {"steps": 6, "batch_size": 4, "learning_rate": 5e-3, "report_every": 2, "eval_every": 3},
        "output": {"dir": str(tmp / "run"), "report_to": ["tensorboard", "wandb", "mlflow", "trackio"]},
        "eval": {"at_end": True, "max_samples": 3, "max_tokens": 8}})
    with pytest.MonkeyPatch.context() as mp:
        for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                  "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        result = train(recipe, progress=False)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def expected(result, train_rows, val_rows):
    """(tag -> [(step, value)]) that every tracker must hold: train and validation rows, eval results."""
    out = {"train/loss": [(r["step"], r["loss"]) for r in train_rows],
           "train/learning_rate": [(r["step"], r["learning_rate"]) for r in train_rows],
           "val/loss": [(r["step"], r["val_loss"]) for r in val_rows]}
    ev = json.loads((result.run_dir / "eval.json").read_text())
    out["eval/exact_match"] = [(result.summary["steps"], ev["exact_match"])]
    out["eval/loss"] = [(result.summary["steps"], ev["loss"])]
    return out


def check(series: dict, want: dict, rel: float = 0.0):
    # three train reports; validation before training (step 0) and at steps 3 and 6
    assert len(want["train/loss"]) == 3 and [s for s, _ in want["val/loss"]] == [0, 3, 6]
    for tag, points in want.items():
        got = series[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=rel, abs=0), tag


def test_tensorboard_event_files(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, train_rows, val_rows = run
    acc = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    check(series, expected(*run), rel=1e-6)  # TensorBoard keeps float32
    recipe_text = acc.Tensors("recipe")[0].tensor_proto.string_val[0].decode()
    assert recipe_text == (result.run_dir / "recipe.resolved.toml").read_text()
    assert series["summary/final_loss"] == [(6, pytest.approx(result.summary["final_loss"], rel=1e-6))]
    assert '"best_val_loss"' in acc.Tensors("summary")[0].tensor_proto.string_val[0].decode()


def wandb_records(path):
    """The protobuf records of a .wandb file (LevelDB-style log: 32 KiB blocks of CRC'd chunks after a
    7-byte header), decoded with wandb's own Record message."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:  # the rest of the block is padding
            pos += left
            continue
        buf, pos = buf + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_wandb_offline_run_files(run):
    result, *_ = run
    (path,) = (result.run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nobody is logged in
    series, config, summary = {}, {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                series.setdefault(k, []).append((row["_step"], v))
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                            for i in rec.summary.update})
    check(series, expected(*run))
    assert config["training"]["learning_rate"] == 5e-3 and config["output"]["report_to"][0] == "tensorboard"
    assert summary["final_loss"] == result.summary["final_loss"] and summary["steps"] == 6


def test_mlflow_local_store(run):
    from mlflow.tracking import MlflowClient

    result, *_ = run
    client = MlflowClient(tracking_uri=f"sqlite:///{result.run_dir / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("mlx_ft").experiment_id])
    assert r.info.run_name == "run" and r.info.status == "FINISHED"
    series = {tag: [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, tag),
                                                       key=lambda m: m.step)]
              for tag in r.data.metrics}
    check(series, expected(*run))
    assert r.data.params["training.learning_rate"] == "0.005" and r.data.params["eval.at_end"] == "True"
    assert r.data.metrics["summary/final_loss"] == result.summary["final_loss"]
    files = {f.path for f in client.list_artifacts(r.info.run_id)}
    assert files == {"recipe.resolved.toml", "summary.json"}


def test_trackio_local_store(run):
    from trackio.sqlite_storage import SQLiteStorage

    result, *_ = run
    # the store TRACKIO_DIR names
    assert SQLiteStorage.get_project_db_path("mlx_ft").parent == result.run_dir.parent / "trackio"
    logs = SQLiteStorage.get_logs("mlx_ft", "run")
    series = {}
    for row in logs:
        for k, v in row.items():
            if k not in ("step", "timestamp") and isinstance(v, float | int) and not math.isnan(v):
                series.setdefault(k, []).append((row["step"], v))
    check(series, expected(*run))
    config = SQLiteStorage.get_run_config("mlx_ft", "run")
    assert config["training"]["learning_rate"] == 5e-3
    assert series["summary/final_loss"] == [(6, result.summary["final_loss"])]


def test_a_missing_tracker_library_names_its_extra(tmp_path, tiny_model_dir, chat_jsonl, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importing it raises ImportError
    train_file, valid_file = chat_jsonl
    rec = tmp_path / "r.toml"
    rec.write_text(f'[model]\npath = "{tiny_model_dir}"\n[data]\ntrain = "{train_file}"\n'
                   f'[training]\nsteps = 1\n[output]\ndir = "{tmp_path / "run"}"\nreport_to = ["mlflow"]\n')
    message = ("output.report_to: 'mlflow' needs its library, which is not installed; "
               'pip install -e ".[mlflow]"')
    for cmd in ("validate", "run"):  # validate says so before a run would load the model
        result = CliRunner().invoke(main, [cmd, str(rec)])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
