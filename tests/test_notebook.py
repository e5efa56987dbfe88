"""examples/quickstart.ipynb runs end to end in a real Jupyter kernel, on the tiny demo model,
shortened to one epoch through its `parameters` cell."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", "") if o["output_type"] == "stream" else o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = ('OVERRIDES = {"output.dir": "runs/quickstart", "training.epochs": 1,\n'
                        '             "eval.max_samples": 8}\n'
                        "EVAL_SAMPLES = 8")
    # The notebook's relative paths resolve in a scratch root, so runs/ is written there.
    for name in ("recipes", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure

    text = "\n".join(outputs_text(c) for c in nb.cells if c.cell_type == "code")
    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["data"]["batching"]["steps_per_epoch"] == 24  # one epoch
    assert "TrainResult(steps=24" in text
    assert "FITS with" in text and "exact match" in text and " Review: " in text
    assert json.loads((run / "eval.json").read_text())["records"] == 8  # the [eval] table, shortened
    assert (run / "adapters" / "adapters.safetensors").is_file()
    assert (run / "export" / "safetensors" / "model.safetensors").is_file()
    assert (run / "export" / "gguf" / "model-f16.gguf").is_file()
    assert (run / "export" / "peft" / "adapter_model.safetensors").is_file()


def test_checked_in_notebook_shows_a_full_demo_run():
    """The committed outputs are those of the unshortened demo (re-run the notebook to refresh)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "training.epochs" not in params.source
    text = "\n".join(outputs_text(c) for c in nb.cells if c.cell_type == "code")
    assert "TrainResult(steps=480" in text and "exact match" in text and not any(
        o["output_type"] == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
