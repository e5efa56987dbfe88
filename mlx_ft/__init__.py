"""mlx_ft: fine-tune LLMs on Apple Silicon with MLX, driven by TOML recipes.

Notebook use mirrors the CLI (examples/quickstart.ipynb, docs/notebook.md)::

    from mlx_ft import load_recipe, plan, inspect_data, train, evaluate, generate, fuse
    recipe = load_recipe("recipes/demo.toml", overrides={"training.epochs": 1})
    plan(recipe, machine="m4-max-128")   # mlxft plan
    inspect_data(recipe)                 # mlxft data inspect
    result = train(recipe)               # mlxft run; TrainResult: run_dir, adapter_dir, summary, model,
                                         # tokenizer
    evaluate(result)                     # mlxft eval; EvalResult: figures (eval.json), samples
    generate(result, "Review: ...", chat=True)   # mlxft generate
    fuse(result.run_dir, to="gguf")      # mlxft fuse; export_adapter: mlxft export-adapter

Heavy modules (mlx, mlx-lm) load on first use, so `import mlx_ft` is cheap. On Linux it binds
MLX's CPU backend to OpenBLAS when installed (or warns once): see mlx_ft/blas.py.
"""

import sys
import types
import warnings

from . import blas

# mlx-lm imports huggingface_hub, which imports tqdm.auto: in a Jupyter kernel without ipywidgets
# that warns "IProgress not found" with a site-packages path, into every notebook. mlx_ft's own
# progress bar is plain text there (pip install ".[notebook]" gives the widget), so say nothing.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

blas.STATUS = blas.prefer_openblas()  # before anything imports mlx.core

from .errors import (CheckpointError, DataError, ExportError, MlxFtError, ModelError, PlanError,
                     RecipeError, StorageError, TrainingError)
from .recipe import Recipe, load_recipe, recipe_from_dict

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first access
_LAZY = {
    "train": ("runner", "train"),
    "TrainResult": ("runner", "TrainResult"),
    "Callback": ("report", "Callback"),
    "load_with_adapter": ("models", "load_with_adapter"),
    "plan": ("planner", "plan"),
    "inspect_data": ("api", "inspect_data"),
    "fuse": ("export", "fuse"),
    "export_adapter": ("export", "export_adapter"),
    "generate": ("generate", "generate"),
    "evaluate": ("evaluate", "evaluate"),
    "EvalResult": ("evaluate", "EvalResult"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'mlx_ft' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing submodule `mlx_ft.train` (or `.generate`) would bind the module over the lazy
    function of the same name, so `from mlx_ft import train` gave the module; refuse that binding
    (the module stays importable as `mlx_ft.train` through sys.modules)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["load_recipe", "recipe_from_dict", "Recipe", *_LAZY, "MlxFtError", "RecipeError", "DataError",
           "ModelError", "CheckpointError", "TrainingError", "ExportError", "PlanError", "StorageError"]
