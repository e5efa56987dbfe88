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
from ..gguf_types import ALIASES, LLAMA_CPP_TYPES, NEEDS_IMATRIX, needs_imatrix_message
from ._io import atomic_file


def canonical(gguf_type: str) -> str:
    return ALIASES.get(gguf_type, gguf_type)


def check_type(gguf_type: str) -> str:
    """Fail before the slow part: a type that needs an importance matrix, or no quantizer at all."""
    gguf_type = canonical(gguf_type)
    if gguf_type in NEEDS_IMATRIX:
        raise ExportError(needs_imatrix_message("--gguf-type", gguf_type))
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
            proc = subprocess.run([exe, str(src), str(tmp), gguf_type.upper()], capture_output=True,
                                  text=True)
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
            llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))),
            daemon=True)
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
