"""PEFT export loaded by the real `peft` on CPU torch gives MLX's base+adapter logits."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from test_export_helpers import build_base, make_adapter, mlx_logits, prompt_ids

from mlx_ft.export import export_adapter


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("peft")


def peft_logits(base, adapter, ids):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family,method,quantize", [("llama", "lora", False), ("qwen2", "dora", False),
                                                    ("llama", "lora", True)], ids=["llama-lora", "qwen2-dora", "llama-qlora"])
def test_peft_export_matches_mlx(root, family, method, quantize):
    from mlx_lm.utils import load

    base = build_base(root, family)
    adapter_dir, adapted = make_adapter(root, base, method=method, quantize=quantize)
    _, tok = load(str(base))
    ids = prompt_ids(tok)
    out = export_adapter(adapter_dir, to="peft")
    got = peft_logits(base, out, ids)
    if quantize:
        # PEFT applies the QLoRA adapter to the float base (transformers cannot load MLX 4-bit
        # weights): compare with the same float base + adapter in MLX.
        adapted, _ = load(str(base), adapter_path=str(adapter_dir))
    ref = mlx_logits(adapted, ids)
    print(f"{family} {method} PEFT max |d| {np.abs(got - ref).max():.2e}")
    assert np.abs(got - ref).max() < 1e-4


def test_peft_layout_only_adapted_layers(root):
    base = build_base(root, "llama")
    adapter_dir, adapted = make_adapter(root, base, targets=["q_proj", "v_proj"], layers=1, rank=8, alpha=16.0, seed=7)
    out = export_adapter(adapter_dir, to="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and not cfg["use_rslora"]
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}
    p = "base_model.model.model.layers.1.self_attn."
    assert shapes == {p + "q_proj.lora_A.weight": (8, 64), p + "q_proj.lora_B.weight": (64, 8),
                      p + "v_proj.lora_A.weight": (8, 64), p + "v_proj.lora_B.weight": (32, 8)}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out))
    adapted_names = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted_names == {"base_model.model.model.layers.1.self_attn.q_proj",
                             "base_model.model.model.layers.1.self_attn.v_proj"}
