"""How Hugging Face checkpoints name what MLX names differently, for the supported families.

Only mixture-of-experts tensors differ: mlx-lm stacks a block's experts into one tensor per
projection, Hugging Face keeps one tensor per expert. The tiny models (written as HF checkpoints)
and the safetensors export both go through `hf_weights`.
"""

from __future__ import annotations

# mlx-lm stacks MoE experts into one (n_experts, out, in) tensor per projection; HF keeps one
# tensor per expert. model_type -> (MLX module, HF experts module, {MLX projection: HF name}).
MOE_LAYOUTS = {
    "mixtral": ("block_sparse_moe.switch_mlp", "block_sparse_moe.experts",
                {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}),
    "qwen3_moe": ("mlp.switch_mlp", "mlp.experts", {"gate_proj": "gate_proj", "up_proj": "up_proj",
                                                    "down_proj": "down_proj"}),
    "qwen2_moe": ("mlp.switch_mlp", "mlp.experts", {"gate_proj": "gate_proj", "up_proj": "up_proj",
                                                    "down_proj": "down_proj"}),
}


def hf_weights(weights: dict, model_type: str) -> dict:
    """MLX parameter names -> Hugging Face names (only MoE experts differ for supported models)."""
    if model_type not in MOE_LAYOUTS:
        return weights
    mlx_mod, hf_mod, proj = MOE_LAYOUTS[model_type]
    out = {}
    for name, w in weights.items():
        head, sep, leaf = name.partition(f".{mlx_mod}.")
        if not sep:
            out[name] = w
            continue
        p, suffix = leaf.split(".", 1)  # e.g. gate_proj, weight
        for e in range(w.shape[0]):  # (n_experts, out, in) -> n_experts x (out, in)
            out[f"{head}.{hf_mod}.{e}.{proj[p]}.{suffix}"] = w[e]
    return out
