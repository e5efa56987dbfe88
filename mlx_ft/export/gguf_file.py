"""GGUF files written with gguf-py: fused models and llama.cpp LoRA adapters.

Per family, the GGUF architecture, its hyper-parameter keys and the weight transforms that
llama.cpp's convert_hf_to_gguf.py applies (see docs/export.md for the sources):
- llama/mistral: q/k rows permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved one;
  Llama 3.x `rope_type = llama3` becomes a `rope_freqs` tensor;
- gemma2/gemma3: RMSNorm weights are stored as w but used as (1 + w): llama.cpp wants 1 + w;
- phi3: fused qkv_proj / gate_up_proj map straight to attn_qkv / ffn_up;
- granite: permuted as llama; its *_multiplier settings become llama.cpp's *_scale keys;
- olmo2: post-attention / post-MLP norms and whole-width q/k norms map by name;
- qwen2_moe: experts as for mixtral, plus the shared expert and its gate (ffn_*_shexp);
- tied embeddings: no output.weight, llama.cpp reuses token_embd.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ExportError
from ..hfconfig import normalize
from ._io import atomic_file, check_disk


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH_NAMES value
    permute_qk: bool = False
    norm_shift: float = 0.0
    hparams: Callable[[object, dict], None] | None = None  # family-specific keys: (writer, config)
    key_length: bool = False  # write attention.key_length/value_length from head_dim
    config_head_dim: bool = True  # the converter writes a config's head_dim (Phi-3's and Granite's do not)
    notes: str = ""


def _llama_hparams(w, c):
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c["vocab_size"])


def _gemma2_hparams(w, c):
    w.add_attn_logit_softcapping(c.get("attn_logit_softcapping") or 50.0)
    w.add_final_logit_softcapping(c.get("final_logit_softcapping") or 30.0)
    w.add_sliding_window(c.get("sliding_window") or 4096)


def _gemma3_hparams(w, c):
    w.add_rope_freq_base_swa(c.get("rope_local_base_freq", 10000.0))
    if c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    pattern = c.get("sliding_window_pattern", 6)
    if c.get("layer_types"):
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])
    elif pattern > 1:
        # mlx-lm/HF: layer i is global when (i + 1) % pattern == 0, sliding otherwise.
        w.add_sliding_window_pattern([(i + 1) % pattern != 0 for i in range(c["num_hidden_layers"])])
    if pattern != 1:
        w.add_sliding_window(c.get("sliding_window", 512))


def _phi3_hparams(w, c):
    rot = int(c.get("partial_rotary_factor", 1.0) * c["hidden_size"]) // c["num_attention_heads"]
    w.add_rope_dimension_count(rot)
    w.add_rope_scaling_orig_ctx_len(c.get("original_max_position_embeddings", c["max_position_embeddings"]))
    w.add_sliding_window(c.get("sliding_window") or 0)


def _moe_hparams(w, c):
    w.add_expert_count(c.get("num_local_experts") or c["num_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])


def _mixtral_hparams(w, c):
    _llama_hparams(w, c)
    _moe_hparams(w, c)


def _granite_hparams(w, c):
    # Granite has no head_dim (mlx-lm and the converter ignore one): hidden / heads.
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_vocab_size(c["vocab_size"])
    # HF's *_multiplier settings under llama.cpp's *_scale names, as the converter writes them
    for key, add in (("attention_multiplier", w.add_attention_scale),
                     ("embedding_multiplier", w.add_embedding_scale),
                     ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
        if c.get(key):
            add(c[key])


def _qwen2moe_hparams(w, c):
    _moe_hparams(w, c)
    if c.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])


# HF model_type -> how to write it. Mistral is written as arch "llama", as llama.cpp's converter does.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", permute_qk=True, hparams=_llama_hparams),
    "mistral": Family("llama", permute_qk=True, hparams=_llama_hparams),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3", key_length=True),
    "gemma2": Family("gemma2", norm_shift=1.0, hparams=_gemma2_hparams, key_length=True),
    "gemma3_text": Family("gemma3", norm_shift=1.0, hparams=_gemma3_hparams, key_length=True),
    "phi3": Family("phi3", hparams=_phi3_hparams, config_head_dim=False),
    "mixtral": Family("llama", permute_qk=True, hparams=_mixtral_hparams),
    "qwen3_moe": Family("qwen3moe", hparams=_moe_hparams, key_length=True),
    "olmo2": Family("olmo2"),
    "granite": Family("granite", permute_qk=True, hparams=_granite_hparams, config_head_dim=False),
    "qwen2_moe": Family("qwen2moe", hparams=_qwen2moe_hparams),
}
MOE_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")
# mlx-lm's stacked experts, (n_experts, out, in) -> llama.cpp's *_exps tensors (ne: in, out, n_experts)
SWITCH_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
GGUF_TYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


def check_supported(config: dict) -> Family:
    """The family of an HF config.json, or an ExportError naming the supported ones."""
    mt = config.get("model_type")
    if mt == "gemma3" and "text_config" in config:
        mt = "gemma3_text"  # the multimodal checkpoint: its language model is exported
    if mt not in FAMILIES:
        raise ExportError(f"GGUF export does not support model_type {mt!r}; supported: "
                          f"{', '.join(sorted(FAMILIES))}. `--to safetensors` works for every model mlx-lm "
                          "loads, and llama.cpp's convert_hf_to_gguf.py can convert that directory")
    rs = text_config(config).get("rope_scaling") or {}
    if mt == "phi3" and rs.get("rope_type", rs.get("type")) in ("longrope", "su"):
        raise ExportError("phi3 with LongRoPE scaling (the 128k models) is not supported yet; "
                          "export --to safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    if mt in ("gemma2", "gemma3_text"):
        _check_gemma_query_scale(text_config(config), mt)
    if mt not in MOE_TYPES and (config.get("num_local_experts") or config.get("num_experts")):
        raise ExportError(f"mixture-of-experts {mt} models are not supported for GGUF export yet "
                          f"({', '.join(MOE_TYPES)} are); export --to safetensors and convert with "
                          "llama.cpp's convert_hf_to_gguf.py")
    if mt in ("qwen3_moe", "qwen2_moe") and (config.get("mlp_only_layers")
                                             or config.get("decoder_sparse_step", 1) != 1):
        raise ExportError(f"{mt} with dense layers (mlp_only_layers / decoder_sparse_step) is not supported "
                          "for GGUF export")
    # llama.cpp renormalises the chosen experts' weights for qwen3moe and never for qwen2moe; mlx-lm
    # likewise, whatever the config says, so a config asking otherwise is not what either computes.
    if mt == "qwen3_moe" and not config.get("norm_topk_prob", True):
        raise ExportError("qwen3_moe with norm_topk_prob = false is not supported for GGUF export")
    if mt == "qwen2_moe" and config.get("norm_topk_prob", False):
        raise ExportError("qwen2_moe with norm_topk_prob = true is not supported for GGUF export "
                          "(llama.cpp and mlx-lm do not renormalise its experts' weights)")
    return FAMILIES[mt]


# llama.cpp scales Gemma queries by 1/sqrt(head_dim), except for the 27B models (recognised by
# their layer count), where it uses 1/sqrt(hidden / heads); there is no GGUF key for it.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _check_gemma_query_scale(c: dict, mt: str) -> None:
    head_dim = c.get("head_dim", 256)
    scalar = c.get("query_pre_attn_scalar", head_dim)
    is_27b = c.get("num_hidden_layers") == GEMMA_27B_LAYERS[mt]
    expected = c["hidden_size"] // c["num_attention_heads"] if is_27b else head_dim
    if scalar != expected:
        raise ExportError(f"{mt}: query_pre_attn_scalar = {scalar} but llama.cpp will scale queries by "
                          f"1/sqrt({expected}) for this model, which would change its outputs; "
                          "this configuration cannot be exported to GGUF")


def text_config(config: dict) -> dict:
    """The language model's config (a multimodal config's text_config on top), RoPE keys in both
    spellings (transformers 4 and 5, `mlx_ft.hfconfig`)."""
    config = normalize(config)
    return {**config, **config["text_config"]} if "text_config" in config else config


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp interleaved rows; w is (n_head * head_dim, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(c: dict) -> np.ndarray | None:
    """Llama 3.x RoPE scaling as llama.cpp wants it: per-frequency factors, (head_dim / 2,)."""
    rs = c.get("rope_scaling") or {}
    if (rs.get("rope_type") or rs.get("type")) != "llama3":
        return None
    dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    freqs = 1.0 / (c.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _add_common_hparams(w, c: dict, fam: Family) -> None:
    import gguf

    w.add_context_length(c.get("max_position_embeddings", 4096))
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c.get("num_key_value_heads") or c["num_attention_heads"])
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    if c.get("rope_theta") is not None:
        w.add_rope_freq_base(c["rope_theta"])
    # The converter writes head_dim whenever the config has it, except in Phi-3's own writer.
    if fam.key_length or (c.get("head_dim") and fam.config_head_dim):
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rs = c.get("rope_scaling") or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    elif kind not in (None, "default", "llama3"):
        raise ExportError(f"config.json rope_scaling type {kind!r} is not supported for GGUF export; "
                          "supported: linear, yarn, llama3")
    if fam.hparams:
        fam.hparams(w, c)


def _gguf_tensors(model, c: dict, fam: Family):
    """(gguf name, float32 numpy array) for every weight of the fused model, transformed."""
    import gguf
    import mlx.core as mx
    from mlx.utils import tree_flatten

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper().replace("-", "_")],
                                    c["num_hidden_layers"])
    unmapped = []
    freqs = llama3_rope_freqs(c) if fam.arch == "llama" else None
    if freqs is not None:
        yield "rope_freqs.weight", freqs
    for name, p in tree_flatten(model.parameters()):
        name = name.removeprefix("language_model.")
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        moe = re.match(r"model\.layers\.(\d+)\..*switch_mlp\.(\w+)\.weight$", name)
        if moe and moe.group(2) in SWITCH_TENSORS:
            gname = f"blk.{moe.group(1)}.{SWITCH_TENSORS[moe.group(2)]}.weight"
        if gname is None:
            unmapped.append(name)
            continue
        arr = np.array(p.astype(mx.float32))
        if fam.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            arr = permute_rows(arr, c["num_attention_heads"])
        elif fam.permute_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            arr = permute_rows(arr, c.get("num_key_value_heads") or c["num_attention_heads"])
        if fam.norm_shift and name.endswith("norm.weight"):
            arr = arr + fam.norm_shift
        yield gname, arr
    if unmapped:
        raise ExportError(f"cannot map {len(unmapped)} tensor(s) to GGUF names for arch {fam.arch}: "
                          + ", ".join(unmapped[:10]))


def _encode(name: str, arr: np.ndarray, gguf_type: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors and norms stay F32 as llama.cpp wants."""
    import gguf

    # Routers stay F32 too, as the converter and llama-quantize keep them (ffn_gate_inp, _shexp).
    if arr.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp" in name or gguf_type == "f32":
        return arr.astype(np.float32), None
    if gguf_type == "f16":
        return arr.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPE_NAMES[gguf_type])
    if gguf_type == "q4_0" and name in ("output.weight", "token_embd.weight"):
        # 4-bit vocabulary matrices hurt most; llama-quantize likewise gives output.weight more bits.
        qtype = gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except (gguf.quants.QuantError, ValueError):  # rows not a multiple of the block size
        return arr.astype(np.float16), None


def write_model_gguf(model, base_dir: Path, out: Path, gguf_type: str, name: str, tokenizer=None,
                     pre: str | None = None) -> Path:
    """Write a fused (float, unquantized) mlx-lm model with its tokenizer as one GGUF file.

    `pre` names the BPE pre-tokenizer when llama.cpp's table does not know the tokenizer."""
    import json

    import gguf
    from transformers import AutoTokenizer

    from .vocab import add_vocab

    c = text_config(json.loads((base_dir / "config.json").read_text()))
    fam = check_supported(c)
    tensors = list(_gguf_tensors(model, c, fam))
    n_vocab = next(a.shape[0] for n, a in tensors if n == "token_embd.weight")
    bytes_per = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07, "q4_0": 0.57}[gguf_type]
    check_disk(out, int(sum(a.size for _, a in tensors) * bytes_per))
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(base_dir))
    vocab = tokenizer.get_vocab()
    if fam.arch == "phi3" and not all(t in vocab for t in PHI3_NAME_TOKENS):
        # llama.cpp looks these tokens up (and aborts if one is missing) when general.name
        # contains "phi3"/"phi-3"; a retrained tokenizer may lack them, so keep the name neutral.
        name = re.sub(r"(?i)phi-?3", "phi", name)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        _add_common_hparams(w, c, fam)
        w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w, base_dir, tokenizer, n_vocab, pre)
        for gname, arr in tensors:
            data, raw = _encode(gname, arr, gguf_type)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def write_lora_gguf(adapted, out: Path) -> Path:
    """Write the adapter as a llama.cpp LoRA GGUF (`--lora adapter.gguf` on the base GGUF).

    llama.cpp scales B(Ax) by alpha / rank, so alpha = mlx scale * rank reproduces mlx-lm's
    `scale * (x @ lora_a @ lora_b)`. A is (rank, in) and B is (out, rank), PEFT's orientation.
    """
    import gguf
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    c = text_config(adapted.base_config)
    fam = check_supported(c)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], c["num_hidden_layers"])
    pairs, scales, refused = [], set(), []
    for path, m in adapted.model.named_modules():
        if isinstance(m, DoRALinear) or type(m).__name__.startswith("DoRA"):
            raise ExportError("llama.cpp has no DoRA adapters; fuse instead: "
                              "`mlxft fuse RUN --to gguf` writes the merged model")
        if not hasattr(m, "lora_a"):
            continue
        if not isinstance(m, LoRALinear):
            refused.append(f"{path} ({type(m).__name__})")
            continue
        hf = path.removeprefix("language_model.") + ".weight"
        gname = tmap.get_name(hf, try_suffixes=(".weight",))
        if gname is None:
            refused.append(f"{path} (no GGUF name)")
            continue
        a = np.array(m.lora_a.astype(mx.float32)).T  # (rank, in)
        b = np.array(m.lora_b.astype(mx.float32)).T  # (out, rank)
        if fam.permute_qk and path.endswith("self_attn.q_proj"):
            b = permute_rows(b, c["num_attention_heads"])
        elif fam.permute_qk and path.endswith("self_attn.k_proj"):
            b = permute_rows(b, c.get("num_key_value_heads") or c["num_attention_heads"])
        pairs.append((gname, a, b))
        scales.add((float(m.scale), a.shape[0]))
    if refused:
        raise ExportError("llama.cpp LoRA GGUF supports adapters on linear layers only; cannot export: "
                          + ", ".join(refused) + ". Fuse instead (`mlxft fuse RUN --to gguf`), or train "
                          "with adapter.targets that leave out the MoE experts")
    if not pairs:
        raise ExportError(f"{adapted.adapter_dir}: no LoRA layers found in the adapter")
    if len(scales) != 1:
        raise ExportError(f"adapter layers have different scales or ranks {sorted(scales)}; "
                          "one GGUF LoRA file carries a single alpha")
    scale, rank = scales.pop()
    check_disk(out, sum(a.nbytes + b.nbytes for _, a, b in pairs))
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(Path(str(adapted.config.get("base_model", "model"))).name + "-lora")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        for gname, a, b in pairs:
            w.add_tensor(f"{gname}.lora_a", np.ascontiguousarray(a))
            w.add_tensor(f"{gname}.lora_b", np.ascontiguousarray(b))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
