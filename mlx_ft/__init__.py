"""mlx_ft: fine-tune LLMs on Apple Silicon with MLX, driven by TOML recipes.

Notebook use mirrors the CLI::

    from mlx_ft import load_recipe, train
    recipe = load_recipe("recipes/demo.toml", overrides={"training.epochs": 1})
    result = train(recipe)          # TrainResult: run_dir, adapter_dir, summary, model, tokenizer

Heavy modules (mlx, mlx-lm) load on first use, so `import mlx_ft` is cheap.
"""

from .errors import (CheckpointError, DataError, ExportError, MlxFtError, ModelError, PlanError,
                     RecipeError, TrainingError)
from .recipe import Recipe, load_recipe, recipe_from_dict

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first access
_LAZY = {
    "train": ("train", "train"),
    "TrainResult": ("train", "TrainResult"),
    "Callback": ("train", "Callback"),
    "load_with_adapter": ("models", "load_with_adapter"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'mlx_ft' has no attribute {name!r}")


__all__ = ["load_recipe", "recipe_from_dict", "Recipe", *_LAZY, "MlxFtError", "RecipeError", "DataError",
           "ModelError", "CheckpointError", "TrainingError", "ExportError", "PlanError"]
