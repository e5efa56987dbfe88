"""`generate` / `mlxft generate`: a run directory finds its adapter and recorded base; the text is
what mlx-lm's own loader + greedy decoding gives; the chat template is applied only when asked."""

import json

import pytest
from click.testing import CliRunner

from mlx_ft.errors import ModelError


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A run directory holding a LoRA adapter with non-zero B (so it changes the output)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_ft import models
    from mlx_ft.recipe import AdapterConfig, ModelConfig

    cfg = ModelConfig(path=str(tiny_model_dir))
    model, _, _ = models.load_base(cfg)
    adapter_cfg = models.apply_adapters(model, AdapterConfig(rank=4, alpha=8.0))
    mx.random.seed(1)
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.load_weights([(name, 0.5 * mx.random.normal(p.shape))], strict=False)
    run = tmp_path_factory.mktemp("runs") / "gen"
    models.save_adapter(model, run / "adapters", adapter_cfg, str(tiny_model_dir), cfg)
    return run


def mlx_lm_reference(base, adapter_dir, prompt: str) -> str:
    from mlx_lm import generate as lm_generate, load

    model, tok = load(str(base), adapter_path=str(adapter_dir))
    return lm_generate(model, tok, tok.encode(prompt), max_tokens=12)


def test_run_dir_gives_mlx_lm_text(run_dir, tiny_model_dir):
    from mlx_ft.generate import generate

    out = generate(run_dir, "What colour is item 3?", max_tokens=12)
    assert out.text == mlx_lm_reference(tiny_model_dir, run_dir / "adapters", "What colour is item 3?")
    assert out.generation_tokens >= 1 and out.prompt == "What colour is item 3?"
    base_only = generate(str(tiny_model_dir), "What colour is item 3?", max_tokens=12)
    assert base_only.text != out.text  # the adapter is applied


def test_model_plus_adapter_equals_run_dir(run_dir, tiny_model_dir):
    from mlx_ft.generate import generate

    a = generate(run_dir, "Sure?", max_tokens=8)
    b = generate(str(tiny_model_dir), "Sure?", adapter=run_dir / "adapters", max_tokens=8)
    assert a.text == b.text


def test_chat_applies_the_template_and_streams(run_dir):
    from mlx_ft.generate import generate

    pieces = []
    out = generate(run_dir, "What colour is item 5?", chat=True, system="Answer briefly.",
                   max_tokens=10, on_text=pieces.append)
    assert out.prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert "".join(pieces) == out.text


def test_cli_streams_the_same_text(run_dir, tiny_model_dir):
    from mlx_ft.cli import main
    from mlx_ft.generate import generate

    expected = generate(run_dir, "Sure?", chat=True, max_tokens=8).text
    res = CliRunner().invoke(main, ["generate", str(run_dir), "--prompt", "Sure?", "--chat", "--max-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert res.output == expected + "\n"
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_dir), "--adapter", str(run_dir),
                                    "--prompt", "Sure?", "--chat", "--max-tokens", "8"])
    assert res.output == expected + "\n"


def test_cli_user_errors(run_dir, tmp_path):
    from mlx_ft.cli import main

    res = CliRunner().invoke(main, ["generate", "--prompt", "hi"])
    assert res.exit_code == 2 and "give a RUN_DIR" in res.output
    res = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "hi"])
    assert res.exit_code == 2 and "no adapter_config.json" in res.output
    res = CliRunner().invoke(main, ["generate", str(run_dir), "--adapter", str(run_dir), "--prompt", "hi"])
    assert res.exit_code == 2 and "not both" in res.output


def test_chat_without_template_is_a_clear_error(run_dir, tiny_model_dir, tmp_path):
    import shutil

    from mlx_ft.generate import generate

    base = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in base.glob("*.jinja"):
        f.unlink()
    with pytest.raises(ModelError, match="no chat template"):
        generate(str(base), "hi", chat=True)
