"""What the planner reasons about, whichever memory model answers: the training settings that decide
memory, the estimate it returns, the framework headroom, and which blocks and modules are adapted.

Both memory models return an `Estimate`: the replayed graph of the training step
(`planner.replay`, the planner's answer) and the closed-form formula (`planner.formula`, the
fallback where the step cannot be traced, and the search behind the suggestions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .configs import ModelShape

GIB = 2**30

HEADROOM_FIXED = 1 * GIB
"""Outside mx.get_peak_memory(): Python, Metal command buffers, the allocator cache [est]."""
HEADROOM_FRACTION = 0.05
"""... plus this share of the peak for fragmentation and the free-buffer cache [est]."""
STATIC_TERMS = ("weights", "quantization overhead", "adapters", "optimizer state", "batch", "reference copy")
"""Breakdown lines that do not grow with the batch: the probe and the suggestions scale the others."""


@dataclass(frozen=True)
class Settings:
    """The training choices that decide memory (from a recipe or from `mlxft plan` options)."""

    method: str = "lora"  # lora | dora | full
    quant_bits: int | None = None
    quant_group: int = 64
    rank: int = 16
    layers: int | None = None  # adapted blocks, the last N; None = all
    targets: tuple[str, ...] = ("all-linear",)
    batch_size: int = 4
    seq_len: int = 2048
    pack: bool = False
    grad_checkpointing: bool = False
    loss_chunk: int = 512
    optimizer: str = "adamw"
    grad_accum: int = 1
    loss_impl: str = "mlx_ft"
    """`mlx_ft` (chunked float32 cross-entropy) or `mlx_lm` (mlx-lm's default_loss on full logits in
    the model dtype), for comparing with published mlx-lm runs."""
    objective: str = "sft"
    """sft, or a preference objective (dpo, orpo, simpo, kto): each of `batch_size` examples is then
    two sequences of `seq_len + 1` tokens."""
    reference: str = "none"
    """How a preference step gets its reference log-probs: `none` (sft, orpo, simpo), `bypass` (the
    same model with its adapters off, a second forward pass), `copy` (a frozen copy of the trained
    weights: full fine-tuning) or `precomputed` (read from the batch)."""

    @property
    def rows(self) -> int:
        """Token rows per micro-batch: two per example for a preference objective."""
        return self.batch_size * (1 if self.objective == "sft" else 2)


def reference_kind(objective: str, method: str, precompute: bool = False) -> str:
    """`Settings.reference` of an objective trained with `method`."""
    if objective not in ("dpo", "kto"):
        return "none"
    return "precomputed" if precompute else "copy" if method == "full" else "bypass"


@dataclass
class Estimate:
    breakdown: dict[str, int]
    """Term -> bytes, in display order; sums to `peak_bytes` (headroom is separate)."""
    peak_bytes: int
    """Predicted mx.get_peak_memory() during training."""
    headroom_bytes: int
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)
    memory_model: str = "formula"
    """How the peak was found: "formula" (this module) or the replayed graph (planner.replay)."""

    @property
    def required_bytes(self) -> int:
        return self.peak_bytes + self.headroom_bytes


def adapted_modules(shape: ModelShape, st: Settings, layer: int | None = None) -> dict[str, tuple[int, int]]:
    lin = shape.linears(layer)
    if st.method == "full" or "all-linear" in st.targets:
        return lin
    return {k: v for k, v in lin.items() if any(k == t or k.endswith("." + t) for t in st.targets)}


def n_adapted(shape: ModelShape, st: Settings) -> int:
    return shape.layers if st.layers is None else min(st.layers, shape.layers)


def adapted_layers(shape: ModelShape, st: Settings) -> range:
    """Indices of the adapted blocks: the last n_adapted ones."""
    return range(shape.layers - n_adapted(shape, st), shape.layers)


def lora_params(shape: ModelShape, st: Settings, layer: int) -> int:
    """LoRA (+ DoRA magnitude) parameters of one adapted block; a SwitchLinear gets an A and a B
    per expert (mlx-lm's LoRASwitchLinear: lora_a (experts, r, in), lora_b (experts, out, r))."""
    mods = adapted_modules(shape, st, layer)
    n = sum(st.rank * (i + o) * shape.copies(m) for m, (i, o) in mods.items())
    return n + (sum(o for _, o in mods.values()) if st.method == "dora" else 0)


def weight_bytes(shape: ModelShape, st: Settings) -> tuple[int, int]:
    """(weights, quantization scales+biases) in bytes, as mlx-lm stores them."""
    s = shape.dtype_bytes
    bits = st.quant_bits or shape.quantized_bits
    group = st.quant_group if st.quant_bits else (shape.quantized_group_size or 64)
    small = shape.layers * shape.block_small_params() + shape.hidden
    # (last dim, elements, bits, group) of every matrix; a SwitchLinear is `experts` of them
    mats = [(i, i * o * shape.copies(m), *((shape.router_bits, 64) if shape.router(m) and shape.router_bits
                                          else (bits, group)))
            for layer in range(shape.layers) for m, (i, o) in shape.linears(layer).items()]
    mats += [(shape.hidden, shape.hidden * shape.vocab, bits, group)] * (1 if shape.tied else 2)
    if not bits:
        return (sum(n for _, n, _, _ in mats) + small) * s, 0
    # mlx-lm quantizes every Linear/Embedding/SwitchLinear whose last dim divides by the group size;
    # a model's quant_predicate may pick other bits for some (qwen3_moe's router: 8 bits, group 64).
    q = [(n, b, g) for i, n, b, g in mats if i % group == 0]
    dense = sum(n for i, n, _, _ in mats if i % group != 0) + small
    return int(sum(n * b / 8 for n, b, _ in q) + dense * s), int(sum(n / g * 2 * s for n, _, g in q))


def trainable_params(shape: ModelShape, st: Settings) -> int:
    """Parameters the run trains: LoRA/DoRA matrices of the adapted modules, or whole blocks (full)."""
    span = adapted_layers(shape, st)
    if st.method == "full":
        return sum(shape.block_params(layer) for layer in span)
    return sum(lora_params(shape, st, layer) for layer in span)


def model_notes(shape: ModelShape, st: Settings) -> list[str]:
    """What the plan should say about the model itself, whichever memory model gives the peak."""
    notes = []
    if st.method == "dora" and (st.quant_bits or shape.quantized_bits):
        notes.append("QDoRA keeps a dequantized copy of every DoRA layer's weight for the backward pass")
    if not shape.is_moe:
        return notes
    notes.append(f"mixture of experts: {shape.experts} experts, top-{shape.experts_per_tok}; every expert's "
                 f"weights are held, activations and time per epoch count the top-{shape.experts_per_tok} "
                 f"({shape.total_params(active=True) / 1e9:.2f}B of {shape.total_params() / 1e9:.2f}B "
                 "parameters active per token)")
    if shape.model_type not in ("qwen3_moe", "mixtral"):
        notes.append(f"{shape.model_type}: modelled like qwen3_moe (routed experts only); shared experts or "
                     "other MoE parts of this architecture are not counted")
    return notes
