"""Rewrite the planner's numbers where the docs quote them, after the memory model changes.

    python scripts/update_plan_quotes.py

- recipes/*.toml: the "# Planner: peak ... budget ... to spare" and "# Time per epoch" lines,
  re-planned with the `mlxft plan ... --machine M --tokens N` command in each header;
- docs/choosing.md: the two tables printed by examples/plan_matrix.py.
Prose around them is not rewritten: read the diff. tests/test_recipes.py fails until this is run.
"""

import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

from mlx_ft.planner import plan
from mlx_ft.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def recipe_quotes(path: Path) -> str:
    text = path.read_text()
    m = re.search(r"--machine (\S+) --tokens (\d+)", text)
    if not m:
        return text
    p = plan(load_recipe(path), machine=m[1], tokens=int(m[2]))
    s = p.seconds_per_epoch
    when = f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"
    verdict = "fits" if p.fits else "DOES NOT FIT"
    text = re.sub(r"# Planner: .*", f"# Planner: peak {p.peak_bytes / GIB:.1f} GiB of a {p.machine.budget_bytes / GIB:.1f} "
                  f"GiB budget: {verdict}, {p.margin_bytes / p.machine.budget_bytes:.0%} of the budget to spare.", text, count=1)
    return re.sub(r"# Time per epoch: ~\S+ \S+ for", f"# Time per epoch: ~{when} for", text, count=1)


def matrix(argv: list[str]) -> str:
    sys.argv = ["plan_matrix.py", *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(ROOT / "examples" / "plan_matrix.py"), run_name="__main__")
    return out.getvalue().strip()


def main() -> None:
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        new = recipe_quotes(path)
        if new != path.read_text():
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    doc = ROOT / "docs" / "choosing.md"
    text = doc.read_text()
    tables = re.findall(r"^\| model \|.*?(?=\n\n)", text, re.S | re.M)
    for old, new in zip(tables, (matrix([]), matrix(["--no-checkpointing"]))):
        text = text.replace(old, new)
    if text != doc.read_text():
        doc.write_text(text)
        print("updated docs/choosing.md tables; check the numbers quoted in its prose")


if __name__ == "__main__":
    main()
