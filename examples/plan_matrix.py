"""Peak memory of full / LoRA / DoRA / QLoRA / QDoRA across model sizes, from the planner alone.

    python examples/plan_matrix.py                 # the tables of docs/choosing.md
    python examples/plan_matrix.py --no-checkpointing --seq-len 1024
    python examples/plan_matrix.py --seeds         # the planner beside the published rules of thumb

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


# The seeds' rules of thumb: (name, model, method, published hours per epoch at 50k samples x 2048 tokens)
SEEDS = [("QLoRA 7B", "Qwen/Qwen2.5-7B", "qlora", 2), ("LoRA 13B", "meta-llama/Llama-2-13b-hf", "lora", 6),
         ("QLoRA 32B", "Qwen/Qwen2.5-32B", "qlora", 26), ("QLoRA 70B", "meta-llama/Llama-3.1-70B", "qlora", 52),
         ("QLoRA 120B (gpt-oss)", "openai/gpt-oss-120b", "qlora", 96)]
SEED_TOKENS = 50_000 * 2048
SEED_MACHINES = ["m5-max-128", "m5-ultra-192"]


def seeds() -> None:
    """The planner's memory and time per epoch for the seeds' configurations, beside the published
    rules of thumb, with the arithmetic: tokens x FLOPs/token, and the sustained rate each time implies."""
    from mlx_ft.planner.timing import GEMM_EFFICIENCY

    machines = [get_machine(m) for m in SEED_MACHINES]
    head = " | ".join(f"{m.name} ({m.memory_bytes // 2**30} GB{', projected' if m.projected else ''})"
                      for m in machines)
    print(f"| seed | rule of thumb | {head} | tokens x FLOPs/token | rate the rule implies | tokens the rule's "
          f"hours cover on {machines[0].name} |")
    print("|---|---|" + "---|" * len(machines) + "---|---|---|")
    for name, model, method, hours in SEEDS:
        st = Settings(method="lora", quant_bits=4 if method == "qlora" else None, rank=16, batch_size=1,
                      seq_len=2047, pack=True, grad_checkpointing=True)
        cells, first = [], None
        for m in machines:
            p = plan_model(model, st, machine=m, tokens=SEED_TOKENS)
            first = first or p
            low, high = p.seconds_per_epoch / 3600, p.seconds_per_epoch_high / 3600
            fit = f"fits, {p.margin_bytes / p.machine.budget_bytes:.0%} spare" if p.fits else "does not fit"
            cells.append(f"{p.peak_bytes / 2**30:.1f} GiB ({fit}); {low:,.0f} h ({high:,.0f} h at "
                         f"{m.matmul_tflops[1]:.0f} TFLOP/s)")
        flops = SEED_TOKENS * p.flops_per_token
        print(f"| {name} | {hours} h | " + " | ".join(cells) + f" | {SEED_TOKENS / 1e6:.1f}M x "
              f"{p.flops_per_token / 1e9:.0f} GFLOP = {flops / 1e18:.1f} EFLOP | "
              f"{flops / (hours * 3600) / 1e12:,.0f} TFLOP/s | "
              f"{SEED_TOKENS * hours * 3600 / first.seconds_per_epoch / 1e6:,.1f}M |")
    m = machines[0]
    print(f"\nRates: {m.name} matmuls {m.matmul_tflops[0]:.0f}-{m.matmul_tflops[1]:.0f} TFLOP/s, the rest of the step "
          f"at {GEMM_EFFICIENCY} x {m.fp32_tflops} TFLOP/s; {machines[1].name} twice that (projected).")
    p13 = plan_model("meta-llama/Llama-2-13b-hf", Settings(rank=16, batch_size=1, seq_len=2047, pack=True,
                                                            grad_checkpointing=True), machine="m5-pro-24")
    print(f"LoRA 13B on a 24 GB Mac (m5-pro-24, 16-bit base, batch 1 x 2048, checkpointing): "
          f"{p13.peak_bytes / 2**30:.1f} GiB of a {p13.machine.budget_bytes / 2**30:.1f} GiB budget: "
          f"{'fits' if p13.fits else 'does not fit'}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--seeds", action="store_true", help="the planner beside the seeds' rules of thumb")
    args = ap.parse_args()
    if args.seeds:
        return seeds()
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
