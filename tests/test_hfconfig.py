"""RoPE settings read from either config spelling (transformers 4 top-level keys, transformers 5
`rope_parameters`): training (mlx-lm load), planning and export all see the same model."""

import json

import numpy as np
import pytest

from test_export_helpers import build_base, make_adapter, mlx_logits, nmse, prompt_ids

from mlx_ft.errors import ModelError
from mlx_ft.hfconfig import normalize, rope_settings, transformers5_spelling, with_architecture

THETA = 100000.0  # not mlx-lm's fallback (10000), so a missed rope_parameters shows in the logits


def test_both_spellings_normalize_to_the_same_settings():
    t4 = {"model_type": "gemma3_text", "rope_theta": 1e6, "rope_local_base_freq": 1e4,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "partial_rotary_factor": 0.5}
    t5 = transformers5_spelling(t4)
    assert "rope_theta" not in t5 and set(t5["rope_parameters"]) == {"full_attention", "sliding_attention"}
    assert rope_settings(t5) == rope_settings(normalize(t4)) == {
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "partial_rotary_factor": 0.5,
        "rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 8.0}}
    flat = {"rope_parameters": {"rope_theta": THETA, "rope_type": "default", "partial_rotary_factor": 0.75}}
    assert normalize(flat)["rope_theta"] == THETA and "rope_scaling" not in normalize(flat)
    assert normalize(flat)["partial_rotary_factor"] == 0.75


def test_disagreeing_spellings_are_refused_naming_both():
    cfg = {"rope_theta": 10000.0, "rope_parameters": {"rope_theta": THETA, "rope_type": "default"}}
    with pytest.raises(ModelError, match=r"cfg.json: rope_theta = 10000.0 but rope_parameters says 100000.0"):
        normalize(cfg, "cfg.json")


def test_missing_architectures_named_from_model_type():
    assert with_architecture({"model_type": "qwen2", "architectures": None})["architectures"] == ["Qwen2ForCausalLM"]
    assert with_architecture({"model_type": "llama", "architectures": ["X"]})["architectures"] == ["X"]


def test_rope_parameters_model_matches_transformers_and_llama_cpp(tmp_path):
    """The acceptance test of issue 19: a transformers-5 config with rope_theta 100000 only in
    rope_parameters trains (MLX) as transformers runs it, and its GGUF runs so in llama.cpp."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlx_ft.export import fuse
    from mlx_ft.models import load_base
    from mlx_ft.planner.configs import load_shape
    from mlx_ft.recipe import ModelConfig
    from test_export_gguf import run_llama_cpp

    base = build_base(tmp_path, "llama", "bpe", tag="-t5", transformers5=True, extra_config={"rope_theta": THETA})
    cfg = json.loads((base / "config.json").read_text())
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == THETA
    model, tok, _ = load_base(ModelConfig(path=str(base)))
    ids = prompt_ids(tok)
    ref = mlx_logits(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert load_shape(str(base)).config["rope_theta"] == THETA  # the planner traces the same model

    adapter_dir, adapted = make_adapter(tmp_path, base)
    out = fuse(adapter_dir, to="gguf", gguf_type="f32")
    llm, got = run_llama_cpp(out, ids)
    assert float(llm.metadata["llama.rope.freq_base"]) == THETA
    assert nmse(got, mlx_logits(adapted, ids)) < 1e-6
    fused = json.loads((fuse(adapter_dir, to="safetensors", dtype="f32") / "config.json").read_text())
    assert fused["rope_theta"] == fused["rope_parameters"]["rope_theta"] == THETA
