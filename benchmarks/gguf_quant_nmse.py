"""NMSE of every GGUF file type in llama.cpp against the MLX model it was made from.

    python benchmarks/gguf_quant_nmse.py [--seeds 3] [--types q4_k_m,q6_k]

A tiny llama (hidden 256, 4 blocks, vocab 512: rows a multiple of 256, so the K-quants are
really used and not llama.cpp's fallback types) with a random rank-8 adapter on every linear
layer is fused to f16 once per seed; each type is then made from that file by llama.cpp's
quantizer in-process (llama-cpp-python) or written by gguf-py (f32, f16, bf16, q8_0, q4_0), and
run in llama.cpp with an F32 KV cache on 24 positions. NMSE = mean((llama.cpp - MLX)^2) / var(MLX),
llama.cpp's check-nmse.py measure; top-1 = share of positions with the same argmax.

Random weights have larger activations than trained ones, so these errors overstate what a real
checkpoint shows; they rank the types and catch a broken path. docs/export.md quotes the output
and takes each type's test bound from it (tests/test_export_quant.py checks a few types).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_export_helpers import build_base, make_adapter, mlx_logits, nmse  # noqa: E402

from mlx_ft.errors import ExportError  # noqa: E402
from mlx_ft.export import GGUF_TYPES, fuse  # noqa: E402
from mlx_ft.export.quantize import LLAMA_CPP_TYPES, NEEDS_IMATRIX, quantize_gguf  # noqa: E402

PROMPT = ("What colour is item 7? Item 7 is blue. What colour is item 12? Item 12 is red. "
          "Sure? Yes, green.")
TINY = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0, verbose=False, seed=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def measure(root: Path, types: list[str], seed: int) -> dict[str, tuple[float, float, float] | str]:
    from mlx_lm.utils import load

    base = build_base(root, "llama", "bpe", tag="-256", **TINY)
    adapter_dir, adapted = make_adapter(root, base, rank=8, seed=seed)
    _, tok = load(str(base))
    ids = tok.encode(PROMPT, add_special_tokens=False)[:24]
    ref = mlx_logits(adapted, ids)
    f16 = fuse(adapter_dir, to="gguf", gguf_type="f16", out=root / f"s{seed}" / "model-f16.gguf", overwrite=True)
    rows = {}
    for t in types:
        out = root / f"s{seed}" / f"model-{t}.gguf"
        try:
            if t in GGUF_TYPES:
                fuse(adapter_dir, to="gguf", gguf_type=t, out=out, overwrite=True)
            else:
                quantize_gguf(f16, out, t)  # also the imatrix types: does llama.cpp really refuse them?
        except ExportError as e:
            rows[t] = "refused: " + str(e).splitlines()[-1][:60]
            continue
        got = llama_cpp_logits(out, ids)
        bpw = out.stat().st_size * 8 / f16.stat().st_size * 16  # bits per weight, relative to f16
        rows[t] = (nmse(got, ref), float((got.argmax(-1) == ref.argmax(-1)).mean()), bpw)
    return rows


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--types", default=",".join(GGUF_TYPES + tuple(LLAMA_CPP_TYPES)))
    args = ap.parse_args()
    types = args.types.split(",")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [measure(Path(tmp), types, seed) for seed in range(args.seeds)]
    print(f"machine: {cpu_name()}, {args.seeds} seeds, "
          f"{time.time() - t0:.0f} s\n")
    print("| type | NMSE (worst of seeds) | NMSE (median) | top-1 (worst) | size (f16 = 16 bits) | imatrix |")
    print("|---|---|---|---|---|---|")
    for t in types:
        got = [s[t] for s in per_seed]
        if isinstance(got[0], str):
            print(f"| {t} | - | - | - | - | {'needed' if t in NEEDS_IMATRIX else ''} {got[0]} |")
            continue
        errs, top1 = [g[0] for g in got], [g[1] for g in got]
        print(f"| {t} | {max(errs):.1e} | {np.median(errs):.1e} | {min(top1):.2f} | {got[0][2]:.1f} | "
              f"{'needed' if t in NEEDS_IMATRIX else 'no'} |")


if __name__ == "__main__":
    main()
