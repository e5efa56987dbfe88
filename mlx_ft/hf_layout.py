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


def gpt_oss_native(weights: dict) -> dict:
    """mlx-lm's gpt-oss experts -> the MXFP4 layout OpenAI's checkpoints use, which mlx-lm's
    `gpt_oss.Model.sanitize` reads back: gate and up interleaved row by row in one `gate_up_proj`,
    each weight as `_blocks` (uint8, 16 bytes = 32 4-bit values per group) and `_scales` (uint8
    exponents, one per group of 32). The quantization is MLX's own `mx.quantize(mode="mxfp4")`."""
    import mlx.core as mx

    def packed(w):  # (E, out, in) float -> blocks (E, out, in/32, 16), scales (E, out, in/32)
        q, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        return q.view(mx.uint8).reshape(*scales.shape, 16), scales

    def interleave(a, b, axis):  # rows a0 b0 a1 b1 ...: HF's gate_up_proj order
        return mx.stack([a, b], axis=axis + 1).flatten(axis, axis + 1)

    out = {}
    for name, w in weights.items():
        head, sep, leaf = name.partition(".mlp.experts.")
        if not sep or leaf.startswith("up_proj"):
            if not sep:
                out[name] = w
            continue
        proj, kind = leaf.split(".")  # gate_proj / down_proj, weight / bias
        if proj == "gate_proj":
            up = weights[f"{head}.mlp.experts.up_proj.{kind}"]
            if kind == "bias":
                out[f"{head}.mlp.experts.gate_up_proj_bias"] = interleave(w, up, 1)
                continue
            w = interleave(w, up, 1)  # (E, 2I, H)
        if kind == "bias":
            out[f"{head}.mlp.experts.{proj}_bias"] = w
            continue
        blocks, scales = packed(w)
        target = "gate_up_proj" if proj == "gate_proj" else proj
        out[f"{head}.mlp.experts.{target}_blocks"] = blocks
        out[f"{head}.mlp.experts.{target}_scales"] = scales
    return out
