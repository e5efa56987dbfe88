"""Tiny models built offline: the demo model and the models the tests train.

A tiny model is a real Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template) with random weights and a byte-level BPE tokenizer
trained on the given texts with the `tokenizers` library. mlx-lm, transformers and llama.cpp
converters all load it like any downloaded model, which is what makes the tests honest.

`builtin:tiny-llama` in a recipe's `model.path` builds one into the cache, its tokenizer trained
on the recipe's training data, so `recipes/demo.toml` runs with no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

# ChatML, as Qwen uses it. Assistant turns end with <|im_end|> followed by a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and tools is defined and tools %}"
    "<|im_start|>system\n{% if message['role'] == 'system' %}{{ message['content'] }}\n{% endif %}"
    "Tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Architecture hyper-parameters per family: HF config.json keys on top of the shared ones.
FAMILIES: dict[str, dict] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0},
}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (like Llama 3's and Qwen's) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    extra_config: dict | None = None,
) -> Path:
    """Write a randomly initialised model of `family` with a tokenizer trained on `texts`.

    Returns the directory, written under a temporary name and renamed when complete.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-model family {family!r}; known: {sorted(FAMILIES)}")
    out_dir = Path(out_dir)
    tok = train_bpe_tokenizer(texts, vocab_size)
    config = {
        **FAMILIES[family],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": tok.get_vocab_size(),
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        **(extra_config or {}),
    }
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))

    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": CHATML_TEMPLATE,
        }, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


BUILTIN_MODELS = {
    # name -> build_tiny_model keyword arguments
    "tiny-llama": dict(family="llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, vocab_size=768, seed=0),
}


def builtin_model(name: str, texts: list[str], cache_dir: str | Path | None = None) -> Path:
    """Build (once, then reuse from the cache) the builtin model `name` for these texts."""
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    kwargs = BUILTIN_MODELS[name]
    digest = hashlib.sha256(json.dumps([kwargs, texts], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("MLX_FT_CACHE", Path.home() / ".cache" / "mlx_ft"))
    out = root / "builtin" / f"{name}-{digest}"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_model(out, texts, **kwargs)
    return out
