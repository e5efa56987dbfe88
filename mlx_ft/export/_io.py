"""Writing exports safely: refuse to clobber, check free space first, write under a temp name
(`mlx_ft.atomic`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import atomic_dir, atomic_file  # noqa: F401  (the export modules import them from here)
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
