"""The `mlxft` command line: thin click commands over the library.

Each command parses its arguments, calls one library function, and turns our exceptions into one
clear message with exit code 2. Heavy imports (mlx, mlx-lm) happen inside the commands so that
`mlxft --help` and `mlxft validate` stay fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .errors import MlxFtError

EXIT_USER_ERROR = 2


def user_errors(fn):
    """Print an MlxFtError as one block on stderr and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MlxFtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-ft")
def main():
    """Fine-tune LLMs on Apple Silicon with MLX, driven by TOML recipes.

    \b
    mlxft validate recipes/demo.toml
    mlxft run recipes/demo.toml --set training.learning_rate=2e-4
    """


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@user_errors
def validate(recipes, overrides):
    """Check recipes and report every problem at once.

    \b
    Example:
      mlxft validate recipes/*.toml
    """
    from .errors import RecipeError
    from .recipe import load_recipe

    failed = []
    for path in recipes:
        try:
            load_recipe(path, list(overrides))
            click.echo(f"{path}: ok")
        except RecipeError as e:
            failed.append(str(e))
    if failed:
        click.echo("\n".join(failed), err=True)
        sys.exit(EXIT_USER_ERROR)
