"""From `[data]` to lists of samples: read every source, carve validation, render, filter, mix.

Order of operations, and why:
1. Read and check every record of every source (a bad record 10,000 lines in still fails now).
2. Carve `valid_fraction` out of each train source with `training.seed`, before rendering and
   mixing, so no validation record also appears (repeated) in training.
3. Render, then apply `max_seq_len` (`truncate` or `drop`); samples left with no supervised
   token (a chat without assistant turns, or one truncated inside its prompt) are dropped too.
4. Mix by `weights`: source i gets round(N * w_i / sum(w)) samples of the N usable ones,
   repeating all of it as often as fits and drawing the rest without replacement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..recipe import DataConfig, Recipe
from .batching import Sample, epoch_batches, padding_fraction, positions
from .formats import Record, read_file
from .render import render
from .sources import resolve_files


@dataclass
class Source:
    """One entry of `data.train` (or `data.valid`) with its records."""

    name: str
    formats: list[str]
    records: list[Record]
    files: int = 0


@dataclass
class Splits:
    train: list[Sample]
    valid: list[Sample] | None
    stats: dict = field(default_factory=dict)


def _sources(cfg: DataConfig) -> list[str]:
    return [cfg.train] if isinstance(cfg.train, str) else list(cfg.train)


def read_source(name: str, cfg: DataConfig, split: str) -> Source:
    """Read and normalise every record of one source."""
    files = resolve_files(name, split)
    formats, records = [], []
    for f in files:
        fmt, recs = read_file(f, cfg)
        formats.append(fmt)
        records += recs
    return Source(name, sorted(set(formats)), records, len(files))


def record_texts(recipe: Recipe) -> list[str]:
    """Every string of the training records (message contents, prompts, completions, texts).

    Needs no tokenizer: it is what the builtin demo tokenizer is trained on.
    """
    return [s for name in _sources(recipe.data) for r in read_source(name, recipe.data, "train").records
            for s in r.strings()]


def load_datasets(recipe: Recipe, tokenizer) -> Splits:
    """Read, check, render and mix the recipe's data into train (and validation) samples.

    Raises:
        DataError: naming the file:line and the fix for any unusable input, or when no usable
            sample is left after filtering.
    """
    cfg, seed = recipe.data, recipe.training.seed
    names = _sources(cfg)
    check_weights(cfg)
    sources = [read_source(n, cfg, "train") for n in names]
    valid_records = split_valid(sources, cfg, seed,
                                lambda: read_source(cfg.valid, cfg, "validation").records)

    per_source, counts = [], []
    for k, src in enumerate(sources):
        samples, c = _render_all(src.records, tokenizer, cfg, k)
        per_source.append(samples)
        counts.append(c)
    usable = sum(len(s) for s in per_source)
    if usable == 0:
        raise DataError("data.train: no usable samples after filtering: " + _explain(counts, cfg))
    mixed = _mix(per_source, cfg.weights, seed) if cfg.weights is not None else [s for ss in per_source for s in ss]

    valid = None
    valid_counts = None
    if valid_records:
        valid, valid_counts = _render_all(valid_records, tokenizer, cfg, -1)
        if not valid:
            where = "data.valid" if cfg.valid is not None else "data.valid_fraction"
            raise DataError(f"{where}: no usable validation samples after filtering: " + _explain([valid_counts], cfg))

    stats = {
        "sources": [{"source": src.name, "format": "+".join(src.formats), "files": src.files, **c,
                     "weight": None if cfg.weights is None else cfg.weights[k],
                     "epoch_samples": sum(1 for s in mixed if s.source == k)}
                    for k, (src, c) in enumerate(zip(sources, counts))],
        "train": _summary(mixed),
        "valid": None if valid is None else {**_summary(valid), **valid_counts},
        "dropped": sum(c["dropped"] for c in counts),
        "truncated": sum(c["truncated"] for c in counts),
        "no_supervised": sum(c["no_supervised"] for c in counts),
        "batching": _batching(mixed, recipe),
    }
    return Splits(mixed, valid, stats)


def check_weights(cfg: DataConfig) -> None:
    """`data.weights`: one positive weight per train source."""
    names = _sources(cfg)
    if cfg.weights is not None:
        if len(cfg.weights) != len(names):
            raise DataError(f"data.weights: {len(cfg.weights)} weights for {len(names)} train sources; "
                            "give one per source")
        for i, w in enumerate(cfg.weights):
            if not w > 0:
                raise DataError(f"data.weights[{i}]: a mixing weight must be > 0, found {w}; "
                                "remove the source instead of weighting it 0")


def split_valid(sources: list[Source], cfg: DataConfig, seed: int, read_valid) -> list:
    """The validation records: `read_valid()` for data.valid, or `valid_fraction` of each train
    source carved out with `seed` (taken out of `sources` in place)."""
    if cfg.valid is not None:
        return read_valid()
    valid_records: list = []
    if cfg.valid_fraction > 0:
        rng = np.random.default_rng(seed)
        for src in sources:
            n_valid = int(round(cfg.valid_fraction * len(src.records))) if len(src.records) > 1 else 0
            held = set(rng.permutation(len(src.records))[:n_valid].tolist())
            valid_records += [r for i, r in enumerate(src.records) if i in held]
            src.records = [r for i, r in enumerate(src.records) if i not in held]
        if not valid_records:
            n = sum(len(s.records) for s in sources)
            raise DataError(f"data.valid_fraction: {cfg.valid_fraction} of {n} records rounds to 0 "
                            "validation records; raise it or give data.valid")
    return valid_records


def _batching(samples: list[Sample], recipe: Recipe) -> dict:
    """Batches, optimizer steps and padding of the first epoch, as the recipe batches them."""
    d, t = recipe.data, recipe.training
    plans = epoch_batches(samples, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, d.shuffle)
    return {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "pack": d.pack,
            "max_seq_len": d.max_seq_len, "batches_per_epoch": len(plans),
            "steps_per_epoch": -(-len(plans) // t.grad_accum),
            "positions": positions(samples, plans, d.max_seq_len, d.pack),
            "padding_fraction": round(padding_fraction(samples, plans, d.max_seq_len, d.pack), 4)}


def _render_all(records: list[Record], tokenizer, cfg: DataConfig, source: int) -> tuple[list[Sample], dict]:
    out, dropped, truncated, empty = [], 0, 0, 0
    for r in records:
        tokens, mask = render(r, tokenizer, cfg.train_on)
        if len(tokens) > cfg.max_seq_len:
            if cfg.truncation == "drop":
                dropped += 1
                continue
            tokens, mask = tokens[:cfg.max_seq_len], mask[:cfg.max_seq_len]
            truncated += 1
        if not any(mask):
            empty += 1  # nothing to learn from; would only cost compute
            continue
        out.append(Sample(tokens, mask, source))
    return out, {"records": len(records), "samples": len(out), "dropped": dropped,
                 "truncated": truncated, "no_supervised": empty}


def _mix(per_source: list[list[Sample]], weights: list[float], seed: int) -> list[Sample]:
    rng = np.random.default_rng([seed, 1])
    total, wsum = sum(len(s) for s in per_source), sum(weights)
    out = []
    for samples, w in zip(per_source, weights):
        if not samples:
            continue
        want = int(round(total * w / wsum))
        whole, rest = divmod(want, len(samples))
        out += samples * whole + [samples[i] for i in sorted(rng.permutation(len(samples))[:rest])]
    return out


def _summary(samples: list[Sample]) -> dict:
    lengths = [len(s.tokens) for s in samples]
    return {"samples": len(samples), "tokens": int(sum(lengths)),
            "supervised_tokens": int(sum(sum(s.mask) for s in samples)),
            "max_len": max(lengths, default=0), "mean_len": round(float(np.mean(lengths)), 1) if lengths else 0.0}


def _explain(counts: list[dict], cfg: DataConfig) -> str:
    c = {k: sum(x[k] for x in counts) for k in ("records", "dropped", "truncated", "no_supervised")}
    parts = [f"{c['records']} records"]
    if c["dropped"]:
        parts.append(f"{c['dropped']} longer than data.max_seq_len={cfg.max_seq_len} were dropped "
                     "(raise max_seq_len or set truncation = 'truncate')")
    if c["no_supervised"]:
        parts.append(f"{c['no_supervised']} had no supervised token under train_on = {cfg.train_on!r} "
                     "(no assistant turn, or truncated before it; check the data or raise max_seq_len)")
    return "; ".join(parts)
