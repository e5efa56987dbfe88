"""Writing exports safely: refuse to clobber, replace only an earlier export of mlx_ft of the same
kind, check the place and the free space first, write under a temp name (`mlx_ft.atomic`) and
remove the temp leftovers of a killed export to the same target."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import atomic_dir, atomic_file, check_writable, clean_leftovers  # noqa: F401  (re-exported)
from ..errors import ExportError
from ..ownership import MARKER, kind_of, mark  # noqa: F401  (the writers mark what they write)

# Headroom over the estimated size: metadata, tokenizer files, padding between tensors.
DISK_MARGIN = 1.05
DISK_SLACK_BYTES = 16 << 20
MODELFILE_HEADER = "# Ollama Modelfile written by mlx_ft"
FILE_KINDS = {"gguf": b"GGUF", "modelfile": MODELFILE_HEADER.encode()}  # kind -> how such a file starts


def check_target(out: Path, overwrite: bool, kind: str) -> None:
    """Raise before any work when `out` cannot be written: it exists (without `overwrite`), it is not an
    earlier mlx_ft export of the same `kind` (directories carry a .mlx_ft marker, a GGUF starts with
    its magic), or its place is a file or read-only. Removes leftovers of a killed export to `out`."""
    out = Path(out)
    check_writable(out, "--out")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExportError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
        problem = _not_replaceable(out, kind)
        if problem:
            raise ExportError(f"{out} {problem}; mlx_ft replaces only an earlier export of its own of the "
                              f"same kind ({kind}), even with --overwrite. Nothing was changed: choose a new "
                              "path for --out")
    clean_leftovers(out.parent, out.name)


def _not_replaceable(out: Path, kind: str) -> str | None:
    if out.is_symlink():
        return "is a symbolic link"
    if kind in FILE_KINDS:
        if not out.is_file():
            return f"is a directory, not a {kind} file"
        with open(out, "rb") as f:
            head = f.read(len(FILE_KINDS[kind]))
        return None if head == FILE_KINDS[kind] else f"is not a {kind} file (it does not start as one)"
    if not out.is_dir():
        return "is a file, not an export directory"
    found = kind_of(out)
    if found == kind or not any(out.iterdir()) or _inside_own_export(out):
        return None
    if found == "run":
        return "is a run directory of mlx_ft, not an export"
    if found:
        return f"is an mlx_ft {found} export, not {kind}"
    return f"holds files mlx_ft did not write (no {MARKER})"


def _inside_own_export(out: Path) -> bool:
    """`out` is in the export/ folder of an mlx_ft run directory, a place mlx_ft owns."""
    return any(a.name == "export" and kind_of(a.parent) == "run" for a in list(out.absolute().parents)[:2])


def check_disk(out: Path, needed_bytes: int) -> None:
    """Raise before writing anything when the destination's filesystem cannot hold the export."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    needed = int(needed_bytes * DISK_MARGIN) + DISK_SLACK_BYTES
    if free < needed:
        raise ExportError(f"not enough disk space for {out}: about {needed / 1e9:.2f} GB needed, "
                          f"{free / 1e9:.2f} GB free on {parent}; free space or choose another --out")
