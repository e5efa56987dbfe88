"""The layering rules of docs/architecture.md, read from the imports of every module.

Stages only call down: a module imports modules of lower layers (or of its own package), never a
higher layer; and there is no import cycle among mlx_ft's modules (imports inside functions count:
they are the same dependency, taken later).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mlx_ft"

# Layer of each module (by its dotted name under mlx_ft, or its package); higher calls lower.
LAYERS = {
    # the top: what users call, then the runner that orchestrates a run
    "__main__": 6, "__init__": 5, "cli": 5, "api": 5, "runner": 4, "probe": 4,
    # the stages
    "train": 3, "planner": 3, "export": 3, "generate": 3, "evaluate": 3,
    # what the stages are built from
    "data": 2, "models": 2, "losses": 2, "step": 2, "checkpoint": 2, "report": 2, "trackers": 2,
    "objectives": 2,
    # the bottom
    "recipe": 1, "recipe_reference": 1, "hub": 1, "tiny": 1, "hf_layout": 1, "hfconfig": 1, "ownership": 1,
    "errors": 0, "atomic": 0, "chunking": 0, "cache": 0, "gguf_types": 0, "blas": 0,
}
# Imports between modules of the same layer, each with its reason; any other is a violation.
SIDEWAYS = {
    ("probe", "runner"): "the probe trains two real steps of the recipe through the runner",
    ("report", "checkpoint"): "the reporter shows the loop state a checkpoint holds (LoopState)",
    ("evaluate", "generate"): "evaluation generates every assistant turn",
    ("hub", "tiny"): "builtin: model paths are built by tiny",
    ("tiny", "hf_layout"): "tiny models are written as Hugging Face checkpoints",
    ("tiny", "hfconfig"): "tiny models write their config in transformers 4's or 5's spelling",
    ("recipe_reference", "recipe"): "the reference is generated from the recipe's dataclasses",
    ("atomic", "errors"): "a write that fails (disk full, read-only) is the user's StorageError",
    ("objectives", "losses"): "preference objectives sum the chunked per-token log-probs of losses",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """mlx_ft modules that `name` imports, anywhere in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("mlx_ft"):
                target = node.module.removeprefix("mlx_ft").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import data` imports a module, `from .x import f` a name
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_ft."):
                    found.add(alias.name.removeprefix("mlx_ft."))
    return {m for m in found if m in known and m != name}


def _top(module: str) -> str:
    return module.split(".")[0] or "__init__"


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in _modules()} - set(LAYERS))
    assert not missing, f"give these modules a layer in LAYERS (and docs/architecture.md): {missing}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for src, targets in _graph().items():
        for dst in targets:
            a, b = _top(src), _top(dst)
            if a == b:
                continue  # inside one package (planner.*, export.*, data.*)
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and (a, b) not in SIDEWAYS):
                bad.append(f"{src} (layer {LAYERS[a]}) imports {dst} (layer {LAYERS[b]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("stage, forbidden", [
    ("train", {"planner", "export", "cli", "runner", "evaluate"}),
    ("planner", {"train", "runner", "probe"}),
    ("data", {"models"}),
])
def test_the_rules_the_issue_names(stage, forbidden):
    """The loop neither plans nor exports; the planner never imports the loop; data needs a
    tokenizer, not the model stage."""
    graph = _graph()
    hits = sorted(f"{src} imports {dst}" for src, dsts in graph.items() if _top(src) == stage
                  for dst in dsts if _top(dst) in forbidden)
    assert not hits, hits


def test_lines_within_110_characters():
    """Every line of mlx_ft's sources fits in 110 characters, the width the code is hand-wrapped to:
    a longer one is a sign of a wrap forgotten, and it reads badly side by side and in review."""
    long_lines = [f"{path.relative_to(PKG.parent)}:{n}: {len(line)} characters"
                  for path in sorted(PKG.rglob("*.py"))
                  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                  if len(line) > 110]
    assert not long_lines, "lines longer than 110 characters:\n" + "\n".join(long_lines)
