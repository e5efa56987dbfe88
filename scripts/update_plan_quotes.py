"""Rewrite the planner's numbers where the docs quote them, after the memory model changes.

    python scripts/update_plan_quotes.py

- recipes/*.toml: the "# Planner: peak ... budget ... to spare" and "# Time per epoch" lines,
  re-planned with the `mlxft plan ... --machine M --tokens N` command in each header;
- docs/choosing.md: the two tables printed by examples/plan_matrix.py, and the seeds' table
  (`--seeds`) between its `<!-- seeds -->` markers;
- mlx_ft/planner/plan_cache.json: the replayed estimates behind both, shipped so that the tests,
  `mlxft plan` and `mlxft run` on these models answer at once (every entry is keyed by the
  planner's sources and versions, so a stale one is never read: it only costs a replay).
Prose around them is not rewritten: read the diff. tests/test_recipes.py fails until this is run.
"""

import contextlib
import io
import json
import os
import re
import runpy
import sys
import tempfile
from pathlib import Path

# Replay everything into an empty cache, whose entries are then exactly the ones shipped.
os.environ["MLX_FT_CACHE"] = tempfile.mkdtemp(prefix="mlxft-plan-quotes-")

from mlx_ft.planner import plan  # noqa: E402
from mlx_ft.planner import plan_cache  # noqa: E402
from mlx_ft.recipe import load_recipe  # noqa: E402

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
    start, end = "<!-- seeds: python examples/plan_matrix.py --seeds -->\n", "\n<!-- /seeds -->"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + start + matrix(["--seeds"]) + end + rest.split(end, 1)[1]
    if text != doc.read_text():
        doc.write_text(text)
        print("updated docs/choosing.md tables; check the numbers quoted in its prose")
    entries = plan_cache.entries()
    plan_cache.SHIPPED.write_text(json.dumps(entries, indent=0, sort_keys=True) + "\n")
    print(f"wrote {plan_cache.SHIPPED.relative_to(ROOT)}: {len(entries)} replayed estimates")


if __name__ == "__main__":
    main()
