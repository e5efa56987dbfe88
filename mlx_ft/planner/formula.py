"""The closed-form memory model, the fallback: what MLX holds at the peak of one training step.

The planner's answer is the replayed graph of the step (`planner.replay`). This formula answers
where the step cannot be traced (`--memory-model formula`, or a model mlx-lm cannot build
lazily), prices the candidate changes the suggestions search (scaled to agree with the replay at
the plan's own settings), and gives full fine-tuning's optimizer-update phase, which measured
above the replayed step (`update_floor`).

Each term follows a mechanism of the training step (see docs/planner.md for the derivation):
weights (+ quantization scales and biases), adapter parameters, their gradients and optimizer
state, the activations autodiff saves for the backward pass, the attention score matrices (MLX
never uses fused attention when differentiating, so each adapted block keeps a B x heads x L x L
matrix), the working set of the backward pass through one block, the chunked cross-entropy, and
the optimizer update (old and new weights and moments alive at once), when that is the larger phase.

The chunked cross-entropy is replayed from its graph by `schedule.loss_peak_bytes`, with MLX's own
scheduling numbers and nothing fitted. The few other constants are calibrated, all of them
properties of MLX's autodiff and scheduler rather than of a model; each says where its value comes from.
"""

from __future__ import annotations

from dataclasses import replace

from ..chunking import chunk_positions
from . import schedule
from .configs import ModelShape
from .settings import (HEADROOM_FIXED, HEADROOM_FRACTION, Estimate, Settings, adapted_layers, adapted_modules,
                       model_notes, n_adapted, trainable_params, weight_bytes)

# --- Framework constants, measured on MLX 0.32.4's CPU backend. "Mechanisms X" below means
# `benchmarks/planner_accuracy.py --mechanisms X`, which isolates one term (one adapted block; a
# vocabulary, chunk, row length or layer count varied); docs/planner.md has the figures.
BACKWARD_ACT_FACTOR = 1.6
"""The backward pass through one block holds about this many blocks' worth of saved-activation
bytes at once (the block's cotangents plus its saved tensors being consumed)."""
BACKWARD_SCORE_BYTES = {4: 7.5, 2: 4.5}
"""... plus this many bytes per attention score entry (B x heads x L x L), by model dtype bytes:
the softmax vjp of that block, about two score-sized matrices in the model dtype (mechanisms
`attention`: rows of 256-1536 tokens, one adapted block; 4.5 on bfloat16, 7.5 on float32)."""
LOGITS_FULL_BYTES = {4: 12.5, 2: 19.0}
"""Bytes per (row x position x vocab entry) of the loss computed in one piece (loss_chunk_size 0):
plain autodiff keeps the head output, its float32 copy and the softmax until the backward pass,
where the softmax gradient joins them."""
MLX_LM_LOGITS_COPIES = 4
"""mlx-lm's default_loss holds about 4 model-dtype copies of the B x L x V logits (planner-facts §3.6:
8.0 bytes per entry measured for a float16 model)."""
CKPT_SAVED_HIDDEN = 16.0
"""Gradient checkpointing keeps this many bytes per hidden unit per token per checkpointed block,
whatever the model dtype, four float32 hidden-size tensors' worth (grid rows 2-3, 11-14: 15.8-20.4 per
added block from the second adapted block on; the first one adds more, see CKPT_RECOMPUTE_BLOCKS)."""
CKPT_RECOMPUTE_BLOCKS = 1.5
"""Blocks whose recomputed activations and scores are alive at once in the backward pass: the
scheduler recomputes the next block while the current one's backward runs. Mechanisms `ckpt`: from
one to two adapted blocks the peak grows by a whole block's activations on a bfloat16 model with a
wide MLP (2 blocks), while float32 rows with long rows fit 1 block (grid row 28); 1.5 in between."""
PHASE_OVERLAP = 0.35
"""Share of the smaller of the loss and block-backward working sets alive at the larger's peak
(the scheduler starts the top block's backward before the last loss chunks are freed). Mechanisms
`overlap`: two adapted blocks, 1023-token rows, vocabulary 1024-16384, whole-row chunks; the peak
grows by 0.35 of the loss while the loss is the smaller set and by all of it once it is larger.
The block backward's share counts on top of what the loss still holds when it ends
(`schedule.loss_bytes`), which is its peak for one chunk but less when several chunks interleave
and peak before the end: with chunks of 128 (8 a row) the same experiment's peak followed the loss
alone once it was the larger set (+0.2 to +0.5 % with no block share, +5.6 to +13.9 % with 0.35;
measured 15:03 after grid rows 26, 78 and 79 missed that way)."""
MOE_HIDDEN_COPIES = 4.0
"""Hidden-size tensors a MoE block keeps per routed copy of a token (its top-k): the experts' output
and down-projection adapter terms, unsorted back to token order, and weighted by the router
[calibrated on the MoE rows of benchmarks/planner_accuracy.py, on top of the dense constants]."""
MOE_INTERMEDIATE_COPIES = 3.0
"""Expert-wide tensors a MoE block keeps per routed copy of a token: the experts' gate and up
outputs and what the SwiGLU vjp keeps [calibrated, as above]."""
MOE_ROUTER_COPIES = 2.0
"""Experts-wide tensors the router keeps per token: its logits and their softmax [calibrated, as above]."""
MOE_BACKWARD_ACT_FACTOR = 1.6
"""The backward working set counts this many blocks' worth of a MoE block's expert activations
(BACKWARD_ACT_FACTOR for the rest of the block) [calibrated, as above]."""
UPDATE_COPIES = 4.0
"""Trained-parameter-sized arrays the optimizer update adds to weights, gradients and AdamW state:
the new weights and moments computed while the old ones are alive, and the scaled (and clipped)
gradient. Measured on full fine-tunes with short rows, where the update is the peak: 3.4-5.0
(docs/planner.md, MoE section: llama-256-f32 at 64 tokens, a qwen3_moe block at 256)."""
# Which tensor feeds each linear: q/k/v share the first norm's output, gate/up the second's.
_INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid", "gate": "mlp_in",
             "router": "mlp_in"}


def moe_bytes_per_token(shape: ModelShape, layer: int | None = None) -> float:
    """What the MoE MLP of one block saves per token whatever is trained (0 for a dense block):
    MOE_INTERMEDIATE_COPIES expert-wide tensors and MOE_HIDDEN_COPIES hidden-size ones per routed
    copy of the token (its top-k), and the router's logits and probabilities."""
    if not shape.moe_layer(shape.layers - 1 if layer is None else layer):
        return 0
    H, s, k = shape.hidden, shape.dtype_bytes, shape.experts_per_tok
    return s * k * (MOE_INTERMEDIATE_COPIES * shape.moe_intermediate + MOE_HIDDEN_COPIES * H) \
        + s * MOE_ROUTER_COPIES * shape.experts


def activation_bytes_per_token(shape: ModelShape, st: Settings, layer: int | None = None) -> tuple[int, int]:
    """(base, adapter extra) bytes one adapted block saves for the backward pass, per token.

    Base, in the model dtype: block input, both norm outputs, q, k, v, attention output, the
    residual, and four intermediate-size tensors of the MLP (gate, up, and what the fused SwiGLU
    vjp keeps). The MLP output that feeds down_proj is kept once more: as itself in a float32
    model, or as its float32 copy in a 16-bit one (measured: 20 bytes per intermediate unit per
    token in float32, 11.7 in bfloat16). A MoE block's MLP is `moe_bytes_per_token` instead.
    Adapter extra: LoRA's A and B are float32, so on a 16-bit base `x @ A` promotes each distinct
    adapter input to float32 and keeps it (mx.compile merges the copies q/k/v and gate/up share),
    plus every x @ A (rank wide); DoRA also keeps each adapted output before the magnitude scaling.
    The experts' inputs (the sorted, gathered copies of the token, k per token, and the SwiGLU
    output) are kept only when a trained expert layer needs them for its weights' gradient: in
    float32 for LoRA (x @ A promotes them), in the model dtype for full fine-tuning.
    """
    H, s = shape.hidden, shape.dtype_bytes
    moe = moe_bytes_per_token(shape, layer)
    I = 0 if moe else shape.intermediate
    base = s * (4 * H + 2 * shape.d_q + 2 * shape.d_kv + 4 * I) + (4 * I if s >= 4 else 0) + moe
    mods = adapted_modules(shape, st, layer)
    experts = {_INPUT_OF[m.rsplit(".", 1)[-1]]: i * shape.copies(m, active=True)
               for m, (i, _) in mods.items() if shape.copies(m) > 1}
    if st.method == "full":
        return int(base + s * sum(experts.values())), 0
    extra = 4 * st.rank * sum(shape.copies(m, active=True) for m in mods) + 4 * sum(experts.values())
    if s != 4:
        inputs = {_INPUT_OF[m.rsplit(".", 1)[-1]]: dims[0] for m, dims in mods.items()
                  if shape.copies(m) == 1}
        extra += 4 * sum(inputs.values())
    if st.method == "dora":
        extra += s * sum(o for _, o in mods.values())
    return int(base), extra


def loss_chunk_positions(shape: ModelShape, st: Settings) -> int:
    """Positions per loss chunk, as mlx_ft.losses picks them (mlx_ft.chunking)."""
    return chunk_positions(st.loss_chunk, st.batch_size, shape.vocab, st.seq_len)


def estimate(shape: ModelShape, st: Settings) -> Estimate:
    """Predict the peak of mx.get_peak_memory() over a training step with these settings."""
    if st.objective != "sft":
        return _preference(shape, st)
    B, L, V = st.batch_size, st.seq_len, shape.vocab
    n_t = n_adapted(shape, st)
    span = adapted_layers(shape, st)
    notes: list[str] = []

    weights, quant = weight_bytes(shape, st)
    sk = 4 if shape.dtype_bytes >= 4 else 2  # the loss follows the head's (base) dtype
    s = shape.dtype_bytes
    trainable = trainable_params(shape, st)
    if st.method == "full":
        p_bytes = s  # full fine-tuning trains the weights in their own dtype
        adapters = 0
    else:
        p_bytes = 4  # mlx-lm creates LoRA A/B (and DoRA m) in float32
        adapters = trainable * 4
    grads = trainable * p_bytes * (2 if st.grad_accum > 1 else 1)
    opt_states = {"adamw": 2, "adam": 2, "sgd": 0, "adafactor": 0}[st.optimizer]
    optimizer = trainable * p_bytes * opt_states
    if st.optimizer == "adafactor":  # factored second moment: a row and a column vector per matrix
        optimizer = sum((i + o) * shape.copies(m) for layer in span
                        for m, (i, o) in adapted_modules(shape, st, layer).items()) * p_bytes

    # Per adapted block (blocks differ only in a MoE model with dense layers): the largest one sets
    # the one-block working sets, their sum the saved activations.
    toks = [activation_bytes_per_token(shape, st, layer) for layer in span]
    base_tok = max(b for b, _ in toks)
    moe_tok = max(moe_bytes_per_token(shape, layer) for layer in span)
    per_block = B * L * max(b + e for b, e in toks)
    scores = B * shape.heads * L * L * s
    causal_mask = 0 if st.pack else L * L  # the bool mask the unfused attention builds per block
    pack_mask = B * L * L if st.pack else 0  # the explicit [B,1,L,L] mask is one input tensor
    backward = BACKWARD_ACT_FACTOR * B * L * (base_tok - moe_tok) \
        + BACKWARD_SCORE_BYTES[sk] * B * shape.heads * L * L
    if moe_tok:  # the experts' backward runs before the attention's: the larger of the two is alive
        backward = max(backward, MOE_BACKWARD_ACT_FACTOR * B * L * moe_tok)
    if st.grad_checkpointing:
        # Only block inputs stay through the forward pass and the loss; the backward pass
        # recomputes each block (activations and scores) before its backward, the next one early.
        saved = n_t * B * L * shape.hidden * CKPT_SAVED_HIDDEN
        attention = pack_mask
        block_phase = min(n_t, CKPT_RECOMPUTE_BLOCKS) * (per_block + scores + causal_mask) + backward
    else:
        saved = B * L * sum(b + e for b, e in toks)
        attention = n_t * (scores + causal_mask) + pack_mask
        block_phase = backward
    qdora = 0
    if st.method == "dora" and (st.quant_bits or shape.quantized_bits):
        qdora = sum(i * o for layer in span for i, o in adapted_modules(shape, st, layer).values()) * s
    if st.loss_impl == "mlx_lm":
        logits = B * V * L * MLX_LM_LOGITS_COPIES * sk
    elif st.loss_chunk:
        # Fused chunks: what MLX's evaluator holds at once, from the loss graph it runs (several
        # chunks' logits interleaved, and each chunk's dL/dh as a [B, L, hidden] slice update).
        logits, loss_end = schedule.loss_bytes(B, L, loss_chunk_positions(shape, st), V, shape.hidden, sk)
    else:
        logits = B * V * L * LOGITS_FULL_BYTES[sk]
    if st.loss_impl == "mlx_lm" or not st.loss_chunk:
        loss_end = logits  # one piece: its peak is its end
    notes += model_notes(shape, st)
    if shape.is_moe:
        router_frozen = not any(shape.router(m) for layer in span for m in adapted_modules(shape, st, layer))
        if st.grad_checkpointing and router_frozen and (st.quant_bits or shape.quantized_bits):
            # docs/planner.md, MoE rows 60, 69, 70: MLX's tape order, not a tensor the model misses
            notes.append("a quantized MoE with checkpointing and a frozen router measured up to 15 % above "
                         "this estimate on tiny models (MLX's evaluation order; docs/planner.md): keep that "
                         "margin, or check with --probe")
    # The loss runs before the backward pass through the blocks: at the block phase's peak a share of
    # the loss is alive, and a share of the block phase on top of what the loss holds at its end.
    phases = max(logits, loss_end + PHASE_OVERLAP * block_phase, block_phase + PHASE_OVERLAP * logits)
    overlap = phases - logits - block_phase

    breakdown = {
        "weights": weights,
        "quantization overhead": quant,
        "adapters": adapters,
        "gradients": grads,
        "optimizer state": optimizer,
        "activations": int(saved + qdora),
        "attention scores": int(attention),
        "backward working set": int(block_phase),
        "logits and loss": int(logits),
        "loss/backward overlap": int(overlap),
    }
    # After the backward pass the activations are gone, but the optimizer update holds the old and
    # the new weights and moments at once: when that is larger (full fine-tuning, short rows), it
    # is the peak.
    step_peak = sum(breakdown.values())
    update_phase = weights + quant + adapters + grads + optimizer + UPDATE_COPIES * trainable * p_bytes
    breakdown["optimizer update"] = max(0, int(update_phase - step_peak))
    peak = sum(breakdown.values())
    headroom = int(HEADROOM_FIXED + HEADROOM_FRACTION * peak)
    return Estimate(breakdown={k: int(v) for k, v in breakdown.items()}, peak_bytes=int(peak),
                    headroom_bytes=headroom, trainable_params=int(trainable),
                    total_params=shape.total_params(), notes=notes)


def _preference(shape: ModelShape, st: Settings) -> Estimate:
    """A preference step: the SFT step over two rows per example (KTO's second rows run without
    gradient, so this is an upper bound there), plus a full fine-tune's frozen reference copy of the
    trained weights. The reference's forward pass (no gradient) runs before the policy's and is
    smaller than its backward pass, so it adds no term."""
    est = estimate(shape, replace(st, objective="sft", reference="none", batch_size=st.rows))
    if st.reference == "copy":
        copy = trainable_params(shape, st) * shape.dtype_bytes
        est.breakdown = {**est.breakdown, "reference copy": int(copy)}
        est.peak_bytes += int(copy)
        est.headroom_bytes = int(HEADROOM_FIXED + HEADROOM_FRACTION * est.peak_bytes)
    return est


def update_floor(shape: ModelShape, st: Settings) -> int:
    """The formula's peak when the optimizer update is its largest phase (in practice full
    fine-tuning with short rows), else 0. The replayed step measured 13-18 % below real runs there
    (something held between steps that one step's graph does not show; grid rows 72-74), so this is its
    floor."""
    f = estimate(shape, st)
    return f.peak_bytes if f.breakdown.get("optimizer update", 0) else 0
