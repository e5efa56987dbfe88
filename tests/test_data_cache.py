"""The tokenized dataset cache and parallel rendering: cached == uncached, parallel == serial,
invalidation by each key component, crashes and bad caches, empty and oversized records."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.data import epoch_batches, load_datasets
from mlx_ft.data import build, store
from mlx_ft.data.sources import read_records, read_jsonl_range, scan
from mlx_ft.errors import DataError
from mlx_ft.recipe import recipe_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from conftest import chat_corpus  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from mlx_lm.tokenizer_utils import load

    return load(tiny_model_dir)


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def recipe(train, cache_dir, seed=0, **data):
    return recipe_from_dict({"model": {"path": "unused"}, "training": {"seed": seed, "batch_size": 3},
                             "data": {"train": train, "cache_dir": str(cache_dir), **data}})


def assert_same(a, b, pack=False):
    """Same samples (tokens, masks, sources), same batches of an epoch, same counts."""
    L = a.stats["batching"]["max_seq_len"]
    assert (a.valid is None) == (b.valid is None)
    for x, y in [(a.train, b.train)] + ([(a.valid, b.valid)] if a.valid is not None else []):
        assert len(x) == len(y)
        assert all(np.array_equal(s.tokens, t.tokens) and np.array_equal(s.mask, t.mask)
                   and s.source == t.source for s, t in zip(x, y))
    assert list(epoch_batches(a.train, 3, L, pack, 5, 1)) == list(epoch_batches(b.train, 3, L, pack, 5, 1))
    skip = {"cache", "cache_dir", "cache_entries", "seconds"}
    assert {k: v for k, v in a.stats.items() if k not in skip} == \
        {k: v for k, v in b.stats.items() if k not in skip}


def test_cached_equals_uncached_and_opens_warm(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", chat_corpus(40, seed=1))
    b = write(tmp_path / "b.jsonl", chat_corpus(20, seed=2))
    r = recipe([str(a), str(b)], tmp_path / "cache", weights=[1.0, 2.0], valid_fraction=0.1, pack=True)
    cold, warm = load_datasets(r, tok), load_datasets(r, tok)
    d = r.to_dict()
    off = load_datasets(recipe_from_dict({**d, "data": {**d["data"], "cache": False}}), tok)
    assert (cold.stats["cache"], warm.stats["cache"], off.stats["cache"]) == ("miss", "hit", "off")
    assert len(cold.stats["cache_entries"]) == 2 and off.stats["cache_entries"] == []
    assert_same(cold, warm, pack=True)
    assert_same(cold, off, pack=True)
    assert cold.fingerprint == warm.fingerprint == off.fingerprint
    assert isinstance(warm.train.stores[0].tokens, np.memmap)  # opened, not read
    # The entries are plain .npy files anyone can read.
    entry = Path(cold.stats["cache_entries"][0])
    assert np.load(entry / "sample.tokens.npy").dtype == np.uint16  # a 512-token vocabulary
    assert json.loads((entry / "meta.json").read_text())["records"] in (40, 20)


def test_parallel_rendering_equals_serial(tmp_path, tok, monkeypatch):
    """Worker processes render the same chunks as this process: equal token for token. The
    files span several chunks, and hold tools, multi-turn chats, a JSON array and Parquet."""
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(build, "MIN_CHUNK_BYTES", 2048)  # small files, several chunks each
    monkeypatch.setattr(build, "RECORDS_PER_BATCH", 16)
    recs = chat_corpus(300, seed=3)
    for i in range(0, len(recs), 7):
        recs[i] = {**recs[i], "tools": TOOLS}
    big = write(tmp_path / "big.jsonl", recs)
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)], indent=1))
    pq.write_table(pa.Table.from_pylist(chat_corpus(30, seed=4)), tmp_path / "t.parquet")
    r = recipe([str(big), str(arr), str(tmp_path / "t.parquet")], tmp_path / "c", cache=False)
    monkeypatch.setenv("MLX_FT_DATA_WORKERS", "0")
    serial = load_datasets(r, tok)
    monkeypatch.setenv("MLX_FT_DATA_WORKERS", "2")
    parallel = load_datasets(r, tok)
    assert_same(serial, parallel)
    assert [s["format"] for s in parallel.stats["sources"]] == ["tools", "completions", "chat"]
    # A bad record deep in a file is still named by file and line.
    lines = big.read_text().splitlines()
    lines[234] = '{"messages": [{"role": "robot", "content": "x"}]}'
    big.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("MLX_FT_DATA_WORKERS", "1")
    with pytest.raises(DataError, match=rf"{big}:235: messages\[0\]: unknown role 'robot'"):
        load_datasets(recipe(str(big), tmp_path / "c", cache=False), tok)


def test_chunks_cover_every_line_once(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\n{"text": "b"}\n' + b''.join(
        b'{"text": "%d"}\n' % i for i in range(200)) + b'{"text": "last, no newline"}')
    whole = list(read_records(f))
    sc = scan(f, chunk_bytes=50)
    assert len(sc.chunks) > 20 and sc.content == __import__("hashlib").sha256(f.read_bytes()).hexdigest()
    pieces = [(f"{f}:{n}", raw) for s, e, first in sc.chunks for n, raw in read_jsonl_range(f, s, e, first)]
    assert pieces == whole and whole[1][0] == f"{f}:3" and len(whole) == 203


def _change_content(f, tok, r):
    f.write_text(f.read_text().replace("item 3?", "item 4?"))
    return r, tok


def _same_size_same_mtime(f, tok, r):
    st = f.stat()
    f.write_text(f.read_text().replace("item 3?", "item 4?"))  # the same number of bytes
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: ctime still tells
    assert f.stat().st_size == st.st_size
    return r, tok


def _tokenizer(f, tok, r):
    from mlx_lm.tokenizer_utils import load

    other = load(Path(tok._tokenizer.name_or_path))
    other._tokenizer.add_tokens(["colour"])
    return r, other


def _template(f, tok, r):
    from mlx_lm.tokenizer_utils import load

    other = load(Path(tok._tokenizer.name_or_path))
    other._tokenizer.chat_template = other._tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return r, other


def _data(**kw):
    def change(f, tok, r):
        d = r.to_dict()
        return recipe_from_dict({**d, "data": {**d["data"], **kw}}), tok
    return change


def _version(f, tok, r, monkeypatch=None):
    return r, tok


@pytest.mark.parametrize("change, state", [
    (_change_content, "miss"),
    (_same_size_same_mtime, "miss"),
    (_tokenizer, "miss"),
    (_template, "miss"),
    (_data(train_on="last"), "miss"),
    (_data(format="chat"), "miss"),
    (_data(prompt_key="question"), "miss"),
    (_version, "miss"),
    # Not in the key: applied to the cached arrays when they are opened.
    (_data(max_seq_len=40), "hit"),
    (_data(max_seq_len=40, truncation="drop"), "hit"),
    (_data(valid_fraction=0.2), "hit"),
], ids=["content", "content-same-size-and-mtime", "tokenizer", "chat-template", "train_on", "format",
        "format-keys", "format-version", "max_seq_len", "truncation", "valid-split"])
def test_each_key_component_invalidates(tmp_path, tok, monkeypatch, change, state):
    f = write(tmp_path / "d.jsonl", chat_corpus(24, seed=5))
    r = recipe(str(f), tmp_path / "cache", max_seq_len=128)
    first = load_datasets(r, tok)
    r2, tok2 = change(f, tok, r)
    if change is _version:
        monkeypatch.setattr(store, "FORMAT_VERSION", store.FORMAT_VERSION + 1)
    again = load_datasets(r2, tok2)
    assert again.stats["cache"] == state
    d = r2.to_dict()
    assert_same(again, load_datasets(recipe_from_dict({**d, "data": {**d["data"], "cache": False}}), tok2))
    if state == "miss" and change is not _version:
        assert again.fingerprint != first.fingerprint
        assert len(store.list_entries(tmp_path / "cache")) == 2


def test_weights_and_another_path_reuse_the_rendered_file(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", chat_corpus(24, seed=6))
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    shutil.copy(f, copy)
    cache = tmp_path / "cache"
    load_datasets(recipe(str(f), cache), tok)
    mixed = load_datasets(recipe([str(f), str(copy)], cache, weights=[3.0, 1.0]), tok)
    assert mixed.stats["cache"] == "hit" and len(store.list_entries(cache)) == 1  # same content, one entry
    assert [s["epoch_samples"] for s in mixed.stats["sources"]] == [36, 12]
    uncached = load_datasets(recipe([str(f), str(copy)], cache, weights=[3.0, 1.0], cache=False), tok)
    assert_same(mixed, uncached)


def test_damaged_or_foreign_entries_are_rendered_again(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", chat_corpus(24, seed=7))
    r = recipe(str(f), tmp_path / "cache")
    entry = Path(load_datasets(r, tok).stats["cache_entries"][0])
    good = load_datasets(recipe(str(f), tmp_path / "cache", cache=False), tok)
    tokens = entry / "sample.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:300])  # cut short
    assert "damaged (sample.tokens.npy is 300 bytes" in store.list_entries(tmp_path / "cache")[0]["state"]
    with pytest.warns(UserWarning, match=r"data cache: .* is damaged \(sample.tokens.npy is 300 bytes"):
        again = load_datasets(r, tok)
    assert again.stats["cache"] == "miss"
    assert_same(good, again)
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))  # another mlx_ft's
    assert store.list_entries(tmp_path / "cache")[0]["state"] == "stale (data-format version 0)"
    with pytest.warns(UserWarning, match=r"written by data-format version 0"):
        assert_same(good, load_datasets(r, tok))
    assert load_datasets(r, tok).stats["cache"] == "hit"


CRASH = """
import sys
from transformers import AutoTokenizer
from mlx_ft.data import load_datasets
from mlx_ft.recipe import recipe_from_dict
tok = AutoTokenizer.from_pretrained(sys.argv[1])
data = {"train": sys.argv[2], "cache_dir": sys.argv[3]}
load_datasets(recipe_from_dict({"model": {"path": "x"}, "data": data}), tok)
"""


def test_a_crash_while_writing_leaves_no_usable_looking_cache(tmp_path, tok, tiny_model_dir):
    f = write(tmp_path / "d.jsonl", chat_corpus(1500, seed=8))
    cache = tmp_path / "cache"
    env = {**os.environ, "MLX_FT_DATA_WORKERS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", CRASH, str(tiny_model_dir), str(f), str(cache)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if cache.is_dir() and any(p.name.startswith(".sft-") for p in cache.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p.name for p in cache.iterdir() if p.name.startswith(".sft-")]
    assert left and ".tmp-" in left[0], "killed before it started writing"
    assert store.list_entries(cache) == []  # nothing that looks like an entry
    again = load_datasets(recipe(str(f), cache), tok)
    assert again.stats["cache"] == "miss" and len(again.train) == 1500
    assert not any(p.name.startswith(".sft-") for p in cache.iterdir())  # the dead build's leftover is gone
    assert load_datasets(recipe(str(f), cache), tok).stats["cache"] == "hit"


def test_unwritable_cache_dir_falls_back_with_one_warning(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", chat_corpus(12))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match=rf"data cache: cannot write to {blocker}/cache .*in memory"):
        splits = load_datasets(recipe(str(f), blocker / "cache"), tok)
    assert splits.stats["cache"] == "unwritable" and len(splits.train) == 12


def test_a_failed_write_stops_with_a_clear_message_and_keeps_nothing(tmp_path, tok):
    """A write the kernel refuses (here: over RLIMIT_FSIZE; a full disk fails the same way)."""
    f = write(tmp_path / "d.jsonl", chat_corpus(400))
    cache = tmp_path / "cache"
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, old_limit[1]))
    try:
        with pytest.raises(DataError, match=rf"data cache: writing {cache}/sft-\w+ failed \(OSError: "
                                            r"File too large\); nothing was kept there.*data.cache = false"):
            load_datasets(recipe(str(f), cache), tok)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [p.name for p in cache.iterdir()] == ["files"]  # the file's hash record only
    assert load_datasets(recipe(str(f), cache), tok).stats["cache"] == "miss"


def test_cache_command_lists_and_clears_only_its_own(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", chat_corpus(12))
    cache = tmp_path / "cache"
    load_datasets(recipe(str(f), cache), tok)
    (cache / "notes.txt").write_text("mine")
    (cache / "sft-project").mkdir()  # a look-alike that is not an entry
    out = CliRunner().invoke(main, ["data", "cache", "--list", "--dir", str(cache)])
    assert out.exit_code == 0 and "1 cached dataset(s)" in out.output and f"12 records" in out.output
    assert str(f) in out.output
    out = CliRunner().invoke(main, ["data", "cache", "--clear", "--dir", str(cache)])
    assert out.exit_code == 0 and "removed 1 cached dataset(s)" in out.output
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt", "sft-project"]


def test_empty_answers_are_reported_and_mostly_empty_data_refused(tmp_path, tok):
    def empty(record):
        for m in record["messages"]:
            if m["role"] == "assistant":
                m["content"] = ""

    recs = chat_corpus(10)
    for i in (3, 7):
        empty(recs[i])
    f = write(tmp_path / "d.jsonl", recs)
    with pytest.warns(UserWarning, match=rf"2 whose assistant answers are empty.*first at {f}:4\)"):
        splits = load_datasets(recipe(str(f), tmp_path / "c"), tok)
    assert splits.stats["empty_answers"] == 2 and len(splits.train) == 10
    for i in range(7):
        empty(recs[i])
    write(f, recs)
    with pytest.raises(DataError, match=rf"data.train: 8 of 10 records teach nothing: 8 whose assistant "
                                        rf"answers are empty.*\(first at {f}:1\)"):
        load_datasets(recipe(str(f), tmp_path / "c"), tok)


def test_an_oversized_record_is_refused_before_tokenizing(tmp_path, tok):
    recs = chat_corpus(8)
    recs[5]["messages"][1]["content"] = "colour " * 3000
    f = write(tmp_path / "d.jsonl", recs)
    with pytest.raises(DataError, match=rf"{f}:6: the record holds 21,0\d\d characters of text, more "
                                        r"than 8 x max_seq_len \(128\) tokens' worth \(8,192 characters\); "
                                        "it is not tokenized"):
        load_datasets(recipe(str(f), tmp_path / "c", max_seq_len=128), tok)
    dropped = load_datasets(recipe(str(f), tmp_path / "c", max_seq_len=128, truncation="drop"), tok)
    assert dropped.stats["dropped"] == 1 and len(dropped.train) == 7
    # A larger max_seq_len needs that record: the entry that left it out is rendered again.
    wide = load_datasets(recipe(str(f), tmp_path / "c", max_seq_len=1024, truncation="drop"), tok)
    assert wide.stats["cache"] == "miss" and wide.stats["dropped"] == 1  # rendered: longer than 1024 tokens
    narrow = load_datasets(recipe(str(f), tmp_path / "c", max_seq_len=128, truncation="drop"), tok)
    assert narrow.stats["cache"] == "hit"
