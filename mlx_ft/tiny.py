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
from pathlib import Path
from typing import Iterable

from .atomic import atomic_dir
from .cache import cache_root

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
    "{% for call in message['tool_calls'] %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Architecture hyper-parameters per family: HF config.json keys on top of the shared ones.
# A callable value is computed from the finished config (e.g. Gemma's query scale = head_dim).
FAMILIES: dict[str, dict] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "rope_theta": 1000000.0,
                "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rope_theta": 1000000.0},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "rope_theta": 10000.0,
               "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "sliding_window": 4096, "tie_word_embeddings": True,
               "query_pre_attn_scalar": lambda c: c["head_dim"]},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "rope_theta": 1000000.0,
               "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
               "sliding_window": 512, "sliding_window_pattern": 2, "tie_word_embeddings": True,
               "query_pre_attn_scalar": lambda c: c["head_dim"]},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "rope_theta": 1000000.0,
                "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                  "rope_theta": 1000000.0, "num_experts": 4, "num_experts_per_tok": 2,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 64,
                  "norm_topk_prob": True},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rope_theta": 10000.0,
             "partial_rotary_factor": 1.0, "original_max_position_embeddings": 4096, "sliding_window": None,
             "hidden_act": "silu"},
    # OLMo 2: no pre-norms, RMSNorm after attention and after the MLP, q/k norms over all heads.
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "rope_theta": 500000.0,
              "attention_bias": False},
    # Granite 3.x: llama with scaled embeddings, attention, residuals and logits (its own multipliers).
    # The real attention_multiplier is 1/head_dim; 1.0 keeps a tiny model's attention sharp enough that a
    # wrong q/k layout shows in its logits (NMSE 7e-4 instead of 4e-6 at 1/16).
    "granite": {"architectures": ["GraniteForCausalLM"], "model_type": "granite", "rope_theta": 10000.0,
                "attention_multiplier": 1.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "logits_scaling": 8.0, "attention_bias": False, "mlp_bias": False,
                "tie_word_embeddings": True},
    # Qwen1.5-MoE / Qwen2-MoE: routed experts plus a shared expert behind a sigmoid gate.
    "qwen2_moe": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                  "rope_theta": 1000000.0, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": False},
    # As openai/gpt-oss-20b ships: experts in MXFP4 (written by hf_layout.gpt_oss_native), the
    # rest float; attention sinks, sliding and full attention alternating, biases everywhere.
    "gpt_oss": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "rope_theta": 150000.0,
                "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8, "attention_bias": True,
                "swiglu_limit": 7.0,
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                    "lm_head"]},
                "layer_types": lambda c: (["sliding_attention", "full_attention"]
                                          * (c["num_hidden_layers"] // 2))},
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


def train_spm_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512):
    """A SentencePiece BPE tokenizer (like Llama 2's and Gemma's: byte fallback, a dummy prefix
    space, digits split) trained on `texts`, saved as tokenizer.model plus its HF fast form.

    Returns the HF tokenizer; ChatML's markers are user-defined pieces, never split.
    """
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL_TOKENS,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    # transformers converts tokenizer.model to its fast form only on from_pretrained. legacy=True:
    # a "▁" after special tokens too, as llama.cpp's SentencePiece tokenizer does.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
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
    tokenizer: str = "bpe",
    final_norm_scale: float = 1.0,
    transformers5: bool = False,
    bpe_tokenizer=None,
    qk_scale: float = 1.0,
) -> Path:
    """Write a randomly initialised model of `family` with a tokenizer trained on `texts`.

    Args:
        tokenizer: "bpe" (byte-level BPE, tokenizer.json only, as Llama 3 and Qwen) or "spm"
            (SentencePiece tokenizer.model + tokenizer.json, bos added, as Llama 2 and Gemma).
        final_norm_scale: weight of the final RMSNorm. With 1.0 a random frozen head caps how
            confident the model can get (about 0.8 nats per token at hidden 128, vocab 768),
            so a demo trained with adapters only would plateau; a trained model has no such cap.
        transformers5: write config.json as transformers 5 does (RoPE settings in `rope_parameters`).
        bpe_tokenizer: a `tokenizers.Tokenizer` to use instead of training one (e.g. a real model's).
        qk_scale: factor on every query and key projection. Random ones give attention logits of
            std 0.33 at width 128 (3.0 with qk_scale 3), so every token attends almost evenly to
            all the others and adapters take hundreds of steps to make it look anywhere; a trained
            model's logits span several units.
    Returns the directory, written under a temporary name and renamed when complete.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-model family {family!r}; known: {sorted(FAMILIES)}")
    if tokenizer not in ("bpe", "spm"):
        raise ValueError(f"unknown tiny tokenizer {tokenizer!r}; known: bpe, spm")
    out_dir = Path(out_dir)
    texts = list(texts)
    with atomic_dir(out_dir) as tmp:
        if tokenizer == "bpe":
            tok = bpe_tokenizer or train_bpe_tokenizer(texts, vocab_size)
            tok.save(str(tmp / "tokenizer.json"))
            n_vocab, tok_id = tok.get_vocab_size(), tok.token_to_id
            bos, add_bos, tok_class = None, False, "PreTrainedTokenizerFast"
        else:
            hf_tok = train_spm_tokenizer(texts, tmp, vocab_size)
            hf_tok.save_pretrained(str(tmp))
            n_vocab, tok_id = len(hf_tok), hf_tok.convert_tokens_to_ids
            bos, add_bos, tok_class = "<s>", True, "LlamaTokenizer"
        family_cfg = FAMILIES[family]
        config = {
            **{k: v for k, v in family_cfg.items() if not callable(v)},
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": hidden_size // num_heads,
            "intermediate_size": intermediate_size,
            "vocab_size": n_vocab,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": family_cfg.get("tie_word_embeddings", tie_word_embeddings),
            "torch_dtype": "float32",
            "bos_token_id": tok_id(bos) if bos else None,
            "eos_token_id": tok_id("<|im_end|>"),
            "pad_token_id": tok_id("<|endoftext|>"),
            **(extra_config or {}),
        }
        config.update({k: v(config) for k, v in family_cfg.items() if callable(v)})
        model_cls, args_cls = _get_classes(config)
        mx.random.seed(seed)
        model = model_cls(args_cls.from_dict(config))
        if final_norm_scale != 1.0:
            norm = model.model.norm
            norm.weight = mx.full(norm.weight.shape, final_norm_scale, dtype=norm.weight.dtype)
        if qk_scale != 1.0:
            for layer in model.layers:
                attn = layer.self_attn
                attn.q_proj.weight = attn.q_proj.weight * qk_scale
                attn.k_proj.weight = attn.k_proj.weight * qk_scale
        weights = dict(tree_flatten(model.parameters()))
        if config["tie_word_embeddings"]:
            weights.pop("lm_head.weight", None)  # some MLX classes build lm_head regardless

        from .hf_layout import gpt_oss_native, hf_weights
        from .hfconfig import transformers5_spelling

        saved = transformers5_spelling(config) if transformers5 else config
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        weights = hf_weights(weights, config["model_type"])  # HF names (per-expert MoE tensors)
        if config["model_type"] == "gpt_oss":
            weights = gpt_oss_native(weights)  # MXFP4 experts, as OpenAI publishes them
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text()) if tokenizer == "spm" else {}
        tok_config.update({
            "tokenizer_class": tok_class,
            "bos_token": bos,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "add_bos_token": add_bos,
            "add_eos_token": False,
            **({"legacy": True} if tokenizer == "spm" else {}),  # transformers forgets it on save
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": CHATML_TEMPLATE,
        })
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
    return out_dir


BUILTIN_MODELS = {
    # name -> build_tiny_model keyword arguments
    "tiny-llama": dict(family="llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, vocab_size=768, seed=0, final_norm_scale=8.0, qk_scale=3.0),
}


def builtin_model(name: str, texts: list[str], cache_dir: str | Path | None = None) -> Path:
    """Build (once, then reuse from the cache) the builtin model `name` for these texts."""
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    kwargs = BUILTIN_MODELS[name]
    digest = hashlib.sha256(json.dumps([kwargs, texts], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else cache_root()
    out = root / "builtin" / f"{name}-{digest}"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            build_tiny_model(out, texts, **kwargs)
        except OSError:
            # Several processes of one distributed run build it at once; one rename wins.
            if not (out / "model.safetensors").is_file():
                raise
    return out
