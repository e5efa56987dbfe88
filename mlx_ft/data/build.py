"""Cold rendering: a data file's records -> a cache entry (or arrays in memory), in parallel.

A file is cut into chunks (JSONL: byte ranges ending at line ends, found while hashing it;
JSON arrays and Parquet: batches of parsed records). Worker processes each read, check and
render whole chunks, and this process writes their results in file order as they arrive, so
memory holds a few chunks, never the file. Workers (`worker.py`) are fresh interpreters that
import only the tokenizer's libraries, and run the very function the serial path runs on the
very same chunks: the arrays are identical, token for token and mask for mask.

Each record gets one row of per-record numbers (`COLUMNS`) and its tokens and mask in the
`sample` group. A record longer than `char_bound(max_seq_len)` characters is not tokenized:
an error naming it under `truncation = "truncate"`, left out (status OVERSIZE) under "drop".
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..recipe import DataConfig
from .formats import check_format, detect, normalise
from .sources import read_jsonl_range, record_batches, where
from .store import Chunk

COLUMNS = {"origin": "int64", "chars": "int64", "status": "uint8", "supervised": "int32",
           "first_sup": "int32", "first_content": "int32"}
"""Per record: its line (row for Parquet); characters of text; RENDERED or OVERSIZE; supervised
tokens; position of the first supervised token and of the first supervised token that is not an
end-of-turn token (the record's length when there is none)."""
RENDERED, OVERSIZE = 0, 1
OVERSIZE_TOKENS, CHARS_PER_TOKEN = 8, 8
"""A record is refused before tokenizing when it holds more than OVERSIZE_TOKENS x max_seq_len
tokens' worth of text, counting a generous CHARS_PER_TOKEN characters per token (English
averages about 4): far more than a sample can keep, and never a legitimate one."""
PARALLEL_MIN_BYTES = 8 << 20
"""Below this much data to render, workers would cost more to start than they save."""
RECORDS_PER_BATCH = 1024  # JSON arrays and Parquet: records per chunk
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 10, 4 << 20  # JSONL: ~16 chunks per worker within these


def char_bound(max_seq_len: int) -> int:
    return OVERSIZE_TOKENS * CHARS_PER_TOKEN * max_seq_len


def oversize_error(where_: str, chars: int, max_seq_len: int) -> DataError:
    return DataError(
        f"{where_}: the record holds {chars:,} characters of text, more than {OVERSIZE_TOKENS} x max_seq_len "
        f"({max_seq_len}) tokens' worth ({char_bound(max_seq_len):,} characters); it is not tokenized. "
        "Split it into smaller records or remove it, or set data.truncation = 'drop' to leave such "
        "records out")


@dataclass(frozen=True)
class Kind:
    """A kind of rendered sample the cache stores, each in entries of its own (`<name>-<key>`,
    the name also a key component): the function that renders a chunk of a file into a
    `store.Chunk` ("module:function", imported by the workers too), its per-record columns
    (every kind has origin, chars and status) and its ragged groups, field -> dtype, where
    "token" is the tokenizer's (uint16 or int32)."""

    name: str
    render: str
    columns: dict[str, str]
    groups: dict[str, dict[str, str]]

    def fields(self, token_dtype) -> dict[str, dict[str, str]]:
        return {g: {f: np.dtype(token_dtype).name if dt == "token" else dt for f, dt in fields.items()}
                for g, fields in self.groups.items()}


SFT = Kind("sft", "mlx_ft.data.build:render_chunk", COLUMNS, {"sample": {"tokens": "token", "mask": "bool"}})
"""One sequence per record: its tokens and its mask of supervised tokens."""


@dataclass(frozen=True)
class FileJob:
    """What every chunk of one file is rendered with."""

    path: str
    kind: str  # jsonl | json | parquet
    cfg: DataConfig
    first_format: str | None  # of the file's first record: every other must agree
    first_where: str | None
    render: str = SFT.render


def render_job(job: FileJob, part: tuple, renderer) -> Chunk:
    """Render one chunk with the job's kind's function."""
    import importlib

    module, name = job.render.split(":")
    return getattr(importlib.import_module(module), name)(job, part, renderer)


def render_chunk(job: FileJob, part: tuple, renderer) -> Chunk:
    """Read, check and render one chunk of a file.

    `part`: ("range", start, end, first_line) of a JSONL file, or ("records", [(line, raw), ...]).
    Raises:
        DataError: naming the first bad record of the chunk.
    """
    cfg, path = job.cfg, Path(job.path)
    raw_records = read_jsonl_range(path, *part[1:]) if part[0] == "range" else part[1]
    bound = char_bound(cfg.max_seq_len)
    origin, chars, status, records, formats = [], [], [], [], set()
    for n, raw in raw_records:
        w = where(path, job.kind, n)
        found = check_format(raw, w, cfg, job.first_format, job.first_where)
        formats.add(found)
        rec = normalise(raw, found, cfg, w)
        size = sum(map(len, rec.strings()))
        if size > bound:
            if cfg.truncation != "drop":
                raise oversize_error(w, size, cfg.max_seq_len)
            status.append(OVERSIZE)
        else:
            status.append(RENDERED)
            records.append(rec)
        origin.append(n)
        chars.append(size)
    rendered = iter(renderer.render_many(records, cfg.train_on)) if records else iter(())
    count = len(origin)
    lengths = np.zeros(count, np.int64)
    supervised, first_sup, first_content = (np.zeros(count, np.int64) for _ in range(3))
    tokens, masks = [], []
    for i in range(count):
        if status[i] != RENDERED:
            continue
        ids, mask = next(rendered)
        n_tok = len(ids)
        content = mask & ~np.isin(ids, renderer.eot_ids)
        lengths[i], supervised[i] = n_tok, int(mask.sum())
        first_sup[i] = int(mask.argmax()) if supervised[i] else n_tok
        first_content[i] = int(content.argmax()) if content.any() else n_tok
        tokens.append(ids)
        masks.append(mask)
    dtype = renderer.token_dtype
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    if len(flat) and flat.max() > np.iinfo(dtype).max:
        raise DataError(f"{path}: token id {flat.max()} does not fit the cache's {np.dtype(dtype).name}; "
                        "this tokenizer's vocabulary is larger than it reports")
    columns = {"origin": np.array(origin, np.int64), "chars": np.array(chars, np.int64),
               "status": np.array(status, np.uint8), "supervised": supervised, "first_sup": first_sup,
               "first_content": first_content}
    values = {"tokens": flat.astype(dtype), "mask": np.concatenate(masks) if masks else np.zeros(0, bool)}
    return Chunk(columns, {"sample": (lengths, values)}, {"formats": sorted(formats)})


def first_format(path: Path, kind: str, cfg: DataConfig) -> tuple[str | None, str | None]:
    """(format, where) of the file's first record, which every other record must agree with;
    (None, None) when it is unusable: rendering its chunk then reports what is wrong."""
    if cfg.format != "auto":
        return cfg.format, None
    first = _first_jsonl_record(path) if kind == "jsonl" else \
        next((b[0] for b in record_batches(path, kind, 1)), None)
    if first is None or not isinstance(first[1], dict):
        return None, None
    return detect(first[1], cfg), where(path, kind, first[0])


def _first_jsonl_record(path: Path) -> tuple[int, object] | None:
    """The first non-blank line of a JSONL file, parsed (None if it does not parse)."""
    import json

    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            text = line.decode("utf-8", "replace").strip().lstrip("\ufeff")
            if text:
                try:
                    return n, json.loads(text)
                except ValueError:
                    return None
    return None


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """`data: rendering 41% of 1.1 GB, 3,412 records/s, 412,000 records, ETA 1m32s` on stderr:
    redrawn on a terminal, a line every 30 s in logs."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled = max(total_bytes, 1), enabled
        self.done = self.records = 0
        self.t0 = self.last = time.perf_counter()
        self.live = enabled and sys.stderr.isatty()

    def update(self, nbytes: int, records: int) -> None:
        self.done += nbytes
        self.records += records
        now = time.perf_counter()
        if self.enabled and (now - self.last >= (0.5 if self.live else 30)):
            self.last = now
            self._show(now, end="\r" if self.live else "\n")

    def _show(self, now: float, end: str) -> None:
        dt = max(now - self.t0, 1e-9)
        eta = (self.total - self.done) * dt / max(self.done, 1)
        print(f"data: rendering {100 * self.done / self.total:3.0f}% of {self.total / 1e9:.2f} GB, "
              f"{self.records / dt:,.0f} records/s, {self.records:,} records, ETA {_clock(eta)}   ",
              end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.records:
            dt = time.perf_counter() - self.t0
            print(f"data: rendered {self.records:,} records ({self.total / 1e9:.2f} GB) in {_clock(dt)}, "
                  f"{self.records / max(dt, 1e-9):,.0f} records/s" + " " * 12, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def parts_of(path: Path, kind: str, chunks: list[tuple[int, int, int]]):
    """The chunks to render: JSONL byte ranges, or batches of parsed records (read here)."""
    if kind == "jsonl":
        for start, end, line in chunks:
            yield "range", start, end, line
        return
    for batch in record_batches(path, kind, RECORDS_PER_BATCH):
        yield "records", batch
