"""Model stage: find the base (local dir, hub id, builtin demo), load it with mlx-lm, quantize it
for QLoRA, inject adapters, freeze the rest, and save/load adapters in mlx-lm's own format.

The adapter directory written here (`adapters.safetensors` + `adapter_config.json`) loads
unchanged with `mlx_lm.load(base, adapter_path=...)`; mlx_ft adds a few keys of its own to the
JSON (`base_model`, `quantize`, `alpha`, `targets`) that mlx-lm ignores.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .atomic import atomic_dir
from .errors import ModelError
from .hub import resolve_model_path
from .recipe import AdapterConfig, ModelConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def load_base(cfg: ModelConfig, texts: Callable[[], list[str]] | None = None):
    """Load the base model and tokenizer, quantized on load when `cfg.quantize` is set.

    Returns:
        (model, tokenizer, model_dir): the mlx-lm model, its TokenizerWrapper, the local dir.
    """
    from mlx_lm.utils import load

    from .hfconfig import normalize
    from .hub import read_config

    model_dir = resolve_model_path(cfg.path, cfg.revision, texts)
    # mlx-lm reads only transformers 4's RoPE keys: give it those of a transformers-5 config too.
    raw = read_config(model_dir)
    rope = {k: v for k, v in normalize(raw, str(model_dir / "config.json")).items() if raw.get(k) != v}
    try:
        # Quantizing on load: read lazily, so the 16-bit weights are never all in memory at once.
        model, tokenizer = load(str(model_dir), tokenizer_config={"trust_remote_code": cfg.trust_remote_code},
                                model_config=rope, trust_remote_code=cfg.trust_remote_code,
                                lazy=cfg.quantize is not None)
        if cfg.quantize is not None:
            quantize(model, cfg.quantize.bits, cfg.quantize.group_size, cfg.quantize.mode)
            materialize_by_layer(model)
    except ValueError as e:  # mlx-lm: "Model type X not supported.", weights that do not fit the config
        raise ModelError(f"model.path: mlx-lm cannot load {model_dir}: {e}") from None
    except FileNotFoundError as e:  # mlx-lm: "No safetensors found in DIR"
        raise ModelError(f"model.path: {model_dir} has no model*.safetensors weights ({e}); point "
                         "model.path at a Hugging Face model directory with its weights, or download them "
                         "again") from None
    except RuntimeError as e:  # MLX: "[load_safetensors] ... Perhaps an incomplete download or corrupt file?"
        if "safetensors" not in str(e):
            raise
        raise ModelError(f"model.path: a weight file in {model_dir} cannot be read ({e}); download the model "
                         "again") from None
    return model, tokenizer, model_dir


def materialize_by_layer(model) -> None:
    """Evaluate a lazily loaded model one layer (leaf module) at a time.

    Each layer's 16-bit weight is read from disk, quantized and freed before the next is read, so
    quantizing on load peaks near the quantized size plus one layer, where an eager load holds
    every 16-bit weight first (131 GiB for a 70B model). Measured on a 143 MB float32 tiny model
    quantized to 4 bits: 142 MiB eager, 86 MiB by block, 54 MiB by layer (22 MiB quantized plus
    the 32 MiB float32 embedding)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    for _, layer in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def quantize(model, bits: int, group_size: int, mode: str = "affine") -> None:
    """Quantize every quantizable layer in place, as `mlx_lm.convert -q --q-mode MODE` would
    (a model's own quant_predicate still applies: gpt-oss and qwen3_moe routers get 8-bit affine)."""
    from mlx_lm.utils import quantize_model

    if is_quantized(model):
        raise ModelError("model.quantize: the base is already quantized; remove model.quantize "
                         "(a pre-quantized base trains as QLoRA as it is)")
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints a bits-per-weight line
        quantize_model(model, {}, group_size, bits, mode=mode)


def is_quantized(model) -> bool:
    """Any quantized layer: gpt-oss's native checkpoints quantize only the experts (MXFP4)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return any(isinstance(m, kinds) for _, m in model.named_modules())


def _linear_types():
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def num_adapted_layers(model, cfg: AdapterConfig) -> int:
    n = len(model.layers)
    if cfg.layers == "all":
        return n
    if cfg.layers > n:
        raise ModelError(f"adapter.layers: {cfg.layers} blocks asked for, but the model has {n}; "
                         f"use 'all' or a number up to {n}")
    return cfg.layers


def target_keys(model, cfg: AdapterConfig) -> list[str]:
    """Block-relative module paths (e.g. `self_attn.q_proj`) that `cfg.targets` selects."""
    n = num_adapted_layers(model, cfg)
    linear = _linear_types()
    found: dict[str, bool] = {}
    for block in model.layers[len(model.layers) - n:]:
        for name, mod in block.named_modules():
            if name:
                found[name] = isinstance(mod, linear)
    if cfg.targets == "all-linear":
        keys = sorted(k for k, is_lin in found.items() if is_lin)
    else:
        keys = sorted(k for k in found if any(k == t or k.endswith("." + t) for t in cfg.targets))
    if not keys:
        linear_names = sorted(k for k, is_lin in found.items() if is_lin)
        raise ModelError(f"adapter.targets: {cfg.targets!r} matched no module in the last {n} blocks; "
                         f"linear modules there: {', '.join(linear_names) or '(none)'}")
    return keys


def lora_scale(cfg: AdapterConfig) -> float:
    return cfg.alpha / (cfg.rank ** 0.5 if cfg.rslora else cfg.rank)


def apply_adapters(model, cfg: AdapterConfig) -> dict:
    """Freeze the model and make the part the recipe trains trainable.

    Returns:
        the `adapter_config.json` content (mlx-lm's keys) for this model and recipe.
    Raises:
        ModelError: when targets match nothing or the method cannot train this base.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = num_adapted_layers(model, cfg)
    model.freeze()
    params = {"rank": cfg.rank, "scale": lora_scale(cfg), "dropout": cfg.dropout}
    if cfg.method == "full":
        if is_quantized(model):
            raise ModelError("adapter.method: 'full' cannot train a quantized base; "
                             "use 'lora' or 'dora', or a float base without model.quantize")
        for block in model.layers[len(model.layers) - n:]:
            block.unfreeze()
        keys = []
    else:
        keys = target_keys(model, cfg)
        try:
            linear_to_lora_layers(model, n, {**params, "keys": keys}, use_dora=cfg.method == "dora")
        except ValueError as e:  # e.g. DoRA on MoE expert layers
            raise ModelError(f"adapter.method: {e}; use method = 'lora' or exclude those modules "
                             "from adapter.targets") from None
    return {
        "fine_tune_type": cfg.method,
        "num_layers": n,
        "lora_parameters": {**params, "keys": keys},
        "alpha": cfg.alpha,
        "rslora": cfg.rslora,
        "targets": cfg.targets,
    }


_BYPASS = {"on": False}


@contextlib.contextmanager
def adapters_off():
    """Inside this block every LoRA/DoRA layer computes its base layer alone: the model is the
    reference model of preference tuning, without a second copy of its weights.

    mlx-lm's adapter layers keep the base as `self.linear`; their `__call__` is wrapped once per
    class (for the rest of the process) to call it when the switch is on. Used while tracing a
    compiled step, the switch decides which graph is built, so a step can hold both passes."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    for cls in (LoRALinear, LoRASwitchLinear, DoRALinear):
        if not getattr(cls, "_mlxft_bypass", False):
            original = cls.__call__

            def call(self, *args, _original=original, **kwargs):
                if _BYPASS["on"]:
                    return self.linear(*args, **kwargs)
                return _original(self, *args, **kwargs)

            cls.__call__ = call
            cls._mlxft_bypass = True
    before, _BYPASS["on"] = _BYPASS["on"], True
    try:
        yield
    finally:
        _BYPASS["on"] = before


def frozen_copy(model):
    """A second, frozen model of the same class holding the same weight arrays: the reference of a
    full fine-tune. It costs no memory until training replaces the trained weights, whose original
    arrays it then keeps (only the adapted blocks' weights; frozen ones stay shared)."""
    import copy

    from mlx.utils import tree_flatten

    # A new instance's own initial weights are lazy and replaced before anything evaluates them.
    ref = type(model)(model.args) if hasattr(model, "args") else copy.deepcopy(model)
    ref.load_weights(tree_flatten(model.parameters()), strict=False)
    ref.freeze()
    ref.eval()
    return ref


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their logical size."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model)


def save_adapter(model, out_dir: str | Path, adapter_config: dict, base_model: str,
                 model_cfg: ModelConfig) -> Path:
    """Write trainable weights + config to `out_dir`, atomically (temp dir, then rename)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out_dir = Path(out_dir)
    config = {**adapter_config, "base_model": base_model,
              "quantize": asdict(model_cfg.quantize) if model_cfg.quantize else None}
    with atomic_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def find_adapter_dir(path: str | Path) -> Path:
    """A run directory (holding adapters/) or an adapter directory -> the adapter directory."""
    path = Path(path).expanduser()
    for cand in (path, path / "adapters"):
        if (cand / ADAPTER_CONFIG).is_file() and (cand / ADAPTER_WEIGHTS).is_file():
            return cand
    raise ModelError(f"{path}: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} here or in {path / 'adapters'}; "
                     "give a run directory written by `mlxft run` or an adapter directory")


def load_with_adapter(path: str | Path, base_model: str | None = None):
    """Load the base an adapter was trained on (quantized the same way) with the adapter applied.

    Args:
        path: a run directory or an adapter directory.
        base_model: override the `base_model` recorded in adapter_config.json.
    Returns:
        (model, tokenizer, adapter_config dict)
    """
    from mlx_lm.tuner.utils import load_adapters

    adapter_dir = find_adapter_dir(path)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = base_model or config.get("base_model")
    if not base:
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model recorded; pass the base model "
                         "explicitly")
    q = config.get("quantize")
    from .recipe import QuantizeConfig

    model, tokenizer, _ = load_base(ModelConfig(path=base, quantize=QuantizeConfig(**q) if q else None))
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:
        raise ModelError(str(e)) from None
    model.eval()
    return model, tokenizer, config
