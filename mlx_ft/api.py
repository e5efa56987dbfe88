"""The notebook side of `mlxft data inspect`: the same report, as an object that shows itself.

    from mlx_ft import load_recipe, inspect_data
    report = inspect_data(load_recipe("recipes/demo.toml"))
    report                      # the text of `mlxft data inspect`; in Jupyter, supervised tokens in green
    report["train"]["tokens"]   # the numbers of `mlxft data inspect --json`
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DataReport:
    """What `mlxft data inspect --json` prints, with a readable repr and an HTML view for Jupyter."""

    data: dict

    def __getitem__(self, key):
        return self.data[key]

    def to_dict(self) -> dict:
        return self.data

    def __repr__(self) -> str:
        from .data.report import format_report

        return format_report(self.data, color=False)

    def _repr_html_(self) -> str:
        from .data.report import format_report

        # The summary as text, then each sample with its supervised tokens highlighted.
        summary = format_report({**self.data, "samples": []}, color=False)
        parts = [f"<pre>{html.escape(summary)}</pre>"]
        for s in self.data["samples"]:
            body = "".join(
                f'<span style="background:#d4f7d4;font-weight:bold">{html.escape(p["text"])}</span>'
                if p["supervised"] else html.escape(p["text"]) for p in s["pieces"])
            parts.append(f"<p>sample {s['index']} ({s['tokens']} tokens, {s['supervised']} supervised, "
                         f"highlighted):</p><pre style='white-space:pre-wrap'>{body}</pre>")
        return "\n".join(parts)


def inspect_data(recipe, show: int = 3, overrides=None) -> DataReport:
    """Counts, token lengths, supervised share, batches per epoch and rendered samples of a recipe's
    data, before any weight is loaded (what `mlxft data inspect` prints).

    Args:
        recipe: a Recipe or the path of a recipe file.
        show: rendered samples to include.
        overrides: with a path, as for `load_recipe`.
    Raises:
        RecipeError, DataError, ModelError (the tokenizer cannot be found).
    """
    from .data.report import inspect_recipe
    from .recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe), overrides)
    return DataReport(inspect_recipe(recipe, show))
