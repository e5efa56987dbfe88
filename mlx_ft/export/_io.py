"""Writing exports safely: refuse to clobber, check free space first, write under a temp name.

Every export is built next to its destination (same filesystem, so the final `os.replace` is
atomic) and renamed only when complete: an interrupted export leaves at most a `*.tmp-*` entry,
never a half-written file under the name the user asked for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ExportError

# Headroom over the estimated size: metadata, tokenizer files, padding between tensors.
DISK_MARGIN = 1.05
DISK_SLACK_BYTES = 16 << 20


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite to replace it")


def check_disk(out: Path, needed_bytes: int) -> None:
    """Raise before writing anything when the destination's filesystem cannot hold the export."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    needed = int(needed_bytes * DISK_MARGIN) + DISK_SLACK_BYTES
    if free < needed:
        raise ExportError(f"not enough disk space for {out}: about {needed / 1e9:.2f} GB needed, "
                          f"{free / 1e9:.2f} GB free on {parent}; free space or choose another --out")


def _replace(tmp: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp directory next to `out`; it becomes `out` only if the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temp file path next to `out`; it becomes `out` only if the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
