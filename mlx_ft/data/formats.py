"""Record formats: detect them, check every record, and normalise each to messages or text.

    chat         {"messages": [{"role": "user", "content": "..."}, ...]}
    tools        {"messages": [...], "tools": [{"type": "function", "function": {...}}, ...]}
    completions  {"prompt": "...", "completion": "..."}         (keys: data.prompt_key / completion_key)
    text         {"text": "..."}                                (key: data.text_key)
    alpaca       {"instruction": "...", "input": "...", "output": "..."}   (input optional)
    sharegpt     {"conversations": [{"from": "human", "value": "..."}, ...]}

Everything but `text` becomes a list of chat messages, rendered later by the tokenizer's own
chat template. With `format = "auto"` each record's keys decide its format, and all records of a
file must agree (chat and tools may mix: a chat record is a tools record without tools).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..recipe import DataConfig

FORMATS = ("chat", "tools", "completions", "text", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                  "function_response": "tool", "observation": "tool"}


@dataclass
class Record:
    """One normalised record: chat `messages` (with optional `tools`), or plain `text`."""

    where: str
    format: str
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    text: str | None = None

    def strings(self) -> list[str]:
        """Every piece of user-visible text (for training the demo tokenizer)."""
        if self.text is not None:
            return [self.text]
        out = [m["content"] for m in self.messages if m.get("content")]
        out += [json.dumps(m["tool_calls"]) for m in self.messages if m.get("tool_calls")]
        return out + ([json.dumps(self.tools)] if self.tools else [])


def expected_keys(fmt: str, cfg: DataConfig) -> str:
    return {"chat": "'messages'", "tools": "'messages' and 'tools'",
            "completions": f"{cfg.prompt_key!r} and {cfg.completion_key!r}", "text": repr(cfg.text_key),
            "alpaca": "'instruction' and 'output' (and optionally 'input')",
            "sharegpt": "'conversations'"}[fmt]


def detect(raw: dict, cfg: DataConfig) -> str | None:
    """The format a record's keys point to, or None."""
    if "messages" in raw:
        return "tools" if raw.get("tools") else "chat"
    if "conversations" in raw:
        return "sharegpt"
    if "instruction" in raw and "output" in raw:
        return "alpaca"
    if cfg.prompt_key in raw and cfg.completion_key in raw:
        return "completions"
    if cfg.text_key in raw:
        return "text"
    return None


def read_file(path: Path, cfg: DataConfig) -> tuple[str, list[Record]]:
    """Read, check and normalise every record of one file; returns (format, records)."""
    from .sources import read_records

    first, first_where, formats, out = None, None, set(), []
    for where, raw in read_records(path):
        found = check_format(raw, where, cfg, first, first_where)
        first, first_where = first or found, first_where or where
        formats.add(found)
        out.append(normalise(raw, found, cfg, where))
    if not out:
        raise DataError(f"{path}: the file has no records")
    return file_format(first, formats), out


def check_format(raw, where: str, cfg: DataConfig, first: str | None, first_where: str | None) -> str:
    """The record's format (data.format, or detected from its keys). Every record of a file
    keeps the format of its first (`first`, at `first_where`); chat and tools may mix, a chat
    record being a tools record without tools."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object (a record), found {type(raw).__name__}")
    if ("chosen" in raw and "rejected" in raw) or ("completion" in raw and "label" in raw):
        raise DataError(f"{where}: a preference record ({_keys(raw)}), but training.objective is "
                        "'sft'; set training.objective = 'dpo' (or 'orpo', 'simpo', 'kto') to train on "
                        "preferences, or keep preference records out of SFT data")
    if cfg.format != "auto":
        return cfg.format
    found = detect(raw, cfg)
    if found is None:
        raise DataError(f"{where}: cannot tell the record's format from its keys {_keys(raw)}; expected "
                        + "; or ".join(f"{f}: {expected_keys(f, cfg)}" for f in FORMATS if f != "tools")
                        + " (or set data.format and the data.*_key names)")
    if first is not None and _family(found) != _family(first):
        raise DataError(f"{where}: this record looks like {found!r} ({_keys(raw)}) but the file's earlier "
                        f"records ({first_where}) are {first!r}; keep one format per file")
    return found


def file_format(first: str | None, formats: set[str]) -> str:
    """A file's format: its first record's, `tools` when chat records come with tools."""
    return "tools" if first in ("chat", None) and "tools" in formats else (first or min(formats))


def _family(fmt: str) -> str:
    return "chat" if fmt in ("chat", "tools") else fmt


def normalise(raw: dict, fmt: str, cfg: DataConfig, where: str) -> Record:
    """Check one record against `fmt` and turn it into a Record; raises DataError naming `where`."""

    def need_str(key: str, optional: bool = False) -> str:
        v = raw.get(key)
        if v is None and optional:
            return ""
        if not isinstance(v, str):
            what = "missing" if key not in raw else f"a {type(v).__name__}"
            raise DataError(f"{where}: a {fmt!r} record needs {expected_keys(fmt, cfg)}, but {key!r} is "
                            f"{what} (keys found: {_keys(raw)})")
        return v

    if fmt in ("chat", "tools"):
        if "messages" not in raw:
            raise DataError(f"{where}: a {fmt!r} record needs {expected_keys(fmt, cfg)}; keys found: "
                            f"{_keys(raw)}")
        tools = raw.get("tools")
        if fmt == "tools" and not (isinstance(tools, list) and tools
                                   and all(isinstance(t, dict) for t in tools)):
            raise DataError(f"{where}: 'tools' must be a non-empty list of tool schemas (objects), "
                            f"found {_short(tools)}")
        return Record(where, fmt, messages=_check_messages(raw["messages"], where), tools=tools or None)
    if fmt == "sharegpt":
        conv = raw.get("conversations")
        if not isinstance(conv, list):
            raise DataError(f"{where}: a 'sharegpt' record needs 'conversations' as a list, found "
                            f"{_short(conv)}")
        msgs = []
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversations[{j}]: expected {{\"from\": ..., \"value\": ...}}, "
                                f"found {_short(turn)}")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{j}]: unknown speaker {turn['from']!r}; "
                                f"expected one of {', '.join(SHAREGPT_ROLES)}")
            msgs.append({"role": role, "content": turn["value"]})
        return Record(where, fmt, messages=_check_messages(msgs, where, "conversations"))
    if fmt == "completions":
        prompt, completion = need_str(cfg.prompt_key), need_str(cfg.completion_key)
        return Record(where, fmt, messages=[{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": completion}])
    if fmt == "alpaca":
        instruction, extra, output = need_str("instruction"), need_str("input", True), need_str("output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Record(where, fmt, messages=[{"role": "user", "content": user},
                                            {"role": "assistant", "content": output}])
    if fmt == "text":
        text = need_str(cfg.text_key)
        if not text.strip():
            raise DataError(f"{where}: {cfg.text_key!r} is empty")
        return Record(where, fmt, text=text)
    raise DataError(f"data.format: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _check_messages(msgs, where: str, key: str = "messages") -> list[dict]:
    if not isinstance(msgs, list):
        raise DataError(f"{where}: {key!r} must be a list of messages, found {_short(msgs)}")
    if not msgs:
        raise DataError(f"{where}: {key!r} is empty; a conversation needs at least one message")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: {key}[{j}]: expected {{\"role\": ..., \"content\": ...}}, "
                            f"found {_short(m)}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{j}]: unknown role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        content = m.get("content")
        calls = m.get("tool_calls")
        if content is None and m["role"] == "assistant" and calls:
            continue  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{j}] ({m['role']}): 'content' must be a string, found "
                            f"{_short(content)}")
    return msgs


def _keys(raw: dict) -> str:
    return "[" + ", ".join(repr(k) for k in list(raw)[:8]) + (", ..." if len(raw) > 8 else "") + "]"


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return f"{type(v).__name__} {text[:50]}{'...' if len(text) > 50 else ''}"
