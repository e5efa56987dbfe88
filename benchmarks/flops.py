"""Achieved training FLOP/s of `mlx_ft` against MLX's own matmul FLOP/s on this machine.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 HF_HUB_OFFLINE=1 \\
        python benchmarks/flops.py [--hidden 4096] [--intermediate 14336] [--head-dim 128] [--kv-heads 8]
                                   [--layers 2] [--seq 512] [--batch 4] [--steps 5] [--smoke]

1. Matmul roofline: the best of a few float32 matmuls of the shapes the model runs ([tokens, D] x
   [D, F] for each projection, and a square one), timed after a warm-up.
2. Training: `mlx_ft.train` on a random model large enough to be compute bound. The default is two
   blocks of Llama 3 8B's shape (width 4096, MLP 14336, 32 query heads of 128, 8 KV heads), the
   size of block the users' models have; vocab ~650 (what the tokenizer learns) so the head is not
   the story. LoRA on every linear layer, rows filling max_seq_len exactly (no padding), timed per
   optimizer step from the loop's own reports; the first two steps (compilation) are left out.
   `--hidden 1024 --head-dim 64 --layers 4` is the smaller model of earlier runs, where the
   exponentials of softmax and SiLU (not counted as FLOPs, slow on MLX's CPU backend) take half
   the step (docs/benchmarks.md).

FLOPs counted per step are the ones a LoRA step must do, whatever the implementation:
* forward: 2 x tokens x (every block weight + head), plus attention 2 x 2 x tokens x L x D per
  block (QK^T and AV; MLX computes the full square, causal or not);
* backward: gradients with respect to the activations through every frozen matmul (the same
  2 x tokens x weights again), attention backward (2x its forward), and the LoRA A/B gradients.
Recomputation (gradient checkpointing, the chunked loss recomputing a chunk's logits) is work the
implementation chooses, so it is not counted: the figure is "model FLOP/s", as in MFU.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def matmul_flops(shapes: list[tuple[int, int, int]], repeats: int = 5) -> dict:
    """Best achieved FLOP/s of C = A @ B (float32) for each (M, K, N)."""
    import mlx.core as mx

    out = {}
    for m, k, n in shapes:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        mx.eval(a @ b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - t)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return out


def step_flops(cfg: dict, batch: int, seq: int, rank: int) -> dict:
    """FLOPs of one LoRA training step on `batch` rows of `seq` tokens (see the module docstring)."""
    D, F, V, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    T = batch * (seq - 1)  # tokens the model runs (inputs are tokens[:, :-1])
    linear = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]  # (in, out) per block
    w_block = sum(i * o for i, o in linear)
    lora_block = sum(rank * (i + o) for i, o in linear)
    attn_fwd = 2 * 2 * batch * (seq - 1) ** 2 * q  # QK^T and AV over every head
    fwd = n * (2 * T * w_block + 2 * T * lora_block + attn_fwd) + 2 * T * D * V
    bwd_inputs = n * (2 * T * w_block + 2 * T * lora_block + 2 * attn_fwd) + 2 * T * D * V
    bwd_lora = n * 2 * T * lora_block  # dA, dB
    return {"forward": fwd, "backward": bwd_inputs + bwd_lora, "total": fwd + bwd_inputs + bwd_lora, "tokens": T}


def train_flops(hidden: int, layers: int, seq: int, batch: int, steps: int, workdir: Path,
                head_dim: int = 128, intermediate: int | None = None, kv_heads: int | None = None) -> dict:
    from mlx_ft.recipe import recipe_from_dict
    from mlx_ft.tiny import build_tiny_model
    from mlx_ft import Callback, train

    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    # Texts of one length: each record renders to just under `seq` tokens, one sample per row.
    recs = [{"text": " ".join(rng.choice(words) for _ in range(4 * seq))} for _ in range(batch * (steps + 2))]
    model = build_tiny_model(workdir / "model", [r["text"] for r in recs[:64]], family="llama",
                             hidden_size=hidden, num_layers=layers, num_heads=hidden // head_dim,
                             num_kv_heads=kv_heads or hidden // head_dim,
                             intermediate_size=intermediate or int(hidden * 2.75) // 64 * 64,
                             vocab_size=1024)
    (workdir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = recipe_from_dict({
        "model": {"path": str(model)},
        "adapter": {"method": "lora", "rank": 8, "alpha": 16, "targets": "all-linear"},
        "data": {"train": str(workdir / "train.jsonl"), "train_on": "all", "max_seq_len": seq,
                 "truncation": "truncate", "shuffle": False},
        "training": {"batch_size": batch, "steps": steps, "learning_rate": 1e-4, "lr_schedule": "constant",
                     "report_every": 1},
        "output": {"dir": str(workdir / "run")},
    })
    times, cpu = [], []

    class Clock(Callback):
        def on_train_report(self, row):
            times.append(row["elapsed"])
            cpu.append(time.process_time())  # all threads of this process

    train(recipe, overwrite=True, callbacks=[Clock()], progress=False)
    cfg = json.loads((model / "config.json").read_text())
    per_step = (times[-1] - times[1]) / (len(times) - 2)  # steps 3..N: compilation is in the first two
    f = step_flops(cfg, batch, seq, 8)
    return {"config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
            "step_sec": per_step, "flops_per_step": f["total"], "flops_per_sec": f["total"] / per_step,
            "tokens_per_sec": f["tokens"] / per_step,
            "cores_busy": (cpu[-1] - cpu[1]) / (times[-1] - times[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336, help="MLP width (0: 2.75 x hidden)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-heads", type=int, default=8, help="0: as many as query heads")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, not speed")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.seq, args.batch, args.steps = 128, 2, 64, 2, 4
        args.intermediate, args.head_dim, args.kv_heads = 0, 32, 0
    with tempfile.TemporaryDirectory(prefix="mlxft-flops-") as tmp:
        tr = train_flops(args.hidden, args.layers, args.seq, args.batch, args.steps, Path(tmp),
                         head_dim=args.head_dim, intermediate=args.intermediate, kv_heads=args.kv_heads)
    T, D, F = args.batch * (args.seq - 1), tr["config"]["hidden_size"], tr["config"]["intermediate_size"]
    mm = matmul_flops([(T, D, D), (T, D, F), (T, F, D), (2048, 2048, 2048)])
    best = max(mm.values())
    print("matmul FLOP/s (float32, best of 5):")
    for k, v in mm.items():
        print(f"  {k:>18s}  {v / 1e9:8.1f} GFLOP/s")
    print(f"training: {tr['config']}, head_dim {args.head_dim}, batch {args.batch} x seq {args.seq}, LoRA r8 on all linear layers")
    print(f"  {tr['step_sec']:.3f} s/step, {tr['flops_per_step'] / 1e9:.1f} GFLOP/step, "
          f"{tr['tokens_per_sec']:.0f} tok/s, {tr['cores_busy']:.2f} cores busy on average")
    print(f"  achieved {tr['flops_per_sec'] / 1e9:.1f} GFLOP/s = {tr['flops_per_sec'] / best:.2f}x "
          f"the best matmul ({best / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
