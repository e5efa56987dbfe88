"""Peak memory of full / LoRA / DoRA / QLoRA / QDoRA across model sizes, from the planner alone.

    python examples/plan_matrix.py                 # the tables of docs/choosing.md
    python examples/plan_matrix.py --no-checkpointing --seq-len 1024

Each cell is what `mlxft plan --model M --method X --batch-size 1 --max-seq-len 2048 --pack
--grad-checkpointing` prints as "total peak", and the smallest Mac (by RAM) whose default GPU budget
holds it. No weights are loaded: the dimensions come from the planner's bundled config table.
"""

import argparse

from mlx_ft.planner import Settings, get_machine, plan_model

MODELS = ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-3B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-14B",
          "Qwen/Qwen2.5-32B", "meta-llama/Llama-3.1-70B"]
METHODS = [("full", "full", None), ("LoRA", "lora", None), ("DoRA", "dora", None), ("QLoRA", "lora", 4),
           ("QDoRA", "dora", 4)]
# One profile per RAM size, smallest first (the budget depends on RAM, not on the chip).
SIZES = [("m4-16", 16), ("m4-pro-24", 24), ("m4-32", 32), ("m4-max-32c-36", 36), ("m4-max-48", 48),
         ("m4-max-64", 64), ("m3-ultra-96", 96), ("m4-max-128", 128), ("m2-ultra-192", 192),
         ("m3-ultra-256", 256), ("m3-ultra-512", 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-checkpointing", action="store_true")
    args = ap.parse_args()
    budgets = [(gb, get_machine(name).budget_bytes) for name, gb in SIZES]
    print("| model | " + " | ".join(m[0] for m in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for model in MODELS:
        cells = []
        for _, method, bits in METHODS:
            st = Settings(method=method, quant_bits=bits, rank=args.rank, batch_size=args.batch_size,
                          seq_len=args.seq_len - 1, pack=True, grad_checkpointing=not args.no_checkpointing)
            peak = plan_model(model, st, machine="m4-max-128").peak_bytes
            mac = next((gb for gb, budget in budgets if peak <= budget), None)
            cells.append(f"{peak / 2**30:.1f} GiB: {mac} GB" if mac else f"{peak / 2**30:.0f} GiB: no Mac")
        print(f"| {model.split('/')[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
