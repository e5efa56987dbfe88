"""llama.cpp's GGUF file types, as data: what `mlxft fuse --gguf-type` and a recipe's
`export.gguf_type` accept, which of them mlx_ft writes itself, and which need an importance matrix.
One list for the CLI, the recipe schema and the exporter (mlx_ft.export.quantize makes the rest).
"""

from __future__ import annotations

# Written by gguf-py directly (mlx_ft.export.gguf_file).
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# Every type llama.cpp's quantizer accepts (tools/quantize/quantize.cpp QUANT_OPTIONS, llama.cpp
# 0c1e57098 as vendored in llama-cpp-python 0.3.36) except f32/f16/bf16/q8_0/q4_0, which mlx_ft
# writes itself, and COPY. name -> (llama_ftype name, what llama.cpp says of it).
LLAMA_CPP_TYPES = {
    "q4_1": ("MOSTLY_Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B"),
    "q5_0": ("MOSTLY_Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B"),
    "q5_1": ("MOSTLY_Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B"),
    "q2_k": ("MOSTLY_Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B"),
    "q2_k_s": ("MOSTLY_Q2_K_S", "2.96G, +3.1836 ppl @ Llama-3-8B"),
    "q3_k_s": ("MOSTLY_Q3_K_S", "3.41G, +1.6321 ppl @ Llama-3-8B"),
    "q3_k_m": ("MOSTLY_Q3_K_M", "3.74G, +0.6569 ppl @ Llama-3-8B"),
    "q3_k_l": ("MOSTLY_Q3_K_L", "4.03G, +0.5562 ppl @ Llama-3-8B"),
    "q4_k_s": ("MOSTLY_Q4_K_S", "4.37G, +0.2689 ppl @ Llama-3-8B"),
    "q4_k_m": ("MOSTLY_Q4_K_M", "4.58G, +0.1754 ppl @ Llama-3-8B"),
    "q5_k_s": ("MOSTLY_Q5_K_S", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    "q5_k_m": ("MOSTLY_Q5_K_M", "5.33G, +0.0569 ppl @ Llama-3-8B"),
    "q6_k": ("MOSTLY_Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    "iq1_s": ("MOSTLY_IQ1_S", "1.56 bpw"),
    "iq1_m": ("MOSTLY_IQ1_M", "1.75 bpw"),
    "iq2_xxs": ("MOSTLY_IQ2_XXS", "2.06 bpw"),
    "iq2_xs": ("MOSTLY_IQ2_XS", "2.31 bpw"),
    "iq2_s": ("MOSTLY_IQ2_S", "2.5 bpw"),
    "iq2_m": ("MOSTLY_IQ2_M", "2.7 bpw"),
    "iq3_xxs": ("MOSTLY_IQ3_XXS", "3.06 bpw"),
    "iq3_xs": ("MOSTLY_IQ3_XS", "3.3 bpw"),
    "iq3_s": ("MOSTLY_IQ3_S", "3.44 bpw"),
    "iq3_m": ("MOSTLY_IQ3_M", "3.66 bpw mix"),
    "iq4_nl": ("MOSTLY_IQ4_NL", "4.50 bpw non-linear"),
    "iq4_xs": ("MOSTLY_IQ4_XS", "4.25 bpw non-linear"),
    "tq1_0": ("MOSTLY_TQ1_0", "1.69 bpw ternary, for ternary-trained models only"),
    "tq2_0": ("MOSTLY_TQ2_0", "2.06 bpw ternary, for ternary-trained models only"),
    "q1_0": ("MOSTLY_Q1_0", "1.125 bpw"),
    "q2_0": ("MOSTLY_Q2_0", "2.25 bpw (group 64)"),
    "mxfp4_moe": ("MOSTLY_MXFP4_MOE", "MXFP4 for MoE experts"),
}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # llama-quantize's aliases
# llama.cpp refuses these without an importance matrix (src/llama-quant.cpp tensor_requires_imatrix:
# IQ1/IQ2/IQ3_XXS tensors, which IQ3_XS mixes in, and Q2_K tensors of a Q2_K_S file); each confirmed
# by quantizing it here (benchmarks/gguf_quant_nmse.py). mlx_ft computes no importance matrix.
NEEDS_IMATRIX = ("q2_k_s", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs")


# Every name `--gguf-type` / `export.gguf_type` accepts (the NEEDS_IMATRIX ones then refused with why).
ALL_TYPES = DIRECT_TYPES + tuple(LLAMA_CPP_TYPES) + tuple(ALIASES)


def needs_imatrix_message(where: str, gguf_type: str) -> str:
    """Why `gguf_type` is refused and what to do instead; `where` names the option or recipe key."""
    return (f"{where} {gguf_type}: llama.cpp makes {gguf_type.upper()} only with an importance matrix "
            "(without one its 1-3 bit types turn the model to garbage, so llama.cpp refuses), and mlx_ft "
            "computes none. Export --gguf-type f16, compute one with llama.cpp's `llama-imatrix -m "
            f"model-f16.gguf -f calibration.txt`, then `llama-quantize --imatrix imatrix.gguf model-f16.gguf "
            f"model-{gguf_type}.gguf {gguf_type.upper()}`; or choose a type that needs none (q4_k_m, q3_k_m, "
            "iq4_xs, ...)")
