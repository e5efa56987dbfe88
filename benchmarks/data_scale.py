"""Time to the first training step and peak memory at 10k, 100k and 1M chat samples: `mlxft run`
cold and warm (data cache empty / filled), packed and not, against `mlx_lm.lora`.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 HF_HUB_OFFLINE=1 \\
        python benchmarks/data_scale.py [--sizes 10k,100k,1m] [--mlx-lm-max 100k] [--work DIR] [--smoke]

The data: seeded synthetic chats, like public instruction sets in shape. Lengths are lognormal
(median ~250 tokens, sigma 0.9, cut at 24 and 4,096 tokens), 20% are multi-turn (2-4 exchanges),
30% open with a system message; the words come from a 60,000-word made-up lexicon drawn with
Zipf frequencies, with punctuation and numbers. The tokenizer is a real byte-level BPE with a
49,152-token vocabulary trained offline with `tokenizers` on 10k of those chats, under a
ChatML template; the model is a tiny Llama (2 blocks, hidden 64) built around it, so the
model's own time and memory are small and what is measured is the data stage.

Each run is its own process (`python -m mlx_ft run`, `python -m mlx_lm lora`), timed from its
start to its first training report (report every step), then stopped. Peak RSS is sampled every
50 ms for the process and for its process tree (mlx_ft's rendering workers); "cpu s" is the
tree's user + system time by then, which the machine's other load does not inflate. "model"
rows are the same runs on 200 samples: the model's (and Python's) own memory, to subtract.
Data files, tokenizer and model are kept in the work directory (default
/tmp/mlx_ft_data_scale) and reused; the data cache lives there too and is emptied before each
cold run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlx_ft.recipe import recipe_from_dict, resolved_toml  # noqa: E402
MAX_SEQ_LEN = 4096
GENERATOR = 1  # bump when the generated data change, so old files are not reused


# -- data ----------------------------------------------------------------------------------------

def lexicon(n: int = 60000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    onset = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
             "st", "tr", "ch", "sh", "th", "pl", "gr"]
    nucleus = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ee"]
    coda = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt"]
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))
        words.add("".join(onset[rng.integers(len(onset))] + nucleus[rng.integers(len(nucleus))]
                          + coda[rng.integers(len(coda))] for _ in range(k)))
    return sorted(words)


class Writer:
    """Text of about n tokens: Zipf-drawn words, sentences, commas, numbers, paragraphs."""

    def __init__(self):
        self.words = np.array(lexicon(), dtype=object)
        p = 1.0 / np.arange(1, len(self.words) + 1) ** 1.05
        self.cum = np.cumsum(p / p.sum())

    def text(self, rng, n_tokens: int) -> str:
        n = max(1, int(n_tokens / 1.35))
        words = self.words[np.minimum(np.searchsorted(self.cum, rng.random(n)), len(self.words) - 1)]
        r = rng.random(n)
        out, cap = [], True
        for w, x in zip(words, r):
            out.append(w.capitalize() if cap else w)
            cap = False
            if x < 0.07:
                out[-1] += "."
                cap = True
            elif x < 0.12:
                out[-1] += ","
            elif x < 0.13:
                out.append(str(int(x * 1e6) % 10000))
            elif x < 0.14:
                out[-1] += ".\n\n"
                cap = True
        return " ".join(out).replace("\n ", "\n")


def chats(n: int, seed: int):
    """Seeded chat records: lognormal total length (median 250, sigma 0.9, 24..4096 tokens)."""
    rng = np.random.default_rng(seed)
    w = Writer()
    lengths = np.clip(rng.lognormal(math.log(250), 0.9, n), 24, MAX_SEQ_LEN).astype(int)
    for total in lengths:
        turns = int(rng.integers(2, 5)) if rng.random() < 0.2 else 1
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": w.text(rng, int(rng.integers(8, 30)))})
        per = max(8, (int(total) - 12 * turns) // turns)
        for _ in range(turns):
            u = max(4, int(per * rng.uniform(0.15, 0.45)))
            msgs.append({"role": "user", "content": w.text(rng, u)})
            msgs.append({"role": "assistant", "content": w.text(rng, max(4, per - u))})
        yield {"messages": msgs}


def dataset(work: Path, n: int) -> Path:
    """train.jsonl of n chats (made once, kept), in a directory with a valid.jsonl for mlx_lm."""
    d = work / f"data-{n}-g{GENERATOR}"
    if not (d / "train.jsonl").exists():
        d.mkdir(parents=True, exist_ok=True)
        t = time.time()
        for name, count, seed in (("valid", 200, 99), ("train", n, 1)):
            tmp = d / f".{name}.jsonl.tmp"
            with open(tmp, "w") as f:
                for r in chats(count, seed):
                    f.write(json.dumps(r) + "\n")
            tmp.rename(d / f"{name}.jsonl")
        print(f"   generated {n:,} chats in {time.time() - t:.0f} s ({(d / 'train.jsonl').stat().st_size / 1e9:.2f} GB)",
              flush=True)
    return d


def model(work: Path, vocab: int) -> Path:
    """A tiny Llama whose tokenizer is a BPE of `vocab` tokens trained on 10k chats, with ChatML."""
    out = work / f"model-{vocab}"
    if not (out / "model.safetensors").exists():
        from mlx_ft.tiny import build_tiny_model, train_bpe_tokenizer

        texts = [m["content"] for r in chats(10_000, 7) for m in r["messages"]]
        tok = train_bpe_tokenizer(texts, vocab)
        build_tiny_model(out, [], bpe_tokenizer=tok, vocab_size=vocab, hidden_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, intermediate_size=128)
    return out


# -- runs ----------------------------------------------------------------------------------------

def mlx_ft_recipe(work: Path, data: Path, model_dir: Path, pack: bool, name: str) -> Path:
    tables = {
        "model": {"path": str(model_dir)},
        "adapter": {"rank": 8, "alpha": 16.0, "layers": 2},
        "data": {"train": str(data / "train.jsonl"), "max_seq_len": MAX_SEQ_LEN, "pack": pack,
                 "cache_dir": str(work / "data-cache")},
        "training": {"batch_size": 1 if pack else 4, "steps": 1000, "report_every": 1, "learning_rate": 1e-4},
        "output": {"dir": str(work / "runs" / name)},
    }
    path = work / f"{name}.toml"
    path.write_text(resolved_toml(recipe_from_dict(tables)))
    return path


def mlx_lm_config(work: Path, data: Path, model_dir: Path, name: str) -> Path:
    cfg = {"model": str(model_dir), "train": True, "data": str(data), "fine_tune_type": "lora",
           "mask_prompt": True, "num_layers": 2, "batch_size": 4, "iters": 1000, "val_batches": 0,
           "steps_per_eval": 10**9, "steps_per_report": 1, "save_every": 10**9, "learning_rate": 1e-4,
           "max_seq_length": MAX_SEQ_LEN, "adapter_path": str(work / "runs" / name),
           "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def measure(cmd: list[str], first_step, timeout: float) -> dict:
    """Start `cmd`; time and peak RSS until `first_step(stdout so far)` holds; then stop it."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"data_scale_{os.getpid()}.log"
    t0 = time.perf_counter()
    with open(out_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    peak = peak_tree = cpu = 0.0
    done = None
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        try:
            rss = ps.memory_info().rss
            kids = ps.children(recursive=True)
            tree = rss + sum(k.memory_info().rss for k in kids if k.is_running())
            c = ps.cpu_times()
            cpu = max(cpu, c.user + c.system + c.children_user + c.children_system
                      + sum(sum(k.cpu_times()[:2]) for k in kids if k.is_running()))
        except psutil.Error:
            break
        peak, peak_tree = max(peak, rss), max(peak_tree, tree)
        if first_step(out_path.read_text(errors="replace")):
            done = time.perf_counter() - t0
            break
        time.sleep(0.05)
    text = out_path.read_text(errors="replace")
    for k in ps.children(recursive=True) if proc.poll() is None else []:
        k.kill()
    proc.kill()
    proc.wait()
    out_path.unlink()
    if done is None:
        sys.stderr.write(text[-3000:])
        raise SystemExit(f"no training step from {' '.join(cmd)} within {timeout:.0f} s (exit {proc.returncode})")
    data_s = next((float(w.split("=")[1].rstrip(",")) for line in text.splitlines() if line.startswith("data: ")
                   for w in line.split() if w.startswith("seconds=")), None)
    return {"seconds": done, "peak_mb": peak / 1e6, "tree_mb": peak_tree / 1e6, "cpu_s": cpu, "data_s": data_s}


def mlx_ft_run(recipe: Path, timeout: float) -> dict:
    run_dir = recipe.parent / "runs" / recipe.stem
    shutil.rmtree(run_dir, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    return measure([sys.executable, "-m", "mlx_ft", "run", str(recipe)],
                   lambda _: metrics.exists() and metrics.stat().st_size > 0, timeout)


def mlx_lm_run(config: Path, timeout: float) -> dict:
    """mlx_lm.lora's first report: the row of iteration 1 in its table (`   1    7.782 ...`)."""
    first = re.compile(r"^\s*1\s+\d+\.\d+\s", re.M)
    return measure([sys.executable, "-m", "mlx_lm", "lora", "--config", str(config)],
                   lambda out: first.search(re.sub(r"\x1b\[[0-9;]*m", "", out)) is not None, timeout)


def render_cost(data: Path, model_dir: Path, n: int) -> dict:
    """CPU ms per record to render the first n chats, in this process, one core: mlx_ft's
    pipeline (cache off, no workers) and mlx_lm.lora's ChatDataset.process with mask_prompt (the
    work mlx_lm.lora does inside its epoch, for every run)."""
    from mlx_lm.tokenizer_utils import load
    from mlx_lm.tuner.datasets import ChatDataset

    from mlx_ft.data import load_datasets

    part = data.parent / f"first-{n}.jsonl"
    with open(data / "train.jsonl") as f, open(part, "w") as out:
        records = [json.loads(next(f)) for _ in range(n)]
        out.writelines(json.dumps(r) + "\n" for r in records)
    tok = load(model_dir)
    os.environ["MLX_FT_DATA_WORKERS"] = "0"
    recipe = recipe_from_dict({"model": {"path": str(model_dir)}, "data": {
        "train": str(part), "max_seq_len": MAX_SEQ_LEN, "cache": False}})
    t = time.process_time()
    load_datasets(recipe, tok)
    ours = time.process_time() - t
    ds = ChatDataset(records, tok, mask_prompt=True)
    t = time.process_time()
    for i in range(len(ds)):
        ds.process(ds[i])
    theirs = time.process_time() - t
    del os.environ["MLX_FT_DATA_WORKERS"]
    return {"records": n, "mlx_ft_ms": 1000 * ours / n, "mlx_lm_ms": 1000 * theirs / n}


# -- main ----------------------------------------------------------------------------------------

def size(text: str) -> int:
    text = text.lower()
    return int(float(text[:-1]) * {"k": 1e3, "m": 1e6}[text[-1]]) if text[-1] in "km" else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10k,100k,1m", help="chat counts, e.g. 10k,100k,1m")
    ap.add_argument("--mlx-lm-max", default="100k", help="largest size to run mlx_lm.lora on (it keeps every "
                    "sample as Python lists: at 1M it would need ~30 GB here)")
    ap.add_argument("--cold-both-above", default="100k", help="above this size, only the unpacked run is cold "
                    "(the packed one's cold pass is the same rendering)")
    ap.add_argument("--work", default="/tmp/mlx_ft_data_scale", help="data, model, cache and runs")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--smoke", action="store_true", help="200 and 400 chats, a 2k vocabulary: checks the script")
    ap.add_argument("--json", help="also write the measurements here")
    args = ap.parse_args()
    sizes = [200, 400] if args.smoke else [size(s) for s in args.sizes.split(",")]
    vocab = 2048 if args.smoke else args.vocab
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    model_dir = model(work, vocab)
    cache = work / "data-cache"
    results = {"model": {}}
    base = dataset(work, 200)
    for pack in (False, True):  # the model's own memory: the same run on 200 samples
        results["model"][pack] = mlx_ft_run(mlx_ft_recipe(work, base, model_dir, pack, f"base-{int(pack)}"),
                                             args.timeout)
    for n in sizes:
        data = dataset(work, n)
        row = results.setdefault(n, {})
        for pack in (False, True):
            kind = "packed" if pack else "unpacked"
            name = f"ft-{n}-{kind}"
            recipe = mlx_ft_recipe(work, data, model_dir, pack, name)
            if not pack or n <= size(args.cold_both_above):
                shutil.rmtree(cache, ignore_errors=True)
                row[f"{kind} cold"] = m = mlx_ft_run(recipe, args.timeout)
                print(f"   {n:>9,} {name:24s} cold {m['seconds']:8.1f} s  data {m['data_s']} s  cpu {m['cpu_s']:7.1f} s"
                      f"  peak {m['peak_mb']:7.0f} MB (tree {m['tree_mb']:.0f})", flush=True)
            row[f"{kind} warm"] = m = mlx_ft_run(recipe, args.timeout)
            print(f"   {n:>9,} {name:24s} warm {m['seconds']:8.1f} s  data {m['data_s']} s  cpu {m['cpu_s']:7.1f} s"
                  f"  peak {m['peak_mb']:7.0f} MB", flush=True)
        if n <= size(args.mlx_lm_max):
            row["mlx_lm.lora"] = m = mlx_lm_run(mlx_lm_config(work, data, model_dir, f"lm-{n}"), args.timeout)
            print(f"   {n:>9,} {'mlx_lm.lora':24s}      {m['seconds']:8.1f} s  cpu {m['cpu_s']:7.1f} s  "
                  f"peak {m['peak_mb']:7.0f} MB", flush=True)
    results["render_cost"] = c = render_cost(dataset(work, sizes[-1]), model_dir, 200 if args.smoke else 5000)
    print(f"   rendering, CPU per record (one core, {c['records']:,} chats): mlx_ft {c['mlx_ft_ms']:.2f} ms, "
          f"mlx_lm.lora's ChatDataset.process {c['mlx_lm_ms']:.2f} ms", flush=True)
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(table(results, sizes))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1, default=str))


def table(results: dict, sizes: list[int]) -> str:
    """Markdown: per size, each run's time to first step, CPU, peak RSS and RSS above the model's."""
    head = ["samples", "run", "first step s", "data stage s", "cpu s", "peak RSS MB", "above model MB",
            "tree RSS MB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pack, m in results["model"].items():
        out.append(f"| 200 | model only, {'packed' if pack else 'unpacked'} | {m['seconds']:.1f} | {m['data_s']} | "
                   f"{m['cpu_s']:.0f} | {m['peak_mb']:.0f} | 0 | {m['tree_mb']:.0f} |")
    for n in sizes:
        for key, m in results[n].items():
            base = results["model"][key.startswith("packed")]["peak_mb"]
            label = key
            out.append(f"| {n:,} | {label} | {m['seconds']:.1f} | {m['data_s'] if m['data_s'] is not None else '-'} | "
                       f"{m['cpu_s']:.0f} | {m['peak_mb']:.0f} | {m['peak_mb'] - base:.0f} | {m['tree_mb']:.0f} |")
    keys = sorted({k for n in sizes for k in results[n]})
    if len(sizes) > 1:
        out += ["", "Ratios between consecutive sizes (time to first step, cpu, peak RSS above the model's):", ""]
        for k in keys:
            have = [n for n in sizes if k in results[n]]
            parts = []
            for a, b in zip(have, have[1:]):
                ra, rb = results[a][k], results[b][k]
                base = results["model"][k.startswith("packed")]["peak_mb"]
                above = (ra["peak_mb"] - base, rb["peak_mb"] - base)
                memory = f"x{above[1] / above[0]:.1f}" if min(above) > 50 else \
                    f"{above[0]:+.0f} -> {above[1]:+.0f} MB (noise is ~20 MB)"
                parts.append(f"{a:,}->{b:,} (x{b / a:g}): time x{rb['seconds'] / ra['seconds']:.1f}, "
                             f"cpu x{rb['cpu_s'] / ra['cpu_s']:.1f}, memory above the model {memory}")
            if parts:
                out.append(f"- {k}: " + "; ".join(parts))
    return "\n".join(out)


if __name__ == "__main__":
    main()
