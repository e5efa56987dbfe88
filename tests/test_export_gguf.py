"""GGUF export checked in the real llama.cpp (llama-cpp-python): logits, tokenizer, chat template,
LoRA adapters. Tiny models of each supported family, no network.

NMSE = mean((llama.cpp - MLX)^2) / var(MLX), llama.cpp's check-nmse.py measure; the KV cache is
F32 (type_k = type_v = 0) so that the file, not the cache, is what is measured.
"""

import numpy as np
import pytest

import llama_cpp
from test_export_helpers import TEST_TEXT, build_base, make_adapter, mlx_logits, nmse, prompt_ids

from mlx_ft.errors import ExportError
from mlx_ft.export import export_adapter, fuse

F32 = 0  # GGML_TYPE_F32 for the KV cache

# (family, tokenizer): every family once, both tokenizer kinds among them.
CASES = [("llama", "bpe"), ("llama", "spm"), ("mistral", "spm"), ("qwen2", "bpe"), ("qwen3", "bpe"),
         ("gemma2", "spm"), ("gemma3", "bpe"), ("phi3", "spm"), ("mixtral", "spm"), ("qwen3_moe", "bpe")]
# olmo2, granite and qwen2_moe: test_newer_families_train_and_their_fused_gguf_runs_in_llama_cpp


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def run_llama_cpp(path, ids, lora=None):
    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, type_k=F32, type_v=F32, verbose=False,
                          seed=0, **kw)
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


def _hf_tokenizer(base):
    from mlx_lm.utils import load

    model, tok = load(str(base))
    return model, tok


@pytest.mark.parametrize("family,tokenizer", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_fused_gguf_f16_matches_mlx(root, family, tokenizer):
    base = build_base(root, family, tokenizer)
    adapter_dir, adapted = make_adapter(root, base)
    _, tok = _hf_tokenizer(base)
    ids = prompt_ids(tok)
    ref = mlx_logits(adapted, ids)

    out = fuse(adapter_dir, to="gguf", gguf_type="f16")
    llm, got = run_llama_cpp(out, ids)
    err = nmse(got, ref)
    print(f"{family}-{tokenizer} f16 NMSE {err:.2e}")
    assert err < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9  # f16 rounding may flip a near-tie
    # The tokenizer: same ids as the HF tokenizer mlx-lm trains with, specials and bos included.
    assert llm.tokenize(TEST_TEXT.encode(), add_bos=True, special=True) == tok.encode(TEST_TEXT)
    plain = "Item 12 is red!\n  ünïcode 🙂"
    assert llm.tokenize(plain.encode(), add_bos=False, special=False) == tok.encode(plain, add_special_tokens=False)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.metadata["tokenizer.ggml.model"] == ("gpt2" if tokenizer == "bpe" else "llama")
    assert (out.parent / "Modelfile").is_file()


# Llama 3.1-style RoPE scaling (written as a rope_freqs tensor) and tied embeddings (no output.weight).
VARIANTS = {
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_gguf_variants_match_mlx(root, variant):
    family, extra = VARIANTS[variant]
    base = build_base(root, family, "bpe", tag="-" + variant, extra_config=extra)
    adapter_dir, adapted = make_adapter(root, base, seed=6)
    _, tok = _hf_tokenizer(base)
    ids = prompt_ids(tok)
    out = fuse(adapter_dir, to="gguf", gguf_type="f32")
    llm, got = run_llama_cpp(out, ids)
    err = nmse(got, mlx_logits(adapted, ids))
    print(f"{variant} f32 NMSE {err:.2e}")
    assert err < 1e-6
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert ("rope_freqs.weight" in names) == (variant == "llama3-rope")
    assert ("output.weight" in names) == (variant != "qwen2-tied")


@pytest.mark.parametrize("gguf_type,bound", [("q8_0", 5e-3), ("q4_0", 5e-2), ("bf16", 1e-4)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_gguf_quantized_close_to_mlx(root, family, gguf_type, bound):
    base = build_base(root, family, "bpe")
    adapter_dir, adapted = make_adapter(root, base, seed=2)
    _, tok = _hf_tokenizer(base)
    ids = prompt_ids(tok)
    out = fuse(adapter_dir, to="gguf", gguf_type=gguf_type)
    _, got = run_llama_cpp(out, ids)
    err = nmse(got, mlx_logits(adapted, ids))
    print(f"{family} {gguf_type} NMSE {err:.2e}")
    assert err < bound


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_lora_gguf_on_base_gguf_matches_mlx(root, family):
    import gguf

    base = build_base(root, family, "bpe" if family != "phi3" else "spm")
    adapter_dir, adapted = make_adapter(root, base, seed=3)
    _, tok = _hf_tokenizer(base)
    ids = prompt_ids(tok)
    lora = export_adapter(adapter_dir, to="gguf-lora", with_base="f32")
    r = gguf.GGUFReader(str(lora))
    assert r.fields["adapter.lora.alpha"].parts[-1][0] == pytest.approx(2.0 * 4)  # scale 8/4 x rank 4
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_output.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    _, got = run_llama_cpp(lora.parent / "base-f32.gguf", ids, lora=lora)
    err = nmse(got, mlx_logits(adapted, ids))
    print(f"{family} f32 base + LoRA GGUF NMSE {err:.2e}")
    assert err < 1e-6
    assert "ADAPTER ./adapter.gguf" in (lora.parent / "Modelfile").read_text()


def test_lora_gguf_for_qlora_uses_the_dequantized_base(root):
    base = build_base(root, "llama", "bpe")
    adapter_dir, adapted = make_adapter(root, base, quantize=True, seed=4)
    _, tok = _hf_tokenizer(base)
    ids = prompt_ids(tok)
    lora = export_adapter(adapter_dir, to="gguf-lora", with_base="f32")
    _, got = run_llama_cpp(lora.parent / "base-f32.gguf", ids, lora=lora)
    err = nmse(got, mlx_logits(adapted, ids))
    print(f"llama QLoRA f32 dequantized base + LoRA GGUF NMSE {err:.2e}")
    assert err < 1e-6


def test_dora_refused_for_gguf_lora_but_fuses(root):
    base = build_base(root, "qwen2", "bpe")
    adapter_dir, adapted = make_adapter(root, base, method="dora", seed=5)
    with pytest.raises(ExportError, match="no DoRA adapters; fuse instead"):
        export_adapter(adapter_dir, to="gguf-lora")
    _, tok = _hf_tokenizer(base)
    ids = prompt_ids(tok)
    _, got = run_llama_cpp(fuse(adapter_dir, to="gguf", gguf_type="f32"), ids)
    assert nmse(got, mlx_logits(adapted, ids)) < 1e-6


def test_moe_expert_adapters_refused_for_gguf_lora(root):
    base = build_base(root, "mixtral", "spm")
    adapter_dir, _ = make_adapter(root, base, seed=8)
    with pytest.raises(ExportError, match="switch_mlp.gate_proj \\(LoRASwitchLinear\\).*Fuse instead"):
        export_adapter(adapter_dir, to="gguf-lora")


@pytest.mark.parametrize("family", ["olmo2", "granite", "qwen2_moe"])
def test_newer_families_train_and_their_fused_gguf_runs_in_llama_cpp(root, family):
    """OLMo 2, Granite and Qwen2-MoE (shared expert) train a few steps with mlx_ft's compiled step and
    chunked loss (Granite divides its logits), and the trained adapter, fused, gives MLX's logits in
    llama.cpp. (The loop is driven here rather than through `mlxft run`, whose plan-first replay of a
    new architecture costs ~10 s when the plan cache is cold.)"""
    import functools

    import mlx.core as mx

    from conftest import chat_corpus
    from mlx_ft import losses
    from mlx_ft.models import apply_adapters, load_base, save_adapter
    from mlx_ft.recipe import AdapterConfig, ModelConfig, TrainingConfig
    from mlx_ft.step import build_optimizer, compile_step

    base = build_base(root, family, "bpe")
    mcfg = ModelConfig(path=str(base))
    model, tok, _ = load_base(mcfg)
    cfg = apply_adapters(model, AdapterConfig(rank=4, alpha=8.0))
    rows = [tok.encode(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)[:48]
            for r in chat_corpus(4)]
    tokens = mx.array([r + [0] * (48 - len(r)) for r in rows])  # (4, 48)
    mask = mx.array([[True] * len(r) + [False] * (48 - len(r)) for r in rows])  # (4, 48)
    loss_fn = functools.partial(losses.loss_sum, chunk_size=16,
                                exact_head=losses.check_architecture(model, packing=False))
    optimizer = build_optimizer(TrainingConfig(learning_rate=1e-2, lr_schedule="constant"), 6)
    micro_step, update, state = compile_step(model, optimizer, loss_fn, max_grad_norm=1.0)
    seen = []
    for _ in range(6):
        loss, n, grads = micro_step(tokens, mask)
        update(grads, n)
        mx.eval(state, loss)
        seen.append((loss / n).item())
    assert seen[-1] < seen[0] - 0.1, seen
    model.eval()
    adapter_dir = save_adapter(model, root / f"trained-{family}" / "adapters", cfg, str(base), mcfg)
    ids = prompt_ids(tok)
    _, got = run_llama_cpp(fuse(adapter_dir, to="gguf", gguf_type="f32"), ids)
    err = nmse(got, mlx_logits(model, ids))
    print(f"{family} trained {seen[0]:.2f} -> {seen[-1]:.2f}, fused f32 NMSE {err:.2e}")
    assert err < 1e-6
