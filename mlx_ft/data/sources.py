"""Where records come from: local files, directories and Hugging Face dataset repos.

A source string is one of
    path/to/train.jsonl | data.json | part.parquet    one file
    path/to/dir                                        its data files (recursively)
    hf://datasets/org/name[@revision][/path][?split=train]
A directory (local or a downloaded repo) holding split-named files (`train.jsonl`,
`data/validation-00000-of-00001.parquet`, `test/…`) contributes only the wanted split: `train` for
`data.train`, `validation` (or valid/val/dev) for `data.valid`; `?split=` picks another one.

Every raw record comes with `where`, the place to name in an error: `file:line` for JSONL and
JSON arrays, `file: row i` for Parquet. Files are read as streams: JSONL by byte ranges (`scan`
cuts a file into chunks at line ends while hashing it, and worker processes read a chunk each),
Parquet a batch of rows at a time; a JSON array is decoded from its whole text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet")
# JSON files that dataset repos and `datasets.save_to_disk` keep next to the data: not records.
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
# Canonical split name for the leading word of a file or folder name.
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "eval": "validation", "test": "test"}


def parse_source(source: str) -> tuple[str, str | None]:
    """Split `?split=NAME` off a source string; returns (source, split or None)."""
    base, sep, query = source.partition("?")
    if not sep:
        return source, None
    key, _, value = query.partition("=")
    if key != "split" or not value:
        raise DataError(f"{source}: unknown query {query!r}; the only one is ?split=NAME, e.g. ?split=train")
    return base, value


def resolve_files(source: str, split: str) -> list[Path]:
    """The data files of one source for `split` ("train" or "validation"), in a stable order."""
    source, explicit = parse_source(source)
    wanted = explicit or split
    if source.startswith("hf://"):
        root, sub = _download_hf(source)
        path = root / sub if sub else root
        shown = source
    else:
        path = Path(source).expanduser()
        shown = source
        if not path.exists():
            raise DataError(f"{source}: no such file or directory (relative to {Path.cwd()}); "
                            "check data.train / data.valid")
    if path.is_file():
        if explicit:
            raise DataError(f"{shown}: ?split= selects files inside a directory or dataset repo, not in one "
                            "file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(EXTENSIONS)
                   and p.name not in METADATA_FILES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{shown}: no {', '.join(EXTENSIONS)} files in this directory")
    return _select_split(files, path, wanted, explicit is not None, shown)


def _split_words(rel: Path) -> list[str]:
    """The split-like word of each path part: `data/train-00000-of-00001.parquet` -> [data, train]."""
    return [re.split(r"[-.]", part.lower())[0] for part in rel.parts]


def _select_split(files: list[Path], root: Path, wanted: str, explicit: bool, shown: str) -> list[Path]:
    words = {f: _split_words(f.relative_to(root)) for f in files}
    found = sorted({SPLIT_ALIASES[w] for ws in words.values() for w in ws if w in SPLIT_ALIASES})
    if not found and not explicit:
        return files  # no split-named files: the whole directory is one split
    canon = SPLIT_ALIASES.get(wanted.lower(), wanted.lower())
    chosen = [f for f, ws in words.items()
              if any(w == wanted.lower() or SPLIT_ALIASES.get(w) == canon for w in ws)]
    if not chosen:
        raise DataError(f"{shown}: no files for split {wanted!r}; splits found: "
                        f"{', '.join(found) or 'none'}. "
                        "Pick one with ?split=NAME or point at a file")
    return chosen


def _download_hf(source: str) -> tuple[Path, str]:
    """Download (or reuse from the huggingface_hub cache) a dataset repo; returns (root, subpath)."""
    m = re.fullmatch(r"hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?", source)
    if not m:
        raise DataError(f"{source}: expected hf://datasets/ORG/NAME[@REVISION][/PATH][?split=NAME]")
    repo, revision, sub = m.group(1), m.group(2), (m.group(3) or "").strip("/")
    from huggingface_hub import snapshot_download

    patterns = ([f"{sub}*", f"{sub}/**"] if sub
                else [f"*{e}" for e in EXTENSIONS] + [f"**/*{e}" for e in EXTENSIONS])
    try:
        root = snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown or gated repo: the user needs the same advice
        raise DataError(f"{source}: cannot get dataset {repo!r} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it once "
                        f"with `hf download --repo-type dataset {repo}` or give a local directory") from None
    root = Path(root)
    if sub and not (root / sub).exists():
        raise DataError(f"{source}: the dataset repo {repo} has no {sub!r}")
    return root, sub


# ----------------------------------------------------------------------------------------------
# Reading files into raw records


def file_kind(path: Path) -> str:
    """`jsonl`, `json` (one JSON array) or `parquet`; a .json file that is not an array is JSONL."""
    if path.name.endswith(".parquet"):
        return "parquet"
    if path.name.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            head = block.lstrip(b"\xef\xbb\xbf \t\r\n")
            if head:
                return "json" if head.startswith(b"[") else "jsonl"
    return "jsonl"


def where(path: Path, kind: str, n: int) -> str:
    """The place to name in an error: `file:line`, or `file: row i` for Parquet."""
    return f"{path}: row {n}" if kind == "parquet" else f"{path}:{n}"


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for every record of a JSONL, JSON-array or Parquet file."""
    kind = file_kind(path)
    if kind == "jsonl":
        for n, raw in read_jsonl_range(path, 0, None, 1):
            yield where(path, kind, n), raw
        return
    for batch in record_batches(path, kind, 1024):
        for n, raw in batch:
            yield where(path, kind, n), raw


def record_batches(path: Path, kind: str, size: int) -> Iterator[list[tuple[int, object]]]:
    """(line or row, record) of a JSON-array or Parquet file, `size` at a time."""
    records = _read_parquet(path) if kind == "parquet" else \
        _read_json_array(path, _decode(path, path.read_bytes()).lstrip("\ufeff"))
    batch = []
    for item in records:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Scan:
    """One pass over a file: its content hash, and for JSONL where to cut it into chunks."""

    content: str
    chunks: list[tuple[int, int, int]]  # (start byte, end byte, line number of the start)


def scan(path: Path, chunk_bytes: int, block: int = 16 << 20) -> Scan:
    """Hash the file (sha256) and, for JSONL, cut it into chunks of about `chunk_bytes` ending
    at line ends, each with the number of its first line."""
    h = hashlib.sha256()
    jsonl = file_kind(path) == "jsonl"
    chunks: list[tuple[int, int, int]] = []
    pos = start = 0  # bytes before this block; where the open chunk starts
    newlines, start_line = 0, 1  # newlines before this block; the open chunk's first line
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
            if jsonl:
                i, counted, seen = max(0, start + chunk_bytes - pos), 0, 0  # seen: newlines in data[:counted]
                while i < len(data):
                    j = data.find(b"\n", i)
                    if j < 0:
                        break
                    seen += data.count(b"\n", counted, j + 1)
                    counted = j + 1
                    chunks.append((start, pos + j + 1, start_line))
                    start, start_line = pos + j + 1, 1 + newlines + seen
                    i = max(j + 1, start + chunk_bytes - pos)
                newlines += data.count(b"\n")
            pos += len(data)
    if jsonl and start < pos:
        chunks.append((start, pos, start_line))
    return Scan(h.hexdigest(), chunks)


def read_jsonl_range(path: Path, start: int, end: int | None,
                     first_line: int) -> Iterator[tuple[int, object]]:
    """(line number, record) of the JSONL lines in bytes [start, end) (end None: to the end)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read() if end is None else f.read(end - start)
    for n, line in enumerate(raw.split(b"\n"), first_line):
        text = _decode(path, line, n).strip().lstrip("\ufeff")  # a BOM some editors write
        if not text:
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None


def _decode(path: Path, raw: bytes, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[:e.start].count(b"\n")
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "re-encode the file as UTF-8") from None


def _read_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """Decode a JSON array element by element, to name each record's line in errors."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end() + 1  # past "["
    while True:
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield line, value
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            n = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{n}: malformed JSON array (expected ',' or ']' after a record)")


def _read_parquet(path: Path) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; install it with "
                        "`pip install pyarrow`") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        i = 0
        for batch in batches:  # a batch at a time: the whole table is never in memory
            for row in batch.to_pylist():
                yield i, _drop_nulls(row)
                i += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None


def _drop_nulls(value):
    """Parquet structs give every key of the schema to every row (None where absent); JSON would
    simply not have the key, and templates test `is defined`."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def missing_sources(recipe) -> list[str]:
    """Problems for every local data source of a recipe that does not exist (data.train, data.valid,
    eval.data), each naming its key and path; hf:// sources are not checked (that needs the hub)."""
    d = recipe.data
    keyed = [("data.train", d.train)] if isinstance(d.train, str) else [(f"data.train[{i}]", s)
                                                                        for i, s in enumerate(d.train)]
    keyed += [(k, s) for k, s in (("data.valid", d.valid), ("eval.data", recipe.eval.data)) if s is not None]
    out = []
    for key, source in keyed:
        path = parse_source(source)[0] if "?" in source else source
        if not source.startswith("hf://") and not Path(path).expanduser().exists():
            out.append(f"{key}: {source} does not exist (recipe paths are relative to the directory mlxft "
                       f"runs in); fix the path or give another with --set {key.split('[')[0]}=PATH")
    return out
