"""Hugging Face config.json spellings made one: what training, planning and every export read.

transformers 4 writes RoPE settings at the top level (`rope_theta`, `rope_scaling`,
`partial_rotary_factor`, Gemma 3's `rope_local_base_freq`); transformers 5 writes them in one
`rope_parameters` table (`{"rope_theta", "rope_type", factors...}`, or one such table per layer
type: `{"full_attention": {...}, "sliding_attention": {...}}` for Gemma 3). mlx-lm 0.32 reads only
the transformers 4 keys and silently falls back to 10000 for a missing `rope_theta`, so a
transformers-5 checkpoint would train, plan and export with the wrong positions.

`normalize(config)` returns the config with both spellings filled in and agreeing; mlx-lm,
transformers 4 and 5 and llama.cpp's converter all read their own spelling from it. The module
sits at the bottom layer: it imports nothing of mlx_ft but the errors.
"""

from __future__ import annotations

from .errors import ModelError

DEFAULT_THETA = 10000.0
# Keys of a rope_parameters table that are not rope_scaling's (transformers 5 folds them in).
_NOT_SCALING = ("rope_theta", "partial_rotary_factor")
_LAYER_TYPES = ("full_attention", "sliding_attention")

# model_type -> the transformers class llama.cpp's converter looks for in `architectures`.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM",
}


def rope_settings(config: dict, source: str = "config.json") -> dict:
    """The RoPE settings in transformers 4 keys: rope_theta, rope_scaling, partial_rotary_factor,
    rope_local_base_freq; only the ones the config sets (in either spelling).

    Raises:
        ModelError: the two spellings disagree (which one the model was trained with is unknown).
    """
    params = config.get("rope_parameters") or {}
    if any(k in params for k in _LAYER_TYPES):  # one table per attention type (Gemma 3)
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full, local = params, {}
    new = {}
    if "rope_theta" in full:
        new["rope_theta"] = full["rope_theta"]
    if "rope_theta" in local:
        new["rope_local_base_freq"] = local["rope_theta"]
    if "partial_rotary_factor" in full:
        new["partial_rotary_factor"] = full["partial_rotary_factor"]
    kind = full.get("rope_type") or full.get("type")
    if kind and kind != "default":
        scaling = {k: v for k, v in full.items() if k not in _NOT_SCALING}
        new["rope_scaling"] = {**scaling, "rope_type": kind, "type": kind}  # mlx-lm reads either key
    old = {k: config[k] for k in ("rope_theta", "rope_local_base_freq", "partial_rotary_factor",
                                  "rope_scaling")
           if config.get(k) is not None}
    for key, value in new.items():
        if key in old and not _same(old[key], value):
            raise ModelError(f"{source}: {key} = {old[key]!r} but rope_parameters says {value!r}; the two "
                             "spellings of the RoPE settings disagree. Keep one: delete the top-level key or "
                             "fix rope_parameters to the values the model was trained with")
    return {**old, **new}


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        kind = lambda d: d.get("rope_type") or d.get("type")  # noqa: E731
        rest = lambda d: {k: v for k, v in d.items() if k not in ("rope_type", "type")}  # noqa: E731
        return kind(a) == kind(b) and rest(a) == rest(b)
    return a == b


def normalize(config: dict, source: str = "config.json") -> dict:
    """A copy of `config` (and of its text_config) with the RoPE settings in both spellings."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = normalize(out["text_config"], f"{source} text_config")
    rope = rope_settings(out, source)
    out.update(rope)
    if rope and "rope_parameters" not in config:
        out["rope_parameters"] = rope_parameters(rope)
    return out


def rope_parameters(rope: dict) -> dict:
    """transformers 5's `rope_parameters` table for settings in transformers 4 keys."""
    scaling = {k: v for k, v in (rope.get("rope_scaling") or {}).items() if k != "type"}
    kind = scaling.pop("rope_type", None) or (rope.get("rope_scaling") or {}).get("type") or "default"
    full = {"rope_theta": rope.get("rope_theta", DEFAULT_THETA), "rope_type": kind, **scaling}
    if "partial_rotary_factor" in rope:
        full["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "rope_local_base_freq" in rope:
        return {"full_attention": full,
                "sliding_attention": {"rope_theta": rope["rope_local_base_freq"], "rope_type": "default"}}
    return full


def transformers5_spelling(config: dict) -> dict:
    """`config` as transformers 5 saves it: RoPE settings only in `rope_parameters` (for tests and
    for checking both spellings give one model)."""
    rope = rope_settings(config)
    out = {k: v for k, v in config.items() if k not in rope}
    out["rope_parameters"] = rope_parameters(rope)
    return out


def with_architecture(config: dict) -> dict:
    """`config` naming its transformers class when it names none (`architectures` null or missing):
    llama.cpp's converter picks its writer by that name and stops without it."""
    if config.get("architectures"):
        return config
    name = ARCHITECTURES.get(config.get("model_type", ""))
    return {**config, "architectures": [name]} if name else config
