"""Model configs without weights: `config.json` from a local directory, the hub, or a bundled table.

The planner needs only the architecture's dimensions. They come, in order, from a local model
directory, the `builtin:` demo models, the bundled table of popular models (models.json, so
planning works offline), or the Hugging Face hub (config.json alone, never the weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import PlanError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about an architecture (from config.json)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str = "bfloat16"
    attention_bias: bool = False
    norms_per_block: int = 2
    qk_norm: bool = False
    quantized_bits: int | None = None
    """Set when the checkpoint itself is quantized (mlx-community 4-bit repos)."""
    quantized_group_size: int | None = None
    source: str = ""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Block-relative linear modules -> (in, out) features, as mlx-lm names them."""
        H, I = self.hidden, self.intermediate
        return {"self_attn.q_proj": (H, self.d_q), "self_attn.k_proj": (H, self.d_kv),
                "self_attn.v_proj": (H, self.d_kv), "self_attn.o_proj": (self.d_q, H),
                "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H)}

    def block_small_params(self) -> int:
        """Norm weights and biases of one block (never quantized)."""
        n = self.norms_per_block * self.hidden
        n += 2 * self.head_dim if self.qk_norm else 0
        n += self.d_q + 2 * self.d_kv if self.attention_bias else 0
        return n

    def block_params(self) -> int:
        return sum(i * o for i, o in self.linears().values()) + self.block_small_params()

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * self.block_params() + self.hidden


def shape_from_config(cfg: dict, name: str, source: str) -> ModelShape:
    """Read the dimensions from a Hugging Face config.json dict (text config for VLMs)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
    try:
        H, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        shape = dict(
            hidden=H, heads=heads, layers=int(cfg["num_hidden_layers"]),
            intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or H // heads),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{source}: config.json lacks a usable {e} entry; the planner needs hidden_size, "
                        "intermediate_size, num_hidden_layers, num_attention_heads and vocab_size") from None
    model_type = str(cfg.get("model_type", "llama"))
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    return ModelShape(
        name=name, model_type=model_type, **shape,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        norms_per_block=2 + int(cfg.get("extra_norms", 2 if model_type.startswith("gemma") else 0)),
        qk_norm=bool(cfg.get("qk_norm", model_type in ("qwen3", "gemma3", "gemma3_text"))),
        quantized_bits=q.get("bits"), quantized_group_size=q.get("group_size"),
        source=source,
    )


@lru_cache(maxsize=1)
def bundled() -> dict:
    return json.loads((Path(__file__).parent / "models.json").read_text())


def bundled_names() -> list[str]:
    return sorted(bundled()["models"])


def load_shape(model: str, revision: str | None = None) -> ModelShape:
    """Find `model`'s config.json: local dir, builtin demo model, bundled table, then the hub.

    Raises:
        PlanError: nowhere to be found offline; the message says how to provide it.
    """
    local = Path(model).expanduser()
    if (local / "config.json").is_file():
        cfg = json.loads((local / "config.json").read_text())
        return shape_from_config(cfg, model, f"{local / 'config.json'}")
    if model.startswith("builtin:"):
        from .. import tiny

        kw = tiny.BUILTIN_MODELS.get(model.split(":", 1)[1])
        if kw is None:
            raise PlanError(f"unknown builtin model {model!r}; known: "
                            + ", ".join("builtin:" + n for n in tiny.BUILTIN_MODELS))
        cfg = {**tiny.FAMILIES[kw["family"]], "hidden_size": kw["hidden_size"], "num_hidden_layers": kw["num_layers"],
               "num_attention_heads": kw["num_heads"], "num_key_value_heads": kw["num_kv_heads"],
               "intermediate_size": kw["intermediate_size"], "vocab_size": kw["vocab_size"],
               "tie_word_embeddings": False, "torch_dtype": "float32"}
        return shape_from_config(cfg, model, "mlx_ft builtin model")
    table = bundled()
    key = table["aliases"].get(model, model)
    if key in table["models"]:
        return shape_from_config(table["models"][key], model, f"bundled table ({key})")
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise PlanError(f"model {model!r}: no config.json at that path; give a model directory that has one, "
                        f"a hub id, or one of the bundled models: {', '.join(bundled_names())}")
    return _from_hub(model, revision)


def _from_hub(model: str, revision: str | None) -> ModelShape:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(model, "config.json", revision=revision)
    except Exception as e:  # offline, unknown or gated repo
        why = ("HF_HUB_OFFLINE=1 and it is not in the local cache" if os.environ.get("HF_HUB_OFFLINE") == "1"
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise PlanError(
            f"model {model!r}: cannot find its config.json ({why}). Provide it one of these ways: "
            f"fetch it once with `hf download {model} config.json`; point --model / model.path at a local "
            "directory holding config.json; or use a bundled model (`mlxft plan --list-models`)") from None
    return shape_from_config(json.loads(Path(path).read_text()), model, f"hub {model} config.json")
