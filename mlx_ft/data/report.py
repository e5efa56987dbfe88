"""`mlxft data inspect`: what the model will see, before any weight is loaded.

Counts per source, the token-length histogram, supervised-token share, dropped and truncated
samples, batches and steps per epoch with their padding, the data cache (where, and whether it
held every file), and a few rendered samples whose supervised tokens are coloured (or wrapped in
[[ ]] when the output is not a terminal).
"""

from __future__ import annotations

import math

import numpy as np

from ..recipe import Recipe
from . import load_datasets, recipe_tokenizer


def inspect_recipe(recipe: Recipe, show: int = 3, tokenizer=None, progress: bool = False) -> dict:
    """The data report of a recipe as plain (JSON-able) data."""
    tokenizer = tokenizer or recipe_tokenizer(recipe)
    splits = load_datasets(recipe, tokenizer, progress=progress)
    train = splits.stats["train"]
    if recipe.training.objective != "sft":  # preference examples: both sequences of each
        from .preference import report_samples

        lengths = [e.length for e in splits.train]
        samples = report_samples(splits.train, tokenizer, recipe.training.objective, show)
    else:
        lengths = splits.train.lengths
        samples = [{"index": i, "source": s.source, "tokens": len(s.tokens), "supervised": int(s.mask.sum()),
                    "pieces": _pieces(tokenizer, s)} for i, s in enumerate(splits.train[:show])]
    return {
        "recipe": recipe.source,
        **splits.stats,
        "supervised_fraction": round(train["supervised_tokens"] / max(train["tokens"], 1), 4),
        "length_histogram": _histogram(lengths, recipe.data.max_seq_len),
        "samples": samples,
    }


def _histogram(lengths: np.ndarray, max_seq_len: int) -> list[dict]:
    """Counts in bins (lo, hi] with power-of-two edges up to max_seq_len."""
    edges = [0] + [2 ** k for k in range(4, 32) if 2 ** k < max_seq_len] + [max_seq_len]
    counts = np.histogram(lengths, bins=np.array(edges) + 0.5)[0] if len(lengths) else [0] * (len(edges) - 1)
    return [{"from": lo + 1, "to": hi, "count": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)]


def _pieces(tokenizer, sample) -> list[dict]:
    """The sample as runs of text, each either supervised or not."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, sup in zip(sample.tokens.tolist(), sample.mask.tolist()):
        if runs and runs[-1][0] == sup:
            runs[-1][1].append(tok)
        else:
            runs.append((sup, [tok]))
    return [{"supervised": sup, "text": tokenizer.decode(ids)} for sup, ids in runs]


def format_report(report: dict, color: bool = False) -> str:
    """The report as text; `color` uses ANSI colours, otherwise supervised text is in [[ ]]."""
    import click

    cache = report["cache"] + (f", {report['cache_dir']}" if report["cache_dir"] else "")
    out = [f"data of {report['recipe']}", f"cache: {cache}; data stage {report['seconds']:.2f} s", "",
           "sources:"]
    head = (f"  {'source':<40} {'format':<12} {'records':>8} {'usable':>7} {'dropped':>8} {'truncated':>10} "
            f"{'no-sup':>7} {'weight':>7} {'in epoch':>9}")
    out.append(head)
    for s in report["sources"]:
        name = s["source"] if len(s["source"]) <= 40 else "..." + s["source"][-37:]
        w = "-" if s["weight"] is None else f"{s['weight']:g}"
        out.append(f"  {name:<40} {s['format']:<12} {s['records']:>8} {s['samples']:>7} {s['dropped']:>8} "
                   f"{s['truncated']:>10} {s['no_supervised']:>7} {w:>7} {s['epoch_samples']:>9}")
    tr = report["train"]
    unit = {"pairs": "pairs (2 sequences each)", "examples": "examples (each with a KL sequence)"}.get(
        report.get("unit"), "samples")
    out += ["", f"train: {tr['samples']} {unit}, {tr['tokens']} tokens, {tr['supervised_tokens']} supervised "
                f"({100 * report['supervised_fraction']:.1f}%), mean length {tr['mean_len']}, "
                f"max {tr['max_len']}",
            f"       {report['dropped']} dropped (longer than max_seq_len), {report['truncated']} truncated, "
            f"{report['no_supervised']} without supervised tokens"
            + (f", {report['empty_answers']} with empty answers" if "empty_answers" in report else "")
            + (f", {report['identical']} with chosen == rejected (left out)" if "identical" in report
               else "")]
    out += [f"note: {n}" for n in report.get("notes", [])]
    if "desirable" in tr:
        out.append(f"       {tr['desirable']} desirable, {tr['undesirable']} undesirable")
    v = report["valid"]
    out.append("valid: none" if v is None else
               f"valid: {v['samples']} {report.get('unit', 'samples')}, {v['tokens']} tokens, "
               f"{v['supervised_tokens']} supervised, {v['dropped']} dropped, {v['truncated']} truncated")
    out += ["", "token lengths (train):"]
    top = max((b["count"] for b in report["length_histogram"]), default=0) or 1
    for b in report["length_histogram"]:
        bar = "#" * math.ceil(40 * b["count"] / top) if b["count"] else ""
        out.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>7} {bar}")
    bt = report["batching"]
    out += ["", f"batches: batch_size {bt['batch_size']}, {'packed' if bt['pack'] else 'length-bucketed'} "
                f"rows of <= {bt['max_seq_len']} tokens: {bt['batches_per_epoch']} batches per epoch, "
                f"{bt['steps_per_epoch']} steps per epoch (grad_accum {bt['grad_accum']}), "
                f"{100 * bt['padding_fraction']:.1f}% padding"]
    if report["samples"]:
        legend = "green" if color else "[[inside double brackets]]"
        out += ["", f"rendered samples (supervised tokens {legend}):"]
    for s in report["samples"]:
        role = f" {s['role']}" if "role" in s else ""  # a preference example: each of its sequences
        out.append(f"--- sample {s['index']}{role} (source {s['source']}, {s['tokens']} tokens, "
                   f"{s['supervised']} supervised)")
        text = "".join(click.style(p["text"], fg="green", bold=True) if p["supervised"] and color
                       else f"[[{p['text']}]]" if p["supervised"] else p["text"] for p in s["pieces"])
        out.append(text.rstrip("\n"))
    return "\n".join(out)
