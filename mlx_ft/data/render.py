"""Rendering: a Record becomes `(tokens, mask)` through the tokenizer's own chat template.

`mask[i]` is True when token i is a supervised target (the loss on predicting tokens[i] from
tokens[:i] counts). How the assistant spans are found, for any template:

1. Render the whole conversation as text, once, and tokenize it with character offsets.
2. For each assistant turn i that `train_on` selects, render the conversation up to turn i with
   the generation prompt (where the model starts writing) and up to and including turn i. Both
   must be prefixes of the full text; their lengths are the turn's character span. (A turn
   that opens the conversation has nothing before it to render: it starts where its text does.)
3. A token is supervised when it starts inside a span. Tokens after the turn's last
   end-of-turn token (the `\\n` after ChatML's `<|im_end|>`) are scaffolding: unsupervised.

Templates that rewrite history (e.g. drop the reasoning of earlier turns) break step 2; that
is reported as an error, never turned into a silently wrong mask.

Example (ChatML, train_on = "assistant"; supervised tokens in [brackets]):

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello!<|im_end|>]\\n
"""

from __future__ import annotations

from ..errors import DataError
from .formats import Record


def render(record: Record, tokenizer, train_on: str) -> tuple[list[int], list[bool]]:
    """Tokens and supervision mask of one record; mask[0] is always False (nothing predicts it)."""
    if record.text is not None:
        tokens = list(tokenizer.encode(record.text))
        eos = tokenizer.eos_token_id
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)  # so the model learns where a document ends
        mask = [True] * len(tokens)
    else:
        text, spans = _chat_spans(record, tokenizer, train_on)
        tokens, offsets = _tokenize_with_offsets(tokenizer, text, record.where)
        mask = _span_mask(tokens, offsets, spans, _end_of_turn_ids(tokenizer), text, trim=train_on != "all")
    if mask:
        mask[0] = False
    return tokens, mask


def _apply_template(tokenizer, messages, tools, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises its own types, e.g. "roles must alternate"
        raise DataError(f"{where}: the tokenizer's chat template cannot render this record "
                        f"({type(e).__name__}: {e})") from None


def _chat_spans(record: Record, tokenizer, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) to supervise."""
    if not getattr(tokenizer, "has_chat_template", True):
        raise DataError(f"{record.where}: the tokenizer has no chat template, so {record.format!r} records "
                        "cannot be rendered; use a chat (instruct) model or the 'text' format")
    msgs, tools = record.messages, record.tools
    full = _apply_template(tokenizer, msgs, tools, False, record.where)
    if train_on == "all":
        return full, [(0, len(full))]
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        end = full if i == len(msgs) - 1 else _apply_template(tokenizer, msgs[: i + 1], tools, False, record.where)
        if i > 0:
            before = _apply_template(tokenizer, msgs[:i], tools, True, record.where)
            start, ok = len(before), full.startswith(before)
        else:  # nothing to render before it (templates refuse an empty list): the turn starts at its text
            content = msgs[0].get("content") or ""
            start, ok = end.find(content), bool(content) and content in end
            if not ok:
                raise DataError(f"{record.where}: the conversation opens with an assistant message without "
                                "text, which cannot be located in the template; start with a user or system message")
        if not (ok and full.startswith(end) and start <= len(end)):
            raise DataError(
                f"{record.where}: the chat template renders the conversation before assistant message {i} "
                "differently from the full conversation (it rewrites earlier turns, e.g. drops their "
                "reasoning), so that turn's tokens cannot be located exactly; set data.train_on = 'last' "
                "or use a template that renders history unchanged")
        spans.append((start, len(end)))
    return full, spans


def _tokenize_with_offsets(tokenizer, text: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise DataError(f"{where}: the tokenizer gives no character offsets (not a 'fast' tokenizer), "
                        "which mlx_ft needs to find assistant turns; use a model with tokenizer.json") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _span_mask(tokens, offsets, spans, eot_ids: set[int], text: str, trim: bool) -> list[bool]:
    mask = [False] * len(tokens)
    for s, e in spans:
        inside = [t for t, (a, _) in enumerate(offsets) if s <= a < e]
        if not inside:
            continue
        if trim:
            ends = [t for t in inside if tokens[t] in eot_ids]
            if ends:
                inside = [t for t in inside if t <= ends[-1]]
            else:  # no end-of-turn token in the span: at least leave trailing whitespace out
                while inside and not text[offsets[inside[-1]][0]:offsets[inside[-1]][1]].strip():
                    inside.pop()
        for t in inside:
            mask[t] = True
    return mask
