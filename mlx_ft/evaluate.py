"""How good is a fine-tune, on held-out data: `mlxft eval RUN` and `evaluate(run)`.

    mlxft eval runs/demo                       # the run's validation set
    mlxft eval runs/demo --data test.jsonl --max-samples 200 --json
    mlxft eval runs/demo --base                # the base model alone: the "before" of a before/after

On a data file (by default the run's validation set: `data.valid`, or the `valid_fraction` carved
out of train exactly as training carved it) it measures

- **loss and perplexity**: the mean cross-entropy per supervised token, computed as the training
  loop's validation pass computes it, and its exponential;
- for chat-like records (chat, tools, completions, alpaca, sharegpt: everything but `text`),
  **every assistant turn answered greedily** from the conversation before it (earlier turns as the
  data has them, through the chat template, as training rendered them) and scored against the
  reference: exact match; normalised match (both texts NFKC-normalised, case-folded, punctuation
  removed and whitespace collapsed); and when the reference is a JSON object or array, whether the
  answer is valid JSON, equal JSON, and for an object the share of its top-level fields answered
  with the reference's value. Turns that call tools are not scored.

The figures go to `<run>/eval.json` and every answer to `<run>/eval_samples.jsonl` (`eval-base.*`
for `--base`), both written whole or not at all.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, ModelError

RESULTS, SAMPLES = "eval.json", "eval_samples.jsonl"
BASE_RESULTS, BASE_SAMPLES = "eval-base.json", "eval-base_samples.jsonl"
RESOLVED = "recipe.resolved.toml"


@dataclass
class EvalResult:
    """What `evaluate` measured: `figures` is eval.json, `samples` the lines of eval_samples.jsonl."""

    figures: dict
    samples: list[dict] = field(default_factory=list, repr=False)
    path: Path | None = None
    """The eval.json written (None with write=False)."""

    def __getitem__(self, key):
        return self.figures[key]

    def to_dict(self) -> dict:
        return self.figures

    def __repr__(self) -> str:
        return format_report(self.figures)


# ----------------------------------------------------------------------------------------------
# Scoring one answer


def normalize(text: str) -> str:
    """NFKC, case-folded, Unicode punctuation removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def _as_json(text: str):
    """The JSON object or array `text` holds, else None."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, (dict, list)) else None


def score(reference: str, answer: str) -> dict:
    """Exact and normalised match; for a JSON reference also validity, equality and its fields."""
    out = {"exact": answer == reference, "normalized": normalize(answer) == normalize(reference)}
    ref = _as_json(reference)
    if ref is None:
        return out
    try:
        got = json.loads(answer)
        valid = True
    except json.JSONDecodeError:
        got, valid = None, False
    out.update(json_valid=valid, json_match=valid and got == ref)
    if isinstance(ref, dict):
        out["fields"] = {k: isinstance(got, dict) and k in got and got[k] == v for k, v in ref.items()}
    return out


def summarize(samples: list[dict]) -> dict:
    """Counts and rates over the scored turns (rates are None when nothing was scored)."""

    def rate(n: int, d: int):
        return round(n / d, 6) if d else None

    n = len(samples)
    js = [s for s in samples if "json_valid" in s]
    fields: dict[str, list[int]] = {}
    for s in js:
        for k, ok in s.get("fields", {}).items():
            fields.setdefault(k, [0, 0])
            fields[k][0] += ok
            fields[k][1] += 1
    counts = {"exact": sum(s["exact"] for s in samples), "normalized": sum(s["normalized"] for s in samples),
              "json_turns": len(js), "json_valid": sum(s["json_valid"] for s in js),
              "json_match": sum(s["json_match"] for s in js), "fields": fields}
    matched, total = sum(v[0] for v in fields.values()), sum(v[1] for v in fields.values())
    return {"turns": n, "exact_match": rate(counts["exact"], n),
            "normalized_match": rate(counts["normalized"], n),
            "json_valid": rate(counts["json_valid"], len(js)),
            "json_match": rate(counts["json_match"], len(js)),
            "field_accuracy": rate(matched, total),
            "fields": {k: rate(a, b) for k, (a, b) in sorted(fields.items())}, "counts": counts}


# ----------------------------------------------------------------------------------------------
# What is evaluated, on what


@dataclass
class _Target:
    model: object
    tokenizer: object
    out_dir: Path
    recipe: object  # the run's Recipe, or None for an adapter directory outside a run
    adapter_dir: Path | None
    adapter_config: dict


def _find_recipe(adapter_dir: Path, given: Path):
    from .recipe import load_recipe

    for cand in (given / RESOLVED, adapter_dir.parent / RESOLVED):
        if cand.is_file():
            return load_recipe(cand)
    return None


def _target(run, base: bool) -> _Target:
    """Model, tokenizer and where results go, for a run dir, an adapter dir or a TrainResult."""
    from .models import ADAPTER_CONFIG, find_adapter_dir, load_base, load_with_adapter
    from .recipe import ModelConfig, QuantizeConfig

    in_memory = hasattr(run, "adapter_dir") and hasattr(run, "model")  # a TrainResult
    given = Path(run.run_dir if in_memory else run)
    adapter_dir = find_adapter_dir(run.adapter_dir if in_memory else given)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    recipe = _find_recipe(adapter_dir, given)
    if base:
        q = config.get("quantize")
        if not config.get("base_model"):
            raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model recorded, so --base has "
                             "nothing to load")
        model, tokenizer, _ = load_base(ModelConfig(path=config["base_model"],
                                                    quantize=QuantizeConfig(**q) if q else None))
    elif in_memory:
        model, tokenizer = run.model, run.tokenizer
    else:
        model, tokenizer, config = load_with_adapter(adapter_dir)
    model.eval()  # adapter dropout off
    return _Target(model, tokenizer, given, recipe, None if base else adapter_dir, config)


def _records(target: _Target, data: str | Path | None):
    """(what the data is called, its records, the DataConfig they are read and rendered with)."""
    from .data.dataset import read_source, valid_records
    from .recipe import DataConfig

    recipe = target.recipe
    cfg = recipe.data if recipe is not None else DataConfig()
    if data is not None:
        if not str(data).startswith("hf://") and not Path(str(data).split("?")[0]).expanduser().exists():
            raise DataError(f"--data: {data} does not exist (relative to the current directory)")
        return str(data), read_source(str(data), cfg, "validation").records, cfg
    where = target.out_dir / RESOLVED
    if recipe is None:
        raise DataError(f"{target.out_dir}: no {RESOLVED} here or next to the adapter, so there is no "
                        "validation set to default to; pass --data FILE (evaluate(..., data=FILE))")
    if recipe.training.objective != "sft":
        raise DataError(f"{where}: a {recipe.training.objective} run's validation data are preference "
                        "pairs, which `mlxft eval` does not score (its held-out reward accuracy and margins "
                        "are the eval_rewards/* rows of metrics.jsonl); pass --data FILE of chat records to "
                        "score answers")
    if recipe.data.valid is None and recipe.data.valid_fraction <= 0:
        raise DataError(f"{where}: the run has no validation set (data.valid and data.valid_fraction are not "
                        "set); pass --data FILE (evaluate(..., data=FILE))")
    source = recipe.data.valid
    if source is not None and not source.startswith("hf://") and not Path(source.split("?")[0]).exists():
        raise DataError(f"{where}: data.valid = {source!r} does not exist relative to {Path.cwd()}; run "
                        "`mlxft eval` from the directory `mlxft run` ran in, or pass --data FILE")
    label = source or f"data.valid_fraction = {recipe.data.valid_fraction} of data.train"
    return label, valid_records(recipe), cfg


# ----------------------------------------------------------------------------------------------
# Loss and answers


def loss_on(model, tokenizer, records, cfg, batch_size: int = 4, chunk_size: int = 512) -> tuple[float, int]:
    """(summed cross-entropy, supervised tokens) of `records`, rendered as training renders them
    (`cfg.train_on`, `max_seq_len`, `truncation`), in length buckets without packing."""
    import mlx.core as mx

    from . import losses
    from .data import collate, epoch_batches
    from .data.dataset import render_records

    samples = render_records(records, tokenizer, cfg)
    if not samples:
        return 0.0, 0
    exact_head = losses.check_architecture(model, packing=False)
    total, count = mx.array(0.0), mx.array(0.0)
    for plan in epoch_batches(samples, batch_size, cfg.max_seq_len, False, 0, 0, False):
        batch = collate(samples, plan, cfg.max_seq_len, False)
        s, n = losses.loss_sum(model, mx.array(batch.tokens), mx.array(batch.mask), None,
                               chunk_size=chunk_size, exact_head=exact_head, grad=False)
        total, count = total + s, count + n
    mx.eval(total, count)
    return total.item(), int(count.item())


def default_max_tokens(reference_tokens: int) -> int:
    """Generation budget for one answer: the reference's length plus a quarter plus 16 tokens."""
    return reference_tokens + reference_tokens // 4 + 16


def answer_turns(model, tokenizer, records, max_tokens: int | None = None,
                 progress: bool = False) -> list[dict]:
    """Answer every assistant turn of chat-like records greedily and score it; one dict per turn."""
    from tqdm.auto import tqdm

    from .generate import complete

    turns = [(r, i) for r in records if r.messages is not None
             for i, m in enumerate(r.messages) if m["role"] == "assistant" and i > 0
             and isinstance(m.get("content"), str) and not m.get("tool_calls")]
    out = []
    for rec, i in tqdm(turns, desc="eval", unit="turn", disable=not progress, leave=False):
        reference = rec.messages[i]["content"]
        prompt = tokenizer.apply_chat_template(rec.messages[:i], tools=rec.tools, tokenize=False,
                                               add_generation_prompt=True)
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))  # the template wrote any BOS
        budget = max_tokens or default_max_tokens(len(tokenizer.encode(reference, add_special_tokens=False)))
        gen = complete(model, tokenizer, ids, prompt, max_tokens=budget)
        user = next((m.get("content") for m in reversed(rec.messages[:i]) if m["role"] == "user"), None)
        out.append({"record": rec.where, "turn": i, "prompt": user, "reference": reference,
                    "answer": gen.text, **score(reference, gen.text), "tokens": gen.generation_tokens,
                    "finish": gen.finish_reason})
    return out


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(run, data: str | Path | None = None, max_samples: int | None = None, base: bool = False,
             max_tokens: int | None = None, write: bool = True, progress: bool = True) -> EvalResult:
    """Loss, perplexity and scored greedy answers of a fine-tune on held-out data (`mlxft eval`).

    Args:
        run: a run directory, an adapter directory, or the `TrainResult` of `train()` (its model
            is used as it is in memory).
        data: a data file or directory (any form `data.valid` takes); None: the run's validation set.
        max_samples: evaluate the first N records only.
        base: evaluate the base model the adapter was trained on, without the adapter.
        max_tokens: tokens generated per answer at most (default: `default_max_tokens`).
        write: write eval.json and eval_samples.jsonl (eval-base.* with `base`) into the run dir.
    Raises:
        DataError (no data, unreadable data), ModelError (no adapter, no base recorded).
    """
    t0 = time.perf_counter()
    target = _target(run, base)
    label, records, cfg = _records(target, data)
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"--max-samples: must be >= 1, found {max_samples}")
        records = records[:max_samples]
    t = target.recipe.training if target.recipe is not None else None
    loss_total, n_tok = loss_on(target.model, target.tokenizer, records, cfg,
                                batch_size=t.batch_size if t else 4,
                                chunk_size=t.loss_chunk_size if t else 512)
    samples = answer_turns(target.model, target.tokenizer, records, max_tokens, progress)
    loss = loss_total / n_tok if n_tok else None
    figures = {
        "model": target.adapter_config.get("base_model"),
        "adapter": str(target.adapter_dir) if target.adapter_dir else None,
        "data": label, "records": len(records), "max_samples": max_samples,
        "loss": round(loss, 6) if loss is not None else None,
        "perplexity": round(math.exp(loss), 6) if loss is not None else None,
        "supervised_tokens": n_tok,
        **summarize(samples),
        "max_tokens": max_tokens or "reference + 25% + 16",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = _write(target.out_dir, figures, samples, base) if write else None
    return EvalResult(figures, samples, path)


def _write(out_dir: Path, figures: dict, samples: list[dict], base: bool) -> Path:
    from .atomic import atomic_file

    results, lines = (BASE_RESULTS, BASE_SAMPLES) if base else (RESULTS, SAMPLES)
    with atomic_file(out_dir / lines) as tmp:
        tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    with atomic_file(out_dir / results) as tmp:
        tmp.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return out_dir / results


def metrics(figures: dict, prefix: str = "eval/") -> dict[str, float]:
    """The numeric figures flattened for trackers: {"eval/loss": ..., "eval/fields/topic": ...}."""
    out = {}
    for k in ("loss", "perplexity", "exact_match", "normalized_match", "json_valid", "json_match",
              "field_accuracy"):
        if figures.get(k) is not None:
            out[prefix + k] = float(figures[k])
    for k, v in (figures.get("fields") or {}).items():
        if v is not None:
            out[f"{prefix}fields/{k}"] = float(v)
    return out


# ----------------------------------------------------------------------------------------------
# Reports

_ROWS = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.4g}"),
         ("exact_match", "exact match", "{:.1%}"), ("normalized_match", "normalised match", "{:.1%}"),
         ("json_valid", "valid JSON", "{:.1%}"), ("json_match", "equal JSON", "{:.1%}"),
         ("field_accuracy", "JSON fields right", "{:.1%}")]


def _fmt(figures: dict, key: str, spec: str) -> str:
    v = figures.get(key) if not key.startswith("fields/") else (figures.get("fields") or {}).get(key[7:])
    return "-" if v is None else spec.format(v)


def _rows(figures: dict) -> list[tuple[str, str, str]]:
    rows = list(_ROWS) + [(f"fields/{k}", f"  {k}", "{:.1%}") for k in figures.get("fields") or {}]
    return [r for r in rows if _fmt(figures, r[0], r[2]) != "-"]


def format_report(figures: dict, base: dict | None = None) -> str:
    """The text `mlxft eval` prints; with `base`, a before/after table (base | fine-tuned)."""
    c = figures.get("counts", {})
    who = figures["adapter"] or f"{figures['model']} (base model, no adapter)"
    if base is not None:
        who += ", and its base model without it"
    head = [f"eval of {who}", f"  on {figures['data']}: {figures['records']} records, "
            f"{figures['supervised_tokens']:,} supervised tokens, {figures['turns']} assistant turns "
            f"answered greedily ({figures['seconds']} s)"]
    if base is None:
        body = [f"  {label:<18} {_fmt(figures, key, spec):>8}" for key, label, spec in _rows(figures)]
        if figures["turns"]:
            js = f", {c['json_valid']} of {c['json_turns']} valid JSON" if c.get("json_turns") else ""
            body.append(f"  ({c['exact']} of {figures['turns']} answers exact{js})")
        return "\n".join(head + body)
    rows = [f"  {'':<18} {'base':>10} {'fine-tuned':>11}"]
    rows += [f"  {label:<18} {_fmt(base, key, spec):>10} {_fmt(figures, key, spec):>11}"
             for key, label, spec in _rows(figures)]
    return "\n".join(head + rows)


def comparable(a: dict, b: dict) -> bool:
    """Were two eval.json figures measured on the same data and records (a before/after pair)?"""
    return all(a.get(k) == b.get(k) for k in ("data", "records", "max_samples", "max_tokens"))


def run_eval_table(recipe, result, trackers=(), echo=print) -> dict:
    """The recipe's `[eval]` table at the end of `mlxft run`: evaluate the trained model in memory
    (and the base, with `eval.base`), print the report, give the figures to the trackers as an
    `on_eval` row of `eval/...` (and `eval_base/...`) values. Returns eval.json's figures."""
    e = recipe.eval
    kwargs = dict(data=e.data, max_samples=e.max_samples, max_tokens=e.max_tokens, progress=False)
    tuned = evaluate(result, **kwargs).figures
    row = {"step": result.summary["steps"], **metrics(tuned)}
    base = None
    if e.base:
        base = evaluate(result, base=True, **kwargs).figures
        row.update(metrics(base, "eval_base/"))
    echo(format_report(tuned, base))
    for t in trackers:
        t.on_eval(row)
    return tuned
