"""Where mlx_ft keeps what it can rebuild: `$MLX_FT_CACHE`, else ~/.cache/mlx_ft.

Builtin demo models (`builtin/`), replayed plans (`plans/`) and other derived files live under
it; deleting it costs only the time to rebuild them.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache directory (not created here)."""
    return Path(os.environ.get("MLX_FT_CACHE") or Path.home() / ".cache" / "mlx_ft").expanduser()
