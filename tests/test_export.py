"""Fuse to HF safetensors, bad-input handling, run_exports, CLI: tiny models, no network."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from test_export_helpers import build_base, make_adapter, mlx_logits, prompt_ids

from mlx_ft.errors import ExportError
from mlx_ft.export import export_adapter, fuse, run_exports


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def llama_base(root):
    return build_base(root, "llama")


def _load(path):
    from mlx_lm.utils import load

    return load(str(path))


@pytest.mark.parametrize("method,quantize", [("lora", False), ("lora", True), ("dora", False)],
                         ids=["lora", "qlora-4bit", "dora"])
def test_fused_safetensors_equals_base_plus_adapter(root, llama_base, method, quantize):
    adapter_dir, adapted = make_adapter(root, llama_base, method=method, quantize=quantize)
    base, tok = _load(llama_base)
    ids = prompt_ids(tok)
    ref = mlx_logits(adapted, ids)
    assert np.abs(ref - mlx_logits(base, ids)).max() > 0.1, "adapter is an identity: test proves nothing"

    out = fuse(adapter_dir, to="safetensors", dtype="f32")
    fused, _ = _load(out)  # reloads in mlx-lm
    assert np.abs(mlx_logits(fused, ids) - ref).max() < 1e-4
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]  # HF names, no lora_a/b
    assert not any("lora" in k for k in index["weight_map"])


def test_fused_bf16_close_and_loads_in_transformers(root, llama_base):
    import torch
    from transformers import AutoModelForCausalLM

    adapter_dir, adapted = make_adapter(root, llama_base, seed=2)
    _, tok = _load(llama_base)
    ids = prompt_ids(tok)
    ref = mlx_logits(adapted, ids)
    out = fuse(adapter_dir, to="safetensors", dtype="bf16")
    fused, _ = _load(out)
    assert np.abs(mlx_logits(fused, ids) - ref).max() < 0.1  # bf16 weights: ~3 significant digits

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 0.1


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                    "mixtral", "qwen3_moe", "olmo2", "granite", "qwen2_moe"])
def test_fused_safetensors_load_in_transformers_every_family(root, family):
    import torch
    from transformers import AutoModelForCausalLM

    base = build_base(root, family)
    adapter_dir, adapted = make_adapter(root, base, seed=12)
    _, tok = _load(base)
    ids = prompt_ids(tok)
    out = fuse(adapter_dir, to="safetensors", dtype="f32")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - mlx_logits(adapted, ids)).max() < 1e-4


def test_requantized_safetensors_load_in_mlx(root, llama_base):
    adapter_dir, adapted = make_adapter(root, llama_base, seed=3)
    _, tok = _load(llama_base)
    ids = prompt_ids(tok)
    out = fuse(adapter_dir, to="safetensors", dtype="f32", quantize=8, out=root / "q8-fused")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    model, _ = _load(out)
    got, ref = mlx_logits(model, ids), mlx_logits(adapted, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9  # lossy, but close at 8 bits


def test_existing_target_refused_and_overwrite_replaces_only_an_export_of_the_same_kind(root, llama_base):
    adapter_dir, _ = make_adapter(root, llama_base, seed=4)
    out = root / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        fuse(adapter_dir, to="safetensors", out=out)
    with pytest.raises(ExportError, match=f"{out} holds files mlx_ft did not write .* even with --overwrite"):
        fuse(adapter_dir, to="safetensors", out=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    mine = fuse(adapter_dir, to="safetensors", out=root / "mine")
    with pytest.raises(ExportError, match="is an mlx_ft safetensors export, not peft"):
        export_adapter(adapter_dir, to="peft", out=mine, overwrite=True)
    (mine / "model.safetensors").write_bytes(b"stale")
    fuse(adapter_dir, to="safetensors", out=mine, overwrite=True)  # an export of its own kind: replaced
    assert (mine / "model.safetensors").stat().st_size > 5 and (mine / ".mlx_ft").is_file()


def test_adapter_that_does_not_fit_lists_every_tensor(root, llama_base):
    adapter_dir, _ = make_adapter(root, llama_base, seed=5)
    (root / "other").mkdir(exist_ok=True)
    other = build_base(root / "other", "llama", intermediate_size=96)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model"] = str(other)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as e:
        fuse(adapter_dir, to="safetensors", out=root / "nofit")
    msg = str(e.value)
    # gate/up (in 64 -> out 96) and down (in 96) differ in both blocks: 2 layers x 3 tensors
    bad = [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in
           ("gate_proj.lora_b", "up_proj.lora_b", "down_proj.lora_a")]
    assert all(b in msg for b in bad), msg
    assert "6 tensors" in msg and not (root / "nofit").exists()


def test_unknown_architecture_refused_with_supported_list(root, llama_base):
    import shutil

    odd = root / "odd-base"
    shutil.copytree(llama_base, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "starcoder2"}))
    adapter_dir, _ = make_adapter(root, llama_base, seed=6)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**acfg, "base_model": str(odd)}))
    for call in (lambda: fuse(adapter_dir, to="gguf"), lambda: export_adapter(adapter_dir, to="gguf-lora")):
        with pytest.raises(ExportError, match="starcoder2.*supported: gemma2, gemma3_text, granite, llama, mistral, "
                                              "mixtral, olmo2, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"):
            call()


def test_not_enough_disk_checked_before_writing(root, llama_base, monkeypatch):
    import shutil

    from mlx_ft.export import _io

    adapter_dir, _ = make_adapter(root, llama_base, seed=7)
    monkeypatch.setattr(_io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = root / "nodisk"
    with pytest.raises(ExportError, match="not enough disk space"):
        fuse(adapter_dir, to="safetensors", out=out)
    with pytest.raises(ExportError, match="not enough disk space"):
        fuse(adapter_dir, to="gguf", out=out / "m.gguf")
    assert not out.exists() or not any(out.iterdir())


def test_interrupted_export_leaves_no_file_under_final_name(root, llama_base, monkeypatch):
    import gguf

    adapter_dir, _ = make_adapter(root, llama_base, seed=8)
    out = root / "interrupted" / "model.gguf"

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        fuse(adapter_dir, to="gguf", out=out)
    assert list(out.parent.iterdir()) == []  # neither model.gguf nor a temp file left


def test_k_quant_without_any_quantizer_says_how_to_get_one(root, llama_base, monkeypatch):
    import sys

    adapter_dir, _ = make_adapter(root, llama_base, seed=9)
    monkeypatch.setenv("PATH", str(root / "empty-bin"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # neither the binary nor llama-cpp-python
    with pytest.raises(ExportError, match=r"--gguf-type q4_k_m .*pip install 'mlx-ft\[gguf\]'.*llama-quantize"):
        fuse(adapter_dir, to="gguf", gguf_type="q4_k_m")


def test_run_exports_follows_recipe(root, llama_base):
    from mlx_ft.recipe import ExportConfig, Recipe

    adapter_dir, _ = make_adapter(root, llama_base, seed=10)
    run_dir = adapter_dir.parent
    recipe = Recipe(export=ExportConfig(to=["safetensors", "gguf", "peft", "gguf-lora"], gguf_type="q8_0"))
    done = run_exports(recipe, run_dir)
    assert done == [run_dir / "export" / "safetensors", run_dir / "export" / "gguf" / "model-q8_0.gguf",
                    run_dir / "export" / "peft", run_dir / "export" / "gguf-lora" / "adapter.gguf"]
    assert all(p.exists() for p in done)
    modelfile = (run_dir / "export" / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile
    assert "TEMPLATE" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile  # test_export_ollama.py
    assert run_exports(recipe, run_dir) == done  # a second run replaces its own exports


def test_cli_fuse_and_export_adapter(root, llama_base):
    from mlx_ft.cli import main

    adapter_dir, _ = make_adapter(root, llama_base, seed=11)
    runner = CliRunner()
    for cmd in (["fuse", "--help"], ["export-adapter", "--help"]):
        res = runner.invoke(main, cmd)
        assert res.exit_code == 0 and "Example" in res.output and "mlxft " + cmd[0] in res.output
    res = runner.invoke(main, ["fuse", str(adapter_dir.parent), "--to", "gguf", "--gguf-type", "f16"])
    assert res.exit_code == 0, res.output
    assert (adapter_dir.parent / "export" / "gguf" / "model-f16.gguf").is_file()
    res = runner.invoke(main, ["fuse", str(adapter_dir.parent), "--to", "gguf", "--gguf-type", "f16"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(main, ["export-adapter", str(adapter_dir.parent), "--to", "peft"])
    assert res.exit_code == 0, res.output
    assert (adapter_dir.parent / "export" / "peft" / "adapter_model.safetensors").is_file()


def test_export_adapter_with_base_takes_gguf_pre(root, llama_base):
    """--gguf-pre names the base GGUF's pre-tokenizer, as for fuse; without a base there is no tokenizer."""
    from mlx_ft.cli import main
    from mlx_ft.export.gguf_meta import read_meta

    adapter_dir, _ = make_adapter(root, llama_base, seed=14)
    with pytest.raises(ExportError, match="--gguf-pre qwen2 applies with --with-base"):
        export_adapter(adapter_dir, to="gguf-lora", gguf_pre="qwen2")
    res = CliRunner().invoke(main, ["export-adapter", str(adapter_dir), "--to", "gguf-lora", "--with-base", "f32",
                                    "--gguf-pre", "qwen2"])
    assert res.exit_code == 0, res.output
    base_gguf = adapter_dir.parent / "export" / "gguf-lora" / "base-f32.gguf"
    assert read_meta(base_gguf, tensors=False).fields["tokenizer.ggml.pre"].value() == "qwen2"


def test_k_quant_runs_llama_quantize_from_an_f16_file(root, llama_base, monkeypatch):
    """The plumbing around llama-quantize (not in CI): f16 input, type argument, atomic output."""
    import gguf

    bin_dir = root / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    log = root / "llama-quantize.args"
    fake = bin_dir / "llama-quantize"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {log}\ncp \"$1\" \"$2\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    adapter_dir, _ = make_adapter(root, llama_base, seed=13)
    out = fuse(adapter_dir, to="gguf", gguf_type="q4_k_m")
    assert out.name == "model-q4_k_m.gguf" and (out.parent / "Modelfile").is_file()
    src, dst, qtype = log.read_text().split()
    assert qtype == "Q4_K_M" and src.endswith("model-f16.gguf")
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].parts[-1][0] == 1  # the f16 input, copied
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "model-q4_k_m.gguf"]
