"""What mlx_ft may delete or replace, and one run per output directory.

mlx_ft deletes or replaces only what it created. A run directory and every exported directory
carry a small marker file, `.mlx_ft` ({"written_by": "mlx_ft", "kind": "run" | "safetensors" |
"peft" | ...}); `--overwrite` on a directory without it is refused, and on a run directory with it
removes only the entries mlx_ft writes there (RUN_ENTRIES), leaving anything else the user put in.

A run holds an advisory lock (fcntl.flock) on `<run>/.mlx_ft.lock` from before it writes anything
until it ends, and records its process id, host, command and start time in that file, so a second
run on the same directory stops at once naming the first. The kernel drops the lock of a process
that died (SIGKILL, a crash, a reboot), so a stale lock is simply taken over.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from .atomic import clean_leftovers, write_text
from .errors import MlxFtWarning, StorageError

MARKER = ".mlx_ft"
LOCK = ".mlx_ft.lock"
RESOLVED = "recipe.resolved.toml"
REFERENCE_FILE = "reference-logps.npz"  # training.precompute_reference's log-probs
# The entries of a run directory that mlx_ft writes (and so may remove on --overwrite).
RUN_ENTRIES = ("adapters", "adapters-best", "checkpoints", "export", "metrics.jsonl", "summary.json",
               "loss.svg", RESOLVED,
               # `mlxft eval` and the [eval] table; the trackers of output.report_to that write in the run
               "eval.json", "eval_samples.jsonl", "eval-base.json", "eval-base_samples.jsonl",
               "tensorboard", "wandb", "mlflow.db", "mlartifacts",
               REFERENCE_FILE)


def mark(where: Path, kind: str) -> None:
    """Record that mlx_ft made `where` (a directory) and what it holds."""
    write_text(Path(where) / MARKER, json.dumps({"written_by": "mlx_ft", "kind": kind}) + "\n")


def kind_of(where: Path) -> str | None:
    """What mlx_ft wrote at `where` ("run", "safetensors", ...), or None for a place it did not make.

    Run directories written before markers existed are recognised by their resolved recipe, whose
    first line says it was written by mlx_ft."""
    where = Path(where)
    marker = where / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("kind") or "unknown")
        except (OSError, ValueError, AttributeError):
            return "unknown"
    try:
        with open(where / RESOLVED) as f:
            return "run" if "by mlx_ft" in f.readline() else None
    except OSError:
        return None


def is_empty_dir(where: Path) -> bool:
    return where.is_dir() and not any(where.iterdir())


def clear_run_dir(run: Path) -> list[str]:
    """Remove what mlx_ft wrote in `run` (and its temp leftovers); returns the names left, the user's."""
    for name in RUN_ENTRIES:
        p = run / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    clean_leftovers(run)
    return sorted(p.name for p in run.iterdir() if p.name not in (MARKER, LOCK))


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another process (it has not recorded itself yet)"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") \
        else "?"
    cmd = f", `{info['command']}`" if info.get("command") else ""
    return f"process {info['pid']}{where} (started {started}{cmd})"


def _read_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """The advisory lock that makes a run directory one run's at a time."""

    def __init__(self, run: Path):
        self.run, self.path, self.fd = Path(run), Path(run) / LOCK, None
        self.took_over: dict | None = None  # what a killed holder had recorded

    def acquire(self) -> "RunLock":
        """Take the lock, or raise StorageError naming the process that holds it."""
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(self.fd)
            os.close(self.fd)
            self.fd = None
            raise StorageError(in_use_message(self.run, info)) from None
        except OSError as e:  # a file system without locks (some network mounts): run unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{self.path}: this file system cannot lock files ({e.strerror}); make sure no "
                          "other run uses this output.dir", MlxFtWarning, stacklevel=2)
        previous = _read_info(self.fd)
        self.took_over = previous if previous.get("pid") else None
        prog = "mlxft" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name  # python -m mlx_ft
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([prog, *sys.argv[1:]])[:200]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)
        return self

    def release(self) -> None:
        """Clear the holder's record (a record left behind means its process was killed) and unlock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def in_use_message(run: Path, info: dict) -> str:
    return (f"output.dir {run} is in use by {_describe(info)}; one run per directory at a time. Wait for it "
            "to finish (or stop it), or set another output.dir")


def check_not_in_use(run: Path) -> None:
    """Raise StorageError when another process holds `run`'s lock (without taking it)."""
    import fcntl

    path = Path(run) / LOCK
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file (yet): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise StorageError(in_use_message(Path(run), _read_info(fd))) from None
    except OSError:
        pass
    finally:
        os.close(fd)
