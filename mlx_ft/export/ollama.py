"""Ollama Modelfile next to a GGUF: FROM, a Go TEMPLATE for the chat format, stop tokens.

Ollama templates are Go templates, not Jinja, so the chat template is recognised by its markers
(ChatML, Llama 3, Gemma, Phi-3, Mistral [INST]) and written in Ollama's form. For an unrecognised
template the TEMPLATE line is left out and Ollama falls back to the template inside the GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._io import MODELFILE_HEADER, atomic_file, check_target

# marker in the Jinja template -> (Ollama Go template, stop strings)
TEMPLATES = [
    ("<|im_start|>", '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"]),
    ("<|start_header_id|>", '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                            '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
     ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("<start_of_turn>", '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model'
                        '{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n'
                        '{{ end }}<start_of_turn>model\n', ["<start_of_turn>", "<end_of_turn>"]),
    ("<|assistant|>", '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
     ["<|end|>", "<|user|>", "<|assistant|>"]),
    ("[INST]", '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
               '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}', ["[INST]", "[/INST]"]),
]


def chat_template(base_dir: Path) -> str | None:
    cfg_path = base_dir / "tokenizer_config.json"
    tmpl = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.is_file() else None
    if tmpl is None and (base_dir / "chat_template.jinja").is_file():
        tmpl = (base_dir / "chat_template.jinja").read_text()
    if isinstance(tmpl, list):  # named templates: use "default"
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"])
    return tmpl


def modelfile_text(gguf_name: str, base_dir: Path, adapter: str | None = None) -> str:
    tmpl = chat_template(base_dir) or ""
    lines = [f"{MODELFILE_HEADER}. Create the model with:",
             f"#   ollama create my-model -f Modelfile", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    match = next(((go, stops) for marker, go, stops in TEMPLATES if marker in tmpl), None)
    if match:
        go, stops = match
        lines.append(f'TEMPLATE """{go}"""')
        eos = _eos_token(base_dir)
        for s in dict.fromkeys(stops + ([eos] if eos else [])):
            lines.append(f'PARAMETER stop "{s}"')
    else:
        lines.append("# chat template not recognised (no ChatML/Llama 3/Gemma/Phi-3/[INST] markers): Ollama "
                     "uses the one stored in the GGUF (tokenizer.chat_template)")
    return "\n".join(lines) + "\n"


def _eos_token(base_dir: Path) -> str | None:
    path = base_dir / "tokenizer_config.json"
    eos = json.loads(path.read_text()).get("eos_token") if path.is_file() else None
    return eos.get("content") if isinstance(eos, dict) else eos


def write_modelfile(gguf_path: Path, base_dir: Path, overwrite: bool = False, adapter: str | None = None) -> Path:
    out = gguf_path.parent / "Modelfile"
    check_target(out, overwrite, "modelfile")
    with atomic_file(out) as tmp:
        tmp.write_text(modelfile_text(gguf_path.name, base_dir, adapter))
    return out
