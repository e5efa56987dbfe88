"""Where a model lives and how its files are named: the one place below the data and model stages
that turns `model.path` into a local directory and loads a tokenizer.

`model.path` is a local Hugging Face directory, a hub id (downloaded into the Hugging Face cache,
or found there when offline), or `builtin:NAME` for a tiny model mlx_ft builds offline (its
tokenizer trained on the recipe's texts). The data stage needs only the tokenizer, so it loads
that without the weights; the model stage loads both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import ModelError

# What snapshot_download fetches for a base model: weights, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
# ... and for the tokenizer alone (`mlxft data inspect`, `mlxft plan` counting tokens).
TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def resolve_model_path(
    path: str, revision: str | None = None, texts: Callable[[], list[str]] | None = None,
    patterns: list[str] | None = None,
) -> Path:
    """Turn `model.path` into a local directory: as is, built (builtin:), or from the hub.

    Args:
        texts: called only for `builtin:` models, gives the texts their tokenizer is trained on.
        patterns: the files to fetch from the hub (default: weights, configs and tokenizer).
    Raises:
        ModelError: naming model.path, what was found, and how to get the model.
    """
    if path.startswith("builtin:"):
        from . import tiny

        name = path.split(":", 1)[1]
        if name not in tiny.BUILTIN_MODELS:
            raise ModelError(f"model.path: unknown builtin model {name!r}; known: "
                             + ", ".join("builtin:" + n for n in tiny.BUILTIN_MODELS))
        return tiny.builtin_model(name, texts() if texts else ["hello world"])
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.path: {path} has no config.json; point it at a Hugging Face "
                             "model directory (config.json, *.safetensors, tokenizer files)")
        return local
    if looks_local(path):
        raise ModelError(f"model.path: {path} does not exist (relative to {Path.cwd()}); "
                         "give an existing model directory or a hub id such as Qwen/Qwen2.5-7B-Instruct")
    from huggingface_hub import snapshot_download

    unreachable = hub_unreachable()
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=patterns or HUB_PATTERNS,
                                      local_files_only=unreachable is not None))
    except Exception as e:  # offline, unknown repo, gated repo: all say the same to the user
        why = (f"{unreachable}, and it is not in the local cache" if unreachable
               else f"{type(e).__name__}: {e}")
        raise ModelError(f"model.path: cannot get {path!r} from the Hugging Face hub ({why}); "
                         f"download it once with `hf download {path}` or give a local directory") from None


def check_local_model(path: str) -> None:
    """Raise the ModelError of a local `model.path` that is missing or holds no usable config.json,
    without loading anything (hub ids and builtin models are left to loading)."""
    if not path.startswith("builtin:") and (looks_local(path) or Path(path).expanduser().exists()):
        read_config(resolve_model_path(path))


def read_config(model_dir: Path) -> dict:
    """The model's config.json, checked: JSON, an object, naming a `model_type`.

    Raises:
        ModelError: naming the file (and line), what is wrong and the fix.
    """
    import json

    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        where = f":{e.lineno}" if hasattr(e, "lineno") else ""
        raise ModelError(f"{path}{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}); restore the "
                         "model's config.json (download the model again)") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror}); check the model directory") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{path}: no `model_type` (e.g. \"llama\", \"qwen2\"); a Hugging Face config.json "
                         "names its architecture there: restore the model's config.json")
    return config


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None: HF_HUB_OFFLINE set, or one TCP
    connection to the endpoint (or the HTTPS proxy) failing. One quick try: huggingface_hub itself
    retries a failed request five times with back-off (~24 s) before it gives up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    proxy = urlparse(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or "")
    host, port = (proxy.hostname, proxy.port or 80) if proxy.hostname else \
        (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def looks_local(path: str) -> bool:
    """A path that cannot be a hub id (`org/name`): relative, absolute, home or several levels."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1


def load_tokenizer(model_cfg, texts: Callable[[], list[str]] | None = None):
    """The model's tokenizer (mlx-lm TokenizerWrapper) without loading or downloading weights.

    Args:
        model_cfg: the recipe's `[model]` table (ModelConfig).
        texts: for `builtin:` models, the texts their tokenizer is trained on.
    """
    from mlx_lm.utils import load_config, load_tokenizer as mlx_load_tokenizer

    model_dir = resolve_model_path(model_cfg.path, model_cfg.revision, texts, patterns=TOKENIZER_PATTERNS)
    config = load_config(model_dir)
    return mlx_load_tokenizer(model_dir, {"trust_remote_code": model_cfg.trust_remote_code},
                              eos_token_ids=config.get("eos_token_id"))
