"""Files and directories written for the user appear whole or not at all.

Each is built under a temporary name next to its destination (same filesystem, so the final
`os.replace` is atomic) and renamed only when complete: a crash or Ctrl-C leaves at most a
hidden `.<name>.tmp-*` entry, never a half-written file under the name the user asked for, and
`clean_leftovers` removes such entries at the start of the next run or export in that place.

What appears gets the mode the user's umask allows (0644 files, 0755 directories by default),
not the 0600/0700 of `tempfile`'s private names: Ollama's service user, Docker or a colleague
must be able to read an export.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import StorageError

TMP_TAG = ".tmp-"  # every temp name is `.<final name>.tmp-<random>`
_umask_lock = threading.Lock()

# errno -> what the user reads
_REASONS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
    errno.EPERM: "permission denied", errno.EFBIG: "the file is larger than the limit set for this process",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
}


def umask() -> int:
    """The process umask (reading it means setting it; the lock keeps threads from seeing 0)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def tmp_prefix(out: Path) -> str:
    return f".{out.name}{TMP_TAG}"


def _replace(tmp: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    os.replace(tmp, out)


def is_write_failure(e: BaseException) -> bool:
    """An OSError of writing (full, read-only, permissions), or MLX's RuntimeError for a file it
    could not create or write (MLX names no errno)."""
    if isinstance(e, OSError):
        return e.errno in _REASONS
    return isinstance(e, RuntimeError) and str(e).startswith(("[write]", "[save"))


def storage_error(e: BaseException, out: Path, kept: str) -> StorageError:
    """One message for a failed write: the path, why, what was kept, and what to do."""
    reason = _REASONS.get(getattr(e, "errno", None) or 0)
    if reason is None:  # MLX says only that the write failed
        reason = "the write failed"
        try:
            free = shutil.disk_usage(_existing_ancestor(out)).free
            reason += f" (the disk may be full: {free / 2**20:.0f} MiB free there now)"
        except OSError:
            pass
    kept = f"{kept} " if kept else ""
    return StorageError(f"cannot write {out}: {reason}. {kept}Free space or fix the permissions (or choose "
                        "another place), then run the command again", path=out, reason=reason)


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str, inside: bool = False) -> None:
    """Raise before any work when `path` could not be created or replaced (or, `inside`, written
    into when it is a directory): an ancestor is a file, or the directory that would change cannot be
    written (read-only mount, permissions)."""
    path = Path(path)
    base = path if inside and path.is_dir() else _existing_ancestor(path.parent)
    if not base.is_dir():
        raise StorageError(f"{what}: {path} cannot be created: {base} is a file, not a directory; "
                           "choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        ro = _read_only_fs(base)
        raise StorageError(f"{what}: {path} cannot be written: {base} is "
                           f"{'on a read-only file system' if ro else 'not writable by this user'}; "
                           "choose another path or fix the permissions. Nothing was changed")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def clean_leftovers(where: Path, name: str | None = None) -> list[Path]:
    """Remove temp entries of mlx_ft's naming in `where` (only those of `name` when given): what a
    killed write left. Returns what was removed."""
    if not Path(where).is_dir():
        return []
    pattern = f".{name}{TMP_TAG}*" if name else f".*{TMP_TAG}*"
    gone = []
    for p in sorted(Path(where).glob(pattern)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def _create_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StorageError(f"cannot write {out}: a component of {out.parent} is a file, not a directory; "
                           "choose another path") from None
    except OSError as e:
        raise storage_error(e, out, "Nothing was written.") from None


def _kept(out: Path) -> str:
    if out.exists():
        return f"The previous {out.name} is unchanged."
    return "Nothing was written under that name."


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp directory next to `out`; it becomes `out` only if the block completes."""
    out = Path(out)
    _create_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(out), dir=out.parent))
    except OSError as e:
        raise storage_error(e, out, _kept(out)) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(e) and not isinstance(e, StorageError):
            raise storage_error(e, out, _kept(out)) from None
        raise


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temp file path next to `out`; it becomes `out` only if the block completes."""
    out = Path(out)
    _create_parent(out)
    try:
        fd, name = tempfile.mkstemp(prefix=tmp_prefix(out), dir=out.parent)
    except OSError as e:
        raise storage_error(e, out, _kept(out)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        _replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e) and not isinstance(e, StorageError):
            raise storage_error(e, out, _kept(out)) from None
        raise


def write_text(out: Path, text: str) -> Path:
    """`out.write_text(text)`, atomically."""
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    return out
