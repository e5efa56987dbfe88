"""Data stage: records (JSONL, JSON, Parquet, HF dataset repos) -> `(tokens, mask)` samples ->
length-bucketed or packed batches.

    splits = load_datasets(recipe, tokenizer)            # Splits(train, valid, stats, fingerprint)
    plans = epoch_batches(splits.train, batch_size, max_seq_len, pack, seed, epoch, shuffle)
    batch = collate(splits.train, plans[k], max_seq_len, pack)

Modules: `sources` (where files come from, reading them), `formats` (detect and check records),
`render` (chat template and exact loss masks), `build` (rendering files in worker processes),
`store` (the tokenized dataset cache), `batching` (samples as arrays, buckets, packing, collate),
`dataset` (the pipeline above), `report` (`mlxft data inspect`).
"""

from .batching import Batch, Plan, Plans, Sample, Samples, collate, epoch_batches, padding_fraction
from .dataset import Splits, load_datasets, recipe_tokenizer, record_texts, valid_records

__all__ = ["Batch", "Plan", "Plans", "Sample", "Samples", "Splits", "collate", "epoch_batches",
           "load_datasets", "padding_fraction", "recipe_tokenizer", "record_texts", "valid_records"]
