"""Tokenizer metadata for GGUF: the full vocabulary, merges or scores, special tokens, add-bos/eos
flags and the chat template, as llama.cpp's converter writes them (conversion/base.py).

Two tokenizer kinds:
- byte-level BPE from tokenizer.json (Llama 3, Qwen, Mistral-Nemo): model "gpt2", merges, and
  `tokenizer.ggml.pre`, the name llama.cpp uses to pick its pre-tokenizer regex;
- SentencePiece from tokenizer.model (Llama 2, Mistral v0.x, Gemma, Phi-3): model "llama",
  scores and piece types.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ExportError

# Pre-tokenizer regexes as they appear in tokenizer.json -> llama.cpp's `tokenizer.ggml.pre` name.
# llama.cpp's converter identifies them by hashing the ids of a test string (a table generated per
# known model); matching the regex itself also covers fine-tunes and retrained tokenizers.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
BPE_PRE_BY_REGEX = {
    GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
_LOOKS_SPECIAL = re.compile(r"^(<\|.*\|>|<unused\d+>|<pad>|<mask>|<s>|</s>|<unk>|<start_of_turn>|<end_of_turn>)$")


def add_vocab(writer, base_dir: Path, tokenizer, n_vocab: int) -> str:
    """Write the tokenizer of `base_dir` into `writer`; returns "bpe" or "spm".

    Args:
        tokenizer: the transformers tokenizer loaded from base_dir.
        n_vocab: rows of the embedding matrix; the vocabulary is padded to it with [PAD{i}].
    """
    import gguf

    hf_tok = tokenizer
    if (base_dir / "tokenizer.model").is_file():
        _add_sentencepiece(writer, base_dir, hf_tok, n_vocab)
        kind = "spm"
    elif (base_dir / "tokenizer.json").is_file():
        _add_bpe(writer, base_dir, hf_tok, n_vocab)
        kind = "bpe"
    else:
        raise ExportError(f"{base_dir}: neither tokenizer.model (SentencePiece) nor tokenizer.json found; "
                          "a GGUF needs the tokenizer, copy the base model's tokenizer files there")
    special = gguf.SpecialVocab(base_dir, load_merges=kind == "bpe", n_vocab=n_vocab)
    if kind == "bpe" and not special.merges:
        raise ExportError(f"{base_dir}/tokenizer.json: BPE tokenizer without merges; llama.cpp cannot load it")
    special.add_to_gguf(writer, quiet=True)
    return kind


def bpe_pre_name(tokenizer_json: dict, source: str) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from the regex its pre_tokenizer uses."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = []
    for step in steps:
        if step.get("type") == "Split":
            regexes.append(step.get("pattern", {}).get("Regex"))
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            regexes.append(GPT2_REGEX)
    if len(regexes) == 1 and regexes[0] in BPE_PRE_BY_REGEX:
        return BPE_PRE_BY_REGEX[regexes[0]]
    raise ExportError(f"{source}: BPE pre-tokenizer not recognised (split regexes: {regexes or 'none'}); "
                      f"mlx_ft knows {', '.join(sorted(set(BPE_PRE_BY_REGEX.values())))}. Writing it under "
                      "another name would make llama.cpp tokenize differently from training; convert this "
                      "model with llama.cpp's convert_hf_to_gguf.py on the `--to safetensors` export instead")


def _add_bpe(writer, base_dir: Path, hf_tok, n_vocab: int) -> None:
    import gguf

    # The tokenizer as transformers (and so mlx-lm, in training) builds it, which is not always the
    # file: transformers 5 rebuilds e.g. Qwen2's pre-tokenizer from its class whatever the file says.
    backend = getattr(hf_tok, "backend_tokenizer", None)
    tj = json.loads(backend.to_str()) if backend is not None else json.loads((base_dir / "tokenizer.json").read_text())
    if tj.get("model", {}).get("type") != "BPE":
        raise ExportError(f"{base_dir}/tokenizer.json: model type {tj.get('model', {}).get('type')!r} is not "
                          "supported for GGUF (only byte-level BPE, or SentencePiece with tokenizer.model)")
    pre = bpe_pre_name(tj, f"{base_dir}/tokenizer.json")
    reverse = {i: t for t, i in hf_tok.get_vocab().items()}
    added = hf_tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tok = added[i]
            special = tok.special or bool(_LOOKS_SPECIAL.match(tok.content))
            tokens.append(tok.content if special else tok.content.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _add_sentencepiece(writer, base_dir: Path, hf_tok, n_vocab: int) -> None:
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(kind)
    # Tokens added on top of the SentencePiece model (chat markers), as the converter does.
    for i, tok in hf_tok.added_tokens_decoder.items():
        if i >= n_vocab:
            continue
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]"); scores.append(-1000.0); types.append(gguf.TokenType.UNUSED)
        if types[i] in (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.BYTE) and tokens[i] == tok.content:
            continue
        tokens[i], scores[i] = tok.content, -1000.0
        types[i] = gguf.TokenType.CONTROL if tok.special else gguf.TokenType.USER_DEFINED
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]"); scores.append(-1000.0); types.append(gguf.TokenType.UNUSED)
    if len(tokens) > n_vocab:
        raise ExportError(f"{base_dir}/tokenizer.model has {len(tokens)} pieces but the embedding has only "
                          f"{n_vocab} rows; the tokenizer does not belong to this model")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # Whether " " is prepended to the text (SentencePiece's add_dummy_prefix): Llama 2 yes, Gemma no.
    writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))
