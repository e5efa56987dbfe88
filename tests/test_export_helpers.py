"""Shared helpers for the export tests (no tests here): tiny bases with random, non-identity adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import chat_corpus, corpus_texts

TEST_TEXT = "Item 12 is red! Sure?  yes,\n\tgreen…  ünïcode 🙂 <|im_start|>user\nhi<|im_end|>"
PROMPT_IDS_LEN = 12


def texts():
    return corpus_texts(chat_corpus(200)) + [TEST_TEXT]


def build_base(root: Path, family: str, tokenizer: str = "bpe", tag: str = "", **kw) -> Path:
    from mlx_ft.tiny import build_tiny_model

    out = root / f"{family}-{tokenizer}{tag}-base"
    if not out.exists():
        build_tiny_model(out, texts(), family=family, tokenizer=tokenizer, **kw)
        randomize_norms(out / "model.safetensors")
    return out


def randomize_norms(path: Path, seed: int = 0) -> None:
    """Norm weights are initialised to one constant; random ones make a swapped or unshifted norm
    (Gemma's 1 + w, q/k norms, pre/post feed-forward norms) visible in the logits."""
    import mlx.core as mx

    weights = mx.load(str(path))
    mx.random.seed(seed)
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = w + 0.3 * mx.random.normal(w.shape)
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})


def make_adapter(root: Path, base_dir: Path, method: str = "lora", quantize: bool = False,
                 targets="all-linear", layers="all", rank: int = 4, alpha: float = 8.0, seed: int = 1):
    """Train-free adapter: inject, set random lora_b (and perturb DoRA's m), save.

    Returns (adapter_dir, model): the in-memory adapter model gives the reference logits.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_ft.models import apply_adapters, load_base, save_adapter
    from mlx_ft.recipe import AdapterConfig, ModelConfig, QuantizeConfig

    mcfg = ModelConfig(path=str(base_dir), quantize=QuantizeConfig(bits=4, group_size=64) if quantize else None)
    model, _, _ = load_base(mcfg)
    cfg = apply_adapters(model, AdapterConfig(method=method, rank=rank, alpha=alpha, targets=targets, layers=layers))
    mx.random.seed(seed)
    new = {}
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            new[name] = 0.1 * mx.random.normal(p.shape)
        elif name.endswith(".m"):
            new[name] = p * (1 + 0.1 * mx.random.normal(p.shape))
    assert new, "no adapter parameters to randomise"
    model.load_weights(list(new.items()), strict=False)
    model.eval()
    tag = f"{base_dir.name}-{method}{'-q4' if quantize else ''}-{seed}"
    adapter_dir = save_adapter(model, root / tag / "adapters", cfg, str(base_dir), mcfg)
    return adapter_dir, model


def mlx_logits(model, ids) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def nmse(got: np.ndarray, ref: np.ndarray) -> float:
    """llama.cpp's check-nmse.py measure: mean squared error over the reference's variance."""
    return float(np.mean((got - ref) ** 2) / np.var(ref))


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.encode("What colour is item 7? Item 7 is blue.", add_special_tokens=False)[:PROMPT_IDS_LEN]
