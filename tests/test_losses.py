"""Chunked cross-entropy, the packed-sample mask and gradient checkpointing are exact."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_ft import chunking, losses
from mlx_ft.models import apply_adapters, load_base
from mlx_ft.recipe import AdapterConfig, ModelConfig
from mlx_ft.tiny import FAMILIES, build_tiny_model

from conftest import chat_corpus, corpus_texts


def adapted(model_dir, method="lora"):
    model, _, _ = load_base(ModelConfig(path=str(model_dir)))
    apply_adapters(model, AdapterConfig(method=method, rank=4))
    mx.random.seed(3)
    # Random B so the adapter is not an identity and every gradient is non-zero.
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.load_weights([(name, mx.random.normal(p.shape) * 0.1)], strict=False)
    return model


def value_and_grads(model, tokens, mask, segments=None, chunk=0):
    fn = nn.value_and_grad(model, lambda m: losses.loss_sum(m, tokens, mask, segments, chunk)[0])
    value, grads = fn(model)
    return value, dict(tree_flatten(grads))


def batch(vocab, B=3, L=41, seed=0):
    mx.random.seed(seed)
    tokens = mx.random.randint(0, vocab, (B, L))
    mask = mx.random.uniform(shape=(B, L)) > 0.3
    return tokens, mask


@pytest.mark.parametrize("chunk", [1, 7, 16, 39])
def test_chunked_loss_and_gradients_equal_unchunked(tiny_model_dir, chunk):
    model = adapted(tiny_model_dir)
    tokens, mask = batch(model.model.embed_tokens.weight.shape[0])
    v0, g0 = value_and_grads(model, tokens, mask, chunk=0)
    v1, g1 = value_and_grads(model, tokens, mask, chunk=chunk)
    assert abs(v0.item() - v1.item()) <= 1e-4 * abs(v0.item())
    assert g0.keys() == g1.keys() and len(g0) == 28  # lora_a + lora_b of 7 modules x 2 blocks
    for k in g0:
        assert mx.abs(g0[k]).max().item() > 0, k
        assert mx.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4).item(), k


def test_loss_equals_mean_cross_entropy_of_model_logits(tiny_model_dir):
    model = adapted(tiny_model_dir)
    tokens, mask = batch(model.model.embed_tokens.weight.shape[0])
    total, n = losses.loss_sum(model, tokens, mask, chunk_size=8)
    logits = model(tokens[:, :-1])
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask[:, 1:]
    assert n.item() == mask[:, 1:].sum().item()
    assert abs(total.item() - ce.sum().item()) <= 1e-4 * ce.sum().item()


def test_all_masked_batch_gives_zero_not_nan(tiny_model_dir):
    model = adapted(tiny_model_dir)
    tokens, _ = batch(model.model.embed_tokens.weight.shape[0])
    total, n = losses.loss_sum(model, tokens, mx.zeros(tokens.shape, dtype=mx.bool_), chunk_size=8)
    assert (total.item(), n.item()) == (0.0, 0.0)


def test_grad_checkpointing_gives_the_same_gradients(tiny_model_dir):
    model = adapted(tiny_model_dir, "dora")
    tokens, mask = batch(model.model.embed_tokens.weight.shape[0])
    v0, g0 = value_and_grads(model, tokens, mask, chunk=8)
    losses.enable_grad_checkpointing(model)
    v1, g1 = value_and_grads(model, tokens, mask, chunk=8)
    assert v0.item() == pytest.approx(v1.item(), rel=1e-6)
    for k in g0:
        assert mx.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-5).item(), k


def test_segment_mask_matches_docstring_example():
    mask = losses.segment_mask(mx.array([[0, 0, 1, 1, -1]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].astype(mx.int32).tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tiny_family_supports_chunked_loss_and_packing(tmp_path, family):
    """Hidden states + head reproduce model(x), and packed samples do not see each other."""
    out = build_tiny_model(tmp_path / family, corpus_texts(chat_corpus(40)), family=family)
    model, _, _ = load_base(ModelConfig(path=str(out)))
    assert losses.check_architecture(model, packing=True) is True


def test_trainable_head_falls_back_to_checkpointed_chunks(tiny_model_dir):
    """With the head trained its weights need gradients, which the fused chunks do not give."""
    model = adapted(tiny_model_dir)
    model.lm_head.unfreeze()
    assert not losses._head_is_frozen(model)
    tokens, mask = batch(model.model.embed_tokens.weight.shape[0])
    v0, g0 = value_and_grads(model, tokens, mask, chunk=0)
    v1, g1 = value_and_grads(model, tokens, mask, chunk=7)
    assert "lm_head.weight" in g1 and abs(v0.item() - v1.item()) <= 1e-4 * abs(v0.item())
    for k in g0:
        assert mx.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4).item(), k


def test_chunk_is_capped_by_logits_bytes(tiny_model_dir, monkeypatch):
    model = adapted(tiny_model_dir)
    vocab = model.model.embed_tokens.weight.shape[0]
    tokens, mask = batch(vocab)
    v0, g0 = value_and_grads(model, tokens, mask, chunk=0)
    monkeypatch.setattr(chunking, "CHUNK_LOGITS_BYTES", 4 * 3 * vocab * 5)  # 5 positions of 3 rows
    monkeypatch.setattr(chunking, "MIN_CHUNK", 1)
    assert chunking.chunk_positions(512, 3, losses._vocab(model), 99) == 5
    v1, g1 = value_and_grads(model, tokens, mask, chunk=512)
    assert abs(v0.item() - v1.item()) <= 1e-4 * abs(v0.item())
    for k in g0:
        assert mx.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4).item(), k


def test_loss_without_gradient_equals_fused_loss(tiny_model_dir):
    model = adapted(tiny_model_dir)
    tokens, mask = batch(model.model.embed_tokens.weight.shape[0])
    a, n = losses.loss_sum(model, tokens, mask, chunk_size=7)
    b, m = losses.loss_sum(model, tokens, mask, chunk_size=7, grad=False)
    assert n.item() == m.item() and abs(a.item() - b.item()) <= 1e-5 * abs(a.item())
