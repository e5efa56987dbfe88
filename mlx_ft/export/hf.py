"""Hugging Face model directory: config.json, tokenizer files, sharded safetensors with an index.

Parameter names are MLX's, which equal the HF names for the supported text families, so
transformers and mlx-lm both load the directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..hf_layout import hf_weights
from ..errors import MlxFtWarning
from ..hfconfig import normalize, with_architecture
from ._io import atomic_dir, check_disk, mark

# Files copied unchanged from the base directory: the tokenizer and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
MAX_SHARD_GB = 5


def _warn_on_renamed_tensors(base_dir: Path, names: set[str]) -> None:
    """Warn when the written names are not the base checkpoint's (transformers would not find them)."""
    import warnings

    from safetensors import safe_open

    files = sorted(base_dir.glob("*.safetensors"))
    if not files or json.loads((base_dir / "config.json").read_text()).get("quantization"):
        return  # nothing to compare with, or an MLX-quantized base whose names are MLX's anyway
    base_names = set()
    for f in files:
        with safe_open(str(f), "np") as st:
            base_names.update(k for k in st.keys() if not k.endswith("rotary_emb.inv_freq"))
    missing = sorted(base_names - names)
    if missing:
        warnings.warn(f"{len(missing)} tensor name(s) of the base checkpoint are not in the export (e.g. "
                      f"{', '.join(missing[:3])}); mlx-lm loads the export, transformers may not",
                      MlxFtWarning, stacklevel=3)


def model_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def write_hf_dir(model, base_dir: Path, out: Path, dtype: str, quantize: dict | None = None) -> Path:
    """Write the (fused, cast) `model` as an HF directory at `out`, atomically.

    Args:
        quantize: {"bits", "group_size"} to re-quantize for MLX (lossy; transformers cannot load it).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import make_shards, quantize_model

    # Both RoPE spellings (mlx-lm reads only transformers 4's) and a class name llama.cpp's converter
    # can find, whatever the base's config had.
    config = with_architecture(normalize(json.loads((base_dir / "config.json").read_text()),
                                         str(base_dir / "config.json")))
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = config["dtype"] = TORCH_DTYPE[dtype]
    if quantize:
        _, config = quantize_model(model, config, quantize["group_size"], quantize["bits"])
        config["quantization_config"] = config["quantization"]
    check_disk(out, model_bytes(model))

    weights = dict(tree_flatten(model.parameters()))
    if not quantize:  # MLX-quantized output is for mlx-lm only, which wants its own names
        weights = hf_weights(weights, config.get("model_type", ""))
    shards = make_shards(weights, max_file_size_gb=MAX_SHARD_GB)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if not quantize:
        _warn_on_renamed_tensors(base_dir, set(weights))
    with atomic_dir(out) as tmp:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
        for name, shard in zip(names, shards):
            # "pt" is what transformers expects; MLX-quantized tensors only load in MLX anyway.
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx" if quantize else "pt"})
            index["weight_map"].update({k: name for k in shard})
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in TOKENIZER_FILES:
            if (base_dir / f).is_file():
                shutil.copyfile(base_dir / f, tmp / f)  # follows hub-cache symlinks
        mark(tmp, "safetensors")  # so that --overwrite may replace it, and only it
    return out
