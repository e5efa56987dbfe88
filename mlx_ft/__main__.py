"""`python -m mlx_ft ...` is `mlxft ...`."""

from .cli import entry

entry()
