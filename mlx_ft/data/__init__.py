"""Data stage: records (JSONL, JSON, Parquet, HF dataset repos) -> `(tokens, mask)` samples ->
length-bucketed or packed batches.

    splits = load_datasets(recipe, tokenizer)            # Splits(train, valid, stats)
    plans = epoch_batches(splits.train, batch_size, max_seq_len, pack, seed, epoch, shuffle)
    batch = collate(splits.train, plans[k], max_seq_len, pack)

Modules: `sources` (where files come from, reading them), `formats` (detect and check records),
`render` (chat template and exact loss masks), `batching` (buckets, packing, collate),
`dataset` (the pipeline above), `report` (`mlxft data inspect`).
"""

from .batching import Batch, Plan, Sample, collate, epoch_batches, padding_fraction
from .dataset import Splits, load_datasets, recipe_tokenizer, record_texts, valid_records

__all__ = ["Batch", "Plan", "Sample", "Splits", "collate", "epoch_batches", "load_datasets",
           "padding_fraction", "recipe_tokenizer", "record_texts", "valid_records"]
