"""mlx_ft vs mlx_lm.lora, same model, data and settings, run alternately: the table in docs/benchmarks.md.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 HF_HUB_OFFLINE=1 \\
        python benchmarks/vs_mlx_lm.py [--repeats 3] [--only skewed,uniform] [--smoke] [--json out.json]

For each scenario it builds a random model (mlx_ft.tiny) and a chat dataset offline, then runs one
epoch with `mlx_lm.lora` and with `mlxft run` in turn (A B A B ...), each in its own process, and
prints the median time and peak, the mean held-out loss over the rounds (round i trains with seed
+ i) and the ratios mlx_ft / mlx_lm. Both tools run in-process inside
a small child wrapper (`--child`) that measures them the same way:

* epoch time: wall clock from "model loaded" (mlx_lm.utils.load returned) to "adapter written"
  (the tool returned). It includes tokenizing the data, building batches, compiling, every step
  and saving; it excludes Python imports and reading the weights, which are the same for both.
* supervised tokens/s: the epoch's supervised tokens (the same count for both, see below) over
  that time.
* peak memory: `mx.get_peak_memory()` at the end of the run (mlx_ft's own `reset_peak_memory`
  call is disabled in the wrapper, so both count from process start).
* final loss: mean next-token loss on the held-out set, computed by the same code (this file,
  `_valid_loss`) for both adapters after training, on the assistant tokens of each sample.

Matched settings: same base weights, LoRA rank, scale (mlx_ft alpha = scale x rank), targets (every
linear layer of the adapted blocks, mlx_lm's default) and number of adapted blocks, batch size,
max length, Adam with the same constant learning rate, the same seed (`--seed`, 0), no dropout, no gradient clipping
(mlx_lm.lora has none; mlx_ft's `max_grad_norm = 0`). mlx_ft runs with its default
`loss_normalization = "epoch"`; the skewed scenario also runs `"step"`, mlx_lm.lora's way. The data are single-turn
chats, and mlx_lm runs with `mask_prompt` while mlx_ft uses `train_on = "last"`, so both supervise
the answer. One epoch is n_train / batch_size micro-steps for mlx_lm (n_train is a multiple of the
batch size, so it drops nothing) and `epochs = 1` for mlx_ft.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve()


@dataclass
class Scenario:
    name: str
    what: str
    model: dict  # build_tiny_model kwargs
    lengths: str  # "skewed" | "uniform": the answer-length distribution
    n_train: int
    n_valid: int
    batch_size: int
    max_seq_len: int
    rank: int = 8
    scale: float = 2.0
    layers: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    """Training seed of both tools (adapter init, batch order); the data stay the same."""
    variants: dict = field(default_factory=lambda: {"mlx_ft": {}})
    """mlx_ft runs compared with the one mlx_lm run: name -> recipe keys set on top ("data.pack": True)."""


def scenarios(smoke: bool) -> list[Scenario]:
    if smoke:
        small = dict(family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, vocab_size=512)
        return [
            Scenario("skewed", "smoke", small, "skewed", 32, 8, 4, 256, layers=2),
            Scenario("uniform", "smoke", small, "uniform", 32, 8, 4, 256, layers=2),
            Scenario("vocab", "smoke", {**small, "extra_config": {"vocab_size": 8192}}, "uniform", 16, 4, 2, 256,
                     layers=2),
        ]
    base = dict(family="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                intermediate_size=768, vocab_size=1024)
    return [
        Scenario("skewed", "chat, 85% short (~30-70 tokens), 15% long (~250-1000)", base, "skewed",
                 256, 64, 4, 1024,
                 variants={"mlx_ft": {}, "mlx_ft packed": {"data.pack": True, "training.batch_size": 1},
                           "mlx_ft step-norm": {"training.loss_normalization": "step"}}),
        Scenario("uniform", "chat, every sample 136-144 tokens (nothing to pack or bucket)", base, "uniform",
                 256, 64, 4, 256),
        Scenario("vocab", "vocabulary 131072, rows of ~1000 tokens: logits dominate memory",
                 {**base, "extra_config": {"vocab_size": 131072}}, "long", 6, 4, 2, 1024),
    ]


# -- data ----------------------------------------------------------------------------------------

def make_records(kind: str, n: int, seed: int) -> list[dict]:
    """Single-turn chats whose answer is the prompt's words reversed (learnable, length-controlled)."""
    rng = random.Random(seed)
    words = [a + b for a in ("ka", "lo", "mi", "ne", "pu", "ra", "si", "tu", "vo", "ze")
             for b in ("n", "r", "s", "t", "m", "l", "k", "p")]
    out = []
    for _ in range(n):
        if kind == "skewed":
            k = rng.randint(120, 480) if rng.random() < 0.15 else rng.randint(4, 20)
        elif kind == "uniform":
            k = rng.randint(58, 62)
        else:  # long
            k = rng.randint(480, 490)
        ws = [rng.choice(words) for _ in range(k)]
        out.append({"messages": [{"role": "user", "content": "Reverse: " + " ".join(ws)},
                                 {"role": "assistant", "content": " ".join(reversed(ws))}]})
    return out


def build(sc: Scenario, root: Path) -> dict:
    """Model dir, data dir (train/valid/test.jsonl) and token counts for one scenario."""
    from mlx_ft.tiny import build_tiny_model

    train, valid = make_records(sc.lengths, sc.n_train, 1), make_records(sc.lengths, sc.n_valid, 2)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("valid", valid), ("test", valid)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    texts = [m["content"] for r in train for m in r["messages"]]
    model = build_tiny_model(root / "model", texts, **sc.model)
    tokens, supervised, lengths = _count(model, data / "train.jsonl", sc.max_seq_len)
    return {"model": str(model), "data": str(data), "tokens": tokens, "supervised": supervised,
            "len_min": min(lengths), "len_max": max(lengths), "len_mean": sum(lengths) / len(lengths)}


def _samples(model_dir: str, jsonl: Path, max_seq_len: int):
    """The rendered samples of one file, as mlx_ft trains on them (nothing cached)."""
    from mlx_lm.utils import load_tokenizer

    from mlx_ft.data.dataset import render_records
    from mlx_ft.data.formats import read_file
    from mlx_ft.recipe import DataConfig

    cfg = DataConfig(train=str(jsonl), train_on="last", max_seq_len=max_seq_len)
    _, records = read_file(Path(jsonl), cfg)
    return render_records(records, load_tokenizer(Path(model_dir)), cfg)


def _count(model_dir, jsonl, max_seq_len):
    s = _samples(model_dir, jsonl, max_seq_len)
    lengths = [len(x.tokens) for x in s]
    return sum(lengths), sum(int(x.mask[1:].sum()) for x in s), lengths


# -- the two tools, each in a child process --------------------------------------------------------

def mlx_lm_config(sc: Scenario, b: dict, out: Path) -> Path:
    import yaml

    cfg = {
        "model": b["model"], "train": True, "data": b["data"], "fine_tune_type": "lora",
        "optimizer": "adam", "mask_prompt": True, "num_layers": sc.layers, "batch_size": sc.batch_size,
        "iters": sc.n_train // sc.batch_size, "val_batches": 0, "steps_per_eval": 10**9,
        "steps_per_report": 10, "save_every": 10**9, "learning_rate": sc.learning_rate,
        "max_seq_length": sc.max_seq_len, "adapter_path": str(out / "adapters"), "seed": sc.seed,
        "lora_parameters": {"rank": sc.rank, "scale": sc.scale, "dropout": 0.0},
    }
    path = out / "mlx_lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def mlx_ft_recipe(sc: Scenario, b: dict, out: Path, name: str, extra: dict) -> Path:
    training = {"batch_size": sc.batch_size, "epochs": 1, "learning_rate": sc.learning_rate,
                "optimizer": "adam", "lr_schedule": "constant", "max_grad_norm": 0.0, "seed": sc.seed,
                "report_every": 10}
    data = {"train": str(Path(b["data"]) / "train.jsonl"), "train_on": "last", "max_seq_len": sc.max_seq_len}
    for key, v in extra.items():
        table, leaf = key.split(".", 1)
        {"training": training, "data": data}[table][leaf] = v
    slug = name.replace(" ", "_")
    tables = {
        "model": {"path": b["model"]},
        "adapter": {"method": "lora", "rank": sc.rank, "alpha": sc.scale * sc.rank, "targets": "all-linear",
                    "layers": sc.layers, "dropout": 0.0},
        "data": data, "training": training, "output": {"dir": str(out / f"run_{slug}")},
    }
    lines = []
    for t, kv in tables.items():
        lines.append(f"[{t}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in kv.items()]
    path = out / f"{slug}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed_loader(marks: dict):
    """mlx_lm.utils.load that records in `marks["loaded"]` when it first returned: the tools compared
    load their base through it, and their time is measured from there."""
    import mlx_lm.utils

    load = mlx_lm.utils.load

    def timed_load(*a, **k):
        out = load(*a, **k)
        marks.setdefault("loaded", time.perf_counter())
        return out

    return timed_load


def child(tool: str, config: str, model_dir: str, valid: str, max_seq_len: int) -> None:
    """Run one tool in this process; print one RESULT json line."""
    import mlx.core as mx
    import mlx_lm.utils

    marks = {}
    load = mlx_lm.utils.load
    timed_load = timed_loader(marks)

    if tool == "mlx_lm":
        import mlx_lm.lora

        mlx_lm.lora.load = timed_load
        sys.argv = ["mlx_lm.lora", "--config", config]
        mlx_lm.lora.main()
        adapters = str(Path(config).parent / "adapters")
    else:
        import mlx_ft.models
        from mlx_ft.recipe import load_recipe
        from mlx_ft.runner import train

        mlx_lm.utils.load = timed_load
        mx.reset_peak_memory = lambda: None  # count from process start, as for mlx_lm
        r = load_recipe(config)
        train(r, overwrite=True)
        adapters = str(Path(r.output.dir) / "adapters")
    end = time.perf_counter()
    peak = mx.get_peak_memory()
    mlx_lm.utils.load = load
    val = _valid_loss(model_dir, adapters, Path(valid), max_seq_len)
    print("RESULT " + json.dumps({"time": end - marks["loaded"], "peak": peak, "valid_loss": val}), flush=True)


def _valid_loss(model_dir: str, adapters: str, valid: Path, max_seq_len: int) -> float:
    """Mean loss over the assistant tokens of the held-out set, one sample at a time."""
    import mlx.core as mx
    from mlx_lm.utils import load

    from mlx_ft.losses import loss_sum

    model, _ = load(model_dir, adapter_path=adapters)
    model.eval()
    total, count = 0.0, 0.0
    for s in _samples(model_dir, valid, max_seq_len):
        tokens = mx.array(s.tokens.astype("int32"))[None]
        mask = mx.array(s.mask)[None]
        ls, n = loss_sum(model, tokens, mask, chunk_size=0)
        total, count = total + ls.item(), count + n.item()
    return total / count


def run_child(tool: str, config: Path, b: dict, sc: Scenario) -> dict:
    cmd = [sys.executable, str(HERE), "--child", tool, str(config), b["model"],
           str(Path(b["data"]) / "valid.jsonl"), str(sc.max_seq_len)]
    return child_result(cmd, f"{tool} on scenario {sc.name}")


def child_result(cmd: list[str], what: str) -> dict:
    """Run a child process; returns the JSON of its last `RESULT ` line."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"{what} failed (exit {p.returncode})")
    return json.loads(lines[-1][7:])


# -- the table -------------------------------------------------------------------------------------

COLUMNS = ["scenario", "tool", "epoch s", "sup tok/s", "peak MB", "valid loss"]


def table(rows: list[dict]) -> str:
    """Markdown table: per scenario the mlx_lm.lora row, then each mlx_ft run and its ratio to it.

    Times are medians over the repeats; the time ratio is the median of the per-pair ratios. Each
    repeat trains with its own seed: losses are means, the loss ratio is the mean of the per-seed
    ratios (their range in brackets).
    """
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

    def line(scenario, tool, m):
        return (f"| {scenario} | {tool} | {m['time']:.1f} | {m['tok_s']:.0f} | {m['peak'] / 2**20:.0f} | "
                f"{m['valid_loss']:.4f} |")

    def spread(m):
        lo, hi = m["loss_ratio_range"]
        return f" ({lo:.3f}-{hi:.3f})" if hi > lo else ""

    for r in rows:
        a = r["runs"]["mlx_lm"]
        out.append(line(r["scenario"], "mlx_lm.lora", a))
        for name, b in r["runs"].items():
            if name == "mlx_lm":
                continue
            out.append(line(r["scenario"], name, b))
            out.append(f"| {r['scenario']} | **{name} / mlx_lm** | **{b['time_ratio']:.2f}x** | "
                       f"**{1 / b['time_ratio']:.2f}x** | **{b['peak'] / a['peak']:.2f}x** | "
                       f"**{b['loss_ratio']:.3f}x**{spread(b)} |")
    return "\n".join(out)


def ab_parser(doc: str) -> argparse.ArgumentParser:
    """The options of an A/B benchmark against a peer (this one, vs_mlx_lm_lora_dpo.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="A B rounds per scenario, round i with seed + i")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--smoke", action="store_true", help="tiny models and data: checks the script, not speed")
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--workdir", help="keep models, data and runs here (default: a temp dir)")
    return ap


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--seed", type=int, default=0, help="training seed of the first round (data unchanged)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tool, config, model_dir, valid, msl = args.child
        return child(tool, config, model_dir, valid, int(msl))

    chosen = [replace(sc, seed=args.seed) for sc in scenarios(args.smoke)]
    if args.only:
        keep = args.only.split(",")
        chosen = [s for s in chosen if s.name in keep]
    repeats = 1 if args.smoke and args.repeats == 3 else args.repeats
    tmp = tempfile.TemporaryDirectory(prefix="mlxft-bench-") if not args.workdir else None
    root = Path(args.workdir or tmp.name)
    results = []
    for sc in chosen:
        d = root / sc.name
        b = build(sc, d)
        print(f"== {sc.name}: {sc.what}; {sc.n_train} samples, {b['tokens']} tokens "
              f"({b['len_min']}-{b['len_max']}, mean {b['len_mean']:.0f}), {b['supervised']} supervised", flush=True)
        runs = {name: [] for name in ["mlx_lm", *sc.variants]}
        for i in range(repeats):
            # Round i trains with seed + i (both tools alike): the loss ratio is then measured over
            # several seeds, since one seed's held-out loss moves by ~0.5 % with the batch order.
            rnd = replace(sc, seed=sc.seed + i)
            out = d / f"seed{rnd.seed}"
            out.mkdir(parents=True, exist_ok=True)
            configs = {"mlx_lm": mlx_lm_config(rnd, b, out)}
            configs |= {name: mlx_ft_recipe(rnd, b, out, name, extra) for name, extra in sc.variants.items()}
            for name, config in configs.items():  # alternate: A B A B (A B C A B C with variants)
                m = run_child("mlx_lm" if name == "mlx_lm" else "mlx_ft", config, b, sc)
                runs[name].append(m)
                print(f"   {i + 1}/{repeats} seed {rnd.seed} {name:16s} {m['time']:7.2f} s  peak "
                      f"{m['peak'] / 2**20:7.0f} MB  valid loss {m['valid_loss']:.4f}", flush=True)
        row = {"scenario": sc.name, "setup": {**asdict(sc), **b}, "runs": {}}
        for name, ms in runs.items():
            t = statistics.median(m["time"] for m in ms)
            base = runs["mlx_lm"]
            # Time ratio of each A B pair (same minutes of a shared machine), then their median;
            # loss ratio of each pair (same seed), then their mean and range.
            loss_ratios = [m["valid_loss"] / a["valid_loss"] for m, a in zip(ms, base)]
            row["runs"][name] = {"time": t, "tok_s": b["supervised"] / t,
                                 "time_ratio": statistics.median(m["time"] / a["time"] for m, a in zip(ms, base)),
                                 "peak": statistics.median(m["peak"] for m in ms),
                                 "valid_loss": statistics.mean(m["valid_loss"] for m in ms),
                                 "loss_ratio": statistics.mean(loss_ratios),
                                 "loss_ratio_range": [min(loss_ratios), max(loss_ratios)], "all": ms}
        results.append(row)
    publish(table(results), results, args.json)


def publish(text: str, results: list[dict], json_path: str | None) -> None:
    """Print the table; write the raw measurements to `json_path` if given."""
    print()
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
