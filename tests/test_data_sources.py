"""Reading data: files, directories, hf:// repos, format detection, bad input, mixing, splits."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mlx_ft.data import load_datasets, record_texts
from mlx_ft.errors import DataError, RecipeError
from mlx_ft.recipe import recipe_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from conftest import chat_corpus  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from mlx_lm.tokenizer_utils import load

    return load(tiny_model_dir)


def recipe(train, **data):
    return recipe_from_dict({"model": {"path": "unused"}, "data": {"train": train, **data}})


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# ----------------------------------------------------------------------------------------------
# Files and formats


def test_every_file_kind_and_format_is_detected(tmp_path, tok):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_corpus(6))
    comp = tmp_path / "comp.json"
    comp.write_text(json.dumps([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)], indent=2))
    alpaca = write_parquet(tmp_path / "alpaca.parquet",
                           [{"instruction": "Say hi", "input": None, "output": "hi"}] * 2)
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "a"},
                                                                       {"from": "gpt", "value": "b"}]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Item 1 is red."}])
    splits = load_datasets(recipe([str(p) for p in (chat, comp, alpaca, share, text)]), tok)
    assert [s["format"] for s in splits.stats["sources"]] == ["chat", "completions", "alpaca", "sharegpt", "text"]
    assert [s["records"] for s in splits.stats["sources"]] == [6, 3, 2, 1, 1]
    assert len(splits.train) == 13 and splits.valid is None
    assert all(any(s.mask) and len(s.mask) == len(s.tokens) for s in splits.train)


def test_chat_and_tools_records_may_share_a_file(tmp_path, tok):
    tools = [{"type": "function", "function": {"name": "f"}}]
    f = write_jsonl(tmp_path / "t.jsonl", chat_corpus(2) + [{**chat_corpus(1)[0], "tools": tools}])
    assert load_datasets(recipe(str(f)), tok).stats["sources"][0]["format"] == "tools"


def test_malformed_line_names_file_and_line(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(chat_corpus(1)[0]) + "\n\n{\"messages\": [\n")
    with pytest.raises(DataError, match=rf"{f}:3: malformed JSON"):
        load_datasets(recipe(str(f)), tok)


def test_record_of_wrong_shape_names_line_format_and_keys(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", chat_corpus(2) + [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=rf"{f}:3: a 'chat' record needs 'messages'; keys found: \['prompt', 'completion'\]"):
        load_datasets(recipe(str(f), format="chat"), tok)
    # Auto-detection checks every record, not just the first.
    with pytest.raises(DataError, match=rf"{f}:3: this record looks like 'completions'.*earlier records \({f}:1\) are 'chat'"):
        load_datasets(recipe(str(f)), tok)
    g = write_jsonl(tmp_path / "g.jsonl", [{"text": "a"}, {"question": "q", "reply": "r"}])
    with pytest.raises(DataError, match=rf"{g}:2: cannot tell the record's format from its keys \['question', 'reply'\]"):
        load_datasets(recipe(str(g)), tok)


def test_json_array_errors_name_the_line_of_the_record(tmp_path, tok):
    f = tmp_path / "a.json"
    f.write_text('[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "p", "completion": 3}\n]\n')
    with pytest.raises(DataError, match=rf"{f}:3: a 'completions' record needs 'prompt' and 'completion', but 'completion' is a int"):
        load_datasets(recipe(str(f)), tok)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
     r"messages\[1\]: unknown role 'bot'; expected one of system, user, assistant, tool"),
    ([], r"'messages' is empty"),
    ([{"role": "user", "content": ["x"]}], r"messages\[0\] \(user\): 'content' must be a string"),
])
def test_bad_messages(tmp_path, tok, messages, match):
    f = write_jsonl(tmp_path / "m.jsonl", chat_corpus(1) + [{"messages": messages}])
    with pytest.raises(DataError, match=rf"{f}:2: {match}"):
        load_datasets(recipe(str(f)), tok)


def test_utf8_bom_is_accepted(tmp_path, tok):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat_corpus(1)[0]).encode() + b"\r\n")
    g = tmp_path / "bom.json"
    g.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat_corpus(2)).encode())
    assert len(load_datasets(recipe([str(f), str(g)]), tok).train) == 3


def test_non_utf8_bytes_name_the_line(tmp_path, tok):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: not UTF-8 text \(byte 0xe9\)"):
        load_datasets(recipe(str(f)), tok)


def test_zero_usable_samples_is_an_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", chat_corpus(4))
    with pytest.raises(DataError, match=r"no usable samples after filtering: 4 records; 4 longer than data.max_seq_len=8"):
        load_datasets(recipe(str(f), max_seq_len=8, truncation="drop"), tok)
    # Truncated before any assistant token: nothing left to learn, also reported.
    with pytest.raises(DataError, match=r"4 had no supervised token"):
        load_datasets(recipe(str(f), max_seq_len=8), tok)


def test_mix_weight_must_be_positive(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", chat_corpus(4))
    with pytest.raises(RecipeError, match=r"data.weights\[1\]: a mixing weight must be > 0"):
        recipe([str(f), str(f)], weights=[1.0, 0.0])
    r = recipe([str(f), str(f)])  # a recipe built in code without validation still gets a clear error
    r = dataclasses.replace(r, data=dataclasses.replace(r.data, weights=[1.0, -2.0]))
    with pytest.raises(DataError, match=r"data.weights\[1\]: a mixing weight must be > 0, found -2.0"):
        load_datasets(r, tok)


# ----------------------------------------------------------------------------------------------
# Truncation, mixing, validation


def test_truncation_is_counted_and_empty_samples_are_left_out(tmp_path, tok):
    recs = chat_corpus(30)
    f = write_jsonl(tmp_path / "d.jsonl", recs)
    full = load_datasets(recipe(str(f)), tok)
    lengths = sorted(len(s.tokens) for s in full.train)
    cut = lengths[len(lengths) // 2]
    longer = sum(n > cut for n in lengths)
    dropped = load_datasets(recipe(str(f), max_seq_len=cut, truncation="drop"), tok)
    assert dropped.stats["dropped"] == longer and len(dropped.train) == 30 - longer
    truncated = load_datasets(recipe(str(f), max_seq_len=cut), tok)
    st = truncated.stats
    assert st["truncated"] + st["no_supervised"] >= longer and st["truncated"] > 0
    assert all(len(s.tokens) <= cut and any(s.mask) for s in truncated.train)


def test_weights_repeat_and_subsample_sources(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", chat_corpus(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", chat_corpus(30, seed=2))
    r = recipe([str(a), str(b)], weights=[3.0, 1.0])
    splits = load_datasets(r, tok)
    # 40 usable samples, shared 3:1 -> 30 from a (each of its 10 three times), 10 of b's 30.
    assert [s["epoch_samples"] for s in splits.stats["sources"]] == [30, 10]
    assert len(splits.train) == 40
    t = splits.train
    assert len(set(zip(t.store[t.source == 0].tolist(), t.start[t.source == 0].tolist()))) == 10  # repeats
    again = load_datasets(r, tok).train
    assert [s.tokens.tolist() for s in again] == [s.tokens.tolist() for s in t]  # seeded


def test_valid_fraction_is_disjoint_and_seeded(tmp_path, tok):
    recs = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    f = write_jsonl(tmp_path / "d.jsonl", recs)
    r = recipe(str(f), valid_fraction=0.25)
    s1, s2 = load_datasets(r, tok), load_datasets(r, tok)
    decode = lambda ss: {tok.decode(s.tokens) for s in ss}  # noqa: E731
    assert len(s1.train) == 30 and len(s1.valid) == 10
    assert not decode(s1.train) & decode(s1.valid)
    assert decode(s1.valid) == decode(s2.valid)
    other = dataclasses.replace(r, training=dataclasses.replace(r.training, seed=1))
    assert decode(load_datasets(other, tok).valid) != decode(s1.valid)


# ----------------------------------------------------------------------------------------------
# Directories and Hugging Face dataset repos


def _hub_layout(root: Path) -> Path:
    """A dataset repo laid out like the hub's: Parquet shards per split under data/."""
    write_parquet(root / "data" / "train-00000-of-00002.parquet", chat_corpus(6, seed=1))
    write_parquet(root / "data" / "train-00001-of-00002.parquet", chat_corpus(4, seed=2))
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", chat_corpus(3, seed=3))
    (root / "README.md").write_text("# a dataset card\n")
    return root


def test_directory_picks_the_split_files(tmp_path, tok):
    root = _hub_layout(tmp_path / "repo")
    splits = load_datasets(recipe(str(root), valid=str(root)), tok)
    assert splits.stats["sources"][0]["files"] == 2 and len(splits.train) == 10
    assert len(splits.valid) == 3
    only = load_datasets(recipe(f"{root}?split=validation"), tok)
    assert len(only.train) == 3
    with pytest.raises(DataError, match=r"no files for split 'test'; splits found: train, validation"):
        load_datasets(recipe(f"{root}?split=test"), tok)
    # mlx-lm's layout: train.jsonl and valid.jsonl side by side.
    flat = tmp_path / "flat"
    write_jsonl(flat / "train.jsonl", chat_corpus(5))
    write_jsonl(flat / "valid.jsonl", chat_corpus(2))
    assert len(load_datasets(recipe(str(flat), valid=str(flat)), tok).valid) == 2
    # No split names: every data file is read, but not the metadata `datasets` writes.
    plain = tmp_path / "plain"
    write_jsonl(plain / "records.jsonl", chat_corpus(4))
    (plain / "dataset_info.json").write_text('{"features": {}}')
    assert len(load_datasets(recipe(str(plain)), tok).train) == 4


def test_hf_dataset_from_the_hub_cache(tmp_path, tok, monkeypatch):
    """hf:// goes through huggingface_hub.snapshot_download; offline it serves the cached snapshot."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--org--colours"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_layout(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    splits = load_datasets(recipe("hf://datasets/org/colours", valid="hf://datasets/org/colours"), tok)
    assert len(splits.train) == 10 and len(splits.valid) == 3
    one = load_datasets(recipe("hf://datasets/org/colours/data/train-00001-of-00002.parquet"), tok)
    assert len(one.train) == 4
    with pytest.raises(DataError, match=r"hf://datasets/org/missing: cannot get dataset 'org/missing'.*hf download"):
        load_datasets(recipe("hf://datasets/org/missing"), tok)


def test_record_texts_needs_no_tokenizer(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", chat_corpus(3))
    g = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}, {"text": "words"}])
    texts = record_texts(recipe([str(f), str(g)]))
    assert texts[:2] == ["Answer briefly.", "What colour is item 0?"] and texts[-2:] == ["plain", "words"]
