"""The Ollama Modelfile renders what the chat template renders: its TEMPLATE, run by Go's own
text/template as Ollama runs it (SYSTEM first when the conversation has none, `tests/ollama_render.py`),
gives the Jinja rendering transformers gives (what training saw), for real chat templates (from
llama.cpp's test data in the llama-cpp-python sdist) and the tiny models' ChatML in a real export.
"""

from __future__ import annotations

import re

import pytest

from llama_cpp_src import llama_cpp_dir
from ollama_render import ollama_render
from test_export_helpers import build_base, make_adapter

from mlx_ft.export import fuse
from mlx_ft.export.ollama import modelfile_text

# template file -> (bos, eos, add_bos, end-of-turn marker, the chat markers the tokenizer has as special
# tokens), from each model's tokenizer_config.json / tokenizer.json on the Hugging Face hub.
TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>", False, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", True, "<|eot_id|>",
                                         ["<|start_header_id|>", "<|end_header_id|>"]),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", True, "<|eot_id|>",
                                         ["<|start_header_id|>", "<|end_header_id|>"]),
    "google-gemma-2-2b-it": ("<bos>", "<eos>", True, "<end_of_turn>", ["<start_of_turn>"]),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>", False, "<|end|>",
                                        ["<|user|>", "<|assistant|>", "<|system|>"]),
    "HuggingFaceTB-SmolLM3-3B": (None, "<|im_end|>", False, "<|im_end|>", ["<|im_start|>"]),
}
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
EXCHANGE = [{"role": "user", "content": "What colour is item 7?"},
            {"role": "assistant", "content": "Item 7 is blue.\nAsk me about others!"},
            {"role": "user", "content": "And item 12 — in French?"},
            {"role": "assistant", "content": "L'article 12 est rouge."}]
ASK = {"role": "user", "content": "Sure? Say \"yes\" {{ or }} no."}
CONVERSATIONS = {"no system": [ASK], "system": [SYSTEM, ASK], "two exchanges": EXCHANGE + [ASK],
                 "system, two exchanges": [SYSTEM] + EXCHANGE + [ASK]}


def _tokenizer(template: str, bos, eos, specials):
    """A transformers tokenizer carrying a real chat template and its special tokens (the vocabulary
    is a tiny one: only the template and the special tokens matter here)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    tok.add_special_tokens({**({"bos_token": bos} if bos else {}), "eos_token": eos,
                            "additional_special_tokens": [t for t in specials if t not in (bos, eos)]})
    tok.chat_template = template
    return tok


def _modelfile_parts(text: str) -> tuple[str, str]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return template, system.group(1) if system else ""


def _check(modelfile: str, tok, bos_added: str) -> None:
    """Every conversation, rendered by Ollama (Go) from the Modelfile, equals the Jinja rendering."""
    template, system = _modelfile_parts(modelfile)
    cases, want = [], {}
    for name, msgs in CONVERSATIONS.items():
        try:
            want[name] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - Gemma 2 refuses system messages: the model never saw one
            assert msgs[0]["role"] == "system"
            continue
        cases.append({"template": template, "system": system, "messages": msgs})
    got = ollama_render(cases)
    for (name, jinja), go in zip(want.items(), got):
        assert bos_added + go == jinja, name  # Ollama's tokenizer adds the BOS the template wrote


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_modelfile_renders_real_chat_templates_as_jinja(name):
    bos, eos, add_bos, end_of_turn, specials = TEMPLATES[name]
    template = (llama_cpp_dir() / "models" / "templates" / f"{name}.jinja").read_text()
    tok = _tokenizer(template, bos, eos, [end_of_turn] + specials)
    text = modelfile_text("model.gguf", None, add_bos, tokenizer=tok)
    assert "TEMPLATE" in text and f'PARAMETER stop "{end_of_turn}"' in text
    # Qwen 2.5 and SmolLM3 inject a default system turn: Ollama gets it as SYSTEM.
    assert ("\nSYSTEM " in text) == (name in ("Qwen-Qwen2.5-7B-Instruct", "HuggingFaceTB-SmolLM3-3B"))
    _check(text, tok, bos if add_bos else "")


def test_fused_gguf_modelfile_renders_chatml_as_jinja(tmp_path):
    from transformers import AutoTokenizer

    base = build_base(tmp_path, "llama", "bpe")
    adapter_dir, _ = make_adapter(tmp_path, base)
    out = fuse(adapter_dir, to="gguf", gguf_type="f32")
    text = (out.parent / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    _check(text, AutoTokenizer.from_pretrained(str(base)), "")  # this GGUF adds no BOS


def test_unexpressible_template_leaves_template_out():
    """Mistral Nemo puts the system message into the last user turn: no table can say that."""
    template = (llama_cpp_dir() / "models" / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()
    text = modelfile_text("model.gguf", None, True, tokenizer=_tokenizer(template, "<s>", "</s>", ["[INST]"]))
    assert "\nTEMPLATE" not in text and "# no TEMPLATE: the chat template cannot be written as Ollama's" in text
