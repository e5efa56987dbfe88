"""Never lose or destroy a user's files (issue 17): what --overwrite may delete, one run per
directory, resume semantics, clean leftovers after kills, one clear error (exit 2) per bad input.

Deletion tests run only inside a temp dir holding a decoy tree, and assert the decoys survive.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from conftest import chat_corpus
from test_train import files_under, make_recipe

from mlx_ft.cli import main

ROOT = str(Path(__file__).resolve().parent.parent)  # PYTHONPATH of the subprocesses

RUN_FILES = {".mlx_ft", ".mlx_ft.lock", "recipe.resolved.toml", "metrics.jsonl", "summary.json", "loss.svg",
             "adapters/adapters.safetensors", "adapters/adapter_config.json",
             "adapters-best/adapters.safetensors", "adapters-best/adapter_config.json"}
CKPT_FILES = ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json")


def ckpt_files(*steps) -> set[str]:
    return {f"checkpoints/step-{s:06d}/{f}" for s in steps for f in CKPT_FILES}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def decoy_tree(root: Path) -> dict[str, bytes]:
    """A user's files: what no command of mlx_ft may delete."""
    (root / "notes").mkdir(parents=True, exist_ok=True)
    (root / "thesis.tex").write_text("four years of work")
    (root / "notes" / "ideas.md").write_text("keep me")
    (root / ".hidden.tmp-not-ours").write_text("a temp name that is not mlx_ft's")
    return snapshot(root)


def cli(*args):
    """`mlxft ARGS` in-process; returns (exit code, everything printed)."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


@pytest.fixture
def data(tmp_path):
    recs = chat_corpus(24)
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs[:20]))
    valid.write_text("".join(json.dumps(r) + "\n" for r in recs[20:]))
    return train, valid


def recipe(tmp_path, model_dir, data, **sections):
    training = {"steps": 4, "save_every": 2, **sections.pop("training", {})}
    sections["training"] = {k: v for k, v in training.items() if v is not None}  # None: the key left out
    return make_recipe(tmp_path, model_dir, data, **sections)


# -- ownership: --overwrite and --out ------------------------------------------------------------

@pytest.mark.parametrize("out_dir", ["decoy", "..", "."])
def test_overwrite_refuses_a_directory_mlx_ft_did_not_make(tmp_path, tiny_model_dir, data, monkeypatch,
                                                           out_dir):
    home = tmp_path / "home"
    work = home / "decoy" if out_dir == "decoy" else home / "work"
    work.mkdir(parents=True)
    before = decoy_tree(home) if out_dir == ".." else decoy_tree(work)
    path = recipe(tmp_path, tiny_model_dir, data, output={"dir": out_dir})
    monkeypatch.chdir(home if out_dir == "decoy" else work)
    code, out = cli("run", path, "--overwrite")
    assert code == 2 and "Traceback" not in out
    assert f"output.dir: {out_dir} holds files that mlx_ft did not write (no .mlx_ft marker)" in out
    assert "--overwrite included" in out
    assert snapshot(home if out_dir == ".." else work) == before


def test_overwrite_checks_everything_before_deleting_and_removes_only_its_own(tmp_path, tiny_model_dir, data):
    path = recipe(tmp_path, tiny_model_dir, data)
    assert cli("run", path)[0] == 0
    run = tmp_path / "run"
    (run / "my-notes.txt").write_text("mine")
    (run / ".adapters.tmp-abc123").mkdir()  # what a killed save left
    before = snapshot(run)
    code, out = cli("run", path, "--overwrite", "--set", "model.path=typo-model")
    assert code == 2 and "model.path: typo-model does not exist" in out
    assert "plan: skipped" not in out  # the error alone, not after a long plan line
    assert snapshot(run) == before  # a typo deletes nothing
    code, out = cli("run", path, "--overwrite")
    assert code == 0, out
    assert "--overwrite kept 1 entry of" in out and "my-notes.txt" in out
    assert files_under(run) == RUN_FILES | ckpt_files(2) | {"my-notes.txt"}


def test_fuse_and_export_adapter_out_dot_overwrite_delete_nothing(tmp_path, tiny_model_dir, data,
                                                                  monkeypatch):
    path = recipe(tmp_path, tiny_model_dir, data, training={"save_every": None})
    assert cli("run", path)[0] == 0
    run = tmp_path / "run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = decoy_tree(cwd)
    monkeypatch.chdir(cwd)
    for args in (["fuse", run, "--out", ".", "--overwrite"],
                 ["export-adapter", run, "--to", "peft", "--out", "."],
                 ["export-adapter", run, "--to", "peft", "--out", ".", "--overwrite"],
                 ["fuse", run, "--out", run, "--overwrite"]):
        code, out = cli(*args)
        assert code == 2 and out.startswith("error: ") and "Traceback" not in out, (args, out)
    assert "is a run directory of mlx_ft, not an export" in out
    (cwd / "model-f16.gguf").write_text("not a gguf")
    code, out = cli("fuse", run, "--to", "gguf", "--out", ".", "--overwrite")
    assert code == 2 and "model-f16.gguf is not a gguf file" in out
    (cwd / "model-f16.gguf").unlink()
    code, out = cli("fuse", run, "--out", "thesis.tex/model")
    assert code == 2 and "thesis.tex is a file, not a directory" in out
    assert snapshot(cwd) == before
    assert files_under(run) == RUN_FILES  # nothing written in the run either


# -- one run per directory -----------------------------------------------------------------------

def test_second_run_is_refused_naming_the_first_and_a_killed_holder_is_taken_over(tmp_path, tiny_model_dir,
                                                                                  data):
    path = recipe(tmp_path, tiny_model_dir, data)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".mlx_ft").write_text('{"written_by": "mlx_ft", "kind": "run"}\n')
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mlx_ft.ownership import RunLock
        RunLock({str(run)!r}).acquire(); print("locked", flush=True); time.sleep(120)""")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out = cli("run", path, "--resume")
        assert code == 2
        assert f"output.dir {run} is in use by process {holder.pid} (started " in out
        assert "one run per directory at a time" in out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, out = cli("run", path, "--resume")
    assert code == 0, out
    assert f"took over {run}'s lock from process {holder.pid}" in out


# -- resume semantics ----------------------------------------------------------------------------

def test_resume_of_a_finished_run(tmp_path, tiny_model_dir, data):
    path = recipe(tmp_path, tiny_model_dir, data)
    assert cli("run", path)[0] == 0
    run = tmp_path / "run"
    before = snapshot(run)
    code, out = cli("run", path, "--resume")
    assert code == 0 and f"output.dir {run} holds a finished run (4 of 4 steps); nothing to train" in out
    assert snapshot(run) == before
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in chat_corpus(30)[10:]))
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-model")
    for change, message in [("adapter.rank=8", "adapter.rank: checkpoint has 4, recipe has 8"),
                            (f"data.train={other}", "data: the training samples differ"),
                            (f"model.path={moved}", "model.path: checkpoint has")]:
        code, out = cli("run", path, "--resume", "--set", change, "--set", "training.steps=6")
        assert code == 2 and f"{run}: cannot resume with this recipe" in out and message in out, out
    assert snapshot(run) == before
    # More steps continue from the newest checkpoint (step 2): with a constant learning rate the
    # result is the uninterrupted 6-step run's, to the bit.
    code, out = cli("run", path, "--resume", "--set", "training.steps=6")
    assert code == 0 and f"resuming from {run / 'checkpoints/step-000002'}" in out, out
    (tmp_path / "ref").mkdir()
    assert cli("run", recipe(tmp_path / "ref", tiny_model_dir, data, training={"steps": 6}))[0] == 0
    a, b = (dict(mx.load(str(d / "adapters/adapters.safetensors"))) for d in (run, tmp_path / "ref/run"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["initial_val_loss"] == json.loads(
        (tmp_path / "ref/run/summary.json").read_text())["initial_val_loss"]


def test_finished_run_without_checkpoints_cannot_be_extended(tmp_path, tiny_model_dir, data):
    path = recipe(tmp_path, tiny_model_dir, data, training={"save_every": None, "steps": 2})
    assert cli("run", path)[0] == 0
    before = snapshot(tmp_path / "run")
    code, out = cli("run", path, "--resume", "--set", "training.steps=4")
    assert code == 2 and "no checkpoint to continue from (training.save_every was not set)" in out
    assert snapshot(tmp_path / "run") == before


def test_unusable_checkpoints(tmp_path, tiny_model_dir, data):
    path = recipe(tmp_path, tiny_model_dir, data, training={"steps": 6})
    assert cli("run", path)[0] == 0
    run = tmp_path / "run"
    (run / "summary.json").unlink()  # as if killed after step 6
    shutil.copytree(run / "checkpoints/step-000004", run / "checkpoints/step-000004 copy")  # a stray copy
    state = run / "checkpoints/step-000004/state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "loop"}))
    (run / "metrics.jsonl").open("a").write('{"step": 7, "loss": 2.3, "last_lo')  # a torn last row
    half = run / "checkpoints/step-000001"  # what an older mlx_ft's interrupted prune left
    half.mkdir()
    (half / "adapters.safetensors").write_bytes(b"x")
    code, out = cli("run", path, "--resume")
    assert code == 0, out
    assert "removed 1 leftover(s) of an interrupted run" in out and not half.exists()
    assert f"warning: skipping checkpoint {state.parent}: state.json lacks its `loop` or `files` table" in out
    assert "MlxFtWarning" not in out  # one line, no Python source line
    assert "resuming from" in out and "step-000002" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    (run / "summary.json").unlink()
    for d in (run / "checkpoints").glob("step-00000?"):
        (d / "optimizer.safetensors").write_bytes(b"cut")
    before = snapshot(run)
    code, out = cli("run", path, "--resume")
    assert code == 2 and f"{run / 'checkpoints'}: no checkpoint can be resumed from:" in out
    assert "step-000004: optimizer.safetensors does not match its checksum" in out
    assert "--overwrite" in out and "Traceback" not in out
    assert snapshot(run) == before  # never a silent restart from step 0


# -- writes that fail ----------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_is_one_error_naming_what_was_kept(tmp_path, tiny_model_dir, data):
    path = recipe(tmp_path, tiny_model_dir, data, training={"steps": 6, "save_every": 2})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # A file may not grow past 60 kB: the adapter (33 kB) fits, the optimizer state (66 kB) does not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, hard))
    try:
        code, out = cli("run", path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    run = tmp_path / "run"
    assert code == 2 and "Traceback" not in out, out
    assert f"error: cannot write {run / 'checkpoints/step-000002'}: the write failed (the disk may be full" \
        in out
    assert "The run stopped at step 2; it had written no checkpoint yet" in out and "--resume" in out
    assert files_under(run) == {".mlx_ft", ".mlx_ft.lock", "recipe.resolved.toml", "metrics.jsonl"}
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory that cannot be written: chmod for a user, a read-only mount for root (who may
    write through any mode)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("root without the right to mount: no way to make a directory it cannot write")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_read_only_output_dir_and_out_are_one_error(tmp_path, tiny_model_dir, data, read_only_dir):
    ro = read_only_dir
    path = recipe(tmp_path, tiny_model_dir, data, training={"steps": 2, "save_every": None})
    assert cli("run", path)[0] == 0
    run = tmp_path / "run"
    before = snapshot(run)
    path = recipe(tmp_path, tiny_model_dir, data, output={"dir": str(ro / "run")}, name="ro.toml")
    why = "on a read-only file system" if os.geteuid() == 0 else "not writable"
    for args in (["run", path], ["fuse", run, "--out", ro / "fused"],
                 ["export-adapter", run, "--out", ro / "peft"]):
        code, out = cli(*args)
        assert code == 2 and "Traceback" not in out, out
        assert f"cannot be written: {ro} is {why}" in out and "Nothing was changed" in out, out
    assert os.listdir(ro) == [] and snapshot(run) == before


# -- kills during a checkpoint write and during an export ----------------------------------------

KILL_IN_CHECKPOINT = """
import os, signal, sys
import mlx.core as mx
from mlx_ft.recipe import load_recipe
from mlx_ft.runner import train

save = mx.save_safetensors
def dying_save(path, arrays, *a, **k):  # the second checkpoint's optimizer state: half written, then killed
    if "step-000004" in path and path.endswith("optimizer.safetensors"):
        save(path, arrays, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return save(path, arrays, *a, **k)
mx.save_safetensors = dying_save
train(load_recipe(sys.argv[1]), progress=False)
"""


KILL_IN_EXPORT = """
import os, signal, sys
from pathlib import Path
from mlx_ft.export import fuse, quantize

def dying(src, tmp, gguf_type, out):  # llama.cpp's quantizer killed halfway through its output
    Path(tmp).write_bytes(b"GGUF" + bytes(1000))
    os.kill(os.getpid(), signal.SIGKILL)
quantize._quantize_in_process = dying
fuse(sys.argv[1], to="gguf", gguf_type="q4_k_m")
"""


def test_kills_during_a_checkpoint_write_and_an_export_leave_nothing_after_the_next_run(
        tmp_path, tiny_model_dir, data, monkeypatch):
    # Two processes killed at once (side by side: each spends seconds importing MLX).
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    path = recipe(tmp_path / "a", tiny_model_dir, data, training={"steps": 6})
    done = recipe(tmp_path / "b", tiny_model_dir, data, training={"steps": 2, "save_every": None})
    assert cli("run", done)[0] == 0
    run, exported = tmp_path / "a/run", tmp_path / "b/run"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # llama.cpp's quantizer in-process, not a binary
    env = {**os.environ, "PYTHONPATH": ROOT}
    jobs = ((KILL_IN_CHECKPOINT, path), (KILL_IN_EXPORT, exported))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(arg)], env=env, stderr=subprocess.PIPE,
                              text=True) for code, arg in jobs]
    for proc in procs:
        assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr.read()
        proc.stderr.close()

    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".step-000004.tmp-")]
    code, out = cli("run", path, "--resume")
    assert code == 0 and "removed 1 leftover(s) of an interrupted run" in out, out
    assert files_under(run) == RUN_FILES | ckpt_files(2, 4)
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]

    gguf_dir = exported / "export" / "gguf"
    left = sorted(p.name.split(".tmp-")[0] for p in gguf_dir.iterdir())
    assert left == [".model-q4_k_m.gguf", ".model-q4_k_m.gguf"]  # the f16 input dir and the output file
    code, out = cli("fuse", exported, "--to", "gguf", "--gguf-type", "q4_k_m")
    assert code == 0, out
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Modelfile", "model-q4_k_m.gguf"]


# -- modes, paths, bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_get_the_mode_the_umask_allows(tmp_path, tiny_model_dir, data, mask, file_mode, dir_mode):
    path = recipe(tmp_path, tiny_model_dir, data, training={"steps": 2, "save_every": 1})
    old = os.umask(mask)
    try:
        assert cli("run", path)[0] == 0
        run = tmp_path / "run"
        assert cli("fuse", run, "--to", "gguf")[0] == 0
        assert cli("fuse", run, "--to", "safetensors")[0] == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*")}
    assert {m for p, m in modes.items() if (run / p).is_dir()} == {dir_mode}, modes
    assert {m for p, m in modes.items() if (run / p).is_file()} == {file_mode}, modes


@pytest.mark.parametrize("setting, message", [
    ("output=/x", "output (from --set): expected a table such as [output] with its keys, found string"),
    ("training=5", "training (from --set): expected a table such as [training] with its keys, found "
                   "integer 5"),
    ("training.learning_rate=inf",
     "training.learning_rate (from --set): expected a finite number, found inf"),
    ("adapter.alpha=nan", "adapter.alpha (from --set): expected a finite number, found nan"),
])
def test_bad_recipe_values_are_one_error(tmp_path, tiny_model_dir, data, setting, message):
    path = recipe(tmp_path, tiny_model_dir, data)
    for cmd in ("validate", "run"):
        code, out = cli(cmd, path, "--set", setting)
        assert code == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "run").exists() and not Path("/x").exists()


def _broken_model(root: Path, tiny: Path, case: str) -> tuple[Path, str]:
    model = root / f"model-{case}"
    shutil.copytree(tiny, model)
    cfg = model / "config.json"
    if case == "not-json":
        cfg.write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
        return model, f"{cfg}:2: not valid JSON"
    if case == "no-model-type":
        config = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
        return model, f"{cfg}: no `model_type`"
    if case == "unknown-model-type":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": "llamaa"}))
        return model, "Model type llamaa not supported"
    weights = model / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
        return model, f"model.path: a weight file in {model} cannot be read"
    weights.unlink()
    return model, f"model.path: {model} has no model*.safetensors weights"


@pytest.mark.parametrize("case", ["not-json", "no-model-type", "unknown-model-type", "truncated",
                                  "no-weights"])
def test_broken_model_dir_is_one_error(tmp_path, tiny_model_dir, data, case):
    model, message = _broken_model(tmp_path, tiny_model_dir, case)
    path = recipe(tmp_path, model, data)
    code, out = cli("run", path)
    assert code == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "run").exists()


def test_home_in_paths_is_the_home_directory(tmp_path, tiny_model_dir, data, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(data[0], home / "train.jsonl")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path, tiny_model_dir, ("~/train.jsonl", data[1]),
                  output={"dir": "~/runs/x"}, training={"steps": 1, "save_every": None})
    code, out = cli("run", path)
    assert code == 0, out
    assert (home / "runs/x/adapters/adapters.safetensors").is_file() and not (tmp_path / "~").exists()
    code, out = cli("fuse", "~/runs/x", "--out", "~/fused")
    assert code == 0 and (home / "fused/model.safetensors").is_file(), out
