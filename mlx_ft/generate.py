"""Quick check of a fine-tune: load base + adapter, apply the chat template, stream the answer.

    mlxft generate runs/demo --chat --prompt "Review: The soup was awful."

The same from Python: `generate("runs/demo", "Review: ...", chat=True, system=...)`, or
`generate(result, ...)` with the `TrainResult` of `train()`, which reuses its model in memory.
Decoding is greedy by default (temp 0), so a check gives the same text every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelError


@dataclass
class Generation:
    """What `generate` produced: the text and how it went."""

    text: str
    prompt: str
    """The prompt as the model saw it (with the chat template applied when `chat`)."""
    prompt_tokens: int
    generation_tokens: int
    tokens_per_sec: float
    finish_reason: str | None
    """`stop` (an end-of-sequence token) or `length` (max_tokens reached)."""

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return (f"Generation({self.text!r}, {self.generation_tokens} tokens, "
                f"{self.tokens_per_sec:.1f} tok/s, finish={self.finish_reason})")


def load_for_generation(model: str | Path | None = None, adapter: str | Path | None = None):
    """(model, tokenizer) for a base, a base + adapter, or a run directory.

    A run or adapter directory alone is enough: its adapter_config.json records the base model
    and how it was quantized. `model` then overrides the recorded base.
    """
    from .models import load_base, load_with_adapter
    from .recipe import ModelConfig

    if adapter is None and model is not None and _is_run_or_adapter(Path(model)):
        model, adapter = None, model  # `mlxft generate runs/demo`: the run names its base
    if adapter is not None:
        m, tok, _ = load_with_adapter(adapter, base_model=str(model) if model else None)
        return m, tok
    if model is None:
        raise ModelError("generate: give a model (hub id or directory), an adapter directory, or a run "
                         "directory")
    m, tok, _ = load_base(ModelConfig(path=str(model)))
    m.eval()
    return m, tok


def _is_run_or_adapter(path: Path) -> bool:
    from .models import ADAPTER_CONFIG

    return (path / ADAPTER_CONFIG).is_file() or (path / "adapters" / ADAPTER_CONFIG).is_file()


def build_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> str:
    """The text the model is given: the raw prompt, or one user turn through the chat template."""
    if not chat:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError("generate --chat: this tokenizer has no chat template; drop --chat to send the "
                         "prompt as raw text")
    messages = (([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": prompt}])
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate(model, prompt: str, adapter: str | Path | None = None, chat: bool = False,
             system: str | None = None, max_tokens: int = 256, temp: float = 0.0, top_p: float = 0.0,
             seed: int = 0, on_text: Callable[[str], None] | None = None, tokenizer=None) -> Generation:
    """Generate a completion for `prompt`, streaming pieces of text to `on_text` as they come.

    Args:
        model: a hub id or model directory; a run or adapter directory (its recorded base is
            loaded with the adapter); a `TrainResult`; or an mlx-lm model (then pass `tokenizer`).
        adapter: adapter or run directory applied to `model` (a base given by id or path).
        chat: apply the tokenizer's chat template to one user turn (and `system`, if given).
        system: system message; implies `chat`.
        max_tokens, temp, top_p: decoding; temp 0 is greedy.
        on_text: called with each new piece of text, e.g. `print` with `end=""`.
    Raises:
        ModelError: no model, no adapter/base found, no chat template.
    """
    if hasattr(model, "adapter_dir") and hasattr(model, "model"):  # a TrainResult
        model, tokenizer = model.model, model.tokenizer
        model.eval()  # adapter dropout off
    if tokenizer is None:
        model, tokenizer = load_for_generation(model, adapter)
    elif adapter is not None:
        raise ModelError("generate: `adapter` applies to a model given by id or path, not to a loaded model")
    text_prompt = build_prompt(tokenizer, prompt, chat or system is not None, system)
    # The chat template already wrote the BOS token; encode without adding another one.
    ids = tokenizer.encode(text_prompt, add_special_tokens=not (chat or system is not None))
    return complete(model, tokenizer, ids, text_prompt, max_tokens, temp, top_p, seed, on_text)


def complete(model, tokenizer, ids: list[int], text_prompt: str = "", max_tokens: int = 256,
             temp: float = 0.0, top_p: float = 0.0, seed: int = 0,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Continue the token ids `ids` (the prompt already templated and encoded): what `generate`
    and `mlxft eval` decode with. Stops at the tokenizer's end-of-sequence tokens."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    pieces, last = [], None
    for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens,
                                sampler=make_sampler(temp=temp, top_p=top_p)):
        if last.text:
            pieces.append(last.text)
            if on_text is not None:
                on_text(last.text)
    if last is None:  # max_tokens 0
        return Generation("", text_prompt, len(ids), 0, 0.0, "length")
    return Generation("".join(pieces), text_prompt, last.prompt_tokens, last.generation_tokens,
                      last.generation_tps, last.finish_reason)
