"""`python -m mlx_ft ...` is `mlxft ...`."""

from .cli import main

main()
