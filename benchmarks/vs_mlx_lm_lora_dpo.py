"""mlx_ft's DPO vs mlx-lm-lora's, same model, data and settings, run alternately: docs/benchmarks.md.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 HF_HUB_OFFLINE=1 \\
        python benchmarks/vs_mlx_lm_lora_dpo.py [--repeats 3] [--only short,long,vocab] [--smoke] \\
        [--json out.json]

mlx-lm-lora is not a dependency of mlx_ft: the script makes its own virtual environment for it
(`--venv`, default `$MLX_FT_CACHE/bench/mlx-lm-lora-venv`, i.e. under ~/.cache/mlx_ft) and installs
`mlx-lm-lora==MLX_LM_LORA` there with this environment's MLX version (`mlx[cpu]` off macOS), once.

For each scenario it builds a random model (mlx_ft.tiny) and preference pairs offline, then trains
one epoch of DPO with `mlx_lm_lora.train` (in its venv) and with `mlxft run` in turn (A B A B ...),
each in its own process, and prints median time and peak, the held-out DPO metrics of both
adapters (computed by the same code, this file's `evaluate`) and the ratios mlx_ft / mlx-lm-lora.

* epoch time: wall clock from "policy model loaded" (mlx_lm.utils.load returned the first time) to
  "adapter written" (the tool returned): tokenizing, batching, compiling, every step, saving, and
  for mlx-lm-lora the loading of its reference model, a second copy of the base (mlx_ft's
  reference is the same model with its adapters switched off).
* peak memory: `mx.get_peak_memory()` at the end, counted from process start for both.
* held-out: DPO loss and reward accuracy (chosen above rejected) of base + adapter against the
  base, on held-out pairs, one pair at a time.

Matched settings: same base weights and data (TRL's standard format {"prompt", "chosen",
"rejected"}: both tools render them with the chat template as a user and an assistant turn), LoRA
rank 8, scale 2 (alpha 16) on every linear layer of every block, no dropout, batch of 4 pairs, Adam
at a constant 1e-4, no gradient clipping (mlx-lm-lora has none), beta 0.1, the sigmoid loss, no
validation during training, no fusing afterwards. One epoch: n_train / 4 iterations for
mlx-lm-lora (n_train a multiple of 4), `epochs = 1` for mlx_ft.

Off a Mac, mlx-lm-lora's DPO trainer stops at `mx.device_info()["max_recommended_working_set_size"]`
(KeyError: the CPU backend has no GPU working set); its child process gets a device_info that
reports the RAM there, which only feeds its `mx.set_wired_limit` call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve()
MLX_LM_LORA = "5.10.2"

sys.path.insert(0, str(HERE.parent))
from vs_mlx_lm import ab_parser, child_result, publish, timed_loader  # noqa: E402  (shared A/B plumbing)


@dataclass
class Scenario:
    name: str
    what: str
    model: dict  # build_tiny_model kwargs
    words: tuple[int, int]  # words per prompt (each answer has as many)
    n_train: int
    n_valid: int
    max_seq_len: int
    batch_size: int = 4
    rank: int = 8
    scale: float = 2.0
    learning_rate: float = 1e-4
    beta: float = 0.1
    seed: int = 0


def scenarios(smoke: bool) -> list[Scenario]:
    small = dict(family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, vocab_size=512)
    if smoke:
        return [Scenario("short", "smoke", small, (4, 10), 16, 8, 128)]
    base = dict(family="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                intermediate_size=768, vocab_size=1024)
    return [
        Scenario("short", "pairs of ~50-token sequences", base, (8, 20), 256, 32, 256),
        Scenario("long", "pairs of ~220-token sequences", base, (90, 110), 64, 16, 1024),
        Scenario("vocab", "vocabulary 131072, ~220-token sequences: logits dominate memory",
                 {**base, "extra_config": {"vocab_size": 131072}}, (90, 110), 16, 8, 1024),
    ]


# -- data ----------------------------------------------------------------------------------------

def make_pairs(sc: Scenario, n: int, seed: int) -> list[dict]:
    """The chosen answer reverses the prompt's words, the rejected one shuffles them."""
    rng = random.Random(seed)
    words = [a + b for a in ("ka", "lo", "mi", "ne", "pu", "ra", "si", "tu", "vo", "ze")
             for b in ("n", "r", "s", "t", "m", "l", "k", "p")]
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(*sc.words))]
        shuffled = ws[:]
        rng.shuffle(shuffled)
        out.append({"prompt": "Reverse: " + " ".join(ws), "chosen": " ".join(reversed(ws)),
                    "rejected": " ".join(shuffled)})
    return out


def build(sc: Scenario, root: Path) -> dict:
    from mlx_ft.tiny import build_tiny_model

    train, valid = make_pairs(sc, sc.n_train, 1), make_pairs(sc, sc.n_valid, 2)
    data = root / "data"  # train.jsonl alone: mlx-lm-lora then runs no validation
    data.mkdir(parents=True, exist_ok=True)
    for path, recs in ((data / "train.jsonl", train), (root / "heldout.jsonl", valid)):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    model = build_tiny_model(root / "model", [t for r in train for t in r.values()], **sc.model)
    return {"model": str(model), "data": str(data)}


# -- the two tools, each in a child process --------------------------------------------------------

def venv_python(venv: Path) -> Path:
    """mlx-lm-lora's own environment: created and filled once, reused after."""
    import mlx.core as mx

    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        mlx = f"mlx=={mx.__version__}" if platform.system() == "Darwin" else f"mlx[cpu]=={mx.__version__}"
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"mlx-lm-lora=={MLX_LM_LORA}", mlx, "pyyaml"],
                       check=True)
        (venv / ".complete").write_text(MLX_LM_LORA)
    return py


def lora_config(sc: Scenario, b: dict, out: Path) -> Path:
    import yaml

    cfg = {"model": b["model"], "train": True, "train_mode": "dpo", "train_type": "lora", "data": b["data"],
           "optimizer": "adam", "learning_rate": sc.learning_rate, "batch_size": sc.batch_size,
           "iters": sc.n_train // sc.batch_size, "num_layers": sc.model["num_layers"],
           "lora_parameters": {"rank": sc.rank, "scale": sc.scale, "dropout": 0.0},
           "max_seq_length": sc.max_seq_len, "beta": sc.beta, "dpo_cpo_loss_type": "sigmoid",
           "steps_per_eval": 10**9, "steps_per_report": 10, "save_every": 10**9,
           "adapter_path": str(out / "lora_adapters"), "seed": sc.seed, "fuse": False}
    path = out / "mlx_lm_lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def mlx_ft_recipe(sc: Scenario, b: dict, out: Path) -> Path:
    tables = recipe_tables(sc, b, out)
    path = out / "mlx_ft.toml"
    path.write_text("".join(f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())
                            for t, kv in tables.items()))
    return path


def recipe_tables(sc: Scenario, b: dict, out: Path) -> dict:
    return {
        "model": {"path": b["model"]},
        "adapter": {"method": "lora", "rank": sc.rank, "alpha": sc.scale * sc.rank, "targets": "all-linear",
                    "dropout": 0.0},
        "data": {"train": str(Path(b["data"]) / "train.jsonl"), "max_seq_len": sc.max_seq_len},
        "training": {"objective": "dpo", "beta": sc.beta, "batch_size": sc.batch_size, "epochs": 1,
                     "learning_rate": sc.learning_rate, "optimizer": "adam", "lr_schedule": "constant",
                     "max_grad_norm": 0.0, "seed": sc.seed, "report_every": 10},
        "output": {"dir": str(out / "mlx_ft_run")},
    }


def child(tool: str, config: str) -> None:
    """Run one tool in this process; print one RESULT json line (time, peak, adapter directory)."""
    import mlx.core as mx
    import mlx_lm.utils

    marks = {}
    timed_load = timed_loader(marks)  # both tools load the policy through mlx_lm.utils.load

    if tool == "mlx_lm_lora":
        import mlx_lm_lora.train
        import mlx_lm_lora.utils

        info = mx.device_info
        if "max_recommended_working_set_size" not in info():
            # off Metal MLX reports no working set, and mlx-lm-lora's DPO trainer reads it to set the
            # wired limit (a KeyError on Linux); that limit means nothing on the CPU backend
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            mx.device_info = lambda: {**info(), "max_recommended_working_set_size": ram}

        mlx_lm_lora.utils.load = mlx_lm_lora.train.load = timed_load
        sys.argv = ["mlx_lm_lora.train", "--config", config]
        mlx_lm_lora.train.main()
        import yaml

        adapters = yaml.safe_load(Path(config).read_text())["adapter_path"]
    else:
        from mlx_ft.recipe import load_recipe
        from mlx_ft.runner import train

        mlx_lm.utils.load = timed_load
        mx.reset_peak_memory = lambda: None  # count from process start, as for mlx-lm-lora
        r = load_recipe(config)
        train(r, overwrite=True)
        adapters = str(Path(r.output.dir) / "adapters")
    end = time.perf_counter()
    print("RESULT " + json.dumps({"time": end - marks["loaded"], "peak": mx.get_peak_memory(),
                                  "adapters": adapters}), flush=True)


def run_child(python: Path, tool: str, config: Path) -> dict:
    return child_result([str(python), str(HERE), "--child", tool, str(config)], tool)


def evaluate(b: dict, adapters: str, sc: Scenario) -> dict:
    """Held-out DPO loss and reward accuracy of base + adapter against the base, by mlx_ft's code."""
    from functools import partial

    from mlx_lm import load

    from mlx_ft import data, objectives
    from mlx_ft.recipe import recipe_from_dict
    from mlx_ft.runner import _reference_logps
    from mlx_ft.step import as_arrays

    tables = recipe_tables(sc, b, Path(adapters).parent)
    tables["data"]["train"] = str(Path(b["data"]).parent / "heldout.jsonl")
    recipe = recipe_from_dict(tables)
    model, tokenizer = load(b["model"], adapter_path=adapters)
    model.eval()
    pairs = data.load_datasets(recipe, tokenizer).train
    obj = objectives.from_config(recipe.training)
    ref = partial(_reference_logps, model, True, 0, True)
    totals = None
    loss, n = 0.0, 0.0
    for i in range(len(pairs)):
        s, u, m = objectives.preference_loss(obj, model, *as_arrays(data.collate(pairs, [[i]], sc.max_seq_len,
                                                                                  False)),
                                             reference=ref, chunk_size=0, grad=False)
        loss, n = loss + s.item(), n + u.item()
        totals = m if totals is None else totals + m
    metrics = obj.summarize(totals.tolist())
    return {"loss": loss / n, "accuracy": metrics["rewards/accuracies"], "margin": metrics["rewards/margins"]}


# -- the table -------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    cols = ["scenario", "tool", "epoch s", "pairs/s", "peak MB", "held-out loss", "held-out accuracy"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        for name, label in (("mlx_lm_lora", "mlx-lm-lora"), ("mlx_ft", "mlx_ft")):
            m = r["runs"][name]
            out.append(f"| {r['scenario']} | {label} | {m['time']:.1f} | {r['n_train'] / m['time']:.1f} | "
                       f"{m['peak'] / 2**20:.0f} | {m['loss']:.4f} | {m['accuracy']:.3f} |")
        a, b = r["runs"]["mlx_lm_lora"], r["runs"]["mlx_ft"]
        out.append(f"| {r['scenario']} | **mlx_ft / mlx-lm-lora** | **{b['time_ratio']:.2f}x** | "
                   f"**{1 / b['time_ratio']:.2f}x** | **{b['peak'] / a['peak']:.2f}x** | | |")
    return "\n".join(out)


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--venv", help="mlx-lm-lora's virtual environment (created when missing)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from mlx_ft.cache import cache_root

    lora_py = venv_python(Path(args.venv) if args.venv else cache_root() / "bench" / "mlx-lm-lora-venv")
    chosen = scenarios(args.smoke)
    if args.only:
        chosen = [s for s in chosen if s.name in args.only.split(",")]
    repeats = 1 if args.smoke else args.repeats
    tmp = tempfile.TemporaryDirectory(prefix="mlxft-dpo-bench-") if not args.workdir else None
    root = Path(args.workdir or tmp.name)
    results = []
    for sc in chosen:
        d = root / sc.name
        b = build(sc, d)
        print(f"== {sc.name}: {sc.what}; {sc.n_train} pairs, held out {sc.n_valid}", flush=True)
        runs = {"mlx_lm_lora": [], "mlx_ft": []}
        for i in range(repeats):
            rnd = replace(sc, seed=sc.seed + i)
            out = d / f"seed{rnd.seed}"
            out.mkdir(parents=True, exist_ok=True)
            for tool, py, config in (("mlx_lm_lora", lora_py, lora_config(rnd, b, out)),
                                     ("mlx_ft", Path(sys.executable), mlx_ft_recipe(rnd, b, out))):
                m = run_child(py, tool, config)
                m.update(evaluate(b, m["adapters"], sc))
                runs[tool].append(m)
                print(f"   {i + 1}/{repeats} seed {rnd.seed} {tool:12s} {m['time']:7.2f} s  peak "
                      f"{m['peak'] / 2**20:7.0f} MB  held-out loss {m['loss']:.4f} "
                      f"accuracy {m['accuracy']:.3f}", flush=True)
        row = {"scenario": sc.name, "n_train": sc.n_train, "setup": {**asdict(sc), **b}, "runs": {}}
        for tool, ms in runs.items():
            base = runs["mlx_lm_lora"]
            row["runs"][tool] = {
                "time": statistics.median(m["time"] for m in ms),
                "peak": statistics.median(m["peak"] for m in ms),
                # per A B pair (the same minutes of a shared machine), then their median
                "time_ratio": statistics.median(m["time"] / a["time"] for m, a in zip(ms, base)),
                "loss": statistics.mean(m["loss"] for m in ms),
                "accuracy": statistics.mean(m["accuracy"] for m in ms), "all": ms}
        results.append(row)
    publish(table(results), results, args.json)


if __name__ == "__main__":
    main()
