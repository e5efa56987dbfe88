"""Time per epoch: FLOPs per token of the training step over the machine's sustained FLOP/s.

    seconds/epoch = padded tokens/epoch x FLOPs/token / (efficiency x peak FLOP/s)

FLOPs per token (N = matmul parameters a token uses: in a MoE block the router and its top-k experts,
N_span = those of the adapted blocks, L = row length, d_q = heads x head_dim; MLX computes the full
L x L attention when training, no causal halving):

    forward             2 N + 4 L d_q x layers
    backward, inputs    2 N_span + 2 V H (head) + 8 L d_q x adapted layers
    backward, weights   2 N_span (full fine-tuning only; LoRA's own matmuls are negligible)
    checkpointing       + 2 N_span + 4 L d_q x adapted layers (the forward is run again)
    reference           + 2 N + 2 V H + 4 L d_q x layers (preference tuning with the reference
                        computed in the step: a forward pass without gradient; tokens count both
                        sequences of each example)

The chunked loss adds nothing: with a frozen head (every method mlx_ft has) each chunk computes
its logits and dL/dh once, in the forward pass (`mlx_ft.losses._fused_chunk`), which is the
forward and the "backward, inputs" head matmuls above.
"""

from __future__ import annotations

from .configs import ModelShape
from .machines import Machine
from .settings import Settings, n_adapted

EFFICIENCY = 0.40
"""Sustained share of peak GPU FLOP/s: two published MLX LoRA runs decompose to 39% and 44%
(planner-facts §3.9); small models and short rows do worse (per-step overhead dominates)."""
GEMM_EFFICIENCY = 0.80
"""A 16-bit GEMM's share of FP32 peak on an M1-M4 GPU: torch-MPS fp16 on an M4 Max measured 14.8 of
18.4 TFLOP/s (planner-facts §1) [est: one measurement]. With EFFICIENCY it splits a step in two:
the matmuls at this rate take EFFICIENCY / GEMM_EFFICIENCY = half the time, the rest (element-wise
ops, softmax, memory traffic, dispatch) the other half. On a GPU with matrix units (M5) only the
matmul half speeds up."""


def flops_per_token(shape: ModelShape, st: Settings, attn_len: float | None = None) -> float:
    """Training FLOPs per padded token; `attn_len`: the row length attention runs over, when the
    batches are narrower than st.seq_len (the token-weighted mean width of the epoch's batches)."""
    L, n_t = (attn_len or st.seq_len), n_adapted(shape, st)
    # A token goes through its top-k experts only: a MoE block's matmul FLOPs are its active ones.
    blocks = [shape.matmul_params(layer, active=True) for layer in range(shape.layers)]
    head = shape.vocab * shape.hidden
    n_span = sum(blocks[shape.layers - n_t:])
    attn = 4 * L * shape.d_q
    f = 2 * (sum(blocks) + head) + attn * shape.layers  # forward
    f += 2 * n_span + 2 * head + 2 * attn * n_t  # backward to the inputs through the span
    if st.method == "full":
        f += 2 * n_span
    if st.grad_checkpointing:
        f += 2 * n_span + attn * n_t
    if st.reference in ("bypass", "copy"):
        f += 2 * (sum(blocks) + head) + attn * shape.layers
    return float(f)


def seconds_per_epoch(shape: ModelShape, st: Settings, machine: Machine, tokens: int,
                      tflops: float | None = None, matmul_tflops: float | None = None,
                      attn_len: float | None = None) -> float | None:
    """Estimated seconds for `tokens` padded tokens; None when the machine's FLOP/s are unknown.

    Without matrix units: tokens x FLOPs/token / (EFFICIENCY x peak). With them (`matmul_tflops`,
    the M5 family): the matmul half of the step at that rate, the other half as before
    (tokens x FLOPs/token x (1 / matmul rate + (1/EFFICIENCY - 1/GEMM_EFFICIENCY) / peak))."""
    peak = tflops or machine.tflops(shape.dtype)
    if not peak:
        return None
    flops = tokens * flops_per_token(shape, st, attn_len)
    if matmul_tflops:
        return flops / (matmul_tflops * 1e12) + flops * (1 / EFFICIENCY - 1 / GEMM_EFFICIENCY) / (peak * 1e12)
    return flops / (EFFICIENCY * peak * 1e12)


def measure_cpu_tflops(seconds: float = 0.3) -> float:
    """Sustained float32 matmul TFLOP/s of this machine's MLX default device (a quick GEMM loop)."""
    from ..blas import matmul_gflops

    return matmul_gflops(512, seconds) / 1e3
