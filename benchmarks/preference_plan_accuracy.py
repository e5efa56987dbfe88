"""The planner on preference steps: replayed peak vs mx.get_peak_memory() of real training steps.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 HF_HUB_OFFLINE=1 \\
        python benchmarks/preference_plan_accuracy.py [--seq-len 256]

For each model and objective it runs `mlxft plan RECIPE --probe --json` in its own process: the
probe trains 2 real steps on pairs whose two sequences fill the row (the planner's worst case)
and reports MLX's measured peak beside the replay's prediction at the same settings
(`calibration` in the plan's JSON). The table is docs/planner.md's preference rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {
    "llama-256-f32": dict(family="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                          intermediate_size=512),
    "llama-256-f32-v8k": dict(family="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                              intermediate_size=512, extra_config={"vocab_size": 8192}),
}
CASES = [  # (label, recipe keys)
    ("sft", {"training.objective": "sft"}),
    ("dpo, adapters off", {"training.objective": "dpo"}),
    ("dpo, precomputed", {"training.objective": "dpo", "training.precompute_reference": True}),
    ("orpo", {"training.objective": "orpo"}),
    ("kto", {"training.objective": "kto"}),
    ("dpo, full, frozen copy", {"training.objective": "dpo", "adapter.method": "full"}),
    ("dpo, packed", {"training.objective": "dpo", "data.pack": True}),
]


def recipe(model: Path, work: Path, keys: dict) -> Path:
    tables = {"model": {"path": str(model)}, "adapter": {"rank": 8, "alpha": 16.0},
              "data": {"train": str(work / "unused.jsonl")},
              "training": {"batch_size": 2, "learning_rate": 1e-5 if keys.get("adapter.method") else 1e-4},
              "output": {"dir": str(work / "run")}}
    for key, value in keys.items():
        table, leaf = key.split(".")
        tables[table][leaf] = value
    path = work / "r.toml"
    path.write_text("".join(f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())
                            for t, kv in tables.items()))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (the probe's rows)")
    args = ap.parse_args()
    from mlx_ft.tiny import build_tiny_model

    rows = ["| model | objective | predicted MiB | measured MiB | measured / predicted |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="mlxft-pref-plan-") as tmp:
        for name, kw in MODELS.items():
            model = build_tiny_model(Path(tmp) / name, ["the of and to in is was for on that"] * 20, **kw)
            for label, keys in CASES:
                work = Path(tmp) / f"{name}-{len(rows)}"
                work.mkdir()
                pairs = keys["training.objective"] != "sft"  # the probe writes its own data
                unused = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n' if pairs else '{"text": "a"}\n'
                (work / "unused.jsonl").write_text(unused)
                cmd = [sys.executable, "-m", "mlx_ft", "plan", str(recipe(model, work, keys)), "--probe",
                       "--probe-seq-len", str(args.seq_len), "--machine", "m4-max-128", "--json"]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if out.returncode:
                    raise SystemExit(f"{name} {label}: {out.stderr[-2000:]}")
                c = json.loads(out.stdout[out.stdout.index("{"):])["calibration"]
                ratio = c["measured_bytes"] / c["predicted_bytes"]
                rows.append(f"| {name} | {label} | {c['predicted_bytes'] / 2**20:.1f} | "
                            f"{c['measured_bytes'] / 2**20:.1f} | {ratio:.3f} |")
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
