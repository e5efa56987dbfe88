"""Files and directories written for the user appear whole or not at all.

Each is built under a temporary name next to its destination (same filesystem, so the final
`os.replace` is atomic) and renamed only when complete: a crash or Ctrl-C leaves at most a
hidden `.<name>.tmp-*` entry, never a half-written file under the name the user asked for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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
