"""Model configs without weights: `config.json` from a local directory, the hub, or a bundled table.

The planner needs only the architecture's dimensions. They come, in order, from a local model
directory, the `builtin:` demo models, the bundled table of popular models (models.json, so
planning works offline), or the Hugging Face hub (config.json alone, never the weights).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
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
    """Set when the checkpoint itself is quantized (mlx-community 4-bit repos, gpt-oss's MXFP4)."""
    quantized_group_size: int | None = None
    quantized_mode: str = "affine"
    float_modules: tuple[str, ...] = ()
    """Modules a pre-quantized checkpoint keeps in float, as patterns (Hugging Face's
    `modules_to_not_convert`: gpt-oss quantizes only its experts)."""
    quantized_paths: tuple[tuple[str, int, int, str], ...] = ()
    """Per-module (path, bits, group, mode) of an MLX checkpoint whose config names some
    (routers at 8 bits)."""
    source: str = ""
    experts: int = 0
    """Routed experts per mixture-of-experts block (0: a dense model)."""
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    """Width of one expert's SwiGLU (qwen3_moe's moe_intermediate_size; Mixtral's intermediate_size)."""
    dense_layers: tuple[int, ...] = ()
    """Blocks of a MoE model that keep a dense MLP (qwen3_moe's mlp_only_layers, decoder_sparse_step)."""
    moe_prefix: str = "mlp"
    """The MoE module's name in a block, as mlx-lm builds it (Mixtral: block_sparse_moe)."""
    experts_module: str = "switch_mlp"
    """The experts' SwitchGLU inside it (gpt-oss: experts)."""
    router_module: str = "gate"
    """The router's Linear inside it (gpt-oss: router)."""
    router_bits: int | None = None
    """Bits mlx-lm's quantization predicate gives the router (qwen3_moe, gpt-oss: 8, group 64)."""
    sinks: bool = False
    """Attention sinks: one learned logit per head (gpt-oss)."""
    mlp_bias: bool = False
    """Biases on the experts, the router and o_proj (gpt-oss; attention_bias covers q, k, v)."""
    sliding_window: int | None = None
    """Window of the sliding-attention blocks (gpt-oss alternates them with full ones)."""
    sliding_layers: int = 0
    config: dict | None = field(default=None, compare=False, repr=False)
    """The config.json it was read from: `planner.trace` builds the model class from it."""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    def linears(self, layer: int | None = None) -> dict[str, tuple[int, int]]:
        """Block-relative linear modules -> (in, out) features of one matrix, as mlx-lm names them.

        `layer` None is the last block, the first one adapters reach. In a MoE block the experts'
        projections are SwitchLinear modules holding `experts` such matrices each (see `copies`)
        and the router `gate` is a plain Linear (hidden -> experts).
        """
        H, I = self.hidden, self.intermediate
        attn = {"self_attn.q_proj": (H, self.d_q), "self_attn.k_proj": (H, self.d_kv),
                "self_attn.v_proj": (H, self.d_kv), "self_attn.o_proj": (self.d_q, H)}
        if not self.moe_layer(self.layers - 1 if layer is None else layer):
            return {**attn, "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H)}
        p, e, Im = self.moe_prefix, self.experts_module, self.moe_intermediate
        return {**attn, f"{p}.{self.router_module}": (H, self.experts), f"{p}.{e}.gate_proj": (H, Im),
                f"{p}.{e}.up_proj": (H, Im), f"{p}.{e}.down_proj": (Im, H)}

    def copies(self, module: str, active: bool = False) -> int:
        """Matrices `module` holds: one per expert in a SwitchLinear (the top-k when `active`)."""
        if not self.is_moe or f".{self.experts_module}." not in module:
            return 1
        return self.experts_per_tok if active else self.experts

    def router(self, module: str) -> bool:
        return self.is_moe and module == f"{self.moe_prefix}.{self.router_module}"

    def checkpoint_quant(self, path: str) -> tuple[int, int, str] | None:
        """(bits, group, mode) the checkpoint stores the module at `path` in (`model.layers.3.mlp.router`,
        `lm_head`); None when it is float. As mlx-lm's load quantizes it: the config's per-module
        entry, else nothing HF's modules_to_not_convert names, else the checkpoint's mode."""
        if not self.quantized_bits:
            return None
        for where, bits, group, mode in self.quantized_paths:
            if where == path:
                return bits, group, mode
        if any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*")
               for p in self.float_modules):
            return None
        return self.quantized_bits, self.quantized_group_size or 64, self.quantized_mode

    def block_small_params(self, layer: int | None = None) -> int:
        """Norm weights, biases and sinks of one block (never quantized)."""
        n = self.norms_per_block * self.hidden
        n += 2 * self.head_dim if self.qk_norm else 0
        n += self.d_q + 2 * self.d_kv if self.attention_bias else 0
        n += self.heads if self.sinks else 0
        if self.mlp_bias:  # o_proj's, and one per output of every linear of the MLP
            n += self.hidden + sum(o * self.copies(m) for m, (_, o) in self.linears(layer).items()
                                   if m.startswith(self.moe_prefix + "."))
        return n

    def matmul_params(self, layer: int | None = None, active: bool = False) -> int:
        """Linear weights of one block; `active`: only those one token uses (its top-k experts)."""
        return sum(i * o * self.copies(m, active) for m, (i, o) in self.linears(layer).items())

    def block_params(self, layer: int | None = None) -> int:
        return self.matmul_params(layer) + self.block_small_params(layer)

    def total_params(self, active: bool = False) -> int:
        """All parameters; `active`: those one token uses (MoE: the router's top-k experts)."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        blocks = sum(self.matmul_params(i, active) + self.block_small_params(i) for i in range(self.layers))
        return embed + blocks + self.hidden


def shape_from_config(cfg: dict, name: str, source: str) -> ModelShape:
    """Read the dimensions from a Hugging Face config.json dict (text config for VLMs)."""
    from ..hfconfig import normalize

    cfg = normalize(cfg, source)  # RoPE keys in mlx-lm's spelling for the traced model class
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
    window = cfg.get("sliding_window") if model_type == "gpt_oss" else None
    types = cfg.get("layer_types") or ["sliding_attention", "full_attention"] * (shape["layers"] // 2)
    return ModelShape(
        name=name, model_type=model_type, **shape, **_moe_fields(cfg, model_type, shape["layers"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        norms_per_block=2 + int(cfg.get("extra_norms", 2 if model_type.startswith("gemma") else 0)),
        qk_norm=bool(cfg.get("qk_norm", model_type in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"))),
        **_quantization(cfg), sinks=model_type == "gpt_oss", mlp_bias=model_type == "gpt_oss",
        sliding_window=window, sliding_layers=types.count("sliding_attention") if window else 0,
        source=source, config=cfg,
    )


def _quantization(cfg: dict) -> dict:
    """How a pre-quantized checkpoint stores its weights, read as mlx-lm's load_model reads it:
    MLX's `quantization` (bits, group_size, mode, per-module entries), or Hugging Face's
    `quantization_config` with quant_method mxfp4 (gpt-oss: the experts only) or mxfp8."""
    q = cfg.get("quantization")
    if isinstance(q, dict) and q.get("bits"):
        paths = tuple((k, int(v["bits"]), int(v["group_size"]), str(v.get("mode", "affine")))
                      for k, v in q.items() if isinstance(v, dict) and "bits" in v)
        return dict(quantized_bits=int(q["bits"]), quantized_group_size=int(q.get("group_size") or 64),
                    quantized_mode=str(q.get("mode", "affine")), quantized_paths=paths)
    hf = cfg.get("quantization_config") or {}
    native = {"mxfp4": (4, 32), "mxfp8": (8, 32)}.get(hf.get("quant_method"))
    if native:
        return dict(quantized_bits=native[0], quantized_group_size=native[1],
                    quantized_mode=hf["quant_method"],
                    float_modules=tuple(hf.get("modules_to_not_convert") or ()))
    if hf.get("bits"):  # an MLX config that spells it quantization_config only
        return dict(quantized_bits=int(hf["bits"]), quantized_group_size=int(hf.get("group_size") or 64),
                    quantized_mode=str(hf.get("mode", "affine")))
    return {}


def _moe_fields(cfg: dict, model_type: str, layers: int) -> dict:
    """The mixture-of-experts layout, read the way mlx-lm's qwen3_moe.py and mixtral.py build it."""
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if not experts:
        return {}
    step = int(cfg.get("decoder_sparse_step") or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    return dict(
        experts=experts, experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
        moe_intermediate=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step != 0),
        moe_prefix="block_sparse_moe" if model_type in ("mixtral", "phimoe") else "mlp",
        experts_module="experts" if model_type == "gpt_oss" else "switch_mlp",
        router_module="router" if model_type == "gpt_oss" else "gate",
        router_bits=8 if model_type in ("qwen3_moe", "gpt_oss") else None,  # mlx-lm's Model.quant_predicate
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
        cfg = {**tiny.FAMILIES[kw["family"]], "hidden_size": kw["hidden_size"],
               "num_hidden_layers": kw["num_layers"],
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

    from ..hub import hub_unreachable

    unreachable = hub_unreachable()  # fail at once offline: no retries with back-off
    try:
        path = hf_hub_download(model, "config.json", revision=revision,
                               local_files_only=unreachable is not None)
    except Exception as e:  # offline, unknown or gated repo
        why = (f"{unreachable}, and it is not in the local cache" if unreachable
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise PlanError(
            f"model {model!r}: cannot find its config.json ({why}). Provide it one of these ways: "
            f"fetch it once with `hf download {model} config.json`; point --model / model.path at a local "
            "directory holding config.json; or use a bundled model (`mlxft plan --list-models`)") from None
    return shape_from_config(json.loads(Path(path).read_text()), model, f"hub {model} config.json")
