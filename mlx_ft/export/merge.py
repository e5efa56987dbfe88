"""Load a base with its adapter, check that they fit, and merge the adapter into the weights.

Fusing always dequantizes: a QLoRA adapter was trained against the dequantized base weights, so
`W_deq + scale * B^T A^T` in float is exactly what the adapter model computes. Re-quantizing
afterwards (for MLX, or as a GGUF type) is a separate, explicitly lossy step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError
from ..models import ADAPTER_CONFIG, ADAPTER_WEIGHTS, find_adapter_dir, load_base
from ..recipe import ModelConfig, QuantizeConfig

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


@dataclass
class Adapted:
    """A base model with its adapter applied (not fused yet)."""

    model: object
    tokenizer: object  # mlx-lm TokenizerWrapper
    config: dict  # adapter_config.json
    adapter_dir: Path
    base_dir: Path  # local HF directory of the base: config.json and tokenizer files

    @property
    def base_config(self) -> dict:
        return json.loads((self.base_dir / "config.json").read_text())


def load_adapted(path: str | Path, base_model: str | None = None) -> Adapted:
    """Load the base recorded in the adapter's config (quantized as in training) plus the adapter.

    Raises:
        ExportError: the adapter does not fit the base; every mismatching tensor is listed.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import load_adapters

    adapter_dir = find_adapter_dir(path)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = base_model or config.get("base_model")
    if not base:
        raise ExportError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model recorded; "
                          "add \"base_model\": \"<dir or hub id>\" to it")
    q = config.get("quantize")
    model, tokenizer, base_dir = load_base(ModelConfig(path=base,
                                                       quantize=QuantizeConfig(**q) if q else None))
    problems: list[str] = []
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:  # mlx-lm lists every tensor that is not in the model or has another shape
        problems += sorted(line.strip() for line in str(e).splitlines()[1:])
    except (KeyError, IndexError, AttributeError) as e:  # lora_parameters.keys naming no module, etc.
        problems.append(f"adapter_config.json does not describe this base: {type(e).__name__}: {e}")
    if config.get("fine_tune_type", "lora") != "full" and not problems:
        saved = mx.load(str(adapter_dir / ADAPTER_WEIGHTS))
        expected = [n for n, _ in tree_flatten(model.parameters()) if n.rsplit(".", 1)[-1] in ADAPTER_LEAVES]
        problems += [f"{n}: in the model but missing from {ADAPTER_WEIGHTS}"
                     for n in expected if n not in saved]
    if problems:
        raise ExportError(f"the adapter at {adapter_dir} does not fit the base {base} "
                          f"({len(problems)} tensor{'s' if len(problems) != 1 else ''}):\n"
                          + "\n".join(f"  - {p}" for p in problems)
                          + "\nexport with the base the adapter was trained on "
                            "(base_model in adapter_config.json)")
    model.eval()
    return Adapted(model, tokenizer, config, adapter_dir, Path(base_dir))


def fuse_model(model) -> None:
    """Dequantize every layer in the model's float dtype, then merge every LoRA/DoRA layer into its
    base weight, in place.

    Dequantizing first, ourselves: `mx.dequantize` infers its output dtype from the scales, and the
    float modes (mxfp4, nvfp4, mxfp8) keep one uint8 scale per group, so mlx-lm's fuse would give
    bfloat16 weights (and round the adapter's update to bfloat16) in a float32 model."""
    from mlx.utils import tree_unflatten

    dtype = _float_dtype(model)
    plain = [(name, _dequantized(m, dtype)) for name, m in model.named_modules() if "scales" in m]
    if plain:
        model.update_modules(tree_unflatten(plain))
    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def _float_dtype(model):
    """The dtype most of the model's float weights have (norms, embeddings, unquantized layers)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    sizes: dict = {}
    for name, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating) and name.rsplit(".", 1)[-1] not in ADAPTER_LEAVES:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.size
    return max(sizes, key=sizes.get) if sizes else mx.float32


def _dequantized(layer, dtype):
    """The float layer a quantized Linear, Embedding or SwitchLinear stands for, exactly."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    weight = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                           bits=layer.bits, mode=layer.mode, global_scale=layer.get("global_scale"),
                           dtype=dtype)
    if isinstance(layer, nn.QuantizedEmbedding):
        out = nn.Embedding(*weight.shape)
    elif weight.ndim == 3:
        out = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in layer)
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
    out.weight = weight
    if "bias" in layer:
        out.bias = layer.bias
    return out


def cast_model(model, dtype: str) -> None:
    """Cast every floating-point parameter to `dtype` (bf16, f16, f32), in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    target = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}[dtype]
    model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
