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
    quant_mode: str = "affine"  # affine | mxfp4 | nvfp4 | mxfp8 (recipe.QUANT_MODES)
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


def quant_of(shape: ModelShape, st: Settings, path: str, module: str = "") -> tuple[int, int, str] | None:
    """(bits, group, mode) the run stores the weight at `path` in, None for float. Quantized on load
    (model.quantize): every Linear/Embedding/SwitchLinear, routers as the model's quant_predicate
    says (8-bit affine, group 64); a pre-quantized checkpoint: as its config says."""
    if st.quant_bits:
        if shape.router(module) and shape.router_bits:
            return shape.router_bits, 64, "affine"
        return st.quant_bits, st.quant_group, st.quant_mode
    return shape.checkpoint_quant(path)


def weight_bytes(shape: ModelShape, st: Settings) -> tuple[int, int]:
    """(weights, quantization scales+biases) in bytes, as mlx-lm stores them.

    A quantized matrix is `bits` per weight plus, per group, a scale and a bias in the model dtype
    (affine) or one 8-bit scale (mxfp4, nvfp4, mxfp8: no bias); a matrix whose input width does
    not divide by the group stays float, as mlx-lm's quantize_model leaves it."""
    s = shape.dtype_bytes
    small = sum(shape.block_small_params(layer) for layer in range(shape.layers)) + shape.hidden
    # (input width, elements, quantization) of every matrix; a SwitchLinear is `experts` of them
    mats = [(i, i * o * shape.copies(m), quant_of(shape, st, f"model.layers.{layer}.{m}", m))
            for layer in range(shape.layers) for m, (i, o) in shape.linears(layer).items()]
    embed = shape.hidden * shape.vocab
    mats.append((shape.hidden, embed, quant_of(shape, st, "model.embed_tokens")))
    if not shape.tied:
        mats.append((shape.hidden, embed, quant_of(shape, st, "lm_head")))
    weights, overhead = small * s, 0.0
    for width, n, q in mats:
        if q is None or width % q[1]:
            weights += n * s
            continue
        bits, group, mode = q
        weights += n * bits / 8
        overhead += n / group * (2 * s if mode == "affine" else 1)
    return int(weights), int(overhead)


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
    if shape.sliding_layers:
        notes.append(f"{shape.sliding_layers} of {shape.layers} blocks use sliding-window attention "
                     f"({shape.sliding_window} tokens), but MLX computes the full L x L scores when "
                     "training: their memory and time are counted as full attention")
    if shape.sinks:
        notes.append("attention sinks: one learned logit per head joins each row's softmax (counted)")
    if not shape.is_moe:
        return notes
    notes.append(f"mixture of experts: {shape.experts} experts, top-{shape.experts_per_tok}; every expert's "
                 f"weights are held, activations and time per epoch count the top-{shape.experts_per_tok} "
                 f"({shape.total_params(active=True) / 1e9:.2f}B of {shape.total_params() / 1e9:.2f}B "
                 "parameters active per token)")
    if shape.model_type not in ("qwen3_moe", "mixtral", "gpt_oss"):
        notes.append(f"{shape.model_type}: modelled like qwen3_moe (routed experts only); shared experts or "
                     "other MoE parts of this architecture are not counted")
    return notes
