"""How well does the demo learn its skill, and how long does it take? `mlxft run recipes/demo.toml`
for several training seeds, each ending with the recipe's `[eval]` table (held-out exact match).

    HF_HUB_OFFLINE=1 python benchmarks/demo_accuracy.py [--seeds 0 1 2] [--set KEY=VALUE ...] [--keep DIR]

Each run is the real command in a fresh process (the wall time includes planning, building the
tiny model on first use, training and the evaluation); `training.seed` changes the adapter's
initial weights and the data order. Prints one row per seed and the range, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def run(seed: int, sets: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "mlx_ft", "run", "recipes/demo.toml", "--set", f"training.seed={seed}",
           "--set", f"output.dir={out}"] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    return {"seed": seed, "wall_sec": round(wall, 1), "train_sec": round(summary["wall_time_sec"], 1),
            "steps": summary["steps"], "best_val_loss": summary["best_val_loss"], "eval_loss": ev["loss"],
            "exact_match": ev["exact_match"], "normalized_match": ev["normalized_match"],
            "fields": ev["fields"], "turns": ev["turns"], "exact": ev["counts"]["exact"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", type=Path, help="Keep the run directories here (DIR/demo-seed<S>).")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"demo accuracy: {cpu()}, {time.strftime('%Y-%m-%d %H:%M')}, commit {commit}"
          + (f", --set {' '.join(args.sets)}" if args.sets else ""), flush=True)
    print(f"{'seed':>4} {'wall':>7} {'train':>7} {'steps':>5} {'best val':>9} {'eval loss':>9} "
          f"{'exact':>12} {'sentiment':>9} {'topic':>6}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            r = run(seed, args.sets, (args.keep or Path(tmp)).resolve() / f"demo-seed{seed}")
            rows.append(r)
            f = r["fields"]
            print(f"{seed:>4} {r['wall_sec']:>6.0f}s {r['train_sec']:>6.0f}s {r['steps']:>5} "
                  f"{r['best_val_loss']:>9.4f} "
                  f"{r['eval_loss']:>9.4f} {r['exact']:>4}/{r['turns']} {r['exact_match']:>5.1%} "
                  f"{f.get('sentiment', 0):>9.1%} {f.get('topic', 0):>6.1%}", flush=True)
    ex = [r["exact_match"] for r in rows]
    wall = [r["wall_sec"] for r in rows]
    print(f"held-out exact match {min(ex):.1%} to {max(ex):.1%} over {len(rows)} seeds; "
          f"wall time {min(wall):.0f} to {max(wall):.0f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
