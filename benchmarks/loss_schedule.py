"""The fused loss alone: measured peak vs the planner's model of MLX's evaluator (planner/schedule.py).

A trainable [B, L-1, D] hidden state goes through mlx_ft.losses' fused chunks and a frozen head
(nothing else in the graph), compiled and differentiated as mlx_ft.train does; each configuration
runs in its own process, twice, and the second step's mx.get_peak_memory() above the inputs is
compared with `schedule.loss_peak_bytes`. Knobs that change MLX's evaluator test the model's two
mechanisms: MLX_BFS_MAX_WIDTH (1 or 100 instead of 20: how many chunks interleave in the tape) and
a 1-byte memory limit, which makes eval_impl wait for the worker after every task (no run-ahead).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 HF_HUB_OFFLINE=1 \\
        python benchmarks/loss_schedule.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (knob, B, L, D, V, chunk, dtype); knob: default | bfs1 | bfs100 | sync
CASES = [(k, 1, 1024, 128, V, c, "bfloat16") for c in (16, 32, 64, 128, 256) for V in (8192, 24576)
         for k in ("default", "bfs1", "bfs100", "sync")]
CASES += [("default", 1, 1024, 128, V, c, "float32") for c in (16, 64, 256) for V in (8192, 24576)]
# long rows, small vocabulary, wide hidden: each chunk's [B, L, D] dL/dh slice update adds up
CASES += [("default", 1, L, 512, 1024, c, "bfloat16") for L in (2048, 4096, 8192) for c in (16, 64)]
QUICK = [i for i, c in enumerate(CASES) if c[0] == "default" and c[4] == 8192 and c[5] in (32, 128)]
KNOBS = {"default": ({}, 0), "bfs1": ({"MLX_BFS_MAX_WIDTH": "1"}, 0), "bfs100": ({"MLX_BFS_MAX_WIDTH": "100"}, 0),
         "sync": ({}, 1)}


def measure(B: int, L: int, D: int, V: int, chunk: int, dtype: str, memory_limit: int) -> int:
    """Peak bytes above the inputs of the second of two compiled loss-and-gradient steps."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_ft import losses

    dt = getattr(mx, dtype)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = mx.random.normal((B, L - 1, D)) * 0.1  # float32, trained
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.lm_head.weight.astype(dt)
            self.lm_head.freeze()

    model = Head()
    targets, weights = mx.random.randint(0, V, (B, L - 1)), mx.ones((B, L - 1))
    mx.eval(model.parameters(), targets, weights)

    def loss_fn(model, targets, weights):
        h = model.h.astype(dt)

        def chunk_loss(h_c, t_c, w_c):
            return (nn.losses.cross_entropy(losses._head(model, h_c).astype(mx.float32), t_c) * w_c).sum()

        total = mx.array(0.0)
        for s in range(0, L - 1, chunk):
            total = total + losses._fused_chunk(chunk_loss, h[:, s:s + chunk], targets[:, s:s + chunk],
                                                weights[:, s:s + chunk])
        return total

    grad_fn = nn.value_and_grad(model, loss_fn)
    step = mx.compile(lambda t, w: grad_fn(model, t, w), inputs=[model.state], outputs=[model.state])
    if memory_limit:
        mx.set_memory_limit(memory_limit)
    base = mx.get_active_memory()
    for _ in range(2):  # the second step runs the compiled graph as training does
        mx.reset_peak_memory()
        mx.eval(step(targets, weights))
    return mx.get_peak_memory() - base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two default-knob cases")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        knob, B, L, D, V, c, dtype = CASES[a.one]
        print("RESULT " + json.dumps(measure(B, L, D, V, c, dtype, KNOBS[knob][1])), flush=True)
        return 0
    from mlx_ft.planner.schedule import BFS_MAX_WIDTH, RUN_AHEAD, loss_peak_bytes

    widths = {"bfs1": 1, "bfs100": 100}
    worst = 0.0
    print(f"{'knob':8} {'B':>2} {'L':>5} {'D':>4} {'V':>6} {'chunk':>5} {'dtype':9} {'measured MB':>11} "
          f"{'model MB':>9} {'error':>7}")
    for i in QUICK if a.quick else range(len(CASES)):
        knob, B, L, D, V, c, dtype = CASES[i]
        env = {**os.environ, **KNOBS[knob][0]}
        out = subprocess.run([sys.executable, __file__, "--one", str(i)], capture_output=True, text=True, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{knob:8} {B:2} {L:5} {D:4} {V:6} {c:5} {dtype:9} FAILED\n{out.stderr[-1500:]}")
            continue
        measured = json.loads(line[7:])
        model = loss_peak_bytes(B, L - 1, c, V, D, 4 if dtype == "float32" else 2, widths.get(knob, BFS_MAX_WIDTH),
                                0 if knob == "sync" else RUN_AHEAD)
        err = model / measured - 1
        worst = max(worst, abs(err))
        print(f"{knob:8} {B:2} {L:5} {D:4} {V:6} {c:5} {dtype:9} {measured / 1e6:11.1f} {model / 1e6:9.1f} "
              f"{err * 100:+6.1f}%", flush=True)
    print(f"worst error: {worst * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
