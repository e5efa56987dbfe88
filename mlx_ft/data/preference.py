"""Preference data: TRL's preference formats -> two token sequences per example -> batches whose
first half of rows holds one sequence of each example and second half the other.

Formats, detected per record (TRL's names, docs/preference.md):

    standard          {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt   {"chosen": [whole conversation], "rejected": [whole conversation]}: the prompt
                      is their longest common prefix of messages (DPO-mix style; strings: of characters)
    unpaired (KTO)    {"prompt": ..., "completion": ..., "label": true | false}

Conversational records may carry "tools". Rendering is TRL's (DPOTrainer/KTOTrainer): the prompt
is rendered with the generation prompt, prompt + completion without it, both are tokenized, and
the completion is what follows their common token prefix (for a pair, the shorter of the two
prefixes, so chosen and rejected share the same prompt tokens). With a chat template, the strings
of a standard record become a user turn and an assistant turn; a tokenizer without one (a base
model) tokenizes them as plain text with EOS after each completion, as TRL does.

Example (ChatML; supervised tokens in [brackets], the rest is the shared prompt):

    chosen:   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello!<|im_end|>\\n]
    rejected: <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Go away.<|im_end|>\\n]

Truncation keeps the start, as TRL's `truncation_mode="keep_start"`: each sequence is cut to
`max_seq_len` tokens, so the prompt is kept whole and the completions lose their ends; a prompt
that fills `max_seq_len` by itself leaves nothing to compare and is an error (or, with
`data.truncation = "drop"`, the pair is left out). Pairs whose two sequences are the same carry
no preference: they are left out with a warning, and counted.

KTO examples are paired too, with TRL's mismatched completion for the KL estimate: within each
group of `batch_size` consecutive examples, example i's second sequence is its prompt followed by
example i-1's completion. Paired records given to KTO become one desirable and one undesirable
example. Every example is thus two sequences, and batching, packing and collation are shared.

A batch of R plan rows has 2R token rows: row r holds the first sequences of the examples planned
in row r (several when packed), row R + r their second sequences. `seq` numbers each position's
sequence (first of example j: j, second: P + j, padding -1, P the examples' capacity, a multiple
of 8) and, when packed, is also the segment id that keeps their attention apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, MlxFtWarning
from ..recipe import DataConfig, Recipe
from .batching import PAD_MULTIPLE, Plan, Plans
from .batching import epoch_batches as _length_batches
from .dataset import Source, Splits, _mix, _sources, check_weights, split_valid
from .dataset import _explain as _explain_sft
from .formats import _check_messages, _keys, _short
from .sources import read_records, resolve_files

PAIRED_OBJECTIVES = ("dpo", "orpo", "simpo")
FORMATS = ("standard", "conversational", "implicit prompt", "unpaired")


@dataclass
class PrefRecord:
    """One preference record, checked: a pair (chosen, rejected) or a KTO example (completion, label).
    Each field is a string (standard) or a list of chat messages (conversational)."""

    where: str
    format: str
    prompt: str | list
    chosen: str | list
    rejected: str | list | None = None
    label: bool | None = None
    tools: list | None = None

    @property
    def paired(self) -> bool:
        return self.rejected is not None

    def strings(self) -> list[str]:
        """Every text of the record (for training the builtin demo tokenizer)."""
        out = []
        for part in (self.prompt, self.chosen, self.rejected):
            if isinstance(part, str):
                out.append(part)
            elif part:
                out += [m["content"] for m in part if m.get("content")]
        return out


@dataclass
class Pair:
    """One example as token ids: two sequences sharing `prompt`. Paired objectives: `first` is the
    chosen completion, `second` the rejected one. KTO: `first` is the example's completion, whose
    `label` says desirable or not, `second` another example's (the KL estimate's). Completions are
    already truncated: len(prompt) + len(first) <= max_seq_len, the same for second."""

    prompt: list[int]
    first: list[int]
    second: list[int]
    label: bool | None = None
    source: int = 0
    where: str = ""
    ref: tuple[float, float] | None = None
    """Reference log-probs of the first and second completion, when precomputed."""

    @property
    def length(self) -> int:
        """The longer of the two sequences: what a row of the batch must hold."""
        return len(self.prompt) + max(len(self.first), len(self.second))

    def key(self) -> bytes:
        """What identifies the example's tokens (the run's data fingerprint hashes these)."""
        return json.dumps([self.prompt, self.first, self.second, self.label]).encode()


@dataclass
class PrefBatch:
    tokens: np.ndarray  # int32 [2R, W]: rows 0..R-1 the first sequences, R..2R-1 the second
    mask: np.ndarray  # bool [2R, W]: True where the token is a supervised completion target
    seq: np.ndarray  # int32 [2R, W]: each position's sequence (example j: j, its second: P + j), -1 padding
    meta: np.ndarray  # float32 [P, 3]: label (1 desirable), reference log-prob of first, of second
    pairs: int
    n_supervised: int
    n_padding: int

    def arrays(self) -> list[np.ndarray]:
        """The compiled step's arguments, in the order the preference loss takes them."""
        return [self.tokens, self.mask, self.seq, self.meta]


# ----------------------------------------------------------------------------------------------
# Records


def detect(raw: dict) -> str | None:
    """The preference format a record's keys point to, or None."""
    if "chosen" in raw and "rejected" in raw:
        prompt, chosen = raw.get("prompt"), raw["chosen"]
        if prompt is None or (isinstance(chosen, list) and not isinstance(prompt, list)):
            return "implicit prompt"  # TRL: a string prompt beside conversations is not the prompt
        return "conversational" if isinstance(prompt, list) else "standard"
    if "completion" in raw and "label" in raw:
        return "unpaired"
    return None


def read_preference_file(path: Path, objective: str) -> list[PrefRecord]:
    """Read and check every record of one file for `objective`."""
    first_where, kind, out = None, None, []
    for where, raw in read_records(path):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object (a record), found {type(raw).__name__}")
        fmt = detect(raw)
        if fmt is None:
            if first_where is not None:
                raise DataError(f"{where}: this record is not a preference record ({_keys(raw)}) but "
                                f"the file's earlier records ({first_where}) are; keep SFT and preference "
                                "records in separate files")
            raise DataError(f"{where}: training.objective is {objective!r}, which needs preference records: "
                            "'chosen' and 'rejected' (and 'prompt'), or 'prompt', 'completion' and 'label' "
                            f"for KTO; found keys {_keys(raw)}. SFT data trains with training.objective = "
                            "'sft'")
        paired = fmt != "unpaired"
        if kind is not None and kind != paired:
            this, earlier = ("a pair", "unpaired") if paired else ("an unpaired KTO example", "pairs")
            raise DataError(f"{where}: this record is {this} but the file's earlier records ({first_where}) "
                            f"are {earlier}; keep one kind per file")
        if not paired and objective != "kto":
            raise DataError(f"{where}: an unpaired record (prompt, completion, label); training.objective = "
                            f"{objective!r} needs chosen/rejected pairs. Unpaired data trains with "
                            "training.objective = 'kto'")
        kind, first_where = paired, first_where or where
        out.append(normalise(raw, fmt, where))
    if not out:
        raise DataError(f"{path}: the file has no records")
    return out


def normalise(raw: dict, fmt: str, where: str) -> PrefRecord:
    """Check one preference record and split off its prompt; raises DataError naming `where`."""

    def part(key: str, conversational: bool):
        v = raw.get(key)
        if conversational:
            if not isinstance(v, list):
                raise DataError(f"{where}: a {fmt} record needs {key!r} as a list of messages, found "
                                f"{_short(v)}")
            return _check_messages(v, where, key)
        if not isinstance(v, str):
            raise DataError(f"{where}: a {fmt} record needs {key!r} as a string, found {_short(v)}")
        return v

    tools = raw.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: 'tools' must be a list of tool schemas (objects), found {_short(tools)}")
    if fmt == "unpaired":
        label = raw["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true (desirable) or false (undesirable), found "
                            f"{_short(label)}")
        conv = isinstance(raw.get("prompt"), list)
        return PrefRecord(where, fmt, part("prompt", conv), part("completion", conv), label=label,
                          tools=tools)
    if fmt == "implicit prompt":
        conv = isinstance(raw["chosen"], list)
        prompt, chosen, rejected = _split_prompt(part("chosen", conv), part("rejected", conv), where)
        return PrefRecord(where, fmt, prompt, chosen, rejected, tools=tools)
    conv = fmt == "conversational"
    return PrefRecord(where, fmt, part("prompt", conv), part("chosen", conv), part("rejected", conv),
                      tools=tools)


def _split_prompt(chosen, rejected, where: str):
    """TRL's `extract_prompt`: the longest common prefix (of messages, or of characters without a
    trailing space) is the prompt."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < idx < len(chosen) and chosen[idx - 1] == " ":
        idx -= 1
    if idx == 0 and not isinstance(chosen, str):
        raise DataError(f"{where}: 'chosen' and 'rejected' share no first message, so there is no prompt; "
                        "give 'prompt' explicitly, or start both conversations with the same messages")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def read_preference_source(name: str, recipe: Recipe, split: str) -> Source:
    """Read and check every record of one source of preference data."""
    files = resolve_files(name, split)
    records, formats = [], set()
    for f in files:
        recs = read_preference_file(f, recipe.training.objective)
        formats |= {r.format for r in recs}
        records += recs
    return Source(name, sorted(formats), records, len(files))


# ----------------------------------------------------------------------------------------------
# Rendering


def check_records(recipe: Recipe, tokenizer, first: int = 3) -> str:
    """`mlxft validate --deep` on preference data: read and check every record, render the first
    `first` of each source. Raises DataError naming the file:line of the first bad record."""
    cfg = recipe.data
    names = [(n, "train") for n in _sources(cfg)] + ([(cfg.valid, "validation")] if cfg.valid else [])
    sources = [read_preference_source(n, recipe, split) for n, split in names]
    for src in sources:
        for r in src.records[:first]:
            render(r, tokenizer)
    records = sum(len(s.records) for s in sources)
    return f"{records} preference records read in {len(sources)} sources, the first {first} of each rendered"


def render(record: PrefRecord, tokenizer) -> tuple[list[int], list[int], list[int] | None]:
    """(prompt, chosen or completion, rejected or None) token ids, as TRL's trainers tokenize them."""
    from .render import apply_template

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    conversational = isinstance(record.prompt, list)
    template = getattr(tokenizer, "has_chat_template", True)
    if conversational and not template:
        raise DataError(f"{record.where}: the tokenizer has no chat template, so conversational records "
                        "cannot be rendered; use a chat (instruct) model or the standard (string) format")
    completions = [c for c in (record.chosen, record.rejected) if c is not None]
    if template:
        def messages(part, role):
            return part if isinstance(part, list) else ([{"role": role, "content": part}] if part else [])

        def ids(msgs, gen):
            text = apply_template(tokenizer, msgs, record.tools, gen, record.where)
            return list(hf(text, add_special_tokens=False)["input_ids"])

        prompt = messages(record.prompt, "user")
        prompt_ids = ids(prompt, True)
        fulls = [ids(prompt + messages(c, "assistant"), False) for c in completions]
    else:  # plain text, TRL's non-conversational path: EOS ends each completion, BOS as the tokenizer adds it
        eos = tokenizer.eos_token or ""
        prompt_ids = list(hf(record.prompt)["input_ids"])
        fulls = [list(hf(record.prompt + (c if c.endswith(eos) else c + eos))["input_ids"])
                 for c in completions]
    n = min(_common_prefix(prompt_ids, f) for f in fulls)
    parts = [f[n:] for f in fulls]
    return prompt_ids[:n], parts[0], parts[1] if len(parts) > 1 else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render_all(records: list[PrefRecord], tokenizer, cfg: DataConfig, objective: str, source: int):
    """Render, truncate and filter; returns (examples, counts). A KTO example's `second` is filled later."""
    L, out = cfg.max_seq_len, []
    c = {"records": len(records), "samples": 0, "dropped": 0, "truncated": 0, "identical": 0,
         "no_supervised": 0}
    first_identical = None
    for r in records:
        prompt, a, b = render(r, tokenizer)
        if len(prompt) >= L:
            if cfg.truncation == "drop":
                c["dropped"] += 1
                continue
            raise DataError(f"{r.where}: the prompt alone is {len(prompt)} tokens, which fills "
                            f"data.max_seq_len = {L} and leaves no completion token to compare; raise "
                            "data.max_seq_len, shorten the prompt, or set data.truncation = 'drop' to leave "
                            "such records out")
        room = L - len(prompt)
        long = len(a) > room or (b is not None and len(b) > room)
        if long and cfg.truncation == "drop":
            c["dropped"] += 1
            continue
        c["truncated"] += long
        a, b = a[:room], None if b is None else b[:room]
        if not a or (b is not None and not b):
            c["no_supervised"] += 1  # an empty completion has no log-prob to compare
            continue
        if b is not None and a == b:
            c["identical"] += 1
            first_identical = first_identical or r.where
            continue
        if objective == "kto" and b is not None:  # TRL unpairs pairs for KTO
            out += [Pair(prompt, a, [], True, source, r.where), Pair(prompt, b, [], False, source, r.where)]
        else:
            out.append(Pair(prompt, a, b if b is not None else [], r.label, source, r.where))
    if c["identical"]:
        warnings.warn(f"{c['identical']} preference pair(s) have the same chosen and rejected completion "
                      f"(the first at {first_identical}); they carry no preference and are left out",
                      MlxFtWarning, stacklevel=3)
    c["samples"] = len(out)
    return out, c


def kl_partners(examples: list[Pair], group: int, max_seq_len: int) -> list[Pair]:
    """KTO: each example's second sequence is its prompt with the completion of the example before it
    in its group of `group` consecutive examples (the first takes the last's), as TRL builds them."""
    out = []
    for g in range(0, len(examples), group):
        block = examples[g:g + group]
        for i, ex in enumerate(block):
            other = block[i - 1].first[: max_seq_len - len(ex.prompt)]
            out.append(Pair(ex.prompt, ex.first, other, ex.label, ex.source, ex.where, None))
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline


def load_preference(recipe: Recipe, tokenizer) -> Splits:
    """Read, check, render and mix preference data into train (and validation) examples.

    Raises:
        DataError: naming the file:line and the fix for any unusable record, or when nothing usable is left.
    """
    t0 = time.perf_counter()
    cfg, t = recipe.data, recipe.training
    check_weights(cfg)
    sources = [read_preference_source(n, recipe, "train") for n in _sources(cfg)]
    valid_records = split_valid(sources, cfg, t.seed,
                                lambda: read_preference_source(cfg.valid, recipe, "validation").records)
    per_source, counts = [], []
    for k, src in enumerate(sources):
        examples, c = _render_all(src.records, tokenizer, cfg, t.objective, k)
        per_source.append(examples)
        counts.append(c)
    if not any(per_source):
        raise DataError("data.train: no usable preference examples: " + _explain(counts, cfg))
    mixed = (_mix(per_source, cfg.weights, t.seed) if cfg.weights is not None
             else [e for es in per_source for e in es])
    group = max(2, t.batch_size)
    if t.objective == "kto":
        mixed = kl_partners(mixed, group, cfg.max_seq_len)
    valid, valid_counts = None, None
    if valid_records:
        valid, valid_counts = _render_all(valid_records, tokenizer, cfg, t.objective, -1)
        if not valid:
            where = "data.valid" if cfg.valid is not None else "data.valid_fraction"
            raise DataError(f"{where}: no usable validation examples: " + _explain([valid_counts], cfg))
        if t.objective == "kto":
            valid = kl_partners(valid, group, cfg.max_seq_len)
    unit = "examples" if t.objective == "kto" else "pairs"
    stats = {
        "objective": t.objective, "unit": unit,
        "sources": [{"source": src.name, "format": "+".join(src.formats), "files": src.files, **c,
                     "weight": None if cfg.weights is None else cfg.weights[k],
                     "epoch_samples": sum(1 for s in mixed if s.source == k)}
                    for k, (src, c) in enumerate(zip(sources, counts))],
        "train": summary(mixed, t.objective),
        "valid": None if valid is None else {**summary(valid, t.objective), **valid_counts},
        **{k: sum(c[k] for c in counts) for k in ("dropped", "truncated", "identical", "no_supervised")},
        "batching": batching(mixed, recipe),
        "cache": "not used (preference pairs are rendered in memory)", "cache_dir": None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return Splits(mixed, valid, stats, fingerprint(mixed))


def fingerprint(examples: list[Pair]) -> str:
    """Which examples, in which order, with which tokens: a resume on other data is refused."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.key())
    return "v2:pairs:" + h.hexdigest()[:16]


def summary(examples: list[Pair], objective: str) -> dict:
    """Counts of a split; `loss_units` is what the loss is a mean over (pairs, or KTO examples)."""
    first = [len(e.prompt) + len(e.first) for e in examples]
    second = [len(e.prompt) + len(e.second) for e in examples]
    out = {"samples": len(examples), "loss_units": len(examples), "tokens": int(sum(first) + sum(second)),
           "supervised_tokens": int(sum(len(e.first) + len(e.second) for e in examples)),
           "max_len": max(first + second, default=0),
           "mean_len": round(float(np.mean(first + second)), 1) if examples else 0.0}
    if objective == "kto":
        out["desirable"] = sum(1 for e in examples if e.label)
        out["undesirable"] = len(examples) - out["desirable"]
    return out


def _explain(counts: list[dict], cfg: DataConfig) -> str:
    parts = [_explain_sft([{**c, "no_supervised": 0} for c in counts], cfg)]
    identical, empty = (sum(c[k] for c in counts) for k in ("identical", "no_supervised"))
    if identical:
        parts.append(f"{identical} had the same chosen and rejected completion")
    if empty:
        parts.append(f"{empty} had an empty completion")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Batching


def epoch_batches(examples: list[Pair], batch_size: int, max_seq_len: int, pack: bool, seed: int, epoch: int,
                  shuffle: bool = True) -> Plans:
    """The batch plans of one epoch: rows of examples, bucketed (or packed) by their longer sequence.

    A packed row takes examples while the sum of their longer sequences fits max_seq_len, so both
    of its token rows (first and second sequences) fit."""
    lengths = np.array([e.length for e in examples], dtype=np.int64)
    return _length_batches(lengths, batch_size, max_seq_len, pack, seed, epoch, shuffle)


def _width(examples: list[Pair], plan: Plan, max_seq_len: int, pack: bool) -> int:
    if pack:
        return max_seq_len
    longest = max(sum(examples[i].length for i in row) for row in plan)
    return min(max_seq_len, math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(examples: list[Pair], plan: Plan, max_seq_len: int, pack: bool, pad_id: int = 0) -> PrefBatch:
    """Stack the examples of `plan` into right-padded arrays: first sequences, then second ones."""
    R, W = len(plan), _width(examples, plan, max_seq_len, pack)
    P = sum(len(row) for row in plan)
    cap = math.ceil(P / PAD_MULTIPLE) * PAD_MULTIPLE  # fewer distinct shapes for the compiled step
    tokens = np.full((2 * R, W), pad_id, dtype=np.int32)
    mask = np.zeros((2 * R, W), dtype=bool)
    seq = np.full((2 * R, W), -1, dtype=np.int32)
    meta = np.zeros((cap, 3), dtype=np.float32)
    j = 0
    for r, row in enumerate(plan):
        pos = [0, 0]
        for i in row:
            e = examples[i]
            meta[j] = (1.0 if e.label in (None, True) else 0.0, *(e.ref or (0.0, 0.0)))
            for side, completion in enumerate((e.first, e.second)):
                ids = e.prompt + completion
                row_, p, n = r + side * R, pos[side], len(e.prompt) + len(completion)
                tokens[row_, p:p + n] = ids
                mask[row_, p + len(e.prompt):p + n] = True
                mask[row_, p] = False  # a sequence's first token has nothing before it to predict it
                seq[row_, p:p + n] = j + side * cap
                pos[side] += n
            j += 1
    return PrefBatch(tokens, mask, seq, meta, P, int(mask.sum()), int((seq < 0).sum()))


def batching(examples: list[Pair], recipe: Recipe) -> dict:
    """Batches, optimizer steps and padding of the first epoch, as the recipe batches them."""
    d, t = recipe.data, recipe.training
    plans = epoch_batches(examples, t.batch_size, d.max_seq_len, d.pack, t.seed, 0, d.shuffle)
    positions = sum(2 * len(p) * _width(examples, p, d.max_seq_len, d.pack) for p in plans)
    real = sum(2 * len(examples[i].prompt) + len(examples[i].first) + len(examples[i].second)
               for p in plans for row in p for i in row)
    return {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "pack": d.pack,
            "max_seq_len": d.max_seq_len, "batches_per_epoch": len(plans),
            "steps_per_epoch": -(-len(plans) // t.grad_accum), "positions": positions,
            "padding_fraction": round(1 - real / positions, 4) if positions else 0.0}


# ----------------------------------------------------------------------------------------------
# The data report


def report_samples(examples: list[Pair], tokenizer, objective: str, show: int) -> list[dict]:
    """The first `show` examples as runs of text for `mlxft data inspect`: both sequences of a
    pair (KTO: the example and its mismatched KL sequence), completions marked supervised."""
    roles = ("chosen", "rejected") if objective != "kto" else (None, "KL (mismatched completion)")
    out = []
    for i, e in enumerate(examples[:show]):
        for role, completion in zip(roles, (e.first, e.second)):
            if role is None:
                role = "desirable" if e.label else "undesirable"
            pieces = [{"supervised": False, "text": tokenizer.decode(e.prompt)},
                      {"supervised": True, "text": tokenizer.decode(completion)}]
            supervised = len(completion) - (not e.prompt)  # the first token is never a target
            out.append({"index": i, "role": role, "source": e.source, "supervised": supervised,
                        "tokens": len(e.prompt) + len(completion), "pieces": pieces})
    return out
