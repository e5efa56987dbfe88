"""Recipes: TOML files parsed into typed, frozen dataclasses, one per table.

The docstring under each field is its help text: `mlxft recipes --reference`, the recipe reference
in the docs and the comments in recipes/*.toml all come from it. Loading collects every problem
(unknown keys with a suggestion, wrong types, out-of-range values, conflicting fields) and raises one
`RecipeError` that lists them all with their key paths.

Paths inside a recipe (data files, output dir, local model dirs) are relative to the directory
`mlxft` runs in; `extends` is relative to the file that names it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .errors import RecipeError
from .gguf_types import ALL_TYPES as GGUF_TYPE_NAMES
from .gguf_types import NEEDS_IMATRIX, needs_imatrix_message

# ----------------------------------------------------------------------------------------------
# The schema


# MLX 0.32's quantization modes (mx.quantize): the bits and group sizes each accepts, and the
# defaults mlx-lm's quantize_model uses. affine keeps a scale and a bias per group in the model's
# dtype; the microscaling float modes keep one 8-bit scale per group and no bias.
QUANT_MODES = {
    "affine": {"bits": (2, 3, 4, 5, 6, 8), "group_size": (32, 64, 128), "default": (4, 64)},
    "mxfp4": {"bits": (4,), "group_size": (32,), "default": (4, 32)},
    "nvfp4": {"bits": (4,), "group_size": (16,), "default": (4, 16)},
    "mxfp8": {"bits": (8,), "group_size": (32,), "default": (8, 32)},
}


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["affine", "mxfp4", "nvfp4", "mxfp8"] = "affine"
    """MLX quantization mode: `affine` (integers with a scale and a bias per group), or the
    microscaling float formats `mxfp4`, `nvfp4` and `mxfp8` (one 8-bit scale per group)."""
    bits: Optional[int] = None
    """Bits per base weight: affine 2, 3, 4, 5, 6 or 8 (default 4); mxfp4 and nvfp4 4; mxfp8 8."""
    group_size: Optional[int] = None
    """Weights sharing one scale: affine 32, 64 or 128 (default 64; smaller is more exact and
    larger); mxfp4 and mxfp8 32; nvfp4 16."""

    def __post_init__(self):  # unset bits and group size take the mode's defaults
        bits, group = QUANT_MODES.get(self.mode, QUANT_MODES["affine"])["default"]
        object.__setattr__(self, "bits", bits if self.bits is None else self.bits)
        object.__setattr__(self, "group_size", group if self.group_size is None else self.group_size)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Hugging Face repo id (Qwen/Qwen2.5-32B-Instruct), a local model directory, or
    `builtin:tiny-llama` for the small demo model that mlx_ft builds offline."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to download; ignored for local directories."""
    quantize: Optional[QuantizeConfig] = None
    """Quantize the base on load for QLoRA, e.g. `{ bits = 4, group_size = 64 }` or
    `{ mode = "mxfp4" }`. Omit for a float base; a pre-quantized base (mlx-community 4-bit repos,
    gpt-oss's native MXFP4 experts) needs nothing here."""
    trust_remote_code: bool = False
    """Let the tokenizer run code shipped in the model repo."""


@dataclass(frozen=True)
class AdapterConfig:
    method: Literal["lora", "dora", "full"] = "lora"
    """`lora`, `dora` (weight-decomposed LoRA), or `full` (train every weight of the adapted
    blocks; needs a float base)."""
    rank: int = 16
    """LoRA rank r: the width of the low-rank update."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank), which keeps high ranks from under-training."""
    dropout: float = 0.0
    """Dropout on the adapter input, in [0, 1)."""
    targets: Union[str, list[str]] = "all-linear"
    """`all-linear` (every linear layer in the adapted blocks) or module names such as
    ["q_proj", "v_proj"]; a name matches a module whose path ends with it."""
    layers: Union[str, int] = "all"
    """`all`, or N to adapt only the last N transformer blocks."""


@dataclass(frozen=True)
class DataConfig:
    train: Union[str, list[str]] = ""
    """Training data: a JSONL/JSON/Parquet file, a directory of them, or
    `hf://datasets/org/name[/file]`; a list mixes several sources."""
    valid: Optional[str] = None
    """Validation data, same forms as `train`. Omit to carve `valid_fraction` out of train."""
    valid_fraction: float = 0.0
    """Fraction of the training records held out for validation when `valid` is not given."""
    weights: Optional[list[float]] = None
    """Mixing weights, one per `train` source: a source's records are repeated or subsampled so
    its share of the epoch is its weight over the total."""
    format: Literal["auto", "chat", "tools", "completions", "text", "alpaca", "sharegpt"] = "auto"
    """Record format; `auto` detects it per file from the keys of every record."""
    prompt_key: str = "prompt"
    """Key of the prompt in `completions` records."""
    completion_key: str = "completion"
    """Key of the completion in `completions` records."""
    text_key: str = "text"
    """Key of the text in `text` records."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Supervised tokens: every assistant turn, the last assistant turn, or all tokens."""
    max_seq_len: int = 2048
    """Longest sample in tokens; longer ones follow `truncation`."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with samples longer than `max_seq_len`: cut them, or leave them out."""
    pack: bool = False
    """Pack several samples into each row of `max_seq_len` tokens, with attention kept inside
    each sample. Without packing, batches are bucketed by length to keep padding low."""
    shuffle: bool = True
    """Shuffle the order of batches each epoch (seeded by `training.seed`)."""
    cache: bool = True
    """Keep each data file's rendered samples (token ids, masks) on disk, keyed by the file's
    content, the tokenizer, the chat template and the format keys, so the next `run`, `plan`
    or `data inspect` on the same inputs opens them in seconds. false renders in memory."""
    cache_dir: Optional[str] = None
    """Where the rendered-data cache lives; default `$MLX_FT_CACHE/data` (~/.cache/mlx_ft/data).
    `mlxft data cache --list` / `--clear` show and empty it."""


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 4
    """Rows per micro-batch (packed rows when `data.pack`)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; their summed gradients are divided as
    `loss_normalization` says (not averaged per micro-batch)."""
    loss_normalization: Literal["step", "epoch"] = "epoch"
    """What each optimizer step's summed token losses are divided by. `step`: that step's own
    supervised tokens, so every step weighs the same (mlx-lm's way). `epoch`: the mean supervised
    tokens per step over an epoch, so every token weighs the same: a step of short samples (which
    length bucketing groups together) makes a proportionally smaller update."""
    epochs: Optional[int] = None
    """Passes over the training data. Give `epochs` or `steps`; neither means 1 epoch."""
    steps: Optional[int] = None
    """Optimizer steps to run, instead of `epochs`."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    """Optimizer."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw only)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up: constant, linear to 0, or cosine to `min_lr_ratio` x peak."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of the peak."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: much less memory, ~30% slower."""
    loss_chunk_size: int = 512
    """Sequence positions per chunk of the cross-entropy, so the full batch x seq x vocab logits
    never exist at once. 0 computes the loss in one piece."""
    seed: int = 0
    """Seed for adapter initialisation, data order and dropout."""
    report_every: int = 10
    """Steps between lines of metrics (and rows of metrics.jsonl)."""
    eval_every: Optional[int] = None
    """Steps between validation passes (there is always one at the end when there is data)."""
    eval_batches: Optional[int] = None
    """Validation batches per pass; omit to use the whole validation set."""
    eval_at_start: bool = True
    """One validation pass before the first step (metrics.jsonl's step-0 row, summary.json's
    `initial_val_loss`), so the final line shows how much the run learned. Never a "best"."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many validation passes without a new best loss."""
    save_every: Optional[int] = None
    """Steps between checkpoints (adapter, optimizer, data position, RNG) for exact resume."""
    keep_checkpoints: int = 3
    """Checkpoints kept besides the best one; older ones are deleted."""
    resume: Literal["never", "auto"] = "never"
    """`auto` continues from the newest complete checkpoint in `output.dir` if there is one."""
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = "sft"
    """What the loss optimises. `sft`: next-token cross-entropy on the supervised tokens.
    Preference tuning on TRL's preference formats (docs/preference.md): `dpo` (chosen over
    rejected, against a reference model: the base with adapters off, or a frozen copy for
    `full`), `orpo` (odds ratio plus the chosen sequence's NLL, no reference), `simpo`
    (length-normalised margin, no reference), `kto` (desirable/undesirable examples, paired or
    not, against a reference)."""
    beta: Optional[float] = None
    """dpo, kto, simpo: the inverse temperature of the implicit reward beta x log-ratio. Default
    0.1 for dpo and kto (TRL's), 2.0 for simpo (the SimPO paper's)."""
    loss_type: Optional[Literal["sigmoid", "ipo", "hinge", "robust"]] = None
    """dpo: `sigmoid` (the DPO paper, default), `ipo` (squared, on per-token log-ratios as TRL
    computes it), `hinge` (SLiC), `robust` (rDPO: unbiased when a share `label_smoothing` of the
    labels is flipped)."""
    label_smoothing: Optional[float] = None
    """dpo with loss_type 'robust': the probability that a pair's preference is flipped, in [0, 0.5)."""
    orpo_lambda: Optional[float] = None
    """orpo: weight of the odds-ratio term beside the chosen sequence's NLL (the paper's lambda,
    TRL's `beta`). Default 0.1."""
    simpo_gamma: Optional[float] = None
    """simpo: the target reward margin gamma (TRL's `simpo_gamma`). Default 0.5."""
    desirable_weight: Optional[float] = None
    """kto: weight of the desirable examples' losses. Default 1.0."""
    undesirable_weight: Optional[float] = None
    """kto: weight of the undesirable examples' losses. Default 1.0."""
    precompute_reference: bool = False
    """dpo, kto: compute the reference model's log-probs of every example once before training
    (kept in the run directory), so each step runs the policy only; a full fine-tune then needs
    no frozen copy of the model either."""


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = ""
    """Run directory for adapters, checkpoints, metrics and exports; defaults to
    runs/<recipe file name>."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=list)
    """Experiment trackers that also get every metrics row, the validation and `[eval]` results,
    the resolved recipe (as config) and the final summary, e.g. ["tensorboard"]. All work offline:
    TensorBoard event files in <run>/tensorboard, W&B in offline mode unless you are logged in,
    MLflow's SQLite store <run>/mlflow.db (or MLFLOW_TRACKING_URI), trackio's local store. Each needs
    its extra: `pip install -e ".[tensorboard]"` (or wandb, mlflow, trackio)."""


@dataclass(frozen=True)
class ExportConfig:
    to: list[Literal["safetensors", "gguf", "peft", "gguf-lora"]] = field(default_factory=list)
    """Formats to export when the run finishes: fused `safetensors`, fused `gguf`, the adapter as
    `peft` or as a llama.cpp `gguf-lora`."""
    gguf_type: Literal[GGUF_TYPE_NAMES] = "f16"
    """Type of the fused GGUF file: any type `mlxft fuse --gguf-type` makes. f32, f16, bf16, q8_0 and
    q4_0 are written directly; the K-quants (q4_k_m, q6_k, ...) and the other llama.cpp types by
    llama.cpp's quantizer (llama-quantize on PATH, else llama-cpp-python: `mlx-ft[gguf]`)."""
    gguf_pre: Optional[str] = None
    """llama.cpp's pre-tokenizer name (as `--gguf-pre`), only for a BPE tokenizer its converter's table
    does not know; the export's error lists the names."""
    dtype: Literal["bf16", "f16", "f32"] = "bf16"
    """Float type of the fused safetensors model."""


@dataclass(frozen=True)
class EvalConfig:
    at_end: bool = False
    """Evaluate the final adapter when `mlxft run` finishes, as `mlxft eval RUN` does: loss and
    perplexity, and each assistant turn answered greedily and scored against the reference (exact,
    normalised, JSON fields); results in <run>/eval.json, answers in <run>/eval_samples.jsonl."""
    data: Optional[str] = None
    """Data to evaluate on (same forms as `data.valid`); omit for the validation set
    (`data.valid`, or the `data.valid_fraction` carved out of train)."""
    max_samples: Optional[int] = None
    """Evaluate only the first N records; omit for all of them."""
    max_tokens: Optional[int] = None
    """Tokens generated per answer at most; omit for the reference's length plus a quarter plus
    16 (a longer answer cannot match)."""
    base: bool = False
    """Also evaluate the base model without the adapter (<run>/eval-base.json), for a before/after
    table."""


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """What is trained."""
    data: DataConfig = field(default_factory=DataConfig)
    """What it is trained on."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """How it is trained."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """What is exported at the end of `mlxft run`."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What is evaluated at the end of `mlxft run` (`mlxft eval` runs the same at any time)."""
    # Not part of the TOML: where the recipe came from and where each value came from.
    source: str = field(default="<dict>", compare=False, repr=False)
    provenance: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir).expanduser()

    def to_dict(self) -> dict:
        """The TOML tables as plain data (None values left out, as TOML has no null)."""
        return {t: _strip_none(dataclasses.asdict(getattr(self, t))) for t in TABLES}


TABLES = ("model", "adapter", "data", "training", "output", "export", "eval")
_REQUIRED = {"model.path", "data.train"}

# ----------------------------------------------------------------------------------------------
# Loading


def load_recipe(
    path: str | Path, overrides: list[str] | dict[str, Any] | None = None
) -> Recipe:
    """Load, merge (`extends`), override and validate a recipe file.

    Args:
        path: the TOML file.
        overrides: `["training.learning_rate=2e-4", ...]` as given to `--set`, or a dict
            `{"training.learning_rate": 2e-4}`.
    Raises:
        RecipeError: listing every problem found, with key paths.
    """
    path = Path(path)
    data, prov = _read_with_extends(path, [])
    _apply_overrides(data, prov, overrides, str(path))
    _check_tables(data, prov, str(path))
    _settle_alternatives(data, prov)
    if not data.get("output", {}).get("dir"):
        data.setdefault("output", {})["dir"] = f"runs/{path.stem}"
        prov["output.dir"] = "default (runs/<recipe name>)"
    return recipe_from_dict(data, source=str(path), provenance=prov)


def recipe_from_dict(
    data: dict, source: str = "<dict>", provenance: dict | None = None
) -> Recipe:
    """Validate plain data (as parsed from TOML) into a Recipe; raises RecipeError."""
    problems: list[str] = []
    data = dict(data)
    data.pop("extends", None)
    if not data.get("output", {}).get("dir"):
        data = {**data, "output": {**data.get("output", {}), "dir": "runs/run"}}
    values = _build(Recipe, _expand_home(data), "", problems, exclude={"source", "provenance"})
    prov = dict(provenance or {})
    # Fields with a type problem fall back to their defaults so the range and cross-field rules
    # still run: the user sees every problem at once, not one layer at a time.
    recipe = Recipe(**values, source=source, provenance=prov)
    for key in _leaf_paths(recipe):
        prov.setdefault(key, "default")
    reported = {m.split(":", 1)[0].split("[", 1)[0] for m in problems}
    problems += [m for m in _check(recipe) if m.split(":", 1)[0] not in reported]
    if problems:
        raise RecipeError(source, [_where(m, prov, source) for m in problems])
    return recipe


def _check_tables(data: dict, prov: dict, source: str) -> None:
    """Each table must be a table (`output = "x"`, `training = 5` or `--set output=/x` are not): said
    before the tables are read for defaults and alternatives."""
    bad = [_where(f"{t}: expected a table such as [{t}] with its keys, found {_show(data[t])}", prov, source)
           for t in TABLES if t in data and not isinstance(data[t], dict)]
    if bad:
        raise RecipeError(source, bad)


# Keys holding local paths: a leading `~` is the user's home, as in a shell (not a directory "~").
_PATH_KEYS = {("model", "path"), ("data", "train"), ("data", "valid"), ("output", "dir")}


def _expand_home(data: dict) -> dict:
    def expand(v):
        if isinstance(v, str) and v.startswith("~"):
            return os.path.expanduser(v)
        return [expand(x) for x in v] if isinstance(v, list) else v

    out = dict(data)
    for table, key in _PATH_KEYS:
        if isinstance(out.get(table), dict) and key in out[table]:
            out[table] = {**out[table], key: expand(out[table][key])}
    return out


def _either(values: tuple) -> str:
    """(2, 3, 4) -> "2, 3 or 4"."""
    return f"{', '.join(map(str, values[:-1]))} or {values[-1]}" if len(values) > 1 else str(values[0])


def _where(problem: str, prov: dict, source: str) -> str:
    """Name the file a bad value came from when it is not the recipe itself (extends, --set)."""
    key = problem.split(":", 1)[0].split("[", 1)[0]
    origin = prov.get(key, "")
    if origin.startswith("extends ") or origin == "--set":
        return f"{key} (from {origin}){problem[len(key):]}"
    return problem


def _read_toml(path: Path, named_by: str | None) -> dict:
    where = f" (named by `extends` in {named_by})" if named_by else ""
    if not path.is_file():
        raise RecipeError(str(path), [f"recipe file not found{where}; check the path"])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"TOML syntax error: {e}"]) from None
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None


def _read_with_extends(path: Path, chain: list[Path]) -> tuple[dict, dict]:
    """Returns (merged data, provenance) where this file's keys override its base's."""
    data = _read_toml(path, str(chain[-1]) if chain else None)
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in [*chain, path])
        raise RecipeError(str(path), [f"`extends` forms a cycle: {cycle}"])
    tag = "extends " + str(path) if chain else "file " + str(path)
    prov = {k: tag for k in _data_leaf_paths(data) if k != "extends"}
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, prov
    if not isinstance(base_name, str):
        raise RecipeError(str(path), [f"extends: expected a file path string, found {base_name!r}"])
    base_path = Path(os.path.normpath(path.parent / base_name))
    base, base_prov = _read_with_extends(base_path, [*chain, path.resolve()])
    if not chain:  # values inherited through any depth of extends say which file gave them
        base_prov = {k: v.replace("file ", "extends ", 1) for k, v in base_prov.items()}
    return _merge(base, data), {**base_prov, **prov}


def _merge(base: dict, top: dict) -> dict:
    """Tables merge key by key; any other value in `top` replaces the base's."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k in TABLES:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Keys that are alternatives to each other: when a later layer (--set over the file, the file
# over what it extends) gives one of them, the other from an earlier layer is dropped.
_ALTERNATIVES = [("training.epochs", "training.steps"), ("data.valid", "data.valid_fraction")]


def _rank(origin: str) -> int:
    return 3 if origin == "--set" else 2 if origin.startswith("file ") else 1


def _settle_alternatives(data: dict, prov: dict) -> None:
    for a, b in _ALTERNATIVES:
        (ta, ka), (tb, kb) = a.split("."), b.split(".")
        if ka in data.get(ta, {}) and kb in data.get(tb, {}):
            ra, rb = _rank(prov.get(a, "")), _rank(prov.get(b, ""))
            if ra != rb:  # the same layer giving both is a real conflict, reported by _check
                loser, (t, k) = (a, (ta, ka)) if ra < rb else (b, (tb, kb))
                del data[t][k]
                prov[loser] = f"dropped ({a if loser == b else b} given by a later layer)"


def _apply_overrides(data: dict, prov: dict, overrides, source: str) -> None:
    if not overrides:
        return
    items = overrides.items() if isinstance(overrides, dict) else map(_parse_set, overrides)
    for key, value in items:
        *tables, leaf = key.split(".")
        node = data
        for t in tables:
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise RecipeError(source, [f"--set {key}: {t} is not a table"])
        node[leaf] = value
        prov[key] = "--set"


def _parse_set(item: str) -> tuple[str, Any]:
    """`training.learning_rate=2e-4` -> ("training.learning_rate", 2e-4); bare words are strings."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError("--set", [f"{item!r}: expected KEY.PATH=VALUE, e.g. training.learning_rate=2e-4"])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # an unquoted string such as a path
    return key.strip(), value


# ----------------------------------------------------------------------------------------------
# Type checking against the dataclasses


def _build(cls, data: Any, prefix: str, problems: list[str], exclude=frozenset()) -> dict:
    """Check `data` against dataclass `cls`; returns constructor kwargs, appends to `problems`."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'recipe'}: expected a table, found {_show(data)}")
        return {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    for key in data:
        if key not in names:
            problems.append(_unknown_key(prefix, key, names))
    out = {}
    for name in names:
        path = prefix + name
        if name not in data:
            if path in _REQUIRED:
                problems.append(f"{path}: required, but missing")
            continue
        ok, value = _convert(data[name], hints[name], path, problems)
        if ok or dataclasses.is_dataclass(value):  # a table keeps its valid keys
            out[name] = value
    return out


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> tuple[bool, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        before = len(problems)
        kwargs = _build(tp, value, path + ".", problems)
        return len(problems) == before, tp(**kwargs)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        for arm in arms:  # a value that fits one arm exactly wins
            trial: list[str] = []
            ok, v = _convert(value, arm, path, trial)
            if ok and not trial:
                return True, v
        if len(arms) == 1:  # Optional[X]: report X's own, more precise, problem
            return _convert(value, arms[0], path, problems)
        problems.append(f"{path}: expected {_describe(tp)}, found {_show(value)}")
        return False, None
    if origin is Literal:
        if value in args:
            return True, value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        if (path, str(value).lower()) in _HINTS:
            did = "; " + _HINTS[path, str(value).lower()]
        choices = ", ".join(repr(a) for a in args)
        problems.append(f"{path}: expected one of {choices}, found {_show(value)}{did}")
        return False, None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_describe(tp)}, found {_show(value)}")
            return False, None
        before, out = len(problems), []
        for i, item in enumerate(value):
            out.append(_convert(item, args[0], f"{path}[{i}]", problems)[1])
        return len(problems) == before, out
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # TOML has inf and nan; no setting means either
            problems.append(f"{path}: expected a finite number, found {value}")
            return False, None
        return True, float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return True, value
    problems.append(f"{path}: expected {_describe(tp)}, found {_show(value)}")
    return False, None


# Values people write for a choice that is spelled otherwise here: the answer to give instead of
# a did-you-mean.
_QUANTIZED = ("{m} is method = '{base}' with a quantized base: set adapter.method = '{base}' and "
              "model.quantize = {{ bits = 4, group_size = 64 }} (--set adapter.method={base} "
              "--set model.quantize.bits=4)")
_HINTS = {("adapter.method", "qlora"): _QUANTIZED.format(m="QLoRA", base="lora"),
          ("adapter.method", "qdora"): _QUANTIZED.format(m="QDoRA", base="dora")}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {json.dumps(value, default=str)[:60]}"


def _unknown_key(prefix: str, key: str, names: list[str]) -> str:
    path = prefix + key
    hint = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not hint and not prefix:  # a top-level key that belongs in a table, e.g. `rank = 8`
        hint = [f"{t}.{key}" for t in TABLES if key in _field_names(Recipe, t)][:1]
    elif hint:
        hint = [prefix + hint[0]]
    did = f"; did you mean '{hint[0]}'?" if hint else ""
    where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
    return f"{path}: unknown key in {where}{did}"


def _field_names(cls, table: str) -> set[str]:
    sub = typing.get_type_hints(cls)[table]
    return {f.name for f in dataclasses.fields(sub)}


# ----------------------------------------------------------------------------------------------
# Ranges and cross-field rules


def _check(r: Recipe) -> list[str]:
    p: list[str] = []
    a, d, t, q = r.adapter, r.data, r.training, r.model.quantize

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(bool(r.model.path.strip()), "model.path: must not be empty; give a hub id or a local directory")
    if q is not None:
        allowed = QUANT_MODES.get(q.mode, QUANT_MODES["affine"])
        for key in ("bits", "group_size"):
            ok, found = allowed[key], getattr(q, key)
            need(found in ok, f"model.quantize.{key}: expected {_either(ok)}, found {found}"
                 if q.mode == "affine"
                 else f"model.quantize.{key}: mode {q.mode!r} takes {ok[0]}, found {found}; leave it out")
    need(a.rank > 0, f"adapter.rank: must be > 0, found {a.rank}")
    need(a.alpha > 0, f"adapter.alpha: must be > 0, found {a.alpha}")
    need(0 <= a.dropout < 1, f"adapter.dropout: must be in [0, 1), found {a.dropout}")
    if isinstance(a.targets, str):
        need(a.targets == "all-linear", "adapter.targets: expected 'all-linear' or a list of module names, "
             f"found {a.targets!r}; write [\"{a.targets}\"] for one module")
    else:
        need(len(a.targets) > 0, "adapter.targets: the list is empty; use 'all-linear' or name modules")
    if isinstance(a.layers, str):
        need(a.layers == "all", f"adapter.layers: expected 'all' or a number of blocks, found {a.layers!r}")
    else:
        need(a.layers >= 1, f"adapter.layers: must be >= 1, found {a.layers}")
    if a.method == "full" and q is not None:
        p.append("adapter.method: 'full' fine-tuning cannot train a quantized base (model.quantize is set); "
                 "use method = 'lora' or 'dora' for QLoRA, or remove model.quantize")
    trains = [d.train] if isinstance(d.train, str) else d.train
    need(all(s.strip() for s in trains) and len(trains) > 0,
         "data.train: must name at least one file, directory or hf:// dataset")
    need(0 <= d.valid_fraction < 1, f"data.valid_fraction: must be in [0, 1), found {d.valid_fraction}")
    if d.valid is not None and d.valid_fraction > 0:
        p.append("data.valid_fraction: conflicts with data.valid; give a validation file or a fraction, "
                 "not both")
    if d.weights is not None:
        need(len(d.weights) == len(trains),
             f"data.weights: {len(d.weights)} weights for {len(trains)} train sources; give one per source")
        for i, w in enumerate(d.weights):
            need(w > 0, f"data.weights[{i}]: a mixing weight must be > 0, found {w}")
    need(d.max_seq_len >= 8, f"data.max_seq_len: must be >= 8, found {d.max_seq_len}")
    need(t.batch_size >= 1, f"training.batch_size: must be >= 1, found {t.batch_size}")
    need(t.grad_accum >= 1, f"training.grad_accum: must be >= 1, found {t.grad_accum}")
    if t.epochs is not None and t.steps is not None:
        p.append("training.steps: conflicts with training.epochs; give one of them")
    need(t.epochs is None or t.epochs >= 1, f"training.epochs: must be >= 1, found {t.epochs}")
    need(t.steps is None or t.steps >= 1, f"training.steps: must be >= 1, found {t.steps}")
    need(t.learning_rate > 0, f"training.learning_rate: must be > 0, found {t.learning_rate}")
    need(t.weight_decay >= 0, f"training.weight_decay: must be >= 0, found {t.weight_decay}")
    need(t.warmup_steps >= 0, f"training.warmup_steps: must be >= 0, found {t.warmup_steps}")
    need(0 <= t.min_lr_ratio <= 1, f"training.min_lr_ratio: must be in [0, 1], found {t.min_lr_ratio}")
    need(t.max_grad_norm >= 0,
         f"training.max_grad_norm: must be >= 0 (0 = no clipping), found {t.max_grad_norm}")
    need(t.loss_chunk_size >= 0, f"training.loss_chunk_size: must be >= 0, found {t.loss_chunk_size}")
    need(t.report_every >= 1, f"training.report_every: must be >= 1, found {t.report_every}")
    for key in ("eval_every", "eval_batches", "save_every", "early_stopping_patience"):
        v = getattr(t, key)
        need(v is None or v >= 1, f"training.{key}: must be >= 1, found {v}")
    need(t.keep_checkpoints >= 1, f"training.keep_checkpoints: must be >= 1, found {t.keep_checkpoints}")
    has_valid = d.valid is not None or d.valid_fraction > 0
    if t.early_stopping_patience is not None and not has_valid:
        p.append("training.early_stopping_patience: needs validation data; set data.valid or "
                 "data.valid_fraction")
    if t.early_stopping_patience is not None and t.eval_every is None:
        p.append("training.early_stopping_patience: needs training.eval_every to compare validation losses "
                 "during the run")
    p += _objective_problems(r)
    if t.optimizer != "adamw" and t.weight_decay > 0:
        p.append("training.weight_decay: only applies to optimizer 'adamw', but optimizer is "
                 f"{t.optimizer!r}")
    need(bool(r.output.dir.strip()), "output.dir: must not be empty")
    if r.export.gguf_type in NEEDS_IMATRIX:  # refused now, not after training
        p.append(needs_imatrix_message("export.gguf_type:", r.export.gguf_type))
    need(len(set(r.output.report_to)) == len(r.output.report_to),
         f"output.report_to: a tracker is named twice in {r.output.report_to}")
    e = r.eval
    need(e.max_samples is None or e.max_samples >= 1,
         f"eval.max_samples: must be >= 1, found {e.max_samples}")
    need(e.max_tokens is None or e.max_tokens >= 1, f"eval.max_tokens: must be >= 1, found {e.max_tokens}")
    if e.at_end and e.data is None and r.training.objective != "sft":
        p.append(f"eval.at_end: training.objective = {r.training.objective!r} validates on preference pairs, "
                 "which [eval] does not score (their reward accuracy is in metrics.jsonl); set eval.data to "
                 "a file of chat records, or remove eval.at_end")
    elif e.at_end and e.data is None and not has_valid:
        p.append("eval.at_end: there is nothing to evaluate on; set eval.data, data.valid or "
                 "data.valid_fraction")
    return p


# The objectives each preference key belongs to (None: the key is unset).
OBJECTIVE_KEYS = {"beta": ("dpo", "kto", "simpo"), "loss_type": ("dpo",), "label_smoothing": ("dpo",),
                  "orpo_lambda": ("orpo",), "simpo_gamma": ("simpo",), "desirable_weight": ("kto",),
                  "undesirable_weight": ("kto",), "precompute_reference": ("dpo", "kto")}


def _objective_problems(r: Recipe) -> list[str]:
    """The preference keys against `training.objective` and against each other."""
    t, d, p = r.training, r.data, []
    for key, users in OBJECTIVE_KEYS.items():
        value = getattr(t, key)
        if value not in (None, False) and t.objective not in users:
            names = " or ".join(repr(u) for u in users)
            p.append(f"training.{key}: only used with training.objective = {names}, but training.objective "
                     f"is {t.objective!r}; remove training.{key} or change the objective")
    if t.beta is not None and not t.beta > 0:
        p.append(f"training.beta: must be > 0, found {t.beta}")
    if t.label_smoothing is not None and t.objective == "dpo":
        if (t.loss_type or "sigmoid") != "robust":
            p.append(f"training.label_smoothing: only the 'robust' loss uses it (as in TRL), but "
                     f"training.loss_type is {t.loss_type or 'sigmoid'!r}; set training.loss_type = 'robust' "
                     "or remove label_smoothing")
        elif not 0 <= t.label_smoothing < 0.5:
            p.append(f"training.label_smoothing: must be in [0, 0.5) (the share of flipped labels), "
                     f"found {t.label_smoothing}")
    for key in ("orpo_lambda", "simpo_gamma"):
        v = getattr(t, key)
        if v is not None and v < 0:
            p.append(f"training.{key}: must be >= 0, found {v}")
    for key in ("desirable_weight", "undesirable_weight"):
        v = getattr(t, key)
        if v is not None and not v > 0:
            p.append(f"training.{key}: must be > 0, found {v}")
    if t.objective != "sft":
        if d.format != "auto":
            p.append(f"data.format: preference records are detected per record (TRL's formats), but "
                     f"data.format is {d.format!r} and training.objective is {t.objective!r}; set "
                     "data.format = 'auto'")
        if d.train_on != "assistant":
            p.append(f"data.train_on: with training.objective = {t.objective!r} the completions are "
                     f"supervised, so train_on {d.train_on!r} has no effect; remove data.train_on")
    return p


# ----------------------------------------------------------------------------------------------
# Help text and the resolved recipe


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (its help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def table_classes() -> dict[str, type]:
    """Table name -> its dataclass, in recipe order."""
    hints = typing.get_type_hints(Recipe)
    return {t: hints[t] for t in TABLES}


def _leaf_paths(recipe: Recipe) -> list[str]:
    out = []
    for t in TABLES:
        for f in dataclasses.fields(getattr(recipe, t)):
            out.append(f"{t}.{f.name}")
    return out


def _data_leaf_paths(data: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and (not prefix and k in TABLES):
            out += _data_leaf_paths(v, f"{k}.")
        else:
            out.append(prefix + k)
    return out


def _strip_none(d: dict) -> dict:
    return {k: (_strip_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # JSON strings, ints and finite floats are valid TOML


def resolved_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML, each value commented with where it came from."""
    lines = [f"# Resolved from {recipe.source} by mlx_ft; every value and its origin", ""]
    for t in TABLES:
        lines.append(f"[{t}]")
        for f in dataclasses.fields(getattr(recipe, t)):
            v = getattr(getattr(recipe, t), f.name)
            src = recipe.provenance.get(f"{t}.{f.name}", "default")
            if dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            if v is None:
                lines.append(f"# {f.name} is not set  # {src}")
            else:
                lines.append(f"{f.name} = {_toml_value(v)}  # {src}")
        lines.append("")
    return "\n".join(lines)
