"""Where LM Studio finds a model: `<models dir>/<publisher>/<model>/`, the layout LM Studio keeps for
models downloaded from Hugging Face (https://lmstudio.ai/docs/basics/import-model, "LM Studio's
expected models directory structure": ~/.lmstudio/models/publisher/model/model-file.gguf). An
MLX model (Apple Silicon) is the same folder holding a Hugging Face directory, as mlx-community's
downloads are stored. A file put straight into the models directory is not listed.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path("~/.lmstudio/models")
ENV = "LMSTUDIO_MODELS_DIR"  # for a models directory moved in LM Studio's settings
PUBLISHER = "mlx-ft"


def models_dir(explicit: str | Path | None = None) -> Path:
    """The LM Studio models directory: the argument, else $LMSTUDIO_MODELS_DIR, else ~/.lmstudio/models."""
    return Path(explicit or os.environ.get(ENV) or DEFAULT_DIR).expanduser()


def target(run_name: str, gguf_type: str | None, bits: int | None, root: str | Path | None = None) -> Path:
    """The .gguf file (gguf_type) or MLX directory (bits) to write for a run, under LM Studio's layout."""
    if bits:
        return models_dir(root) / PUBLISHER / f"{run_name}-MLX-{bits}bit"
    return models_dir(root) / PUBLISHER / f"{run_name}-GGUF" / f"{run_name}-{gguf_type.upper()}.gguf"


def how_to_load(path: Path) -> str:
    key = f"{path.parent.parent.name}/{path.parent.name}" if path.suffix == ".gguf" else \
        f"{path.parent.name}/{path.name}"
    return (f"LM Studio lists it as {key} (My Models); load it there, or from a terminal with "
            f"`lms load {key}`" + ("" if path.suffix == ".gguf"
                                   else " (MLX format: LM Studio on Apple Silicon)"))
