"""From `[data]` to samples: open (or render) every file, carve validation, filter, mix.

Order of operations, and why:
1. Each data file's records are rendered once into the data cache (`store`), keyed by the
   file's content and everything that changes its rendering; later loads open the arrays
   (memory-mapped) instead. A cold file is read, checked and rendered in parallel (`build`):
   a bad record 10,000 lines in still fails, naming its file and line.
2. Carve `valid_fraction` out of each train source with `training.seed`, by record, before
   filtering and mixing, so no validation record also appears (repeated) in training.
3. Apply `max_seq_len` (`truncate` or `drop`); samples left with no supervised token (a chat
   without assistant turns, or one truncated inside its prompt) are left out too, and those
   whose answers are empty (only end-of-turn tokens supervised) are counted: a train split
   that is mostly such samples is refused.
4. Mix by `weights`: source i gets round(N * w_i / sum(w)) samples of the N usable ones,
   repeating all of it as often as fits and drawing the rest without replacement.

Steps 2-4 work on arrays of per-record numbers, so they take well under a second for 1M records.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, MlxFtWarning
from ..recipe import DataConfig, Recipe
from . import build, store
from .worker import Workers, default_workers
from .batching import ArrayStore, Sample, Samples, epoch_batches, padding_fraction, positions
from .formats import Record, file_format, read_file
from .render import Renderer
from .sources import file_kind, resolve_files, scan, where

MOSTLY_EMPTY = 0.5
"""A train split with more than this share of samples that teach nothing (no supervised token,
or only end-of-turn tokens) is refused."""


@dataclass
class Source:
    """One entry of `data.train` (or `data.valid`) with its records."""

    name: str
    formats: list[str]
    records: list[Record]
    files: int = 0


@dataclass
class Splits:
    train: Samples
    valid: Samples | None
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    """Identifies the training samples (the cache keys of their files and which records, how
    long): a resume on other data is refused."""


def _sources(cfg: DataConfig) -> list[str]:
    return [cfg.train] if isinstance(cfg.train, str) else list(cfg.train)


def read_source(name: str, cfg: DataConfig, split: str) -> Source:
    """Read and normalise every record of one source (in memory: for small uses only)."""
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


def check_records(recipe: Recipe, tokenizer, first: int = 3) -> str:
    """`mlxft validate --deep`: read and check every record of every source (train, valid) and
    render the first `first` of each with the tokenizer's chat template. Returns what was checked.

    Raises:
        DataError: naming the file:line of the first record that cannot be read or rendered.
    """
    cfg = recipe.data
    sources = [read_source(n, cfg, "train") for n in _sources(cfg)]
    if cfg.valid is not None:
        sources.append(read_source(cfg.valid, cfg, "validation"))
    renderer = Renderer(tokenizer)
    for src in sources:
        if src.records:
            renderer.render_many(src.records[:first], cfg.train_on)
    records = sum(len(s.records) for s in sources)
    return f"{records} records read in {len(sources)} sources, the first {first} of each rendered"


# ----------------------------------------------------------------------------------------------
# Files -> rendered records (the cache)


@dataclass
class FileRecords:
    """One data file's rendered records: an opened cache entry, or arrays in memory."""

    path: Path
    kind: str
    entry: store.Entry
    hit: bool

    @property
    def format(self) -> str:
        return self.entry.meta["file_format"]

    def samples_store(self) -> ArrayStore:
        g = self.entry.groups["sample"]
        return ArrayStore(g.values["tokens"], g.values["mask"], self.entry.key)


class Files:
    """Opens the rendered records of data files: from the cache when an entry for the file's
    content and these rendering settings exists, else by rendering them (in parallel).

    `kind`: what a record renders to (`build.SFT`: one sequence and its mask); another kind
    (preference pairs) brings its own render function and arrays and is cached alike."""

    def __init__(self, cfg: DataConfig, tokenizer, progress: bool, kind: build.Kind = build.SFT):
        self.cfg, self.progress, self.kind = cfg, progress, kind
        self.renderer = Renderer(tokenizer)
        self.dir = store.cache_dir_of(cfg) if cfg.cache else None
        self.state = "off" if self.dir is None else "ok"
        if self.dir is not None:
            why = store.writable(self.dir)
            if why:
                warnings.warn(f"data cache: cannot write to {self.dir} ({why}); rendering in memory this "
                              "time. Set data.cache_dir to a writable directory, or data.cache = false",
                              MlxFtWarning, stacklevel=3)
                self.state = "unwritable"
            else:
                store.remove_leftovers(self.dir)
        components = {"format_version": store.FORMAT_VERSION, "kind": kind.name,
                      "tokenizer": self.renderer.identity(),
                      "chat_template": store.digest(self.renderer.template()),
                      "train_on": cfg.train_on, "format": cfg.format, "prompt_key": cfg.prompt_key,
                      "completion_key": cfg.completion_key, "text_key": cfg.text_key}
        self.components = components
        self.bound = build.char_bound(cfg.max_seq_len)

    def key(self, content: str) -> str:
        return store.digest({**self.components, "content": content})

    def _entry_path(self, key: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{self.kind.name}-{key}"

    def _open(self, key: str) -> store.Entry | None:
        """The cached entry for `key` if it is whole and holds every record this recipe needs."""
        path = self._entry_path(key)
        if path is None:
            return None
        try:
            entry = store.open_entry(path)
        except (store.Damaged, OSError) as e:
            warnings.warn(f"data cache: {path} is damaged ({e}); rendering its file again", MlxFtWarning,
                          stacklevel=4)
            return None
        small = entry is not None and entry.meta.get("min_oversize_chars") is not None and \
            self.bound >= entry.meta["min_oversize_chars"]
        return None if small else entry  # small: it left out records this max_seq_len keeps

    def open(self, paths: list[Path]) -> dict[Path, FileRecords]:
        out: dict[Path, FileRecords] = {}
        todo = []
        for p in paths:  # warm: path, size, mtime and ctime known -> no need to read the file
            content = store.known_content(self.dir, p) if self.state == "ok" else None
            entry = self._open(self.key(content)) if content else None
            if entry is not None:
                out[p] = FileRecords(p, file_kind(p), entry, True)
            else:
                todo.append(p)
        if not todo:
            return out
        total = sum(p.stat().st_size for p in todo)
        n = default_workers() if self.renderer.portable else 0
        if "MLX_FT_DATA_WORKERS" not in os.environ and total < build.PARALLEL_MIN_BYTES:
            n = 0
        chunk_bytes = int(np.clip(total // (max(n, 1) * 16), build.MIN_CHUNK_BYTES, build.MAX_CHUNK_BYTES))
        workers = Workers(self.renderer, n)
        progress = build.Progress(total, self.progress and total >= build.PARALLEL_MIN_BYTES)
        try:
            for p in todo:
                out[p] = self._render(p, chunk_bytes, workers, progress)
        finally:
            workers.close()
            progress.close()
        return out

    def _render(self, path: Path, chunk_bytes: int, workers: Workers,
                progress: build.Progress) -> FileRecords:
        kind = file_kind(path)
        sc = scan(path, chunk_bytes)
        key = self.key(sc.content)
        if self.state == "ok":
            store.remember_content(self.dir, path, sc.content)
            entry = self._open(key)  # the same content under another name or stat: already rendered
            if entry is not None:
                progress.update(path.stat().st_size, 0)
                return FileRecords(path, kind, entry, True)
        final = self._entry_path(key) if self.state == "ok" else None
        fmt, first_where = build.first_format(path, kind, self.cfg)
        job = build.FileJob(str(path), kind, self.cfg, fmt, first_where, self.kind.render)
        try:
            writer = store.Writer(final, self.kind.columns, self.kind.fields(self.renderer.token_dtype))
        except OSError as e:
            raise store.write_error(final, e) from None
        formats: set[str] = set()
        oversize = None
        try:
            for part, chunk in workers.map(job, build.parts_of(path, kind, sc.chunks)):
                _write(writer.append, chunk, final)
                formats.update(chunk.info["formats"])
                big = chunk.columns["chars"][chunk.columns["status"] == build.OVERSIZE]
                if len(big):
                    oversize = int(big.min()) if oversize is None else min(oversize, int(big.min()))
                progress.update(part[2] - part[1] if part[0] == "range" else 0, len(chunk))
            if kind != "jsonl":
                progress.update(path.stat().st_size, 0)
            if writer.n == 0:
                raise DataError(f"{path}: the file has no records")
            meta = {"key": key, "kind": self.kind.name,
                    "components": {**self.components, "content": sc.content},
                    "source": {"path": str(path.resolve()), "size": path.stat().st_size},
                    "file_format": file_format(fmt, formats), "origin": kind, "min_oversize_chars": oversize}
            entry = _write(writer.finish, meta, final)
        except BaseException:
            writer.abort()
            raise
        return FileRecords(path, kind, entry, False)


def _write(method, arg, final: Path | None):
    """A cache write; a refused one (a full disk) becomes the error that says what to do."""
    try:
        return method(arg)
    except OSError as e:
        raise store.write_error(final, e) from None


# ----------------------------------------------------------------------------------------------
# Rendered records -> samples


@dataclass
class _Records:
    """The records of one source (or split), in order, as arrays; `files` are the FileRecords."""

    files: list[FileRecords]
    file: np.ndarray
    columns: dict[str, np.ndarray]
    start: np.ndarray  # where each record's tokens start in its file's arrays
    length: np.ndarray  # its full rendered length

    @classmethod
    def of(cls, files: list[FileRecords]) -> _Records:
        cols = {c: np.concatenate([np.asarray(f.entry.columns[c]) for f in files]) for c in build.COLUMNS}
        offsets = [np.asarray(f.entry.groups["sample"].offsets) for f in files]
        file = np.concatenate([np.full(len(f.entry), k, np.int32) for k, f in enumerate(files)])
        return cls(files, file, cols, np.concatenate([o[:-1] for o in offsets]),
                   np.concatenate([np.diff(o) for o in offsets]))

    def __len__(self) -> int:
        return len(self.file)

    def take(self, idx: np.ndarray) -> _Records:
        return _Records(self.files, self.file[idx], {c: v[idx] for c, v in self.columns.items()},
                        self.start[idx], self.length[idx])

    def where(self, i: int) -> str:
        f = self.files[self.file[i]]
        return where(f.path, f.kind, int(self.columns["origin"][i]))


def _select(recs: _Records, cfg: DataConfig, source: int) -> tuple[Samples, dict, dict]:
    """The usable samples of these records under max_seq_len and truncation; (samples, counts,
    the first record of each kind of problem)."""
    L, col = cfg.max_seq_len, recs.columns
    oversize = (col["status"] == build.OVERSIZE) | (col["chars"] > build.char_bound(L))
    if cfg.truncation != "drop" and oversize.any():
        i = int(np.flatnonzero(oversize)[0])
        raise build.oversize_error(recs.where(i), int(col["chars"][i]), L)
    dropped = oversize | ((recs.length > L) if cfg.truncation == "drop" else False)
    truncated = ~dropped & (recs.length > L)
    length = np.minimum(recs.length, L)
    no_sup = ~dropped & (col["first_sup"] >= length)
    empty = ~dropped & ~no_sup & (col["first_content"] >= length)
    keep = np.flatnonzero(~dropped & ~no_sup)
    supervised = col["supervised"].astype(np.int64)
    stores = [f.samples_store() for f in recs.files]
    for i in np.flatnonzero(truncated & ~no_sup):  # supervised tokens of the part kept
        supervised[i] = int(np.count_nonzero(stores[recs.file[i]].mask[recs.start[i]:recs.start[i] + L]))
    samples = Samples(stores, recs.file[keep], recs.start[keep], length[keep],
                      np.full(len(keep), source, np.int32), supervised[keep])
    counts = {"records": len(recs), "samples": len(keep), "dropped": int(dropped.sum()),
              "truncated": int(truncated.sum()), "no_supervised": int(no_sup.sum()),
              "empty_answers": int(empty.sum())}
    first = {name: recs.where(int(np.flatnonzero(m)[0]))
             for name, m in (("no_supervised", no_sup), ("empty_answers", empty)) if m.any()}
    return samples, counts, first


def _mix(per_source: list, weights: list[float], seed: int):
    """Mix sources by weight (a list of `Samples`, or of lists of examples in memory)."""
    rng = np.random.default_rng([seed, 1])
    total, wsum = sum(len(s) for s in per_source), sum(weights)
    parts = []
    for samples, w in zip(per_source, weights):
        if not len(samples):
            continue
        want = int(round(total * w / wsum))
        whole, rest = divmod(want, len(samples))
        idx = np.concatenate([np.tile(np.arange(len(samples)), whole),
                              np.sort(rng.permutation(len(samples))[:rest])])
        parts.append(samples.take(idx) if isinstance(samples, Samples) else [samples[i] for i in idx])
    if per_source and isinstance(per_source[0], Samples):
        return Samples.concat(parts)
    return [x for part in parts for x in part]


def load_datasets(recipe: Recipe, tokenizer, progress: bool = False) -> Splits:
    """Open (or render) and mix the recipe's data into train (and validation) samples.

    Args:
        progress: show a progress line while rendering files the cache does not hold.
    Raises:
        DataError: naming the file:line and the fix for any unusable input, when no usable
            sample is left after filtering, or when most of them teach nothing.
    """
    t0 = time.perf_counter()
    cfg, seed = recipe.data, recipe.training.seed
    names = _sources(cfg)
    check_weights(cfg)
    train_files = [resolve_files(n, "train") for n in names]
    valid_files = resolve_files(cfg.valid, "validation") if cfg.valid is not None else []
    files = Files(cfg, tokenizer, progress)
    wanted = list(dict.fromkeys(p for fs in train_files + [valid_files] for p in fs))
    opened = files.open(wanted)
    sources = [_Records.of([opened[p] for p in fs]) for fs in train_files]

    valid_recs = None
    if cfg.valid is not None:
        valid_recs = _Records.of([opened[p] for p in valid_files])
    elif cfg.valid_fraction > 0:
        masks = held_out([len(src) for src in sources], cfg.valid_fraction, seed)
        valid_recs = [(src.take(np.flatnonzero(held)), k)
                      for k, (src, held) in enumerate(zip(sources, masks))]
        sources = [src.take(np.flatnonzero(~held)) for src, held in zip(sources, masks)]

    per_source, counts, firsts = [], [], []
    for k, src in enumerate(sources):
        samples, c, first = _select(src, cfg, k)
        per_source.append(samples)
        counts.append(c)
        firsts.append(first)
    usable = sum(len(s) for s in per_source)
    if usable == 0:
        raise DataError("data.train: no usable samples after filtering: " + _explain(counts, cfg))
    notes = _empty_notes(counts, firsts, cfg)
    mixed = _mix(per_source, cfg.weights, seed) if cfg.weights is not None else Samples.concat(per_source)

    valid, valid_counts = None, None
    if valid_recs is not None:
        parts = valid_recs if isinstance(valid_recs, list) else [(valid_recs, -1)]
        selected = [_select(r, cfg, -1) for r, _ in parts]
        valid = Samples.concat([s for s, _, _ in selected])
        valid_counts = {k: sum(c[k] for _, c, _ in selected) for k in selected[0][1]}
        if not len(valid):
            where_ = "data.valid" if cfg.valid is not None else "data.valid_fraction"
            raise DataError(f"{where_}: no usable validation samples after filtering: "
                            + _explain([valid_counts], cfg))

    hits = sum(f.hit for f in opened.values())
    stats = {
        "sources": [{"source": name, "format": "+".join(sorted({opened[p].format for p in fs})),
                     "files": len(fs), **c, "weight": None if cfg.weights is None else cfg.weights[k],
                     "epoch_samples": int((mixed.source == k).sum())}
                    for k, (name, fs, c) in enumerate(zip(names, train_files, counts))],
        "train": _summary(mixed),
        "valid": None if valid is None else {**_summary(valid), **valid_counts},
        "dropped": sum(c["dropped"] for c in counts),
        "truncated": sum(c["truncated"] for c in counts),
        "no_supervised": sum(c["no_supervised"] for c in counts),
        "empty_answers": sum(c["empty_answers"] for c in counts),
        "notes": notes,
        "batching": _batching(mixed, recipe),
        "cache": _cache_state(files.state, hits, len(opened)),
        "cache_dir": None if files.dir is None else str(files.dir),
        "cache_entries": sorted({str(f.entry.path) for f in opened.values() if f.entry.path is not None}),
    }
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return Splits(mixed, valid, stats, _fingerprint(mixed))


def valid_records(recipe: Recipe) -> list[Record]:
    """The validation records exactly as `load_datasets` takes them: `data.valid`, or the
    `valid_fraction` carved out of each train source with `training.seed`; [] when neither is set.
    What `mlxft eval` scores by default."""
    cfg = recipe.data
    if cfg.valid is None and cfg.valid_fraction <= 0:
        return []
    sources = [] if cfg.valid is not None else [read_source(n, cfg, "train") for n in _sources(cfg)]
    return split_valid(sources, cfg, recipe.training.seed,
                       lambda: read_source(cfg.valid, cfg, "validation").records)


def _cache_state(state: str, hits: int, n: int) -> str:
    if state != "ok":
        return state  # off | unwritable
    return "hit" if hits == n else "miss" if hits == 0 else f"partial ({hits} of {n} files)"


def _empty_notes(counts: list[dict], firsts: list[dict], cfg: DataConfig) -> list[str]:
    """Say how many train samples teach nothing, and where the first is; refuse when most do."""
    n_none = sum(c["no_supervised"] for c in counts)
    n_empty = sum(c["empty_answers"] for c in counts)
    first = {k: next((f[k] for f in firsts if k in f), None) for k in ("no_supervised", "empty_answers")}
    parts = []
    if n_none:
        parts.append(f"{n_none} without any supervised token (first at {first['no_supervised']}), left out")
    if n_empty:
        parts.append(f"{n_empty} whose assistant answers are empty, so only their end-of-turn token is "
                     f"supervised (first at {first['empty_answers']})")
    rendered = sum(c["records"] - c["dropped"] for c in counts)
    if rendered and (n_none + n_empty) > MOSTLY_EMPTY * rendered:
        what = "every assistant turn" if cfg.train_on == "assistant" else "the " + cfg.train_on
        raise DataError(f"data.train: {n_none + n_empty} of {rendered} records teach nothing: "
                        + "; ".join(parts) + f". Check the data (train_on = {cfg.train_on!r} supervises "
                        f"{what}) and data.max_seq_len ({cfg.max_seq_len})")
    if parts:
        note = "data.train: " + "; ".join(parts)
        warnings.warn(note, MlxFtWarning, stacklevel=3)
        return [note]
    return []


def _fingerprint(samples: Samples) -> str:
    """Which samples, of which cached files, how long: a resume on other data is refused."""
    h = hashlib.sha256()
    h.update(json.dumps([s.key for s in samples.stores]).encode())
    for a in (samples.store, samples.start, samples.lengths):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return "v2:" + h.hexdigest()[:16]


def legacy_fingerprint(samples: Samples) -> str:
    """The fingerprint checkpoints of mlx_ft before the data cache recorded (a hash of every
    sample's token and mask lists), so their runs still resume."""
    h = hashlib.sha256()
    for i in range(len(samples)):
        h.update(bytes(str(samples.tokens(i).tolist()), "ascii"))
        h.update(bytes(str(np.asarray(samples.mask(i), dtype=bool).tolist()), "ascii"))
    return h.hexdigest()[:16]


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
    """The validation records of records read in memory (`mlxft eval`, preference data):
    `read_valid()` for data.valid, or `valid_fraction` of each train source carved out with `seed`
    (taken out of `sources` in place), as `load_datasets` carves its arrays."""
    if cfg.valid is not None:
        return read_valid()
    valid_records: list = []
    if cfg.valid_fraction > 0:
        masks = held_out([len(src.records) for src in sources], cfg.valid_fraction, seed)
        for src, held in zip(sources, masks):
            valid_records += [r for r, h in zip(src.records, held) if h]
            src.records = [r for r, h in zip(src.records, held) if not h]
    return valid_records


def held_out(sizes: list[int], fraction: float, seed: int) -> list[np.ndarray]:
    """Which records of each train source (of `sizes` records) `data.valid_fraction` holds out with
    `training.seed`: round(fraction * n) of each source of more than one record, drawn in source
    order from one generator. The one rule for the cached arrays, records in memory and `mlxft eval`.

    Raises:
        DataError: when that is no record at all.
    """
    rng, masks = np.random.default_rng(seed), []
    for n in sizes:
        held = np.zeros(n, bool)
        held[rng.permutation(n)[:int(round(fraction * n)) if n > 1 else 0]] = True
        masks.append(held)
    if not any(m.any() for m in masks):
        raise DataError(f"data.valid_fraction: {fraction} of {sum(sizes)} records rounds to 0 validation "
                        "records; raise it or give data.valid")
    return masks


def _batching(samples: Samples, recipe: Recipe) -> dict:
    """Batches, optimizer steps and padding of the first epoch, as the recipe batches them."""
    d, t = recipe.data, recipe.training
    plans = epoch_batches(samples, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, d.shuffle)
    return {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "pack": d.pack,
            "max_seq_len": d.max_seq_len, "batches_per_epoch": len(plans),
            "steps_per_epoch": -(-len(plans) // t.grad_accum),
            "positions": positions(samples, plans, d.max_seq_len, d.pack),
            "padding_fraction": round(padding_fraction(samples, plans, d.max_seq_len, d.pack), 4)}


def render_records(records: list[Record], tokenizer, cfg: DataConfig) -> list[Sample]:
    """The usable samples of `records` (a small set in memory: `mlxft eval`), rendered, truncated
    and filtered as training does."""
    out = []
    for tokens, mask in Renderer(tokenizer).render_many(records, cfg.train_on) if records else []:
        if len(tokens) > cfg.max_seq_len:
            if cfg.truncation == "drop":
                continue
            tokens, mask = tokens[:cfg.max_seq_len], mask[:cfg.max_seq_len]
        if mask.any():  # nothing to learn from otherwise
            out.append(Sample(tokens, mask, -1))
    return out


def _summary(samples: Samples) -> dict:
    n = len(samples)
    return {"samples": n, "tokens": int(samples.lengths.sum()),
            "supervised_tokens": int(samples.supervised.sum()),
            "max_len": int(samples.lengths.max()) if n else 0,
            "mean_len": round(float(samples.lengths.mean()), 1) if n else 0.0}


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
