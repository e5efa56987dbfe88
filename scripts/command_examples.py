"""Write docs/commands.md: every `mlxft` command run for real on the demo and the shipped recipes;
then run the guides' commands (docs/own-data.md, docs/deploy.md) and write their real output; and
the README's quick-start blocks (the end of the demo's run, its answer to a held-out review).

    python scripts/command_examples.py          # ~15 minutes on 2 CPU cores (it trains the demo twice)
    python scripts/command_examples.py --guides RUN_DIR [GUIDE ...]   # guides only, on an earlier demo run

Runs in a scratch directory (recipes/ and examples/ linked in), so the run directory prints as
runs/demo and nothing in the checkout is touched. Timings and speeds in the output are this
machine's; the memory and time figures of `mlxft plan` are for the named Mac.

In a guide, every ```console block is live: its `$ ` lines (with backslash continuations and
`<<'EOF'` here-documents) run in order in one bash, in the same scratch directory after the demo,
and the output under each replaces what was there. Jobs a block starts with `&` are killed at its
end. The deploy guide's llama.cpp server needs `pip install -e ".[docs]"`.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = "Review: The soup was awful."  # in examples/data/valid.jsonl, not in train.jsonl
GUIDES = ["docs/own-data.md", "docs/deploy.md"]
MARK = "@@command-examples@@"

SECTIONS = [
    ("Overview", "", ["mlxft --help"]),
    ("Recipes", "The shipped recipes, and the reference of every key (docs/recipes.md is this output).",
     ["mlxft recipes", "mlxft recipes --reference | head -n 24"]),
    ("Validate", "Every problem at once, with its key path and where the value came from; data files must "
                 "exist (the real-model recipes name data/*.jsonl, which a clone does not have).",
     ["mlxft validate recipes/demo.toml recipes/qwen32b-qlora.toml",
      "mlxft validate recipes/demo.toml --set training.lerning_rate=1e-4 --set adapter.rank=0"]),
    ("Machines", "The profiles `--machine` accepts.", ["mlxft machines"]),
    ("Plan", "Will it fit, and how long will an epoch take (here for 1M training tokens)? When it does "
             "not fit, the planner lists single changes that do, each re-planned.",
     ["mlxft plan recipes/qwen32b-qlora.toml --machine m4-max-128 --tokens 1000000",
      "mlxft plan recipes/qwen32b-qlora.toml --machine m4-max-64 --set training.grad_checkpointing=false --tokens 1000000",
      "mlxft plan --model meta-llama/Llama-3.1-8B --method qlora --batch-size 1 --max-seq-len 2048 --pack "
      "--grad-checkpointing --machine m4-pro-24 --tokens 1000000",
      "mlxft plan recipes/qwen7b-dpo.toml --machine m4-pro-48 --tokens 1000000"]),
    ("Data inspect", "What the model will see; supervised tokens are [[bracketed]] off a terminal (green on one).",
     ["mlxft data inspect recipes/demo.toml --show 1", "mlxft data cache --list"]),
    ("Run", "Train. Off a terminal the progress bar becomes one line per `report_every` steps.",
     ["mlxft run recipes/demo.toml", "ls runs/demo"]),
    ("Generate", "Check the fine-tune on a review it never saw: one of examples/data/valid.jsonl, whose "
                 "reviews appear nowhere in train.jsonl (docs/generate.md).",
     [f"mlxft generate runs/demo --chat --prompt {shlex.quote(HELD_OUT)}"]),
    ("Evaluate", "How good is it: loss, perplexity and every held-out answer scored (the run above ended "
                 "with the same figures, from the recipe's `[eval]` table); `--base` for the base model "
                 "alone, beside them.",
     ["mlxft eval runs/demo", "mlxft eval runs/demo --base"]),
    ("Fuse", "Merge the adapter into the base: a Hugging Face directory, or GGUF for llama.cpp and Ollama.",
     ["mlxft fuse runs/demo --to safetensors", "mlxft fuse runs/demo --to gguf --gguf-type q8_0"]),
    ("Export the adapter", "The adapter alone, for transformers + peft or `llama-cli --lora`.",
     ["mlxft export-adapter runs/demo --to peft", "mlxft export-adapter runs/demo --to gguf-lora"]),
    ("Preference tuning", "DPO on the demo model after its SFT (docs/preference.md): the fused SFT model "
                          "is the base, and its new adapters switched off are the reference.",
     ["mlxft fuse runs/demo --to safetensors --dtype f32 --overwrite",
      "mlxft data inspect recipes/demo-dpo.toml --show 1", "mlxft run recipes/demo-dpo.toml"]),
]


def run(cmd: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    return clean(res.stdout + res.stderr, cwd) + (f"\n(exit code {res.returncode})" if res.returncode else "")


def clean(text: str, cwd: Path) -> str:
    return text.rstrip().replace(f"{ROOT}/", "").replace(f"{cwd}/", "")


def parse_block(lines: list[str]) -> list[str]:
    """The commands of a console block: `$ ` lines with their continuations and here-documents."""
    cmds, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        cmd = [lines[i][2:]]
        end = cmd[0].split("<<'", 1)[1].split("'", 1)[0] if "<<'" in cmd[0] else None
        while i + 1 < len(lines) and (cmd[-1].endswith("\\") or (end and cmd[-1] != end)):
            i += 1
            cmd.append(lines[i])
        cmds.append("\n".join(cmd))
        i += 1
    return cmds


def run_block(cmds: list[str], cwd: Path) -> list[str]:
    """Run a block's commands in one bash (so `&` and `kill %1` work); the output of each."""
    script = ["exec 2>&1"]  # stderr in place, between the markers, not all at the end
    for k, cmd in enumerate(cmds):
        script += [f"echo {MARK}{k}", cmd, 'rc=$?; [ $rc -ne 0 ] && echo "(exit code $rc)"']
    script.append("kill $(jobs -p) 2>/dev/null; true")  # nothing a block started outlives it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True)
    parts = (res.stdout + res.stderr).split(MARK)[1:]
    return [clean(part.split("\n", 1)[1] if "\n" in part else "", cwd) for part in parts]


def refresh_guide(path: Path, cwd: Path) -> None:
    """Run every console block of a guide and write each command's output under it."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        if lines[i] != "```console":
            i += 1
            continue
        j = lines.index("```", i + 1)
        cmds = parse_block(lines[i + 1:j])
        for cmd in cmds:
            print(f"$ {cmd.splitlines()[0]}", file=sys.stderr)
        for cmd, result in zip(cmds, run_block(cmds, cwd)):
            out += [f"$ {cmd}"] + ([result] if result else [])
        out.append("```")
        i = j + 1
    path.write_text("\n".join(out) + "\n")


def write_readme_blocks(results: dict[str, str]) -> None:
    """The README's quick start quotes the demo: the end of its run (the last validation, the
    `done:` line with its time, the held-out scores) and the generated answer, from this run."""
    lines = results["mlxft run recipes/demo.toml"].splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("done:"))
    shown = ("  on ", "  loss", "  exact match", "  valid JSON", "  (")  # of the held-out scores
    blocks = {"demo-run": lines[done:done + 2] + [line for line in lines[done + 2:] if line.startswith(shown)],
              "demo-generate": results[f"mlxft generate runs/demo --chat --prompt {shlex.quote(HELD_OUT)}"]
              .splitlines()}
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, body in blocks.items():
        start, end = f"<!-- {name}: scripts/command_examples.py -->\n```\n", "```\n<!-- /" + name + " -->"
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + "\n".join(body) + "\n" + text[b:]
    readme.write_text(text)


def main() -> None:
    if sys.argv[1:2] == ["--guides"]:  # only the guides, on a demo run made earlier (runs/demo)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("recipes", "examples"):
                (Path(tmp) / name).symlink_to(ROOT / name)
            shutil.copytree(sys.argv[2], Path(tmp) / "runs" / "demo")
            for guide in sys.argv[3:] or GUIDES:
                refresh_guide(ROOT / guide, Path(tmp))
        return
    out = ["# The `mlxft` commands, with real output", "",
           "<!-- Generated by `python scripts/command_examples.py`; timings are those of a 2-core Linux CPU box. -->", "",
           "Every command below was run as shown, from the repository root, on the offline demo",
           "(`recipes/demo.toml`: a tiny random llama learns to classify reviews as JSON) and on the shipped",
           "recipes for real models, which `mlxft plan` reads without downloading anything.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("recipes", "examples"):
            (Path(tmp) / name).symlink_to(ROOT / name)
        results = {}
        for title, text, cmds in SECTIONS:
            out += [f"## {title}", ""] + ([text, ""] if text else [])
            for cmd in cmds:
                print(f"$ {cmd}", file=sys.stderr)
                results[cmd] = run(cmd, Path(tmp))
                out += ["```", f"$ {cmd}", results[cmd], "```", ""]
        (ROOT / "docs" / "commands.md").write_text("\n".join(out))
        write_readme_blocks(results)
        for guide in GUIDES:
            refresh_guide(ROOT / guide, Path(tmp))


if __name__ == "__main__":
    main()
