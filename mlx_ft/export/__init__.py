"""Export stage: fuse an adapter into its base and write it for other runtimes.

    fuse(run, to="safetensors")      Hugging Face directory (mlx-lm, transformers)
    fuse(run, to="gguf")             one GGUF file (llama.cpp, Ollama) + an Ollama Modelfile
    export_adapter(run, to="peft")   PEFT adapter for transformers + peft
    export_adapter(run, to="gguf-lora")  llama.cpp LoRA adapter (`llama-cli --lora`)
    run_exports(recipe, run_dir)     what the recipe's [export] table asks for, into run_dir/export/

Every writer refuses an existing target unless `overwrite`, and even then replaces only an earlier
export of mlx_ft of the same kind (a directory with its .mlx_ft marker, a GGUF file); it checks
the place and the free disk space first, writes under a temp name that is renamed when complete
(with the mode the umask allows), and removes what a killed export to the same target left.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..atomic import tmp_prefix
from ..errors import ExportError
from ..gguf_types import ALIASES, DIRECT_TYPES, LLAMA_CPP_TYPES
from ._io import check_target

FUSE_FORMATS = ("safetensors", "gguf", "lmstudio")
ADAPTER_FORMATS = ("peft", "gguf-lora")
DTYPES = ("bf16", "f16", "f32")
GGUF_TYPES = DIRECT_TYPES  # written by gguf-py directly
# Every other llama.cpp file type is made by llama.cpp's quantizer from an f16 file (quantize.py).
LLAMA_QUANTIZE_TYPES = tuple(LLAMA_CPP_TYPES) + tuple(ALIASES)

__all__ = ["fuse", "export_adapter", "run_exports", "check_exports", "FUSE_FORMATS", "ADAPTER_FORMATS",
           "GGUF_TYPES", "LLAMA_QUANTIZE_TYPES", "DTYPES"]


def _default_out(adapter_dir: Path, what: str) -> Path:
    # <run>/adapters -> <run>/export/<what>; a bare adapter dir -> <adapter dir>/export/<what>
    root = adapter_dir.parent if adapter_dir.name == "adapters" else adapter_dir
    return root / "export" / what


def fuse(path, to: str = "safetensors", out=None, dtype: str = "bf16", gguf_type: str = "f16",
         quantize: int | None = None, overwrite: bool = False, group_size: int = 64,
         lmstudio_dir: str | Path | None = None, gguf_pre: str | None = None) -> Path:
    """Merge the adapter of a run (or adapter directory) into its dequantized base and write it.

    Args:
        path: run directory or adapter directory.
        to: "safetensors" (HF directory), "gguf" (one file, plus a Modelfile next to it) or
            "lmstudio" (into LM Studio's models directory: GGUF, or MLX when `quantize` is given).
        out: target directory (safetensors) or .gguf file; default <run>/export/...
        dtype: float type of the safetensors weights (bf16, f16, f32).
        gguf_type: f32, f16, bf16, q8_0, q4_0 (gguf-py), or any other llama.cpp file type such as
            q4_k_m (llama.cpp's quantizer: llama-quantize on PATH, else llama-cpp-python in-process).
        quantize: 4 or 8 to re-quantize the safetensors for MLX (lossy; MLX-only format).
        overwrite: replace an existing target.
        lmstudio_dir: LM Studio's models directory (default $LMSTUDIO_MODELS_DIR or ~/.lmstudio/models).
        gguf_pre: llama.cpp pre-tokenizer name for a BPE tokenizer its converter's table does not know.
    Returns:
        the written directory or file.
    Raises:
        ExportError: bad arguments, unsupported architecture, adapter that does not fit the base,
            existing target, not enough disk.
    """
    from ..models import find_adapter_dir
    from .merge import cast_model, fuse_model, load_adapted

    if to not in FUSE_FORMATS:
        raise ExportError(f"--to {to}: fuse writes one of {', '.join(FUSE_FORMATS)}; "
                          "for the adapter alone use "
                          f"`mlxft export-adapter --to {'|'.join(ADAPTER_FORMATS)}`")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    gguf_type = gguf_type.lower()
    if to == "lmstudio":  # GGUF for llama.cpp, or MLX when re-quantized for it
        if out is not None:
            raise ExportError("--out does not apply to --to lmstudio: the model goes to LM Studio's models "
                              "directory; choose another one with --lmstudio-dir or $LMSTUDIO_MODELS_DIR")
        fmt = "safetensors" if quantize else "gguf"
    else:
        fmt = to
    if fmt == "gguf":
        if gguf_type not in GGUF_TYPES + LLAMA_QUANTIZE_TYPES:
            raise ExportError(f"--gguf-type {gguf_type}: not a llama.cpp file type; expected one of "
                              f"{', '.join(GGUF_TYPES)} (written directly) or "
                              f"{', '.join(LLAMA_QUANTIZE_TYPES)} "
                              "(llama.cpp's quantizer); see docs/export.md")
        if gguf_type in LLAMA_QUANTIZE_TYPES:
            from .quantize import check_type

            gguf_type = check_type(gguf_type)  # fail before the slow part
        if quantize:
            raise ExportError(f"--quantize {quantize} applies to --to safetensors (MLX); a GGUF's precision "
                              f"is --gguf-type (now {gguf_type}), e.g. --gguf-type q8_0 or q4_k_m")
    if quantize not in (None, 4, 8):
        raise ExportError(f"--quantize {quantize}: expected 4 or 8 (bits)")

    adapter_dir = find_adapter_dir(Path(path).expanduser())
    if to == "lmstudio":
        from .lmstudio import target

        run_name = (adapter_dir.parent if adapter_dir.name == "adapters" else adapter_dir).name
        out = target(run_name, gguf_type if fmt == "gguf" else None, quantize, lmstudio_dir)
    if out is None:
        out = _default_out(adapter_dir,
                           "safetensors" if to == "safetensors" else f"gguf/model-{gguf_type}.gguf")
    out = Path(out).expanduser()
    if fmt == "gguf" and out.suffix != ".gguf":
        out = out / f"model-{gguf_type}.gguf"  # --out names a directory
    check_target(out, overwrite, fmt)
    if to == "gguf":  # the Modelfile beside it is always rewritten, but only one mlx_ft wrote
        check_target(out.parent / "Modelfile", True, "modelfile")
    if fmt == "gguf":
        from .gguf_file import check_supported

        check_supported(_read_base_config(adapter_dir))  # refuse an unknown architecture before loading

    adapted = load_adapted(adapter_dir)
    fuse_model(adapted.model)
    if fmt == "safetensors":
        from .hf import write_hf_dir

        cast_model(adapted.model, dtype)
        q = {"bits": quantize, "group_size": group_size} if quantize else None
        return write_hf_dir(adapted.model, adapted.base_dir, out, dtype, q)
    return _write_fused_gguf(adapted, out, gguf_type, overwrite, modelfile=to == "gguf", pre=gguf_pre)


def _write_fused_gguf(adapted, out: Path, gguf_type: str, overwrite: bool, modelfile: bool = True,
                      pre: str | None = None) -> Path:
    from .gguf_file import write_model_gguf
    from .ollama import write_modelfile

    name = Path(str(adapted.config.get("base_model", "model"))).name + "-fused"
    hf_tok = _hf_tokenizer(adapted)
    if gguf_type in LLAMA_QUANTIZE_TYPES:
        from .quantize import quantize_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        # The f16 input, under a temp name of `out` so that a killed export's copy is cleaned next time.
        with tempfile.TemporaryDirectory(prefix=tmp_prefix(out) + "f16-", dir=out.parent) as tmp:
            f16 = write_model_gguf(adapted.model, adapted.base_dir, Path(tmp) / "model-f16.gguf", "f16", name,
                                   hf_tok, pre)
            quantize_gguf(f16, out, gguf_type)
    else:
        write_model_gguf(adapted.model, adapted.base_dir, out, gguf_type, name, hf_tok, pre)
    if modelfile:  # Ollama's; LM Studio reads the chat template inside the GGUF
        write_modelfile(out, adapted.base_dir, overwrite=True, tokenizer=hf_tok)
    return out


def _hf_tokenizer(adapted):
    """The transformers tokenizer inside mlx-lm's wrapper (the one training used): loading it again
    takes seconds for a 150k vocabulary."""
    return getattr(adapted.tokenizer, "_tokenizer", None)


def _read_base_config(adapter_dir: Path) -> dict:
    import json

    from ..hub import resolve_model_path

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model")
    if not base:
        raise ExportError(f"{adapter_dir}/adapter_config.json: no base_model recorded")
    return json.loads((resolve_model_path(base) / "config.json").read_text())


def export_adapter(path, to: str = "peft", out=None, overwrite: bool = False, with_base: str | None = None,
                   gguf_pre: str | None = None) -> Path:
    """Write the adapter of a run (or adapter directory) without fusing it.

    Args:
        to: "peft" (adapter_config.json + adapter_model.safetensors for transformers + peft) or
            "gguf-lora" (a llama.cpp LoRA GGUF to load with `--lora` on the base GGUF).
        out: target directory (peft) or .gguf file; default <run>/export/...
        with_base: for gguf-lora, also write the base as `base-<type>.gguf` (f32, f16, bf16, q8_0,
            q4_0) next to the adapter, dequantized exactly as the adapter saw it in training (QLoRA),
            and a Modelfile with FROM + ADAPTER.
        gguf_pre: for with_base, llama.cpp's pre-tokenizer name for a BPE tokenizer its converter's
            table does not know (as for `fuse`).
    Returns:
        the written directory or file.
    Raises:
        ExportError: unsupported adapter type for the format, adapter that does not fit the base,
            existing target, not enough disk.
    """
    from ..models import find_adapter_dir
    from .merge import load_adapted

    if to not in ADAPTER_FORMATS:
        raise ExportError(f"--to {to}: export-adapter writes one of {', '.join(ADAPTER_FORMATS)}; "
                          "for a merged model use `mlxft fuse`")
    if gguf_pre and not with_base:
        raise ExportError(f"--gguf-pre {gguf_pre} applies with --with-base (the base GGUF carries the "
                          "tokenizer; the adapter GGUF has none)")
    adapter_dir = find_adapter_dir(Path(path).expanduser())
    out = (Path(out).expanduser() if out is not None
           else _default_out(adapter_dir, "peft" if to == "peft" else "gguf-lora/adapter.gguf"))
    if to == "gguf-lora" and out.suffix != ".gguf":
        out = out / "adapter.gguf"
    check_target(out, overwrite, "peft" if to == "peft" else "gguf")
    if with_base:  # written beside the adapter: replaced only when they are mlx_ft's
        check_target(out.parent / f"base-{with_base}.gguf", True, "gguf")
        check_target(out.parent / "Modelfile", True, "modelfile")
    import json

    ft = json.loads((adapter_dir / "adapter_config.json").read_text()).get("fine_tune_type", "lora")
    if ft == "full":
        raise ExportError(f"{adapter_dir}: a full fine-tune has no low-rank adapter to export; "
                          "use `mlxft fuse` to write the whole model")
    if to == "gguf-lora":
        from .gguf_file import check_supported

        check_supported(_read_base_config(adapter_dir))
    adapted = load_adapted(adapter_dir)
    if to == "peft":
        from .peft import write_peft

        return write_peft(adapted, out)
    from .gguf_file import write_lora_gguf

    if with_base is not None and with_base not in GGUF_TYPES:
        raise ExportError(f"--with-base {with_base}: expected one of {', '.join(GGUF_TYPES)}")
    write_lora_gguf(adapted, out)
    if with_base:
        _write_base_gguf(adapted, out, with_base, gguf_pre)
    return out


def _write_base_gguf(adapted, adapter_gguf: Path, gguf_type: str, pre: str | None = None) -> Path:
    """The base the adapter was trained on (dequantized if it was quantized), as a GGUF."""
    from mlx_lm.utils import dequantize_model

    from ..models import load_base
    from ..recipe import ModelConfig, QuantizeConfig
    from .gguf_file import write_model_gguf
    from .ollama import write_modelfile

    q = adapted.config.get("quantize")
    base, _, _ = load_base(ModelConfig(path=str(adapted.base_dir),
                                       quantize=QuantizeConfig(**q) if q else None))
    dequantize_model(base)
    out = adapter_gguf.parent / f"base-{gguf_type}.gguf"
    hf_tok = _hf_tokenizer(adapted)
    write_model_gguf(base, adapted.base_dir, out, gguf_type, adapted.base_dir.name, hf_tok, pre)
    write_modelfile(out, adapted.base_dir, overwrite=True, adapter=adapter_gguf.name, tokenizer=hf_tok)
    return out


def check_exports(recipe) -> None:
    """Before training: fail now if the recipe's GGUF type needs a quantizer this machine lacks."""
    if "gguf" in recipe.export.to and recipe.export.gguf_type in LLAMA_QUANTIZE_TYPES:
        from .quantize import check_type

        check_type(recipe.export.gguf_type)


def run_exports(recipe, run_dir) -> list[Path]:
    """Export what `recipe.export` asks for into <run_dir>/export/, replacing earlier exports."""
    run_dir = Path(run_dir)
    cfg = recipe.export
    done = []
    for fmt in cfg.to:
        if fmt == "safetensors":
            done.append(fuse(run_dir, "safetensors", run_dir / "export" / "safetensors", dtype=cfg.dtype,
                             overwrite=True))
        elif fmt == "gguf":
            done.append(fuse(run_dir, "gguf", run_dir / "export" / "gguf" / f"model-{cfg.gguf_type}.gguf",
                             gguf_type=cfg.gguf_type, overwrite=True, gguf_pre=cfg.gguf_pre))
        elif fmt == "peft":
            done.append(export_adapter(run_dir, "peft", run_dir / "export" / "peft", overwrite=True))
        elif fmt == "gguf-lora":
            done.append(export_adapter(run_dir, "gguf-lora",
                                       run_dir / "export" / "gguf-lora" / "adapter.gguf", overwrite=True))
        else:  # the recipe loader already rejects this; kept for dict-built recipes
            raise ExportError(f"export.to: unknown format {fmt!r}; known: "
                              f"{', '.join(FUSE_FORMATS + ADAPTER_FORMATS)}")
    return done
