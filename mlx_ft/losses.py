"""Loss: masked next-token cross-entropy, computed in chunks, with packed-sample attention.

Two things here go beyond calling `model(tokens)`:

* **Chunked cross-entropy.** The logits of a batch are `B x L x V` float32: 4 x 2048 x 152k is
  5 GB, usually the largest single allocation of a LoRA step. We run the model up to the final
  norm, then project and score `chunk_size` positions at a time. With a frozen head (every
  adapter method) each chunk computes its loss and its gradient with respect to the hidden
  states at once (`_fused_chunk`), so its logits are freed before the next chunk and never
  recomputed; a trainable head falls back to `mx.checkpoint`, which recomputes them.
* **Packed rows.** mlx-lm models build their causal mask from the KV cache object they are given
  (`cache.make_mask`). Handing every layer a `_MaskCache` whose `make_mask` returns a
  block-diagonal causal mask keeps each packed sample's attention inside that sample, for any
  architecture that follows mlx-lm's usual `model.model(inputs, cache)` pattern.
  `check_architecture` verifies both tricks on the loaded model before training starts.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .chunking import chunk_positions
from .errors import ModelError


class _MaskCache:
    """Stands in for an mlx-lm KV cache during training: passes keys/values through unchanged
    (offset 0, so RoPE positions run 0..L-1 along the row) and supplies our attention mask."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask  # bool [B, 1, L, L]

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is None:
            return self.mask
        idx = mx.arange(n)
        band = (idx[:, None] - idx[None, :]) < window_size  # [L, L] sliding window
        return self.mask & band


def segment_mask(segments: mx.array) -> mx.array:
    """Block-diagonal causal mask from per-position segment ids.

    Example (one row, max_seq_len 5, two packed samples and one padding slot)::

        segments = [0, 0, 1, 1, -1]
        mask     = [[1, 0, 0, 0, 0],     row i: which positions j token i may attend to
                    [1, 1, 0, 0, 0],
                    [0, 0, 1, 0, 0],     sample 1 starts afresh: it cannot see sample 0
                    [0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 1]]     padding attends only to padding (never a NaN row)

    RoPE encodes relative offsets, so the continuous positions 0..L-1 of a packed row give each
    sample the same attention logits it would get alone, once the mask isolates it.

    Args:
        segments: int32 [B, L]
    Returns:
        bool [B, 1, L, L]
    """
    L = segments.shape[1]
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    same = segments[:, :, None] == segments[:, None, :]  # [B, L, L]
    return (same & causal)[:, None]


def _head(model, h: mx.array) -> mx.array:
    """The output projection mlx-lm's `Model.__call__` applies after `model.model`."""
    if getattr(model, "lm_head", None) is not None:
        logits = model.lm_head(h)
    else:
        logits = model.model.embed_tokens.as_linear(h)
    cap = getattr(model, "final_logit_softcapping", None)
    if cap:
        logits = mx.tanh(logits / cap) * cap
    scale = getattr(model, "logits_scaling", None)  # Granite divides its logits
    if scale:
        logits = logits / scale
    return logits


def _hidden(model, inputs: mx.array, segments: mx.array | None) -> mx.array:
    cache = None
    if segments is not None:
        cache = [_MaskCache(segment_mask(segments))] * len(model.layers)
    return model.model(inputs, cache=cache)


def check_architecture(model, packing: bool) -> bool:
    """Check the two tricks above on this model with an 8-token probe.

    Returns:
        True if hidden states + head reproduce `model(x)`, so the chunked loss is exact; False
        means the loss falls back to full logits (e.g. a model with its own logit scaling).
    Raises:
        ModelError: with `packing`, when a packed row's second sample would see the first.
    """
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = model(x)
    # The same operations in the same order: equal up to the dtype's rounding.
    tol = 1e-4 if ref.dtype == mx.float32 else 2e-2
    try:
        head_ok = bool(mx.allclose(_head(model, _hidden(model, x, None)), ref, atol=tol, rtol=tol))
    except (AttributeError, TypeError):
        head_ok = False
    if packing and not _isolates_samples(model, x, head_ok):
        raise ModelError(f"data.pack: {type(model).__module__} does not take mlx_ft's attention mask, so "
                         "packed samples would attend to each other; set data.pack = false")
    return head_ok


def _isolates_samples(model, x: mx.array, head_ok: bool) -> bool:
    """Does the second of two packed samples give the logits it gives alone?

    The explicit mask runs another attention kernel than the fused causal path, so in bf16 the
    two differ by rounding (~1e-2). We therefore compare against a deliberate leak (one segment
    spanning the row): isolation must be far closer to "alone" than the leak is."""
    if not head_ok:
        return False
    try:
        alone = model(x[:, 3:]).astype(mx.float32)
        packed = _head(model, _hidden(model, x, mx.array([[0, 0, 0, 1, 1, 1, 1, 1]])))[:, 3:]
        leaked = _head(model, _hidden(model, x, mx.zeros((1, 8), dtype=mx.int32)))[:, 3:]
    except (AttributeError, TypeError):
        return False
    err = mx.abs(packed.astype(mx.float32) - alone).max().item()
    leak = mx.abs(leaked.astype(mx.float32) - alone).max().item()
    return err <= 0.1 * leak


def loss_sum(model, tokens: mx.array, mask: mx.array, segments: mx.array | None = None,
             chunk_size: int = 512, exact_head: bool = True, grad: bool = True):
    """Sum of masked next-token cross-entropies and the number of supervised tokens.

    Args:
        tokens: int32 [B, L]; mask: bool [B, L], True where token t is a supervised target;
        segments: int32 [B, L] packed-sample ids or None; chunk_size: at most this many positions
        per logits chunk, fewer when one chunk's logits would pass chunking.CHUNK_LOGITS_BYTES (0 =
        all at once, no cap); exact_head: False when `check_architecture` found that the
        hidden-state path differs from `model(x)` for this model (then full logits are used);
        grad: False when nothing will differentiate the result (validation): chunks then compute
        their loss only, not the dL/dh that the fused chunks prepare for the backward pass.
    Returns:
        (loss_sum, n_tokens): float32 scalars.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = mask[:, 1:].astype(mx.float32)  # [B, L-1]
    seg = segments[:, :-1] if segments is not None else None
    if not exact_head:
        if seg is not None:
            raise ModelError("data.pack: packing needs mlx-lm's standard model layout; set data.pack = false")
        logits = model(inputs).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, targets) * weights).sum(), weights.sum()

    h = _hidden(model, inputs, seg)  # [B, L-1, D]
    chunk_loss = partial(masked_loss_sum, model)

    n = h.shape[1]
    step = chunk_positions(chunk_size, h.shape[0], _vocab(model), n)
    head = _head_module(model)
    fused = _head_is_frozen(model)
    if not chunk_size or (step == n and not fused):
        return chunk_loss(h, targets, weights), weights.sum()
    total = mx.array(0.0, dtype=mx.float32)
    for s in range(0, n, step):
        t_c, w_c = targets[:, s:s + step], weights[:, s:s + step]
        if not grad:
            total = total + chunk_loss(h[:, s:s + step], t_c, w_c)
        elif fused:
            total = total + _fused_chunk(chunk_loss, h[:, s:s + step], t_c, w_c)
        else:
            # mx.checkpoint differentiates its arguments only: the head's trainable weights are
            # passed in (and put back into the head) so they get their gradient; the integer
            # targets are closed over, as they have none.
            def inner(params, h_c, t_c=t_c, w_c=w_c):
                head.update(params)
                return chunk_loss(h_c, t_c, w_c)

            total = total + mx.checkpoint(inner)(head.trainable_parameters(), h[:, s:s + step])
    return total, weights.sum()


def token_logps(model, tokens: mx.array, segments: mx.array | None = None, chunk_size: int = 512,
                exact_head: bool = True, grad: bool = True) -> mx.array:
    """Log-probability of every next token, computed in chunks: what preference losses sum per sequence.

    Like `loss_sum`, the B x L x V logits never exist at once: each chunk of positions is projected,
    scored and freed. With a frozen head (every adapter method) a chunk also returns, from the same
    logits, each position's gradient of its log-prob with respect to its hidden state
    (`_fused_logps`), which the backward pass scales by that position's cotangent.

    Args:
        tokens: int32 [B, L]; segments: int32 [B, L] packed-sequence ids (-1 padding) or None;
        chunk_size, exact_head, grad: as for `loss_sum`.
    Returns:
        float32 [B, L-1]: log p(tokens[:, t+1] | tokens[:, :t+1]) at every position t.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg = segments[:, :-1] if segments is not None else None
    if not exact_head:
        if seg is not None:
            raise ModelError("data.pack: packing needs mlx-lm's standard model layout; set data.pack = false")
        logps = -nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
        return logps if grad else mx.stop_gradient(logps)

    chunk_logps = partial(target_logps, model)
    h = _hidden(model, inputs, seg)  # [B, L-1, D]
    n = h.shape[1]
    step = chunk_positions(chunk_size, h.shape[0], _vocab(model), n)
    fused = _head_is_frozen(model)
    if not grad:
        # No gradient flows back through these (the reference of preference tuning, validation):
        # with checkpointed blocks the trainable weights are inputs of every block even with the
        # adapters switched off, and the backward pass would recompute the blocks with them on.
        if not chunk_size or step == n:
            return mx.stop_gradient(chunk_logps(h, targets))
        return mx.stop_gradient(mx.concatenate([chunk_logps(h[:, s:s + step], targets[:, s:s + step])
                                                for s in range(0, n, step)], axis=1))
    if not chunk_size or (step == n and not fused):
        return chunk_logps(h, targets)
    head = _head_module(model)
    parts = []
    for s in range(0, n, step):
        h_c, t_c = h[:, s:s + step], targets[:, s:s + step]
        if fused:
            parts.append(_fused_logps(chunk_logps, h_c, t_c))
        else:  # a trainable head: recompute the chunk's logits in the backward pass (see loss_sum)
            def inner(params, h_c, t_c=t_c):
                head.update(params)
                return chunk_logps(h_c, t_c)

            parts.append(mx.checkpoint(inner)(head.trainable_parameters(), h_c))
    return mx.concatenate(parts, axis=1)


def _fused_logps(chunk_logps, h_c: mx.array, t_c: mx.array) -> mx.array:
    """`chunk_logps(h_c, t_c)` [B, c] whose gradient with respect to h_c is computed in the forward pass.

    Position t's log-prob depends on h_c[:, t] alone, so the vjp with a cotangent of ones gives
    each position's own gradient J [B, c, D]; the backward pass returns cotangent[..., None] x J.
    As in `_fused_chunk`, the chunk's logits are used once and freed; J is the size of h_c.
    """

    @mx.custom_function
    def scored(h):
        (logp,), (jac,) = mx.vjp(lambda x: [chunk_logps(x, t_c)], [h], [mx.ones(t_c.shape, dtype=mx.float32)])
        return logp, jac

    @scored.vjp
    def scored_vjp(primals, cotangents, outputs):
        return [(cotangents[0][..., None] * outputs[1]).astype(primals[0].dtype)]

    return scored(h_c)[0]


def target_logps(model, h_c: mx.array, t_c: mx.array) -> mx.array:
    """Log-probs [B, c] of the targets t_c [B, c] from hidden states h_c [B, c, D]; its float32
    [B, c, V] logits are the only ones alive."""
    return -nn.losses.cross_entropy(_head(model, h_c).astype(mx.float32), t_c)


def sequence_sums(values: mx.array, seq: mx.array, n: int) -> mx.array:
    """Sum `values` by sequence: out[k] = sum of values[b, t] where seq[b, t] == k.

    Args:
        values: float32 [B, T]; seq: int32 [B, T], the sequence of each position, -1 for none;
        n: number of sequences.
    Returns:
        float32 [n]
    """
    idx = mx.where(seq >= 0, seq, n).reshape(-1)  # positions of no sequence go to a spare slot
    return mx.zeros((n + 1,), dtype=mx.float32).at[idx].add(values.reshape(-1).astype(mx.float32))[:n]


def masked_loss_sum(model, h_c: mx.array, t_c: mx.array, w_c: mx.array) -> mx.array:
    """Sum of the weighted cross-entropies of one chunk of hidden states [B, c, D] against its
    targets and weights [B, c]; its float32 [B, c, V] logits are the only ones alive."""
    logits = _head(model, h_c).astype(mx.float32)
    return (nn.losses.cross_entropy(logits, t_c) * w_c).sum()


def _vocab(model) -> int:
    """Vocabulary size (the head's output width), for the chunk cap; 1 when unknown, which puts the
    cap far beyond any row."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None or not hasattr(embed, "weight"):
        return 1
    return embed.weight.shape[0]


def _head_module(model):
    return model.lm_head if getattr(model, "lm_head", None) is not None else model.model.embed_tokens


def _head_is_frozen(model) -> bool:
    """True when nothing in the output projection is trained (LoRA, DoRA, and `full`, which trains
    the blocks only): then the loss needs no gradient for the head's weights."""
    from mlx.utils import tree_flatten

    return not tree_flatten(_head_module(model).trainable_parameters())


def _fused_chunk(chunk_loss, h_c: mx.array, t_c: mx.array, w_c: mx.array) -> mx.array:
    """`chunk_loss(h_c, t_c, w_c)` whose gradient with respect to h_c is computed in the forward pass.

    The chunk's logits are needed for the loss and for its gradient; computing both at once lets
    them go before the next chunk, and the backward pass only scales the saved dL/dh_c [B, c, D]
    by the incoming cotangent. That is two head matmuls per chunk, where recomputing the logits
    under `mx.checkpoint` takes three, and no B x L x V array waits for the backward pass. The
    head's weights get no gradient here, so this is used only when the head is frozen.
    """

    @mx.custom_function
    def scored(h):
        (loss,), (dh,) = mx.vjp(lambda x: [chunk_loss(x, t_c, w_c)], [h], [mx.array(1.0, dtype=mx.float32)])
        return loss, dh

    @scored.vjp
    def scored_vjp(primals, cotangents, outputs):
        return [(cotangents[0] * outputs[1]).astype(primals[0].dtype)]

    return scored(h_c)[0]


def enable_grad_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass.

    mlx-lm's `grad_checkpoint` replaces `__call__` for every instance of the block class, for the
    rest of the process. We patch each block class once, but only instances flagged here
    checkpoint, so other models in the same process (a notebook) are untouched.
    """
    for block in model.layers:
        cls = type(block)
        if not getattr(cls, "_mlxft_patched", False):
            original = cls.__call__

            def patched(self, *args, _original=original, **kwargs):
                if not getattr(self, "_mlxft_checkpoint", False):
                    return _original(self, *args, **kwargs)

                def inner(params, *a, **kw):
                    self.update(params)
                    return _original(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            cls.__call__ = patched
            cls._mlxft_patched = True
        object.__setattr__(block, "_mlxft_checkpoint", True)
