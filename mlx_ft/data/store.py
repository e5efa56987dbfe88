"""The tokenized dataset cache: each data file's rendered records as flat arrays on disk.

One entry per (data file content, everything that changes its rendering), a directory

    <cache dir>/sft-<key>/            key: 32 hex digits of a hash of the components below
        meta.json                     what made it, counts, array sizes; written last
        <column>.npy                  one number per record: line, characters, supervised tokens...
        <group>.offsets.npy           int64 [records + 1]: where each record's tokens start
        <group>.<field>.npy           the tokens (uint16 when the vocabulary allows, else int32), mask

Why `.npy`: the arrays are flat numbers read by slicing, which `np.load(mmap_mode="r")` serves
from the page cache without reading anything up front (a 1M-sample entry opens in
milliseconds and costs no memory until a batch touches it); numpy is already a dependency and
an entry can be read with nothing but numpy. Arrow would add a dependency for features the
cache does not use (nested types, compression, a query engine).

The key hashes: the file's content (sha256), mlx_ft's data-format version, the kind of sample,
the tokenizer (its own serialization: vocabulary, merges, pre-tokenizer, special tokens,
end-of-turn ids), the chat template, `train_on`, `format` and the record keys. Not in it: the
file's path (two copies share an entry), `max_seq_len` and `truncation` (an entry keeps every
sample whole; truncation is applied when it is opened), weights, seed and the validation
split (they select records). So changing `max_seq_len` or the mix re-renders nothing.

Writes are atomic: an entry is built in `.sft-<key>.tmp-<pid>-*` and renamed when complete,
its files flushed first, so a crash never leaves anything that looks like an entry. Opening
checks the version and every file's size against meta.json; a damaged entry is rebuilt.

A second kind of sample (preference pairs, say) is stored the same way: its own `kind` prefix
and key, per-record columns, and one ragged group per sequence (`chosen`, `rejected`), each
with its own offsets and fields (`tokens`, `mask`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache import cache_root
from ..errors import DataError

FORMAT_VERSION = 1
"""mlx_ft's data-format version: bump it when rendering or the layout changes, and every
entry written before is left alone (a new key) and listed as stale."""

_ENTRY = re.compile(r"^([a-z]+)-([0-9a-f]{32})$")
_TEMP = re.compile(r"^\.([a-z]+)-([0-9a-f]{32})\.(tmp|old)-(\d+)-[0-9a-f]+$")
_HEADER = 128  # bytes reserved for a streamed .npy header (numpy aligns headers to 64)
STALE_TEMP_SECONDS = 24 * 3600


def default_dir() -> Path:
    """`$MLX_FT_CACHE/data`, else ~/.cache/mlx_ft/data."""
    return cache_root() / "data"


def cache_dir_of(cfg) -> Path:
    """The recipe's `data.cache_dir`, or the default."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_dir()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Entries: open, write


@dataclass
class Group:
    """A ragged array group: record i's values are values[f][offsets[i]:offsets[i + 1]]."""

    offsets: np.ndarray
    values: dict[str, np.ndarray]


@dataclass
class Entry:
    """An opened entry (memory-mapped), or arrays held in memory when the cache is off."""

    path: Path | None
    meta: dict
    columns: dict[str, np.ndarray]
    groups: dict[str, Group]

    @property
    def key(self) -> str:
        return self.meta["key"]

    def __len__(self) -> int:
        return int(self.meta["records"])


class Damaged(Exception):
    """An entry's files do not match its meta.json (or its version is another one)."""


def open_entry(path: Path) -> Entry | None:
    """The entry at `path`, or None when there is none.

    Raises:
        Damaged: meta.json unreadable, another data-format version, a file missing or of the
            wrong size.
    """
    meta_file = path / "meta.json"
    if not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise Damaged(f"meta.json unreadable ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise Damaged(f"written by data-format version {meta.get('format_version')}, this mlx_ft reads "
                      f"{FORMAT_VERSION}")
    for name, size in meta["sizes"].items():
        actual = (path / name).stat().st_size if (path / name).exists() else None
        if actual != size:
            raise Damaged(f"{name} is {'missing' if actual is None else f'{actual} bytes, not {size}'}")
    load = (lambda name: np.load(path / name, mmap_mode="r"))
    try:
        columns = {c: load(f"{c}.npy") for c in meta["columns"]}
        groups = {g: Group(load(f"{g}.offsets.npy"), {f: load(f"{g}.{f}.npy") for f in fields})
                  for g, fields in meta["groups"].items()}
    except (OSError, ValueError) as e:
        raise Damaged(f"unreadable array ({e})") from None
    n = meta["records"]
    if any(len(c) != n for c in columns.values()) or any(
            len(g.offsets) != n + 1 or any(len(v) != g.offsets[-1] for v in g.values.values())
            for g in groups.values()):
        raise Damaged("array lengths disagree with the record count")
    return Entry(path, meta, columns, groups)


@dataclass
class Chunk:
    """Rendered records, in file order: one number per record per column, and per group the
    records' lengths and their values laid end to end."""

    columns: dict[str, np.ndarray]
    groups: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


class _NpyAppender:
    """A 1-D .npy file written as a stream: a placeholder header, the data, then the real header."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * _HEADER)

    def append(self, a: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.n += len(a)

    def close(self) -> int:
        header = np.lib.format.magic(1, 0)
        text = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": (self.n,)})
        text = text.ljust(_HEADER - len(header) - 2 - 1) + "\n"
        self.f.seek(0)
        self.f.write(header + struct.pack("<H", len(text)) + text.encode("latin1"))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return _HEADER + self.n * self.dtype.itemsize


class Writer:
    """Builds one entry from chunks, on disk (`final` a path) or in memory (`final` None).

    On disk it writes under a temporary name next to `final` and renames when `finish` is
    called; `abort` (or any exception in between) removes the temporary directory.
    """

    def __init__(self, final: Path | None, columns: dict[str, str], groups: dict[str, dict[str, str]]):
        self.final, self.columns, self.groups = final, columns, groups
        self.n = 0
        self.tmp = None
        self.parts: dict[str, list[np.ndarray]] = {}
        self.offsets = {g: 0 for g in groups}
        if final is None:
            return
        self.tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        try:
            self.files = {f"{c}.npy": _NpyAppender(self.tmp / f"{c}.npy", dt) for c, dt in columns.items()}
            for g, fields in groups.items():
                self.files[f"{g}.offsets.npy"] = _NpyAppender(self.tmp / f"{g}.offsets.npy", np.int64)
                self.files[f"{g}.offsets.npy"].append(np.zeros(1, np.int64))
                for f, dt in fields.items():
                    self.files[f"{g}.{f}.npy"] = _NpyAppender(self.tmp / f"{g}.{f}.npy", dt)
        except BaseException:
            self.abort()
            raise

    def _put(self, name: str, a: np.ndarray, dtype) -> None:
        if self.tmp is None:
            self.parts.setdefault(name, []).append(np.asarray(a, dtype=dtype))
        else:
            self.files[name].append(a)

    def append(self, chunk: Chunk) -> None:
        for c, dt in self.columns.items():
            self._put(f"{c}.npy", chunk.columns[c], dt)
        for g, fields in self.groups.items():
            lengths, values = chunk.groups[g]
            ends = self.offsets[g] + np.cumsum(lengths, dtype=np.int64)
            self._put(f"{g}.offsets.npy", ends, np.int64)
            self.offsets[g] = int(ends[-1]) if len(ends) else self.offsets[g]
            for f, dt in fields.items():
                self._put(f"{g}.{f}.npy", values[f], dt)
        self.n += len(chunk)

    def finish(self, meta: dict) -> Entry:
        """Complete the entry: in memory, or renamed into place on disk (flushed first)."""
        meta = {**meta, "format_version": FORMAT_VERSION, "records": self.n, "columns": self.columns,
                "groups": self.groups}
        if self.tmp is None:
            cat = {k: np.concatenate(v) for k, v in self.parts.items()}
            zero = np.zeros(1, np.int64)
            columns = {c: cat.get(f"{c}.npy", np.zeros(0, dt)) for c, dt in self.columns.items()}
            groups = {g: Group(np.concatenate([zero, cat.get(f"{g}.offsets.npy", zero[:0])]),
                               {f: cat.get(f"{g}.{f}.npy", np.zeros(0, dt)) for f, dt in fields.items()})
                      for g, fields in self.groups.items()}
            return Entry(None, meta, columns, groups)
        try:
            meta["sizes"] = {name: a.close() for name, a in self.files.items()}
            meta["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.tmp / "meta.json", "w") as f:
                f.write(json.dumps(meta, indent=1))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.tmp)
            _commit(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        self.tmp = None
        entry = open_entry(self.final)
        assert entry is not None
        return entry

    def abort(self) -> None:
        if self.tmp is not None:
            for a in getattr(self, "files", {}).values():
                a.f.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported here (some platforms cannot open a directory)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished entry into place. An entry already there (a damaged one, or one
    too small for this recipe) is moved aside first and removed; readers that still have its
    files open keep reading them."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(final, old)
        except FileNotFoundError:
            old = None
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        # Another process finished the same entry first: the same content, keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(final.parent)


# ----------------------------------------------------------------------------------------------
# Which content a file has: hashed once, then remembered by its stat


def _stat_key(path: Path) -> str:
    st = path.stat()
    # ctime changes on every write and cannot be set back by the user (unlike mtime).
    return digest([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])


def known_content(cache_dir: Path, path: Path) -> str | None:
    """The content hash recorded for this file when its path, size, mtime and ctime are unchanged."""
    try:
        return json.loads((cache_dir / "files" / f"{_stat_key(path)}.json").read_text())["content"]
    except (OSError, ValueError, KeyError):
        return None


def remember_content(cache_dir: Path, path: Path, content: str) -> None:
    """Record the file's content hash under its stat (best effort: a read-only cache just hashes again)."""
    try:
        d = cache_dir / "files"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{secrets.token_hex(8)}.tmp"
        tmp.write_text(json.dumps({"path": str(path.resolve()), "content": content}))
        os.replace(tmp, d / f"{_stat_key(path)}.json")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# What `mlxft data cache --list / --clear` see


def remove_leftovers(cache_dir: Path) -> None:
    """Temporary directories of builds that died (their process is gone, or they are a day old)."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if not m:
            continue
        path = cache_dir / name
        try:
            old = time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS
        except OSError:
            continue
        if old or not _alive(int(m.group(4))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_entries(cache_dir: Path) -> list[dict]:
    """Every entry in `cache_dir`: name, kind, source file, records, bytes, created, state."""
    out = []
    if not cache_dir.is_dir():
        return out
    for path in sorted(cache_dir.iterdir()):
        if not (path.is_dir() and _ENTRY.match(path.name)):
            continue
        row = {"name": path.name, "kind": _ENTRY.match(path.name).group(1), "bytes": _size(path)}
        try:
            meta = json.loads((path / "meta.json").read_text())
            row.update(source=meta.get("source", {}).get("path"), records=meta.get("records"),
                       created=meta.get("created"),
                       state="ok" if meta.get("format_version") == FORMAT_VERSION else
                       f"stale (data-format version {meta.get('format_version')})")
            if row["state"] == "ok":
                open_entry(path)
        except (OSError, ValueError) as e:
            row["state"] = f"damaged ({type(e).__name__})"
        except Damaged as e:
            row["state"] = f"damaged ({e})"
        out.append(row)
    return out


def clear(cache_dir: Path) -> tuple[int, int]:
    """Remove every entry, leftover and file record of mlx_ft's in `cache_dir` (nothing else);
    returns (entries removed, bytes freed)."""
    n = freed = 0
    if not cache_dir.is_dir():
        return 0, 0
    for path in cache_dir.iterdir():
        ours = path.is_dir() and (_ENTRY.match(path.name) or _TEMP.match(path.name))
        if ours:
            freed += _size(path)
            n += bool(_ENTRY.match(path.name))
            shutil.rmtree(path, ignore_errors=True)
    files = cache_dir / "files"
    if files.is_dir():
        for p in files.iterdir():
            if p.suffix in (".json", ".tmp") and p.is_file():
                freed += p.stat().st_size
                p.unlink()
        try:
            files.rmdir()
        except OSError:
            pass
    return n, freed


def writable(cache_dir: Path) -> str | None:
    """None when entries can be written in `cache_dir` (created if needed), else why not."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def write_error(path: Path, e: OSError) -> DataError:
    """The message for a failed cache write (a full disk, most often)."""
    import errno

    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    what = "the disk is full" if full else f"{type(e).__name__}: {e.strerror or e}"
    return DataError(f"data cache: writing {path} failed ({what}); nothing was kept there. Free space, point "
                     "data.cache_dir at another disk, or set data.cache = false to render in memory")
