"""Batching: length buckets without packing; with it, rows of several samples and their segments.

A *plan* is the recipe for one batch: a list of rows, each row a list of sample indices.
Without packing every row holds one sample; with packing a row holds as many as fit in
`max_seq_len` tokens. `epoch_batches` gives the plans of one epoch, the same list for the same
(seed, epoch), so a resumed run skips the first k plans and sees exactly the same data.

Packing example (max_seq_len 8, samples a = 3 tokens, b = 4 tokens; `.` = padding)::

    tokens   = [a0 a1 a2 b0 b1 b2 b3 .]
    segments = [ 0  0  0  1  1  1  1 -1]
    mask     = [ F  ?  ?  F  ?  ?  ?  F]    a sample's first token is never a target

The loss builds a block-diagonal causal attention mask from `segments`, so b0..b3 attend only to
b. Positions run on continuously along the row (b0 is at position 3), which is harmless: RoPE
makes attention depend on the relative offset between query and key only, and within the
isolated block those offsets are the same as if b started at position 0.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

# Unpacked batches are padded to a multiple of this many positions, so a compiled step sees few
# distinct shapes; packed rows are always max_seq_len wide.
PAD_MULTIPLE = 8
# Buckets sort samples by log-length plus uniform noise of this width, so each epoch groups
# samples within ~5% of each other's length differently. Measured on lognormal lengths (median
# 100, batch 8): padding 5.6% with it, 4.6% with an exact sort, ~11% with sorting inside windows
# of 64 batches (the usual "megabatch" approach), ~60% with random batches.
LENGTH_JITTER = 0.05

Plan = list[list[int]]


@dataclass
class Sample:
    """One rendered sample. `mask[i]` True: token i is a supervised target."""

    tokens: list[int]
    mask: list[bool]
    source: int = 0
    """Index of the `data.train` source it came from."""


@dataclass
class Batch:
    tokens: np.ndarray  # int32 [B, L]
    mask: np.ndarray  # bool [B, L], True where tokens[b, i] is a supervised target
    segments: np.ndarray | None  # int32 [B, L]: sample index within the row, -1 for padding; None unpacked
    n_supervised: int
    n_padding: int


def epoch_batches(samples: list[Sample], batch_size: int, max_seq_len: int, pack: bool,
                  seed: int, epoch: int, shuffle: bool = True) -> list[Plan]:
    """The batch plans of one epoch, deterministic in (seed, epoch); the last batch may be smaller."""
    lengths = np.array([len(s.tokens) for s in samples], dtype=np.int64)
    return epoch_plans(lengths, batch_size, max_seq_len, pack, seed, epoch, shuffle)


def epoch_plans(lengths: np.ndarray, batch_size: int, max_seq_len: int, pack: bool,
                seed: int, epoch: int, shuffle: bool = True) -> list[Plan]:
    """`epoch_batches` from the items' lengths alone (preference pairs batch by their longer side)."""
    rng = np.random.default_rng([seed, epoch])
    if len(lengths) and lengths.max() > max_seq_len:
        raise ValueError(f"a sample of {lengths.max()} tokens exceeds max_seq_len={max_seq_len}; "
                         "load_datasets truncates or drops them")
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if pack:
        rows = _pack_rows(lengths, order, max_seq_len)
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    key = np.log(np.maximum(lengths, 1)).astype(np.float64)
    if shuffle:
        key = key + rng.uniform(0, LENGTH_JITTER, len(lengths))
    idx = order[np.argsort(key[order], kind="stable")]  # ties keep the shuffled order
    batches = [[[int(i)] for i in idx[b:b + batch_size]] for b in range(0, len(idx), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack with two heuristics and keep the one needing fewer rows.

    Best-fit decreasing is near-optimal on smooth length distributions (0.03% padding on 50k
    lognormal samples) but not on clustered ones: with samples of ~54 and ~89 tokens in rows of
    256 it pairs the long ones (89+89+54 = 232) where 89+3x54 = 251 fits, 13% padding. Filling the
    gap after each row's longest sample exactly (subset sum) gets that case to 2%.
    """
    bfd = _best_fit_decreasing(lengths, order, capacity)
    gap = _gap_fill(lengths, order, capacity)
    return gap if len(gap) < len(bfd) else bfd


def _best_fit_decreasing(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Each sample, longest first, goes into the fullest row it fits in."""
    by_length = sorted(order.tolist(), key=lambda i: -lengths[i])  # stable: ties stay shuffled
    space: list[tuple[int, int]] = []  # (free positions, row id), sorted
    rows: list[list[int]] = []
    for i in by_length:
        n = int(lengths[i])
        k = bisect.bisect_left(space, (n, -1))
        if k == len(space):
            rows.append([i])
            bisect.insort(space, (capacity - n, len(rows) - 1))
        else:
            free, r = space.pop(k)
            rows[r].append(i)
            bisect.insort(space, (free - n, r))
    return rows


def _gap_fill(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Each row: the longest sample left, then the subset of the rest that fills it most."""
    pool: dict[int, list[int]] = {}  # length -> samples of that length, in shuffled order
    for i in order.tolist():
        pool.setdefault(int(lengths[i]), []).append(i)
    rows = []
    while pool:
        top = max(pool)
        row = [_take(pool, top)]
        for n, k in _fill(pool, capacity - top).items():
            row += [_take(pool, n) for _ in range(k)]
        rows.append(row)
    return rows


def _take(pool: dict[int, list[int]], n: int) -> int:
    i = pool[n].pop()
    if not pool[n]:
        del pool[n]
    return i


def _fill(pool: dict[int, list[int]], free: int) -> dict[int, int]:
    """How many samples of each length fill `free` positions most: bounded subset sum on a
    bitset (bit t set = t positions reachable), copies of a length added in groups 1, 2, 4, ..."""
    reach, steps = 1, []
    for n in sorted(pool):
        if n > free:
            break
        left, group = min(len(pool[n]), free // n), 1
        while left:
            k = min(group, left)
            steps.append((n, k, reach))
            reach = (reach | reach << (n * k)) & ((1 << (free + 1)) - 1)
            left, group = left - k, group * 2
        if reach >> free & 1:
            break  # the row is full
    total, taken = reach.bit_length() - 1, {}
    for n, k, before in reversed(steps):  # walk back: a step was used if `total` needed it
        if not before >> total & 1:
            total -= n * k
            taken[n] = taken.get(n, 0) + k
    return taken


def row_width(samples: list[Sample], plan: Plan, max_seq_len: int, pack: bool) -> int:
    """L, the padded width of the batch `plan`."""
    if pack:
        return max_seq_len
    longest = max(sum(len(samples[i].tokens) for i in row) for row in plan)
    return min(max_seq_len, math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(samples: list[Sample], plan: Plan, max_seq_len: int, pack: bool, pad_id: int = 0) -> Batch:
    """Stack the rows of `plan` into right-padded arrays (padding is never a target)."""
    B, L = len(plan), row_width(samples, plan, max_seq_len, pack)
    tokens = np.full((B, L), pad_id, dtype=np.int32)
    mask = np.zeros((B, L), dtype=bool)
    segments = np.full((B, L), -1, dtype=np.int32) if pack else None
    used = 0
    for r, row in enumerate(plan):
        pos = 0
        for k, i in enumerate(row):
            s = samples[i]
            n = len(s.tokens)
            assert pos + n <= L, "plan rows must fit max_seq_len"  # internal invariant of epoch_batches
            tokens[r, pos:pos + n] = s.tokens
            mask[r, pos:pos + n] = s.mask
            # The first token of a sample cannot be predicted from the sample before it.
            mask[r, pos] = False
            if pack:
                segments[r, pos:pos + n] = k
            pos += n
        used += pos
    return Batch(tokens, mask, segments, int(mask.sum()), B * L - used)


def positions(samples: list[Sample], plans: list[Plan], max_seq_len: int, pack: bool) -> int:
    """Positions the model runs over these batches, padding included (rows x padded width)."""
    return sum(len(p) * row_width(samples, p, max_seq_len, pack) for p in plans)


def padding_fraction(samples: list[Sample], plans: list[Plan], max_seq_len: int, pack: bool) -> float:
    """Share of the positions in these batches that are padding (wasted compute)."""
    total = positions(samples, plans, max_seq_len, pack)
    real = sum(len(samples[i].tokens) for p in plans for row in p for i in row)
    return 1 - real / total if total else 0.0
