"""mlx_ft's GGUF equals llama.cpp's own converter's: for each family's tiny model (configs also in the
transformers-5 spelling, one with `architectures: null`), llama.cpp's convert_hf_to_gguf.py from the
llama-cpp-python sdist converts mlx_ft's fused `--to safetensors` directory, and every tensor and
every metadata key that affects inference must equal mlx_ft's own `--to gguf` file. The keys that
differ on purpose are DELIBERATE below (docs/export.md says why).

BPE tokenizers the converter cannot name (a hash unknown to its table, as every tokenizer trained
here is) make it stop, so the BPE cases use Qwen2's real tokenizer, rebuilt from the vocabulary GGUF
llama.cpp ships for its tokenizer tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

from llama_cpp_src import llama_cpp_dir
from test_export_helpers import build_base, make_adapter

from mlx_ft.export import fuse
from mlx_ft.export.gguf_meta import read_meta, tensor_bytes
from mlx_ft.export.vocab import BPE_PRE, PRE_DEFINITIONS

# general.* naming the converter derives from the directory and its model card (name, size label,
# basename, ...): descriptive only, llama.cpp does not read them to run the model.
DELIBERATE = ("general.name", "general.size_label", "general.basename", "general.finetune",
              "general.version", "general.license", "general.tags", "general.languages")
# The converter takes a SentencePiece model's added tokens from tokenizer_config.json's
# added_tokens_decoder, which transformers 5 no longer writes, so it marks chat markers NORMAL;
# mlx_ft takes them from the tokenizer transformers builds (what training used): CONTROL, score
# -1000. mlx_ft also writes add_space_prefix for every SentencePiece model (True is llama.cpp's
# default when the key is absent). Both only where `sentencepiece_added` allows.
SPM_ADDED = ("tokenizer.ggml.token_type", "tokenizer.ggml.scores")
# Per case, keys where mlx_ft is right and the converter is not, for these tiny models (each checked
# in llama.cpp against MLX logits by test_export_gguf.py):
# - Gemma 3's converter writes add_space_prefix = False for every tokenizer (Gemma's have no dummy
#   prefix); mlx_ft writes what the SentencePiece model does (the tiny one adds it);
# - it writes no sliding_window_pattern when the config has sliding_window_pattern but no
#   layer_types, so llama.cpp assumes 5 local layers in 6; mlx_ft writes the config's pattern.
CASE_DIFFERENCES = {"gemma3-spm-t5": ("tokenizer.ggml.add_space_prefix", "gemma3.attention.sliding_window_pattern")}
# id -> (family, tokenizer, transformers-5 spelling, extra config)
CASES = {
    "llama-spm": ("llama", "spm", False, {}),
    "llama-gpt2tok-t5-noarch": ("llama", "gpt-2", True, {"rope_theta": 100000.0, "architectures": None}),
    "qwen2-spm-tied": ("qwen2", "spm", False, {"tie_word_embeddings": True}),
    "qwen3-spm-t5": ("qwen3", "spm", True, {}),
    "gemma3-spm-t5": ("gemma3", "spm", True, {}),
    "phi3-spm-t5": ("phi3", "spm", True, {}),
    "mixtral-spm": ("mixtral", "spm", False, {}),
    "olmo2-bpe-t5": ("olmo2", "bpe", True, {}),
    "granite-spm-t5": ("granite", "spm", True, {}),
    "qwen2_moe-bpe": ("qwen2_moe", "bpe", False, {}),
}
# OLMo 2 and Qwen2-MoE read only a BPE tokenizer.json, and the converter stops on a BPE tokenizer its
# table does not know (every tiny one). These cases are about the architecture: the converter is told
# the pre-tokenizer name mlx_ft decided (gpt-2, by its definition, which
# test_pre_tokenizer_definitions_are_the_real_ones checks on the real tokenizer); all else is its own.
TOLD_PRE = {"olmo2-bpe-t5": "gpt-2", "qwen2_moe-bpe": "gpt-2"}
# A 50k vocabulary makes every weight-sized step slow: that case is narrower (head_dim 16 still).
SIZES = {"llama-gpt2tok-t5-noarch": dict(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)}


def _converter(src, conn) -> None:
    """llama.cpp's converter with its own gguf-py, in a child forked from the test process once torch
    and transformers are imported there (importing them again costs a fresh interpreter ~5 s; on
    macOS it is spawned all the same); one job per message, converted as soon as it arrives."""
    import logging
    import traceback

    os.chdir(src)
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[name]  # the installed gguf-py; the converter needs the one it ships with
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    os.environ["NO_LOCAL_GGUF"] = "1"  # it would add its gguf-py after the installed one
    import convert_hf_to_gguf as conv
    from conversion.base import TextModel

    own_pre = TextModel.get_vocab_base_pre
    while (job := conn.recv()) is not None:
        case, hf_dir, out = job
        told = TOLD_PRE.get(case)
        TextModel.get_vocab_base_pre = (lambda self, tok: told) if told else own_pre
        sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", "f32"]
        try:
            conv.main()
            conn.send((case, "ok"))
        except BaseException:  # noqa: BLE001 - its errors, sys.exit included, are the test's finding
            conn.send((case, traceback.format_exc()[-1500:]))
        logging.getLogger().handlers.clear()  # main() adds a handler each time


def real_bpe_tokenizer(name: str):
    """llama.cpp's vocabulary GGUF of a real tokenizer, rebuilt as a `tokenizers.Tokenizer` with
    mlx_ft's definition of its pre-tokenizer (a leading bos for Llama 3, as its tokenizer adds)."""
    from tokenizers import Tokenizer

    cached = llama_cpp_dir().parent / f"tokenizer-{name}.json"  # the GGUF's vocabulary as tokenizer.json
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    meta = read_meta(llama_cpp_dir() / "models" / f"ggml-vocab-{name}.gguf", tensors=False)
    tokens, merges, types = (meta.fields[f"tokenizer.ggml.{k}"].value() for k in ("tokens", "merges", "token_type"))
    tj = {"version": "1.0", **PRE_DEFINITIONS[name], "post_processor": None,
          "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate(tokens) if types[i] == 3],
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": name == "llama-bpe", "vocab": {t: i for i, t in enumerate(tokens)},
                    "merges": merges}}
    if name == "llama-bpe":
        bos = tokens[meta.fields["tokenizer.ggml.bos_token_id"].value()]
        seq = lambda i: {"Sequence": {"id": i, "type_id": 0}}  # noqa: E731
        tj["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                seq("A")], "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, seq("A"), seq("B")],
                                "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}}
    cached.write_text(json.dumps(tj))
    return Tokenizer.from_str(json.dumps(tj))


@pytest.mark.parametrize("name", list(PRE_DEFINITIONS))
def test_pre_tokenizer_definitions_are_the_real_ones(name):
    """Rebuilt with mlx_ft's definition, the real tokenizer hashes to the converter's name for it and
    gives the token ids of llama.cpp's own tokenizer tests (models/ggml-vocab-NAME.gguf.inp/.out).
    (`tokenizers` directly: transformers' wrapper gives the same ids and takes a second to build.)"""
    tok = real_bpe_tokenizer(name)
    digest = hashlib.sha256(str(tok.encode(BPE_PRE["chktxt"]).ids).encode()).hexdigest()
    assert BPE_PRE["table"][digest]["pre"] == name
    models = llama_cpp_dir() / "models"
    texts = (models / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    ids = (models / f"ggml-vocab-{name}.gguf.out").read_text().strip().split("\n")
    for text, want in zip(texts, ids):
        assert tok.encode(text, add_special_tokens=False).ids == [int(i) for i in want.split()], text


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each case: mlx_ft's f32 GGUF, and the converter's f32 GGUF of mlx_ft's fused HF directory
    (one converter process for all cases, working while the next model is built)."""
    import multiprocessing

    root = tmp_path_factory.mktemp("convert")
    conn, worker = None, None
    jobs, ours, status = [], {}, {}
    try:
        for case, (family, tok, t5, extra) in CASES.items():
            real = {}
            if tok in PRE_DEFINITIONS:
                real["bpe_tokenizer"] = real_bpe_tokenizer(tok)
                real["bpe_tokenizer"].add_special_tokens(["<|im_start|>", "<|im_end|>"])  # the tiny chat template's
            base = build_base(root, family, "bpe" if real else tok, tag="-" + case, transformers5=t5,
                              extra_config=extra, **real, **SIZES.get(case, {}))
            adapter_dir, _ = make_adapter(root, base)
            hf_dir = fuse(adapter_dir, to="safetensors", dtype="f32")
            ours[case] = fuse(adapter_dir, to="gguf", gguf_type="f32")
            if worker is None:  # torch and transformers are loaded by now
                import torch  # noqa: F401  (what the converter imports first)

                # fork shares the imports; on macOS forking after Metal/Objective-C start is unsafe
                ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
                conn, child = ctx.Pipe()
                worker = ctx.Process(target=_converter, args=(llama_cpp_dir(), child), daemon=True)
                worker.start()
            jobs.append((case, str(hf_dir), str(root / f"{case}-converter.gguf")))
            conn.send(jobs[-1])
        conn.send(None)
        for _ in jobs:
            assert conn.poll(600), "llama.cpp's converter did not answer in 10 minutes"
            case, result = conn.recv()
            status[case] = result
        worker.join(60)
    finally:
        if worker is not None and worker.is_alive():
            worker.kill()
    return {case: (ours[case], root / f"{case}-converter.gguf", status[case]) for case, _, _ in jobs}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_equals_llama_cpp_converter(converted, case):
    ours, ref, status = converted[case]
    assert status == "ok", f"llama.cpp's converter failed on mlx_ft's fused directory:\n{status}"
    mine_meta, ref_meta = read_meta(ours), read_meta(ref)
    # key -> the field's raw bytes (type and value): equal bytes, equal value
    mine = {k: (f.type, f.raw) for k, f in mine_meta.fields.items()}
    theirs = {k: (f.type, f.raw) for k, f in ref_meta.fields.items()}
    value = lambda meta, k: meta.fields[k].value()  # noqa: E731
    keys = (set(mine) | set(theirs)) - set(DELIBERATE) - set(CASE_DIFFERENCES.get(case, ()))
    if CASES[case][1] == "spm":
        if "tokenizer.ggml.add_space_prefix" not in theirs:  # llama.cpp's SentencePiece default: True
            assert value(mine_meta, "tokenizer.ggml.add_space_prefix") is True
            mine.pop("tokenizer.ggml.add_space_prefix")
        types = value(mine_meta, "tokenizer.ggml.token_type")
        special = {i for i, t in enumerate(types) if t == 3} - {1, 2}
        # Phi-3's writer makes <unk>, <s>, </s> CONTROL with score -1000 (SentencePiece: UNKNOWN/CONTROL, 0)
        unk = {0, 1, 2} if CASES[case][0] == "phi3" else set()
        for key in SPM_ADDED:  # differ only at transformers' special tokens: CONTROL, -1000
            a, b = value(mine_meta, key), value(ref_meta, key)
            assert [v for i, v in enumerate(a) if i not in special | unk] == \
                [v for i, v in enumerate(b) if i not in special | unk]
            assert all(types[i] == 3 and a[i] == (-1000.0 if key.endswith("scores") else 3) for i in special)
            mine.pop(key), theirs.pop(key)
    differ = sorted(k for k in keys if mine.get(k) != theirs.get(k))
    assert not differ, {k: (value(mine_meta, k) if k in mine else None, value(ref_meta, k) if k in theirs else None)
                        for k in differ}
    assert sorted(t.name for t in mine_meta.tensors) == sorted(t.name for t in ref_meta.tensors)
    theirs_t = {t.name: t for t in ref_meta.tensors}
    for t in mine_meta.tensors:
        o = theirs_t[t.name]
        assert (t.type, t.shape) == (o.type, o.shape), t.name
        assert tensor_bytes(ours, t) == tensor_bytes(ref, o), t.name
