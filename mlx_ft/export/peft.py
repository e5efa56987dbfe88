"""PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for transformers + peft.

mlx-lm computes y = x W^T + scale * (x @ lora_a @ lora_b) with lora_a (in, r), lora_b (r, out);
PEFT computes y = x W^T + (alpha / r) * B(A(x)) with A.weight (r, in), B.weight (out, r). So
A = lora_a^T, B = lora_b^T and lora_alpha = scale * r (rsLoRA is already folded into scale,
hence use_rslora = false). DoRA's magnitude `m` is PEFT's `lora_magnitude_vector`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ._io import atomic_dir, check_disk, mark

PREFIX = "base_model.model."


def write_peft(adapted, out: Path) -> Path:
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    modules, layers, scales, refused = [], set(), set(), []
    is_dora = False
    for path, m in adapted.model.named_modules():
        if not hasattr(m, "lora_a"):
            continue
        if not isinstance(m, (LoRALinear, DoRALinear)):
            refused.append(f"{path} ({type(m).__name__})")
            continue
        key = PREFIX + path
        tensors[f"{key}.lora_A.weight"] = np.array(m.lora_a.astype(mx.float32)).T.copy()  # (r, in)
        tensors[f"{key}.lora_B.weight"] = np.array(m.lora_b.astype(mx.float32)).T.copy()  # (out, r)
        if isinstance(m, DoRALinear):
            is_dora = True
            tensors[f"{key}.lora_magnitude_vector"] = np.array(m.m.astype(mx.float32))  # (out,)
        modules.append(path)
        scales.add((float(m.scale), m.lora_a.shape[1]))
        layer = re.search(r"\.layers\.(\d+)\.", path)
        if layer:
            layers.add(int(layer.group(1)))
    if refused:
        raise ExportError("PEFT export supports LoRA/DoRA on linear layers only; cannot export: "
                          + ", ".join(refused))
    if not modules:
        raise ExportError(f"{adapted.adapter_dir}: no LoRA layers found in the adapter")
    if len(scales) != 1:
        raise ExportError(f"adapter layers have different scales or ranks {sorted(scales)}; not expressible "
                          "as one PEFT config")
    scale, rank = scales.pop()
    lp = adapted.config.get("lora_parameters", {})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(adapted.config.get("base_model", "")),
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": lp.get("dropout", 0.0),
        "use_rslora": False,
        "use_dora": is_dora,
        # Exactly the adapted modules (mlx-lm adapts only the last num_layers blocks): a regex
        # PEFT full-matches against module names, so no unused zero adapters are created.
        "target_modules": "^(" + "|".join(re.escape(p) for p in modules) + ")$",
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    check_disk(out, sum(t.nbytes for t in tensors.values()))
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(_readme(config, adapted, sorted(layers)))
        mark(tmp, "peft")
    return out


def _readme(config: dict, adapted, layers: list[int]) -> str:
    q = adapted.config.get("quantize")
    note = (f"\nThe adapter was trained on a {q['bits']}-bit quantized base (QLoRA); here it is applied to "
            "the float base.\n" if q else "")
    if adapted.base_config.get("quantization"):
        note += ("\nThe base recorded above is an MLX-quantized checkpoint, which transformers cannot load: "
                 "load the adapter on the original float model it was quantized from.\n")
    return (f"# PEFT adapter exported by mlx_ft\n\nBase model: `{config['base_model_name_or_path']}`; "
            f"r = {config['r']}, lora_alpha = {config['lora_alpha']:g}, DoRA: {config['use_dora']}; "
            f"blocks {layers}.\n{note}\n```python\nfrom transformers import AutoModelForCausalLM\n"
            "from peft import PeftModel\n\nbase = AutoModelForCausalLM.from_pretrained(BASE)\n"
            "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n```\n")
