"""Data stage: records (JSONL, JSON, Parquet, HF dataset repos) -> `(tokens, mask)` samples ->
length-bucketed or packed batches.

    splits = load_datasets(recipe, tokenizer)            # Splits(train, valid, stats, fingerprint)
    plans = epoch_batches(splits.train, batch_size, max_seq_len, pack, seed, epoch, shuffle)
    batch = collate(splits.train, plans[k], max_seq_len, pack)

Modules: `sources` (where files come from, reading them), `formats` (detect and check records),
`render` (chat template and exact loss masks), `build` (rendering files in worker processes),
`store` (the tokenized dataset cache), `batching` (samples as arrays, buckets, packing, collate),
`dataset` (the pipeline above), `preference` (TRL's preference formats: two sequences per
example, for `training.objective` dpo, orpo, simpo and kto), `report` (`mlxft data inspect`).
"""

import numpy as np

from . import batching as _batching, dataset as _dataset, preference as _preference
from .batching import Batch, Plan, Plans, Sample, Samples, padding_fraction
from .dataset import Splits, valid_records
from .preference import Pair, PrefBatch


def load_datasets(recipe, tokenizer, progress: bool = False) -> Splits:
    """Read, check, render and mix the recipe's data into train (and validation) samples: SFT
    samples (through the data cache; `progress` shows a line while rendering what it lacks), or
    preference examples when `training.objective` is not 'sft'.

    Raises:
        DataError: naming the file:line and the fix for any unusable input.
    """
    if recipe.training.objective != "sft":
        return _preference.load_preference(recipe, tokenizer)
    return _dataset.load_datasets(recipe, tokenizer, progress)


def record_texts(recipe) -> list[str]:
    """Every string of the training records; needs no tokenizer: the builtin demo tokenizer is
    trained on it."""
    if recipe.training.objective != "sft":
        return [s for name in _dataset._sources(recipe.data)
                for r in _preference.read_preference_source(name, recipe, "train").records
                for s in r.strings()]
    return _dataset.record_texts(recipe)


def check_records(recipe, tokenizer, first: int = 3) -> str:
    """`mlxft validate --deep`: read and check every record of every source, render the first
    `first` of each; returns what was checked. Raises DataError naming the first bad record."""
    module = _preference if recipe.training.objective != "sft" else _dataset
    return module.check_records(recipe, tokenizer, first)


def recipe_tokenizer(recipe):
    """The recipe's tokenizer (mlx-lm TokenizerWrapper) without loading or downloading weights;
    a `builtin:` model's is trained on the recipe's training texts."""
    from ..hub import load_tokenizer

    return load_tokenizer(recipe.model, texts=lambda: record_texts(recipe))


def _module(samples):
    pairs = isinstance(samples, list) and samples and isinstance(samples[0], Pair)
    return _preference if pairs else _batching


def item_lengths(samples) -> np.ndarray:
    """The length each sample (or preference example: its longer sequence) is batched by."""
    if _module(samples) is _preference:
        return np.array([e.length for e in samples], dtype=np.int64)
    return _batching.sample_lengths(samples)


def item_tokens(samples) -> np.ndarray:
    """The tokens each sample trains on: a preference example's two sequences, prompt included."""
    if _module(samples) is _preference:
        return np.array([2 * len(e.prompt) + len(e.first) + len(e.second) for e in samples], dtype=np.int64)
    return _batching.sample_lengths(samples)


def epoch_batches(samples, batch_size: int, max_seq_len: int, pack: bool, seed: int, epoch: int,
                  shuffle: bool = True) -> Plans | list[Plan]:
    """The batch plans of one epoch (SFT samples, or preference examples: see `preference`)."""
    return _module(samples).epoch_batches(samples, batch_size, max_seq_len, pack, seed, epoch, shuffle)


def collate(samples, plan: Plan, max_seq_len: int, pack: bool, pad_id: int = 0):
    """The arrays of one batch: a `Batch` of SFT samples, a `PrefBatch` of preference examples."""
    return _module(samples).collate(samples, plan, max_seq_len, pack, pad_id)


__all__ = ["Batch", "Pair", "Plan", "Plans", "PrefBatch", "Sample", "Samples", "Splits", "check_records",
           "collate", "epoch_batches", "item_lengths", "item_tokens", "load_datasets", "padding_fraction",
           "recipe_tokenizer", "record_texts", "valid_records"]
