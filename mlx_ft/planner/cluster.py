"""Several Macs: what data-parallel training over a link buys.

Each Mac holds a whole model copy, so the memory plan is per node and unchanged. With the global
batch split evenly, each node computes 1/N of a step, then the gradients are all-reduced over
the ring (mx.distributed, as `mlxft run` under mlx.launch does):

    step time    = compute / N + all-reduce
    all-reduce   = 2 (N - 1) / N x gradient bytes / link bandwidth + 2 (N - 1) x link latency
    speed-up     = compute / step time

Gradient bytes are the trainable parameters x 4 for LoRA/DoRA (mlx-lm keeps adapters in float32)
or x the weight dtype for full fine-tuning.
"""

from __future__ import annotations

# name -> (nominal Gb/s, usable share for MLX's TCP ring [est], one-way latency in seconds [est])
LINKS = {
    "tb5": (80.0, 0.5, 30e-6),     # Thunderbolt 5 networking (IP over Thunderbolt)
    "tb4": (40.0, 0.5, 30e-6),     # Thunderbolt 4 / 3
    "10gbe": (10.0, 0.9, 50e-6),   # 10 Gigabit Ethernet (Mac Studio, Mac mini option)
    "1gbe": (1.0, 0.9, 100e-6),
}


def cluster_estimate(nodes: int, link: str, step_seconds: float, gradient_bytes: int) -> dict:
    """Per-step time and speed-up of `nodes` Macs over `link` for a step of `step_seconds` on one."""
    gbps, share, latency = LINKS[link]
    bandwidth = gbps * 1e9 / 8 * share  # bytes/s
    allreduce = 2 * (nodes - 1) / nodes * gradient_bytes / bandwidth + 2 * (nodes - 1) * latency
    step = step_seconds / nodes + allreduce
    return {"nodes": nodes, "link": link, "link_bytes_per_sec": bandwidth, "gradient_bytes": gradient_bytes,
            "allreduce_seconds": allreduce, "step_seconds_one_node": step_seconds, "step_seconds": step,
            "speedup": step_seconds / step}


def cluster_text(c: dict) -> str:
    return (f"{c['nodes']} Macs over {c['link']}: {c['gradient_bytes'] / 2**20:,.0f} MiB of gradients per "
            f"step, all-reduce ~{c['allreduce_seconds'] * 1e3:,.0f} ms at "
            f"~{c['link_bytes_per_sec'] / 1e9:.1f} GB/s; "
            f"step {c['step_seconds_one_node']:.2f} s on one -> {c['step_seconds']:.2f} s: "
            f"speed-up ~{c['speedup']:.2f}x (memory per node as above)\n"
            "  = compute / (compute / N + 2 (N-1)/N x gradient bytes / bandwidth + 2 (N-1) x latency)")
