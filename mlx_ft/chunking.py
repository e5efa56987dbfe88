"""How many positions one chunk of the loss takes: the rule mlx_ft.losses runs and the planner
predicts. Pure Python, so `mlxft plan` can use it on a machine without mlx."""

CHUNK_LOGITS_BYTES = 32 * 2**20
"""Upper bound on one chunk's float32 logits (rows x positions x vocabulary x 4 bytes). MLX
schedules ops ahead of the ones running, so the loss's memory grows with the chunk, not with the
number of chunks: measured on a 128k vocabulary, rows of 1024, batch 2, peak 4.6 GB at 512
positions, 2.2 GB at 64, 1.5 GB at 32 (docs/benchmarks.md). Chunks of 32 to 512 positions took the
same time within noise (same FLOPs; the matmuls stay large)."""
MIN_CHUNK = 16
"""Fewest positions per chunk, whatever the vocabulary and batch."""


def chunk_positions(requested: int, rows: int, vocab: int, positions: int) -> int:
    """Positions per loss chunk for `rows` rows of `positions` positions: the recipe's
    `loss_chunk_size` (`requested`; 0 = the whole row), fewer when one chunk's float32 logits
    would pass CHUNK_LOGITS_BYTES, at most the row."""
    if not requested:
        return positions
    return min(requested, max(MIN_CHUNK, CHUNK_LOGITS_BYTES // (4 * rows * vocab)), positions)
