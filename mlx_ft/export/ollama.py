"""Ollama Modelfile next to a GGUF: FROM, a Go TEMPLATE rendering what the chat template renders,
the chat template's default system message as SYSTEM, and stop strings.

Ollama templates are Go templates, not Jinja. Rather than recognise a few template families by their
markers, the chat template is *measured*: it renders probe conversations whose message texts are
unique words, and the text between two messages is read off for each pair of roles (before the first
message, system -> user, user -> assistant, assistant -> user, and the generation prompt after the
last user message). Most chat templates are such a table; the Go template written is that table.
It is checked before it is written: for longer conversations, with and without a system message,
the table must reproduce the Jinja rendering exactly, else no TEMPLATE is written and the Modelfile
says why.

What Ollama does around the template (server/routes.go, template/template.go) is part of the
contract: when the conversation has no system message, Ollama puts the Modelfile's SYSTEM first.
So a template that injects a default system turn (Qwen 2.5, SmolLM) gets it as SYSTEM, and a
conversation without one renders as the chat template renders it. Ollama's tokenizer adds BOS
itself when the GGUF says `add_bos_token`, so a leading BOS the chat template writes as text is
left out of the TEMPLATE (else the model would see two). Message texts are not trimmed (Go
templates have no trim; Llama 3 and Gemma trim theirs) and tool calls are not rendered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ._io import MODELFILE_HEADER, atomic_file, check_target

ROLES = ("system", "user", "assistant")
# A system message the chat template refuses (Gemma 2, Mistral v0.1) goes at the start of the first
# user message, separated as Gemma 3's own template separates it.
MERGED_SYSTEM_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as a table: the text before the first message (by its role), between two
    messages (by both roles) and after a final user message (the generation prompt)."""

    start: dict[str, str]
    between: dict[tuple[str, str], str]
    generation: str
    system: str | None = None  # the default system message the template injects, if any
    stops: list[str] = field(default_factory=list)


class NotATable(Exception):
    """The chat template does something a per-role table cannot express."""


def render(fmt: ChatFormat, messages: list[dict]) -> str:
    """What the Go template of `fmt` renders for `messages` (Python twin of `go_template`)."""
    out, prev = [], ""
    for m in messages:
        out.append(fmt.start.get(m["role"], "") if not prev else fmt.between.get((prev, m["role"]), ""))
        out.append(m["content"])
        prev = m["role"]
    if prev == "user":
        out.append(fmt.generation)
    return "".join(out)


def _go_text(piece: str) -> str:
    # Raw template text is literal except the left delimiter.
    return piece.replace("{{", '{{ "{{" }}')


def _go_branches(var: str, cases: dict[str, str]) -> str:
    """`{{ if eq $var "a" }}A{{ else if eq $var "b" "c" }}B{{ end }}`: one branch per distinct text
    (Go's eq is true when its first argument equals any of the others)."""
    groups: dict[str, list[str]] = {}
    for key, piece in cases.items():
        groups.setdefault(piece, []).append(key)
    out = [f'{{{{ {"if" if i == 0 else "else if"} eq {var} {" ".join(json.dumps(k) for k in keys)} }}}}'
           f"{_go_text(piece)}" for i, (piece, keys) in enumerate(groups.items())]
    return "".join(out) + ("{{ end }}" if out else "")


def go_template(fmt: ChatFormat) -> str:
    """The Ollama TEMPLATE (Go text/template over .Messages) for `fmt`."""
    lines = ['{{- $prev := "" }}{{ range .Messages }}']
    for i, role in enumerate(ROLES):
        cases = {"": fmt.start[role]} if role in fmt.start else {}
        cases.update({p: t for (p, r), t in fmt.between.items() if r == role})
        body = _go_branches("$prev", cases)
        lines.append(f'{{{{- {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{body}')
    lines.append("{{- end }}{{ .Content }}{{ $prev = .Role }}")
    lines.append(f'{{{{- end }}}}{{{{ if eq $prev "user" }}}}{_go_text(fmt.generation)}{{{{ end }}}}')
    return "\n".join(lines)


def _probe(role: str, i: int) -> dict:
    # Words no template changes (no spaces to trim, no markup), unique in the rendering.
    return {"role": role, "content": f"MlxFt{role.capitalize()}{i}"}


def _split(text: str, messages: list[dict]) -> list[str]:
    """The texts around the message contents, in order: len(messages) + 1 pieces."""
    pieces, pos = [], 0
    for m in messages:
        at = text.find(m["content"], pos)
        if at < 0 or text.count(m["content"]) != 1:
            raise NotATable(f"message {m['content']!r} is not rendered verbatim once")
        pieces.append(text[pos:at])
        pos = at + len(m["content"])
    return pieces + [text[pos:]]


def derive(render_jinja: Callable[[list[dict]], str], bos: str | None = None,
           special_tokens: tuple[str, ...] = (), eos: str | None = None) -> ChatFormat:
    """Measure a chat template as a ChatFormat.

    Args:
        render_jinja: messages -> the chat template's text with the generation prompt.
        bos: the BOS text to leave out at the start (Ollama's tokenizer adds the BOS token itself).
        special_tokens: the tokenizer's special tokens; those closing an assistant turn become stops.
    Raises:
        NotATable: the template cannot be written as an Ollama TEMPLATE; the reason.
    """
    u, a, s = ((lambda i: _probe("user", i)), (lambda i: _probe("assistant", i)),
               (lambda i: _probe("system", i)))

    def pieces(msgs):
        try:
            text = render_jinja(msgs)
        except Exception as e:  # noqa: BLE001 - jinja's raise_exception and its own errors
            raise NotATable(f"it refuses {[m['role'] for m in msgs]}: {type(e).__name__}: {e}") from None
        if bos and text.startswith(bos):
            text = text[len(bos):]
        return _split(text, msgs)

    plain = [u(1), a(1), u(2), a(2), u(3)]
    q = pieces(plain)
    if q[1] != q[3] or q[2] != q[4]:
        raise NotATable("the text between turns depends on the turn's position")
    start = {"user": q[0]}
    between = {("user", "assistant"): q[1], ("assistant", "user"): q[2]}
    default = None
    try:
        p = pieces([s(1)] + plain)
    except NotATable:  # no system role (Gemma 2): merged into the first user message
        start["system"], between[("system", "user")] = q[0], MERGED_SYSTEM_SEPARATOR
    else:
        if p[2:] != q[1:]:
            raise NotATable("a system message changes how the other turns are rendered")
        start["system"], between[("system", "user")] = p[0], p[1]
        head, tail = p[0], p[1]
        if q[0].startswith(head) and q[0].endswith(tail) and len(q[0]) >= len(head) + len(tail):
            default = q[0][len(head):len(q[0]) - len(tail)] or None
    fmt = ChatFormat(start, between, q[-1], default, _stops(q[2], special_tokens, eos))
    for msgs in ([u(7)], [s(7), u(7)], [s(7), u(7), a(7), u(8), a(8), u(9)],
                 [u(7), a(7), u(8), a(8), u(9), a(9), u(10)]):
        try:
            want = render_jinja(msgs)
        except Exception:  # noqa: BLE001 - refused by the template: nothing to match
            continue
        want = want[len(bos):] if bos and want.startswith(bos) else want
        if render(fmt, msgs) != want:
            raise NotATable("the table does not reproduce a conversation of roles "
                            f"{[m['role'] for m in msgs]}")
    return fmt


def _stops(after_assistant: str, special_tokens: tuple[str, ...], eos: str | None) -> list[str]:
    """The special tokens in the text that closes an assistant turn (<|im_end|>, <|eot_id|>, ...), in
    order, then EOS: where Ollama should stop generating."""
    found = sorted((after_assistant.find(t), t) for t in set(special_tokens) if t and t in after_assistant)
    return list(dict.fromkeys([t for _, t in found] + ([eos] if eos else [])))


def hf_chat_format(base_dir: Path, add_bos: bool, tokenizer=None) -> ChatFormat:
    """The ChatFormat of a model directory's tokenizer (the one training rendered with)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise NotATable("the tokenizer has no chat template")

    def render_jinja(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    specials = tuple(tokenizer.all_special_tokens) + tuple(
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return derive(render_jinja, tokenizer.bos_token if add_bos else None, specials, tokenizer.eos_token)


def _gguf_add_bos(gguf_path: Path) -> bool:
    """Whether llama.cpp (and so Ollama) adds BOS for this GGUF; Ollama's default is yes."""
    from .gguf_meta import read_meta

    f = read_meta(gguf_path, tensors=False).fields.get("tokenizer.ggml.add_bos_token")
    return True if f is None else bool(f.value())


def _quoted(text: str) -> str | None:
    return None if '"""' in text else f'"""{text}"""'


def modelfile_text(gguf_name: str, base_dir: Path, add_bos: bool, adapter: str | None = None,
                   tokenizer=None) -> str:
    """The Modelfile for `gguf_name` (a GGUF of the model in `base_dir`)."""
    lines = [f"{MODELFILE_HEADER}. Create the model with:",
             "#   ollama create my-model -f Modelfile", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    try:
        fmt = hf_chat_format(base_dir, add_bos, tokenizer)
        template = _quoted(go_template(fmt))
        if template is None:
            raise NotATable('its text contains """, which a Modelfile cannot quote')
    except NotATable as e:
        lines.append(f"# no TEMPLATE: the chat template cannot be written as Ollama's ({e}); Ollama then "
                     "picks one from its library that matches the GGUF's tokenizer.chat_template, if any")
        return "\n".join(lines) + "\n"
    lines.append(f"TEMPLATE {template}")
    if fmt.system and _quoted(fmt.system):
        # Ollama sends it as the first message when a conversation has none: what the template injects.
        lines.append(f"SYSTEM {_quoted(fmt.system)}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in fmt.stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, base_dir: Path, overwrite: bool = False, adapter: str | None = None,
                    tokenizer=None) -> Path:
    """Write `Modelfile` next to `gguf_path` (the base GGUF when `adapter` names a LoRA GGUF)."""
    out = gguf_path.parent / "Modelfile"
    check_target(out, overwrite, "modelfile")
    text = modelfile_text(gguf_path.name, base_dir, _gguf_add_bos(gguf_path), adapter, tokenizer)
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    return out
