"""llama.cpp's file types, made by llama.cpp's own quantizer from an f16 GGUF.

gguf-py quantizes only the simple block types in numpy (mlx_ft writes f32, f16, bf16, q8_0 and
q4_0 that way); the K-quant mixtures (q4_k_m, ...), the IQ types and the rest exist only in
llama.cpp's C++ quantizer. It runs as the `llama-quantize` executable when one is on PATH, and
otherwise in-process through llama-cpp-python's bindings of the same function
(`llama_model_quantize`), so no binary is needed (`pip install 'mlx-ft[gguf]'`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import ExportError
from ._io import atomic_file

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


def canonical(gguf_type: str) -> str:
    return ALIASES.get(gguf_type, gguf_type)


def check_type(gguf_type: str) -> str:
    """Fail before the slow part: a type that needs an importance matrix, or no quantizer at all."""
    gguf_type = canonical(gguf_type)
    if gguf_type in NEEDS_IMATRIX:
        raise ExportError(
            f"--gguf-type {gguf_type}: llama.cpp makes {gguf_type.upper()} only with an importance matrix "
            "(without one its 1-3 bit types turn the model to garbage, so llama.cpp refuses), and mlx_ft "
            "computes none. Export --gguf-type f16, compute one with llama.cpp's `llama-imatrix -m "
            f"model-f16.gguf -f calibration.txt`, then `llama-quantize --imatrix imatrix.gguf model-f16.gguf "
            f"model-{gguf_type}.gguf {gguf_type.upper()}`; or choose a type that needs none (q4_k_m, q3_k_m, "
            "iq4_xs, ...)")
    if shutil.which("llama-quantize") is None:
        _bindings(gguf_type)
    return gguf_type


def _bindings(gguf_type: str):
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"--gguf-type {gguf_type} is made by llama.cpp's quantizer, and neither llama-cpp-python (its "
            "Python bindings) nor a `llama-quantize` executable on PATH was found. Install the bindings with "
            "`pip install 'mlx-ft[gguf]'` (builds llama.cpp; on macOS with Metal), or get llama-quantize "
            "with `brew install llama.cpp`; f32, f16, bf16, q8_0 and q4_0 need neither") from None
    return llama_cpp


def quantize_gguf(src: Path, out: Path, gguf_type: str) -> Path:
    """Write `out` as `gguf_type` made from the f16/f32 GGUF `src`, printing a progress line."""
    gguf_type = canonical(gguf_type)
    exe = shutil.which("llama-quantize")
    with atomic_file(out) as tmp:
        if exe:
            proc = subprocess.run([exe, str(src), str(tmp), gguf_type.upper()], capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-5:])
                raise ExportError(f"llama-quantize failed ({proc.returncode}) making {out}:\n{tail}")
        else:
            _quantize_in_process(src, tmp, gguf_type, out)
    return out


def _quantize_in_process(src: Path, tmp: Path, gguf_type: str, out: Path) -> None:
    import ctypes

    llama_cpp = _bindings(gguf_type)
    progress = _Progress(f"quantizing {out.name} to {gguf_type.upper()} with llama.cpp "
                         f"(llama-cpp-python {llama_cpp.__version__})")

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):  # llama.cpp logs one "[ i/ n] tensor ..." line per tensor
        progress.log(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + LLAMA_CPP_TYPES[gguf_type][0])
    result: list = []
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        # A thread, so that Ctrl-C still reaches Python while llama.cpp works.
        worker = threading.Thread(target=lambda: result.append(
            llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))), daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            progress.show()
    finally:
        from llama_cpp import _logger  # put llama-cpp-python's own log handler back

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    progress.done(ok=result == [0])
    if result != [0]:
        raise ExportError(f"llama.cpp's quantizer failed making {out} ({gguf_type.upper()}):\n"
                          + "\n".join(progress.errors[-5:]))


class _Progress:
    """One line on stderr: "quantizing ... tensor 12/290", rewritten in place on a terminal."""

    TENSOR = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")

    def __init__(self, what: str):
        self.what, self.start, self.i, self.n, self.errors = what, time.monotonic(), 0, 0, []
        self.tty = sys.stderr.isatty()
        print(f"{what} ...", file=sys.stderr, end="\r" if self.tty else "\n", flush=True)

    def log(self, text: str) -> None:
        if m := self.TENSOR.search(text):
            self.i, self.n = int(m.group(1)), int(m.group(2))
        if "error" in text.lower() or "failed" in text.lower() or "requires" in text.lower():
            self.errors.append(text.strip())

    def show(self) -> None:
        if self.tty and self.n:
            print(f"{self.what}: tensor {self.i}/{self.n}", file=sys.stderr, end="\r", flush=True)

    def done(self, ok: bool) -> None:
        verdict = f"{self.n} tensors in {time.monotonic() - self.start:.1f} s" if ok else "failed"
        print(f"{self.what}: {verdict}", file=sys.stderr, flush=True)
