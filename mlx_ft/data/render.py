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

Records are rendered many at a time (`Renderer.render_many`): the template over a batch of
conversations and the fast tokenizer's batch encoding, one call each, which is what makes a
million records affordable. A `Renderer` pickles, so worker processes render exactly as this
one does.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import DataError
from .formats import Record

# A conversation `Renderer` checks once: rendered through the Hugging Face tokenizer directly
# (what worker processes do) and through mlx-lm's wrapper (what generation uses) it must agree.
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}]


class Renderer:
    """What rendering needs from a tokenizer (mlx-lm TokenizerWrapper or Hugging Face tokenizer).

    `portable`: the template renders through the Hugging Face tokenizer alone, with the keyword
    arguments mlx-lm's wrapper adds (its thinking switch), so the renderer can be pickled to
    worker processes. A tokenizer with a chat renderer of mlx-lm's own is not portable and is
    rendered in this process only.
    """

    def __init__(self, tokenizer):
        inner = getattr(tokenizer, "_tokenizer", None)  # mlx-lm's wrapper holds the Hugging Face one
        self.hf = inner if hasattr(inner, "apply_chat_template") else tokenizer
        self._wrapper = tokenizer
        self.eot_ids = np.array(sorted(_end_of_turn_ids(tokenizer)), dtype=np.int64)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.has_template = getattr(tokenizer, "has_chat_template", True)
        self.template_kwargs = _wrapper_kwargs(tokenizer)
        self.portable = self.template_kwargs is not None and self._agrees_with_wrapper()
        vocab = max(len(self.hf), getattr(self.hf, "vocab_size", 0) or 0)
        self.token_dtype = np.uint16 if vocab <= 2**16 else np.int32

    def __getstate__(self):
        assert self.portable, "only a portable renderer goes to worker processes"
        return {k: v for k, v in self.__dict__.items() if k != "_wrapper"}

    def __setstate__(self, state):
        self.__dict__.update(state, _wrapper=None)

    def identity(self) -> str:
        """A hash of everything in the tokenizer that changes rendered samples: its vocabulary,
        merges, normalizer, pre-tokenizer and post-processor (the fast tokenizer's own
        serialization), special tokens, end-of-turn ids and the chat template."""
        h = hashlib.sha256()
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(self.hf.get_vocab().items())).encode())
        settings = [type(self.hf).__name__, self.template(), self.template_kwargs, self.eot_ids.tolist(),
                    self.eos_id, self.has_template, getattr(self.hf, "special_tokens_map", None),
                    getattr(self.hf, "split_special_tokens", None), str(self.token_dtype)]
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def template(self):
        """The chat template (a string, or a dict of named templates); mlx-lm's own renderer by name."""
        custom = getattr(self._wrapper, "_chat_template", None) if self._wrapper is not None else None
        return getattr(self.hf, "chat_template", None) if custom is None else repr(custom)

    # -- templates and tokens, many records at a time --------------------------------------------
    def _apply(self, convs: list[list[dict]], tools, generation_prompt: bool) -> list[str]:
        if self.portable:
            out = self.hf.apply_chat_template(convs, tools=tools, tokenize=False,
                                              add_generation_prompt=generation_prompt, **self.template_kwargs)
            return list(out)
        return [self._wrapper.apply_chat_template(c, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt) for c in convs]

    def _agrees_with_wrapper(self) -> bool:
        if self._wrapper is self.hf:
            return True
        try:
            ours = self.hf.apply_chat_template([_PROBE], tokenize=False, **self.template_kwargs)[0]
            theirs = self._wrapper.apply_chat_template(_PROBE, tokenize=False)
        except Exception:  # a template that refuses the probe: render through the wrapper, in-process
            return False
        return ours == theirs

    def render_many(self, records: list[Record], train_on: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, mask) of each record, as `render` gives them one by one.

        Raises:
            DataError: naming the first record (in order) that cannot be rendered.
        """
        out: list = [None] * len(records)
        chats = [i for i, r in enumerate(records) if r.text is None]
        texts = [i for i, r in enumerate(records) if r.text is not None]
        if texts:
            ids = self._encode([records[i].text for i in texts], True)
            for i, toks in zip(texts, ids):
                toks = list(toks)
                if self.eos_id is not None and (not toks or toks[-1] != self.eos_id):
                    toks.append(self.eos_id)  # so the model learns where a document ends
                mask = np.ones(len(toks), dtype=bool)
                mask[:1] = False
                out[i] = (np.array(toks, dtype=np.int64), mask)
        if chats:
            try:
                rendered = self._chat_texts([records[i] for i in chats], train_on)
            except _Retry:  # some record fails: one by one, so the first failing one is named
                rendered = [self._chat_texts([records[i]], train_on)[0] for i in chats]
            encodings = self._encode_with_offsets([t for t, _ in rendered], records[chats[0]].where)
            for i, (text, spans), (ids, offsets) in zip(chats, rendered, encodings):
                mask = _span_mask(ids, offsets, spans, self.eot_ids, text, trim=train_on != "all")
                mask[:1] = False
                out[i] = (ids, mask)
        return out

    def _chat_texts(self, records: list[Record], train_on: str) -> list[tuple[str, list[tuple[int, int]]]]:
        """The rendered text and the character spans [start, end) to supervise, of each record."""
        if not self.has_template:
            r = records[0]
            raise DataError(f"{r.where}: the tokenizer has no chat template, so {r.format!r} records "
                            "cannot be rendered; use a chat (instruct) model or the 'text' format")
        # Every render the records need, grouped into one template call per (tools, prompt) kind.
        wanted: dict[tuple, list] = {}  # (tools json, generation prompt) -> [(record, key, messages)]
        for k, r in enumerate(records):
            tools = json.dumps(r.tools, sort_keys=True) if r.tools else None
            msgs = r.messages
            wanted.setdefault((tools, False), []).append((k, "full", msgs))
            for i in _turns(msgs, train_on):
                if i < len(msgs) - 1:
                    wanted[(tools, False)].append((k, ("end", i), msgs[: i + 1]))
                if i > 0:
                    wanted.setdefault((tools, True), []).append((k, ("before", i), msgs[:i]))
        got: dict[tuple, str] = {}
        for (tools, gen), items in wanted.items():
            tool_list = records[items[0][0]].tools if tools else None
            try:
                texts = self._apply([m for _, _, m in items], tool_list, gen)
            except Exception as e:  # jinja raises its own types, e.g. "roles must alternate"
                if len(records) > 1:
                    raise _Retry() from None
                raise DataError(f"{records[0].where}: the tokenizer's chat template cannot render this "
                                f"record ({type(e).__name__}: {e})") from None
            for (k, key, _), text in zip(items, texts):
                got[(k, key)] = text
        out = []
        for k, r in enumerate(records):
            try:
                out.append(_spans(r, got, k, train_on))
            except DataError:
                if len(records) > 1:
                    raise _Retry() from None
                raise
        return out

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not self.portable and self._wrapper is not self.hf:
            return [self._wrapper.encode(t) for t in texts]  # as mlx-lm's wrapper encodes
        return self.hf(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]

    def _encode_with_offsets(self, texts: list[str], where: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids [T], character offsets [T, 2] (start, end) of each token) of each text."""
        try:
            enc = self.hf(texts, add_special_tokens=False, return_attention_mask=False)
            encodings = enc.encodings
        except (NotImplementedError, TypeError, ValueError):
            encodings = None
        if encodings is None:
            raise DataError(f"{where}: the tokenizer gives no character offsets (not a 'fast' tokenizer), "
                            "which mlx_ft needs to find assistant turns; use a model with tokenizer.json")
        out = []
        for e in encodings:
            out.append((np.array(e.ids, dtype=np.int64), np.array(e.offsets, dtype=np.int64).reshape(-1, 2)))
        return out


def apply_template(tokenizer, messages, tools, generation_prompt: bool, where: str) -> str:
    """One conversation through the tokenizer's chat template (a record at a time: preference
    pairs); a template that refuses it is a DataError naming `where`."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises its own types, e.g. "roles must alternate"
        raise DataError(f"{where}: the tokenizer's chat template cannot render this record "
                        f"({type(e).__name__}: {e})") from None


class _Retry(Exception):
    """A batch of records failed somewhere: render them one by one to name the first failure."""


def render(record: Record, tokenizer, train_on: str) -> tuple[list[int], list[bool]]:
    """Tokens and supervision mask of one record; mask[0] is always False (nothing predicts it)."""
    renderer = tokenizer if isinstance(tokenizer, Renderer) else Renderer(tokenizer)
    tokens, mask = renderer.render_many([record], train_on)[0]
    return tokens.tolist(), mask.tolist()


def _turns(msgs: list[dict], train_on: str) -> list[int]:
    if train_on == "all":
        return []
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    return turns[-1:] if train_on == "last" else turns


def _spans(record: Record, got: dict, k: int, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    msgs = record.messages
    full = got[(k, "full")]
    if train_on == "all":
        return full, [(0, len(full))]
    spans = []
    for i in _turns(msgs, train_on):
        end = full if i == len(msgs) - 1 else got[(k, ("end", i))]
        if i > 0:
            before = got[(k, ("before", i))]
            start, ok = len(before), full.startswith(before)
        else:  # nothing to render before it (templates refuse an empty list): the turn starts at its text
            content = msgs[0].get("content") or ""
            start, ok = end.find(content), bool(content) and content in end
            if not ok:
                raise DataError(f"{record.where}: the conversation opens with an assistant message without "
                                "text, which cannot be located in the template; start with a user or system "
                                "message")
        if not (ok and full.startswith(end) and start <= len(end)):
            raise DataError(
                f"{record.where}: the chat template renders the conversation before assistant message {i} "
                "differently from the full conversation (it rewrites earlier turns, e.g. drops their "
                "reasoning), so that turn's tokens cannot be located exactly; set data.train_on = 'last' "
                "or use a template that renders history unchanged")
        spans.append((start, len(end)))
    return full, spans


def _wrapper_kwargs(tokenizer) -> dict | None:
    """The keyword arguments mlx-lm's TokenizerWrapper adds to every template call (its
    thinking switch), or None when it renders with a chat renderer of its own."""
    if not hasattr(getattr(tokenizer, "_tokenizer", None), "apply_chat_template"):
        return {}  # a Hugging Face tokenizer itself
    if getattr(tokenizer, "_chat_template", None) is not None:
        return None
    name = getattr(tokenizer, "_thinking_kwarg", None)
    return {name: tokenizer.has_thinking} if name else {}


def _end_of_turn_ids(tokenizer) -> set[int]:
    listed = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm's wrapper: a set; transformers 5: an int
    ids = {listed} if isinstance(listed, int) else set(listed or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _span_mask(ids: np.ndarray, offsets: np.ndarray, spans, eot_ids: np.ndarray, text: str,
               trim: bool) -> np.ndarray:
    """Supervised tokens: those starting inside a span (up to the span's last end-of-turn token)."""
    mask = np.zeros(len(ids), dtype=bool)
    starts = offsets[:, 0]
    for s, e in spans:
        inside = np.flatnonzero((starts >= s) & (starts < e))
        if not len(inside):
            continue
        if trim:
            ends = inside[np.isin(ids[inside], eot_ids)]
            if len(ends):
                inside = inside[inside <= ends[-1]]
            else:  # no end-of-turn token in the span: at least leave trailing whitespace out
                stop = len(inside)
                while stop and not text[offsets[inside[stop - 1], 0]:offsets[inside[stop - 1], 1]].strip():
                    stop -= 1
                inside = inside[:stop]
        mask[inside] = True
    return mask
