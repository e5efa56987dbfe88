"""Batching: length buckets without packing; with it, rows of several samples and their segments.

A *plan* is the recipe for one batch: a list of rows, each row a list of sample indices.
Without packing every row holds one sample; with packing a row holds as many as fit in
`max_seq_len` tokens. `epoch_batches` gives the plans of one epoch, the same for the same
(seed, epoch), so a resumed run skips the first k plans and sees exactly the same data.

Everything here works on the samples' length array (numpy), never on a Python object per
sample: an epoch of 1M samples is planned in seconds and held as a few arrays (`Plans`), and
`collate` copies only the batch's own tokens out of the (memory-mapped) sample arrays.

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
import heapq
import math
from collections.abc import Sequence
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

    tokens: np.ndarray | list[int]
    mask: np.ndarray | list[bool]
    source: int = 0
    """Index of the `data.train` source it came from."""


class Samples:
    """The samples of one split, as arrays: sample i is `lengths[i]` tokens at `start[i]` of
    store `store[i]`, where a store is a pair of flat arrays (token ids, mask), usually
    memory-mapped from the data cache. A repeated sample (mixing weights) is a repeated index.

    `samples[i]` gives a `Sample` view; `tokens(i)` and `mask(i)` the arrays alone.
    """

    def __init__(self, stores: list, store: np.ndarray, start: np.ndarray, lengths: np.ndarray,
                 source: np.ndarray, supervised: np.ndarray):
        self.stores = stores  # objects with .tokens and .mask flat arrays
        self.store = np.asarray(store, dtype=np.int32)
        self.start = np.asarray(start, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.source = np.asarray(source, dtype=np.int32)
        self.supervised = np.asarray(supervised, dtype=np.int64)
        """Supervised tokens of each sample (its first token never is)."""
        self.memo: dict = {}
        """Plans already computed for these samples (the report's first epoch, reused by the loop)."""

    @classmethod
    def from_list(cls, samples: list[Sample]) -> Samples:
        """Samples held in memory, from a list (small sets built in code, tests)."""
        lengths = np.array([len(s.tokens) for s in samples], dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        masks = [np.asarray(s.mask, dtype=bool) for s in samples]
        tokens = [np.zeros(0, np.int32)] + [np.asarray(s.tokens, dtype=np.int32) for s in samples]
        store = ArrayStore(np.concatenate(tokens), np.concatenate([np.zeros(0, bool)] + masks))
        supervised = np.array([int(m[1:].sum()) for m in masks], dtype=np.int64)
        return cls([store], np.zeros(len(samples), np.int32), start, lengths,
                   np.array([s.source for s in samples], dtype=np.int32), supervised)

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> np.ndarray:
        s = self.start[i]
        return self.stores[self.store[i]].tokens[s:s + self.lengths[i]]

    def mask(self, i: int) -> np.ndarray:
        s = self.start[i]
        return self.stores[self.store[i]].mask[s:s + self.lengths[i]]

    def __getitem__(self, i: int) -> Sample:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = int(i) % len(self)
        return Sample(np.asarray(self.tokens(i)), np.asarray(self.mask(i), dtype=bool), int(self.source[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, idx: np.ndarray) -> Samples:
        """The samples at `idx` (repeats allowed), sharing the stores."""
        return Samples(self.stores, self.store[idx], self.start[idx], self.lengths[idx], self.source[idx],
                       self.supervised[idx])

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        """One set made of several, in order."""
        stores, store = [], []
        for p in parts:
            store.append(p.store + len(stores))
            stores += p.stores
        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, np.int64)

        return Samples(stores, np.concatenate(store) if parts else np.zeros(0, np.int32), cat("start"),
                       cat("lengths"), cat("source"), cat("supervised"))


@dataclass
class ArrayStore:
    """Flat token and mask arrays of many samples (a cache entry's, or built in memory)."""

    tokens: np.ndarray
    mask: np.ndarray
    key: str = ""
    """The cache entry it comes from (what the resume fingerprint names)."""


@dataclass
class Batch:
    tokens: np.ndarray  # int32 [B, L]
    mask: np.ndarray  # bool [B, L], True where tokens[b, i] is a supervised target
    segments: np.ndarray | None  # int32 [B, L]: sample index within the row, -1 for padding; None unpacked
    n_supervised: int
    n_padding: int


class Plans(Sequence):
    """The batches of one epoch as arrays: row r holds samples slots[row_start[r]:row_start[r+1]];
    batch b is rows row_order[batch_start[b]:batch_start[b+1]]. `plans[b]` is that batch's Plan."""

    def __init__(self, slots: np.ndarray, row_start: np.ndarray, row_order: np.ndarray,
                 batch_start: np.ndarray):
        self.slots, self.row_start = slots, row_start  # int64 [samples of the epoch], [rows + 1]
        self.row_order, self.batch_start = row_order, batch_start  # int64 [rows], [batches + 1]

    def __len__(self) -> int:
        return len(self.batch_start) - 1

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[k] for k in range(*b.indices(len(self)))]
        if not -len(self) <= b < len(self):
            raise IndexError(b)
        b %= len(self)
        rows = self.row_order[self.batch_start[b]:self.batch_start[b + 1]]
        return [self.slots[self.row_start[r]:self.row_start[r + 1]].tolist() for r in rows]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def row_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens of each row, in batch order."""
        per_row = np.add.reduceat(lengths[self.slots], self.row_start[:-1]) if len(self.slots) else \
            np.zeros(0, np.int64)
        return per_row[self.row_order]


def sample_lengths(samples) -> np.ndarray:
    """The token count of each sample: of a `Samples`, a list of `Sample`, or a length array."""
    if isinstance(samples, np.ndarray):
        return samples.astype(np.int64, copy=False)
    if isinstance(samples, Samples):
        return samples.lengths
    return np.array([len(s.tokens) for s in samples], dtype=np.int64)


def epoch_batches(samples, batch_size: int, max_seq_len: int, pack: bool, seed: int, epoch: int,
                  shuffle: bool = True) -> Plans:
    """The batch plans of one epoch, deterministic in (seed, epoch); the last batch may be smaller.

    `samples`: a `Samples`, a list of `Sample`, or their length array.
    """
    key = (batch_size, max_seq_len, pack, seed, epoch, shuffle)
    memo = samples.memo if isinstance(samples, Samples) else {}
    if key not in memo:
        memo.clear()  # one epoch at a time: the report's first epoch, then the loop's current one
        memo[key] = _epoch_batches(sample_lengths(samples), *key)
    return memo[key]


def _epoch_batches(lengths: np.ndarray, batch_size: int, max_seq_len: int, pack: bool, seed: int, epoch: int,
                   shuffle: bool) -> Plans:
    rng = np.random.default_rng([seed, epoch])
    if len(lengths) and lengths.max() > max_seq_len:
        raise ValueError(f"a sample of {lengths.max()} tokens exceeds max_seq_len={max_seq_len}; "
                         "load_datasets truncates or drops them")
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if pack:
        slots, row_start = _pack_rows(lengths, order, max_seq_len)
        n_rows = len(row_start) - 1
        row_order = rng.permutation(n_rows) if shuffle else np.arange(n_rows)
        return Plans(slots, row_start, row_order, np.append(np.arange(0, n_rows, batch_size), n_rows))
    key = np.log(np.maximum(lengths, 1)).astype(np.float64)
    if shuffle:
        key = key + rng.uniform(0, LENGTH_JITTER, len(lengths))
    idx = order[np.argsort(key[order], kind="stable")]  # ties keep the shuffled order
    # One sample per row; batches of consecutive rows (the last may be short), then shuffled.
    starts = np.arange(0, len(idx), batch_size)
    sizes = np.diff(np.append(starts, len(idx)))
    batch_order = rng.permutation(len(starts)) if shuffle else np.arange(len(starts))
    batch_start = np.concatenate([[0], np.cumsum(sizes[batch_order])]).astype(np.int64)
    # row j of the epoch is row (j - where its batch starts now) of that batch as sorted
    row_order = np.repeat(starts[batch_order] - batch_start[:-1], sizes[batch_order]) + np.arange(len(idx))
    return Plans(idx.astype(np.int64), np.arange(len(idx) + 1, dtype=np.int64), row_order, batch_start)


def _pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack with two heuristics and keep the one needing fewer rows; returns (slots, row_start).

    Best-fit decreasing is near-optimal on smooth length distributions (0.03% padding on 50k
    lognormal samples) but not on clustered ones: with samples of ~54 and ~89 tokens in rows of
    256 it pairs the long ones (89+89+54 = 232) where 89+3x54 = 251 fits, 13% padding. Filling the
    gap after each row's longest sample exactly (subset sum) gets that case to 2%.

    Both work on the count of samples of each length, not sample by sample: samples of one
    length are interchangeable until they are handed out, so a row that repeats is computed
    once and counted k times, and 1M samples pack in seconds. Which sample fills which slot is
    then decided by the shuffled order alone (see `_assign`).
    """
    bfd = _best_fit_decreasing(lengths, capacity)
    gap = _gap_fill(lengths, capacity)
    return _assign(gap if len(gap.row_size) < len(bfd.row_size) else bfd, lengths, order)


@dataclass
class _Rows:
    """Rows as slot lengths: row r has row_size[r] slots; slots of equal length are filled in
    the order of `seq` (then slot order), with that length's samples in shuffled order
    (`reverse`: from the end of it)."""

    slot_len: np.ndarray
    seq: np.ndarray
    row_size: np.ndarray
    reverse: bool


def _assign(rows: _Rows, lengths: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row shapes -> sample indices, row after row."""
    ordered_len = lengths[order]
    position = np.arange(len(order))
    # samples grouped by length, each group in shuffled order (or its reverse)
    by_len = np.lexsort((-position if rows.reverse else position, ordered_len))
    slot_by_len = np.lexsort((rows.seq, rows.slot_len))  # stable: a placement's slots stay in order
    slots = np.empty(len(rows.slot_len), dtype=np.int64)
    slots[slot_by_len] = order[by_len]
    return slots, np.concatenate([[0], np.cumsum(rows.row_size)]).astype(np.int64)


def _histogram(lengths: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(lengths, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> _Rows:
    """Each sample, longest first, goes into the fullest row it fits in (lowest row on ties).

    With n-token samples and a best row of f free positions, that row takes min(left, f // n)
    of them one after the other: after each it is still the fullest row with room (no row had
    between n and f free). Rows are kept by free space: free -> heap of row ids."""
    rows: list[list[tuple[int, int, int]]] = []  # per row: (length, samples, placement number)
    free_of: dict[int, list[int]] = {}  # free positions -> heap of row ids with that much room
    frees: list[int] = []  # sorted keys of free_of
    seq = 0
    for n, c in sorted(_histogram(lengths).items(), reverse=True):
        while c:
            k = bisect.bisect_left(frees, n)
            if k == len(frees):  # no room anywhere: a new row, of capacity // n samples at most
                take = min(c, capacity // n)
                rows.append([(n, take, seq)])
                _add_free(free_of, frees, capacity - take * n, len(rows) - 1)
            else:
                f = frees[k]
                r = heapq.heappop(free_of[f])
                if not free_of[f]:
                    del free_of[f]
                    frees.pop(k)
                take = min(c, f // n)
                rows[r].append((n, take, seq))
                _add_free(free_of, frees, f - take * n, r)
            c, seq = c - take, seq + 1
    flat = np.array([p for row in rows for p in row], dtype=np.int64).reshape(-1, 3)
    size = np.array([sum(t for _, t, _ in row) for row in rows], dtype=np.int64)
    return _Rows(np.repeat(flat[:, 0], flat[:, 1]), np.repeat(flat[:, 2], flat[:, 1]), size, reverse=False)


def _add_free(free_of: dict[int, list[int]], frees: list[int], f: int, row: int) -> None:
    if f not in free_of:
        free_of[f] = []
        bisect.insort(frees, f)
    heapq.heappush(free_of[f], row)


def _gap_fill(lengths: np.ndarray, capacity: int) -> _Rows:
    """Each row: the longest sample left, then the subset of the rest that fills it most.

    A row depends only on the counts `_fill` looked at, so it repeats while taking it again
    changes none of them: the longest length still has samples, and every length `_fill`
    looked at and takes from still offers min(count, free // n). Computed once, counted k times.
    Samples are handed out from the end of each length's shuffled list."""
    count = _histogram(lengths)
    keys = sorted(count)
    shapes, repeats = [], []
    while keys:
        top = keys[-1]
        _dec(count, keys, top, 1)
        free = capacity - top
        taken, seen = _fill(count, keys, free)
        use = dict(taken)
        use[top] = use.get(top, 0) + 1
        limits = [count.get(top, 0) // use[top]]  # rows after this one that still find `top`
        for n in seen:
            if use.get(n):
                q, c = free // n, count[n]
                limits.append((c - q) // use[n] if c > q else 0)
        k = 1 + min(limits)
        for n, u in use.items():
            _dec(count, keys, n, u * k - (n == top))
        shapes.append([top] + [n for n, t in taken.items() for _ in range(t)])
        repeats.append(k)
    slot_len = np.concatenate([np.tile(np.asarray(s, np.int64), k) for s, k in zip(shapes, repeats)]) \
        if shapes else np.zeros(0, np.int64)
    size = np.repeat(np.array([len(s) for s in shapes], np.int64), repeats)
    return _Rows(slot_len, np.zeros(len(slot_len), np.int64), size, reverse=True)


def _dec(count: dict[int, int], keys: list[int], n: int, by: int) -> None:
    if not by:
        return
    count[n] -= by
    assert count[n] >= 0, "packing took more samples of a length than there are"
    if not count[n]:
        del count[n]
        keys.pop(bisect.bisect_left(keys, n))


def _fill(count: dict[int, int], keys: list[int], free: int) -> tuple[dict[int, int], list[int]]:
    """How many samples of each length fill `free` positions most: bounded subset sum on a
    bitset (bit t set = t positions reachable), copies of a length added in groups 1, 2, 4, ...
    Returns (length -> samples taken, longest first; the lengths looked at)."""
    reach, steps, seen = 1, [], []
    for n in keys:
        if n > free:
            break
        seen.append(n)
        left, group = min(count[n], free // n), 1
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
    return taken, seen


def row_width(samples, plan: Plan, max_seq_len: int, pack: bool) -> int:
    """L, the padded width of the batch `plan`."""
    if pack:
        return max_seq_len
    lengths = sample_lengths(samples)
    longest = max(int(sum(lengths[i] for i in row)) for row in plan)
    return min(max_seq_len, math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(samples, plan: Plan, max_seq_len: int, pack: bool, pad_id: int = 0) -> Batch:
    """Stack the rows of `plan` into right-padded arrays (padding is never a target).

    `samples`: a `Samples` (tokens sliced out of its arrays) or a list of `Sample`."""
    B, L = len(plan), row_width(samples, plan, max_seq_len, pack)
    tokens = np.full((B, L), pad_id, dtype=np.int32)
    mask = np.zeros((B, L), dtype=bool)
    segments = np.full((B, L), -1, dtype=np.int32) if pack else None
    arrays = isinstance(samples, Samples)
    used = 0
    for r, row in enumerate(plan):
        pos = 0
        for k, i in enumerate(row):
            if arrays:
                toks, sup = samples.tokens(i), samples.mask(i)
            else:
                toks, sup = samples[i].tokens, samples[i].mask
            n = len(toks)
            assert pos + n <= L, "plan rows must fit max_seq_len"  # internal invariant of epoch_batches
            tokens[r, pos:pos + n] = toks
            mask[r, pos:pos + n] = sup
            # The first token of a sample cannot be predicted from the sample before it.
            mask[r, pos] = False
            if pack:
                segments[r, pos:pos + n] = k
            pos += n
        used += pos
    return Batch(tokens, mask, segments, int(mask.sum()), B * L - used)


def positions(samples, plans, max_seq_len: int, pack: bool) -> int:
    """Positions the model runs over these batches, padding included (rows x padded width)."""
    if isinstance(plans, Plans):
        rows = plans.row_lengths(sample_lengths(samples))
        if pack:
            return len(rows) * max_seq_len
        starts = plans.batch_start[:-1]
        longest = np.maximum.reduceat(rows, starts) if len(rows) else np.zeros(0, np.int64)
        width = np.minimum(max_seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        return int((width * np.diff(plans.batch_start)).sum())
    return sum(len(p) * row_width(samples, p, max_seq_len, pack) for p in plans)


def padding_fraction(samples, plans, max_seq_len: int, pack: bool) -> float:
    """Share of the positions in these batches that are padding (wasted compute)."""
    total = positions(samples, plans, max_seq_len, pack)
    lengths = sample_lengths(samples)
    if isinstance(plans, Plans):
        real = int(lengths[plans.slots].sum())
    else:
        real = sum(int(lengths[i]) for p in plans for row in p for i in row)
    return 1 - real / total if total else 0.0
