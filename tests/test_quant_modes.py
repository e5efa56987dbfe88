"""MLX's quantization modes for QLoRA (affine, mxfp4, nvfp4, mxfp8) and gpt-oss's native MXFP4 experts:
validated per mode, pre-quantized bases load and train, the planner counts their bytes exactly, and
fuse dequantizes them exactly."""

import contextlib
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import chat_corpus, corpus_texts
from mlx_ft.errors import RecipeError
from mlx_ft.export.merge import fuse_model, load_adapted
from mlx_ft.planner import Settings, load_shape
from mlx_ft.planner.settings import weight_bytes
from mlx_ft.recipe import QuantizeConfig, recipe_from_dict
from mlx_ft.runner import train

MODES = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


def test_each_mode_takes_its_own_bits_and_group_size():
    assert [(q.bits, q.group_size) for q in map(QuantizeConfig, MODES)] == list(MODES.values())
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({**base, "model": {"path": "m", "quantize": {"mode": "mxfp4", "group_size": 64}}})
    assert "model.quantize.group_size: mode 'mxfp4' takes 32, found 64; leave it out" in str(e.value)
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({**base, "model": {"path": "m", "quantize": {"mode": "nvfp4", "bits": 8}}})
    assert "model.quantize.bits: mode 'nvfp4' takes 4, found 8" in str(e.value)
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({**base, "model": {"path": "m", "quantize": {"mode": "fp4"}}})
    assert "model.quantize.mode: expected one of 'affine', 'mxfp4', 'nvfp4', 'mxfp8'" in str(e.value)


def model_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def fused_equals_dequantized_base_plus_adapter(run_dir, tokens):
    """Fusing dequantizes: every fused weight is the base weight dequantized in the model's dtype
    (float32 here; mx.dequantize alone gives bfloat16 for the float modes) plus the adapter's
    scale * B^T A^T, and the fused model gives the adapter model's logits."""
    adapted = load_adapted(run_dir)
    model = adapted.model
    ref = model(tokens)
    expected = {}
    for name, m in model.named_modules():
        if hasattr(m, "fuse") and hasattr(m, "lora_a"):
            base = m.linear
            w = base.weight if "scales" not in base else mx.dequantize(
                base.weight, base.scales, base.get("biases"), group_size=base.group_size, bits=base.bits,
                mode=base.mode, dtype=mx.float32)
            lora_a = m.lora_a if w.ndim == 2 else m.lora_a.reshape(w.shape[0], -1, w.shape[-1])
            delta = (m.scale * m.lora_b.T) @ lora_a.T if w.ndim == 2 else (m.scale * m.lora_b) @ lora_a
            expected[f"{name}.weight"] = w + delta.astype(w.dtype)
    assert expected, "nothing adapted"
    fuse_model(model)
    fused = dict(tree_flatten(model.parameters()))
    assert not any(k.endswith(".scales") for k in fused)  # every layer dequantized
    assert {v.dtype for k, v in fused.items() if k.endswith("weight")} == {mx.float32}
    for k, w in expected.items():
        assert mx.array_equal(fused[k], w).item(), k
    assert mx.allclose(model(tokens), ref, atol=1e-4, rtol=1e-4).item()


@pytest.mark.parametrize("mode", list(MODES))
def test_a_prequantized_base_in_each_mode_trains_is_counted_and_fuses(tmp_path, tiny_model_dir, chat_jsonl, mode):
    from mlx_lm import convert

    from mlx_ft.models import load_base
    from mlx_ft.recipe import ModelConfig

    bits, group = MODES[mode]
    qdir = tmp_path / f"tiny-{mode}"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(tiny_model_dir), str(qdir), quantize=True, q_group_size=group, q_bits=bits, q_mode=mode)
    model, _, _ = load_base(ModelConfig(path=str(qdir)))
    assert model.layers[0].self_attn.q_proj.mode == mode
    # the planner reads the checkpoint's mode from config.json and counts what MLX holds
    assert sum(weight_bytes(load_shape(str(qdir)), Settings())) == model_bytes(model)

    recipe = recipe_from_dict({
        "model": {"path": str(qdir)}, "adapter": {"rank": 4},
        "data": {"train": str(chat_jsonl[0]), "max_seq_len": 128},
        "training": {"batch_size": 4, "steps": 4, "learning_rate": 5e-3},
        "output": {"dir": str(tmp_path / "run")}})
    result = train(recipe, progress=False)
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    fused_equals_dequantized_base_plus_adapter(tmp_path / "run", mx.array([[5, 17, 42, 7, 99, 3]]))


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    """A tiny gpt-oss written as OpenAI publishes it: experts in MXFP4 blocks and scales."""
    from mlx_ft.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpt-oss") / "tiny", corpus_texts(chat_corpus(200)),
                            family="gpt_oss")


def test_gpt_oss_native_mxfp4_experts_are_read_as_transformers_reads_them(gpt_oss_dir):
    """mlx-lm's dequantized experts equal transformers' own MXFP4 decoding of the same blocks."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mlx_ft.models import load_base
    from mlx_ft.recipe import ModelConfig

    raw = mx.load(str(gpt_oss_dir / "model.safetensors"))
    model, _, _ = load_base(ModelConfig(path=str(gpt_oss_dir)))
    experts = model.layers[1].mlp.experts
    assert experts.gate_proj.mode == "mxfp4" and not hasattr(model.layers[1].self_attn.q_proj, "scales")

    def ours(layer):
        return np.array(mx.dequantize(layer.weight, layer.scales, None, group_size=32, bits=4, mode="mxfp4",
                                      dtype=mx.float32))

    def theirs(name):  # (E, in, out) as transformers' GptOssExperts holds it
        blocks, scales = (torch.from_numpy(np.array(raw[f"model.layers.1.mlp.experts.{name}_{k}"]))
                          for k in ("blocks", "scales"))
        return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()

    gate_up = theirs("gate_up_proj")
    np.testing.assert_array_equal(ours(experts.gate_proj), gate_up[..., ::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(ours(experts.up_proj), gate_up[..., 1::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(ours(experts.down_proj), theirs("down_proj").transpose(0, 2, 1))
    assert sum(weight_bytes(load_shape(str(gpt_oss_dir)), Settings())) == model_bytes(model)


def test_lora_on_gpt_oss_attention_and_experts_trains_and_fuses(tmp_path, gpt_oss_dir, chat_jsonl):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    recipe = recipe_from_dict({
        "model": {"path": str(gpt_oss_dir)}, "adapter": {"rank": 4, "targets": targets},
        "data": {"train": str(chat_jsonl[0]), "max_seq_len": 128},
        "training": {"batch_size": 4, "steps": 4, "learning_rate": 5e-3},
        "output": {"dir": str(tmp_path / "run")}})
    result = train(recipe, progress=False)
    keys = json.loads((result.adapter_dir / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert set(keys) == {*(f"self_attn.{t}" for t in targets[:4]), *(f"mlp.experts.{t}" for t in targets[4:])}
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    tokens = mx.array([[5, 17, 42, 7, 99, 3]])
    fused_equals_dequantized_base_plus_adapter(tmp_path / "run", tokens)
    # written out, the fused model reloads in mlx-lm (its names, float experts) with the same logits
    from mlx_lm.utils import load

    from mlx_ft.export import fuse

    with pytest.warns(UserWarning, match="mlx-lm loads the export, transformers may not"):
        out = fuse(tmp_path / "run", to="safetensors", dtype="f32")
    reloaded, _ = load(str(out))
    assert mx.allclose(reloaded(tokens), load_adapted(tmp_path / "run").model(tokens), atol=1e-4).item()
