"""The `mlxft` command line: thin click commands over the library.

Each command parses its arguments, calls one library function, and turns our exceptions into one
clear message with exit code 2. Heavy imports (mlx, mlx-lm) happen inside the commands so that
`mlxft --help` and `mlxft validate` stay fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .errors import MlxFtError
from .gguf_types import DIRECT_TYPES, LLAMA_CPP_TYPES, NEEDS_IMATRIX

EXIT_USER_ERROR = 2
EXIT_DOES_NOT_FIT = 3  # `mlxft plan`: the run would not fit the machine's memory


def user_errors(fn):
    """Print an MlxFtError (or a failed write: disk full, read-only) as one block on stderr and exit 2,
    never a traceback; print mlx_ft's warnings as one line each."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        from .atomic import is_write_failure, storage_error

        shown, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            return fn(*args, **kwargs)
        except MlxFtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as e:
            if not is_write_failure(e):
                raise
            click.echo(f"error: {storage_error(e, Path(e.filename or '.'), '')}", err=True)
            sys.exit(EXIT_USER_ERROR)
        finally:
            warnings.showwarning = shown

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our warnings as `warning: ...` (no Python source line); others as Python shows them."""
    import warnings

    from .errors import MlxFtWarning

    if issubclass(category, MlxFtWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line), err=True, nl=False)


def entry():
    """The `mlxft` console script (importing mlx_ft has bound MLX to OpenBLAS on Linux: blas.py)."""
    main(prog_name="mlxft")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-ft")
def main():
    """Fine-tune LLMs on Apple Silicon with MLX, driven by TOML recipes.

    \b
    mlxft validate recipes/demo.toml
    mlxft run recipes/demo.toml --set training.learning_rate=2e-4
    """


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--deep", is_flag=True, help="Also read every data record and render the first ones with the "
              "model's tokenizer and chat template (loads the tokenizer, not the weights).")
@user_errors
def validate(recipes, overrides, deep):
    """Check recipes and report every problem at once: keys, types, values, data files.

    \b
    Examples:
      mlxft validate recipes/*.toml
      mlxft validate recipes/demo.toml --deep
    """
    from .data.sources import missing_sources
    from .errors import DataError, ModelError, RecipeError
    from .recipe import load_recipe
    from .trackers import missing_trackers

    failed = []
    for path in recipes:
        try:
            recipe = load_recipe(path, list(overrides))
            missing = missing_sources(recipe) + missing_trackers(recipe)
            if missing:
                raise RecipeError(str(path), missing)
            note = ""
            if deep:
                from .data import check_records, recipe_tokenizer

                note = " (" + check_records(recipe, recipe_tokenizer(recipe)) + ")"
            click.echo(f"{path}: ok{note}")
        except RecipeError as e:
            failed.append(str(e))
        except (DataError, ModelError) as e:
            failed.append(f"{path}: {e}")
    if failed:
        click.echo("\n".join(failed), err=True)
        sys.exit(EXIT_USER_ERROR)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set training.learning_rate=2e-4 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output.dir.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run in output.dir: what mlx_ft wrote there is removed once the "
              "recipe, model and data are checked (a directory mlx_ft did not make is refused).")
@click.option("--force", is_flag=True,
              help="Start even when the memory plan says the run will not fit this machine.")
@user_errors
def run(recipe, overrides, resume, overwrite, force):
    """Train as RECIPE says: adapters, checkpoints, metrics and summary in output.dir.

    It plans first: prints the memory plan's verdict for this machine and refuses a run that
    will not fit (unless --force); summary.json records the planned peak beside the measured one.

    \b
    Examples:
      mlxft run recipes/demo.toml
      mlxft run recipes/qwen32b-qlora.toml --set training.learning_rate=2e-4
      mlxft run recipes/qwen32b-qlora.toml --resume
    """
    from .recipe import load_recipe
    from .runner import train

    r = load_recipe(recipe, list(overrides))
    for key, origin in sorted(r.provenance.items()):
        if origin == "--set":
            click.echo(f"{key} = {_value(r, key)!r} (from --set)")
    train(r, resume=True if resume else None, overwrite=overwrite, force=force)


def _value(recipe, key):
    table, name = key.split(".", 1)
    return getattr(getattr(recipe, table), name.split(".")[0])


@main.command("recipes")
@click.option("--dir", "where", type=click.Path(path_type=Path), default=None,
              help="Directory to list (default: the recipes/ folder shipped with mlx_ft).")
@click.option("--reference", is_flag=True,
              help="Print the recipe reference (every key, type, default, meaning) as Markdown.")
def recipes_cmd(where, reference):
    """List the bundled recipes with the first line of their description.

    \b
    Examples:
      mlxft recipes
      mlxft recipes --reference > docs/recipes.md
    """
    if reference:
        from .recipe_reference import markdown

        click.echo(markdown(), nl=False)
        return
    import os
    import shutil
    import textwrap

    where = where or bundled_recipes_dir()
    files = sorted(where.glob("*.toml")) if where and where.is_dir() else []
    if not files:
        click.echo(f"no recipes found in {where}", err=True)
        sys.exit(EXIT_USER_ERROR)
    names = [os.path.relpath(f) for f in files]
    col = max(map(len, names)) + 2
    width = max(shutil.get_terminal_size((100, 24)).columns, col + 40)
    for name, f in zip(names, files):
        lines = textwrap.wrap(first_sentence(f.read_text()), width - col) or [""]
        click.echo("\n".join([f"{name:<{col}}{lines[0]}", *(" " * col + ln for ln in lines[1:])]))


def first_sentence(text: str) -> str:
    """The first sentence of a recipe's opening comment, whole, however many lines it spans."""
    import re

    para = []
    for line in text.splitlines():
        if not line.startswith("#") or not line.lstrip("#").strip():
            if para:
                break
            continue
        para.append(line.lstrip("#").strip())
    joined = " ".join(para)
    m = re.search(r"[.!?](?=\s+[A-Z(`])", joined)
    return joined[: m.end()] if m else joined


def bundled_recipes_dir() -> Path:
    """recipes/ of this checkout (mlx_ft is installed from a clone, editable)."""
    return Path(__file__).resolve().parent.parent / "recipes"


@main.group("data")
def data_group():
    """Look at the data a recipe trains on."""


@data_group.command("inspect")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--show", default=3, show_default=True, metavar="N", help="Rendered samples to print.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@user_errors
def data_inspect(recipe, show, as_json, overrides):
    """Counts, token lengths, supervised share, batches per epoch and rendered samples.

    Supervised tokens are coloured on a terminal and wrapped in [[ ]] otherwise.

    \b
    Example:
      mlxft data inspect recipes/demo.toml --show 2
    """
    import json

    from .data.report import format_report, inspect_recipe
    from .recipe import load_recipe

    report = inspect_recipe(load_recipe(recipe, list(overrides)), show, progress=True)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(format_report(report, color=sys.stdout.isatty()))


@data_group.command("cache")
@click.option("--list", "show", is_flag=True, help="List the cached datasets (the default).")
@click.option("--clear", is_flag=True, help="Remove every cached dataset (only mlx_ft's own files).")
@click.option("--dir", "where", type=click.Path(path_type=Path),
              help="The cache directory (a recipe's data.cache_dir) [default: $MLX_FT_CACHE/data].")
@user_errors
def data_cache(show, clear, where):
    """The rendered-data cache: one entry per data file and rendering settings.

    \b
    Examples:
      mlxft data cache --list
      mlxft data cache --clear --dir /Volumes/scratch/mlx_ft-data
    """
    from .data import store
    from .errors import DataError

    if show and clear:
        raise DataError("data cache: give --list or --clear, not both")
    where = Path(where).expanduser() if where else store.default_dir()
    if clear:
        n, freed = store.clear(where)
        click.echo(f"removed {n} cached dataset(s), {freed / 1e6:,.1f} MB, from {where}")
        return
    rows = store.list_entries(where)
    click.echo(f"{where}: {len(rows)} cached dataset(s), {sum(r['bytes'] for r in rows) / 1e6:,.1f} MB")
    for r in rows:
        click.echo(f"  {r['name']}  {r['bytes'] / 1e6:9,.1f} MB  {r.get('records') or 0:>9,} records  "
                   f"{r.get('created') or '-':19}  {r['state']}  {r.get('source') or '-'}")


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model",
              help="Base model: hub id or local dir (default: the base recorded with the adapter).")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="Adapter directory or run directory to apply.")
@click.option("--prompt", required=True, help="The prompt (the user turn with --chat).")
@click.option("--chat", is_flag=True,
              help="Apply the tokenizer's chat template to the prompt as one user turn.")
@click.option("--system", help="System message (implies --chat).")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=float, default=0.0, help="Nucleus sampling threshold (0 = off).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--verbose", is_flag=True, help="Also print the templated prompt and the speed.")
@user_errors
def generate(run_dir, model, adapter, prompt, chat, system, max_tokens, temp, top_p, seed, verbose):
    """Quick check of a fine-tune: stream the answer to one prompt.

    RUN_DIR is a run directory (or adapter directory): its adapter is applied to the base model
    it recorded. Or give --model (and --adapter) instead.

    \b
    Examples:
      mlxft generate runs/demo --chat --prompt "Review: The soup was awful."
      mlxft generate --model Qwen/Qwen2.5-7B-Instruct --adapter runs/qwen7b-dora --chat --prompt "Hi"
    """
    from .errors import ModelError
    from .generate import generate as run_generate

    if run_dir is not None and adapter is not None:
        raise ModelError("generate: give RUN_DIR or --adapter, not both")
    if run_dir is None and model is None and adapter is None:
        raise ModelError("generate: give a RUN_DIR, or --model (with --adapter DIR to apply a fine-tune)")
    out = run_generate(model, prompt, adapter=adapter or run_dir, chat=chat, system=system,
                       max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                       on_text=lambda t: click.echo(t, nl=False))
    click.echo()
    if verbose:
        click.echo(f"--- prompt ({out.prompt_tokens} tokens):\n{out.prompt}", err=True)
        click.echo(f"--- {out.generation_tokens} tokens, {out.tokens_per_sec:.1f} tok/s, "
                   f"finish: {out.finish_reason}", err=True)


@main.command("eval")
@click.argument("run_or_adapter", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path),
              help="Data file or directory to evaluate on [default: the run's validation set].")
@click.option("--max-samples", type=int, metavar="N", help="Evaluate the first N records only.")
@click.option("--max-tokens", type=int, metavar="N",
              help="Tokens generated per answer at most [default: the reference's length + 25% + 16].")
@click.option("--base", is_flag=True,
              help="Evaluate the base model alone, without the adapter (eval-base.json); "
              "with the fine-tune's eval.json on the same data, prints a before/after table.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures (eval.json) as JSON.")
@user_errors
def eval_cmd(run_or_adapter, data, max_samples, max_tokens, base, as_json):
    """How good is a fine-tune: loss, perplexity and answers on held-out data.

    Every assistant turn of the data is answered greedily from the conversation before it and
    scored against the reference: exact match, normalised match (case, punctuation and spacing
    ignored) and, for JSON references, valid JSON, equal JSON and each field. Figures go to
    RUN/eval.json, every answer to RUN/eval_samples.jsonl.

    \b
    Examples:
      mlxft eval runs/demo
      mlxft eval runs/demo --base
      mlxft eval runs/qwen7b-dora --data data/test.jsonl --max-samples 200 --json
    """
    import json

    from .evaluate import RESULTS, SAMPLES, BASE_SAMPLES, comparable, evaluate, format_report

    res = evaluate(run_or_adapter, data=data, max_samples=max_samples, max_tokens=max_tokens, base=base,
                   progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(res.figures, indent=2, ensure_ascii=False))
        return
    tuned = res.path.parent / RESULTS
    after = json.loads(tuned.read_text()) if base and tuned.is_file() else None
    if after is not None and comparable(after, res.figures):
        click.echo(format_report(after, base=res.figures))
    else:
        click.echo(format_report(res.figures))
        if base:
            click.echo(f"(`mlxft eval {run_or_adapter}` with the same options adds the fine-tune "
                       "for a before/after table)")
    click.echo(f"wrote {res.path} and {res.path.parent / (BASE_SAMPLES if base else SAMPLES)}")


@main.command()
@click.argument("run_or_adapter_dir", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["safetensors", "gguf", "lmstudio"]), default="safetensors",
              show_default=True, help="Hugging Face directory (mlx-lm, transformers), one GGUF file "
              "(llama.cpp, Ollama), or into LM Studio's models directory (GGUF; MLX with --quantize).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Target dir or .gguf file [default: RUN/export/...].")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default="bf16", show_default=True,
              help="Float type of the safetensors weights.")
@click.option("--gguf-type", default="f16", show_default=True,
              help=f"Written directly: {', '.join(DIRECT_TYPES)}. By llama.cpp's quantizer (llama-quantize, "
              "else llama-cpp-python): "
              f"{', '.join(t for t in LLAMA_CPP_TYPES if t not in NEEDS_IMATRIX)}. Refused, "
              f"they need an importance matrix: {', '.join(NEEDS_IMATRIX)}.")
@click.option("--quantize", type=click.Choice(["4", "8"]),
              help="Re-quantize the safetensors for MLX (lossy).")
@click.option("--lmstudio-dir", type=click.Path(path_type=Path), envvar="LMSTUDIO_MODELS_DIR",
              help="--to lmstudio: LM Studio's models directory [env LMSTUDIO_MODELS_DIR; "
              "default ~/.lmstudio/models].")
@click.option("--gguf-pre", help="BPE pre-tokenizer name for llama.cpp, only when its table does not know "
              "the tokenizer (the error lists the names).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing target, if it is an earlier mlx_ft export of the same kind "
              "(never other files).")
@user_errors
def fuse(run_or_adapter_dir, to, out, dtype, gguf_type, quantize, lmstudio_dir, gguf_pre, overwrite):
    """Merge the adapter into its (dequantized) base and write the model.

    \b
    Example:
      mlxft fuse runs/demo --to safetensors --dtype bf16
      mlxft fuse runs/demo --to gguf --gguf-type q4_k_m
      mlxft fuse runs/demo --to lmstudio --gguf-type q8_0
    """
    from .export import fuse as fuse_export

    path = fuse_export(run_or_adapter_dir, to=to, out=out, dtype=dtype, gguf_type=gguf_type,
                       quantize=int(quantize) if quantize else None, overwrite=overwrite,
                       lmstudio_dir=lmstudio_dir, gguf_pre=gguf_pre)
    click.echo(f"wrote {path}")
    if to == "gguf":
        click.echo(f"wrote {path.parent / 'Modelfile'}  (ollama create NAME -f {path.parent / 'Modelfile'})")
    elif to == "lmstudio":
        from .export.lmstudio import how_to_load

        click.echo(how_to_load(path))


@main.command("export-adapter")
@click.argument("run_or_adapter_dir", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["peft", "gguf-lora"]), default="peft", show_default=True,
              help="PEFT directory (transformers + peft) or a llama.cpp LoRA GGUF (llama-cli --lora).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Target dir or .gguf file [default: RUN/export/...].")
@click.option("--with-base", type=click.Choice(DIRECT_TYPES),
              help="gguf-lora: also write the base GGUF the adapter applies to, and a Modelfile.")
@click.option("--gguf-pre", help="With --with-base: BPE pre-tokenizer name for llama.cpp, only when its "
              "table does not know the tokenizer (the error lists the names).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing target, if it is an earlier mlx_ft export of the same kind "
              "(never other files).")
@user_errors
def export_adapter(run_or_adapter_dir, to, out, with_base, gguf_pre, overwrite):
    """Write the adapter alone, for PEFT or llama.cpp, without merging it.

    \b
    Example:
      mlxft export-adapter runs/demo --to peft
      mlxft export-adapter runs/demo --to gguf-lora --with-base f16
    """
    from .export import export_adapter as export

    path = export(run_or_adapter_dir, to=to, out=out, overwrite=overwrite, with_base=with_base,
                  gguf_pre=gguf_pre)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("recipe", required=False, type=click.Path(path_type=Path))
@click.option("--machine", default="auto", show_default=True,
              help="Machine profile (`mlxft machines` lists them) or `auto` for this one.")
@click.option("--model", help="Plan without a recipe: hub id, local dir or bundled model name.")
@click.option("--method", type=click.Choice(["lora", "qlora", "dora", "qdora", "full"]), default="lora",
              show_default=True, help="Without a recipe: what is trained (qlora = lora on a 4-bit base).")
@click.option("--quant-mode", type=click.Choice(["affine", "mxfp4", "nvfp4", "mxfp8"]), default="affine",
              show_default=True, help="Without a recipe, with qlora/qdora: MLX quantization mode of the base "
              "(affine 4-bit group 64, mxfp4, nvfp4, mxfp8).")
@click.option("--rank", type=int, default=16, show_default=True, help="Without a recipe: LoRA rank.")
@click.option("--layers", default="all", show_default=True,
              help="Without a recipe: adapted blocks (last N) or all.")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Without a recipe: rows per micro-batch.")
@click.option("--max-seq-len", type=int, default=2048, show_default=True,
              help="Without a recipe: tokens per row.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False,
              help="Without a recipe: recompute blocks.")
@click.option("--pack/--no-pack", default=False, help="Without a recipe: packed rows.")
@click.option("--objective", type=click.Choice(["sft", "dpo", "orpo", "simpo", "kto"]), default="sft",
              show_default=True, help="Without a recipe: the training objective (preference objectives train "
              "batch-size examples of two sequences each).")
@click.option("--tokens", type=int,
              help="Training tokens per epoch, for the time estimate (default: count the dataset).")
@click.option("--budget-gb", type=float,
              help="Override the machine's GPU budget (GiB), e.g. after raising iogpu.wired_limit_mb.")
@click.option("--probe", is_flag=True,
              help="Run 2 real steps at a short length here and calibrate the estimate.")
@click.option("--probe-seq-len", type=int, help="Row length of the probe [default: min(256, max_seq_len)].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--list-models", is_flag=True, help="List the bundled model configs and exit.")
@click.option("--nodes", type=int, default=1, show_default=True,
              help="Macs training data-parallel (mlx.launch); adds the expected speed-up.")
@click.option("--link", type=click.Choice(["tb5", "tb4", "10gbe", "1gbe"]), default="tb5", show_default=True,
              help="With --nodes: the link between the Macs.")
@click.option("--memory-model", type=click.Choice(["auto", "replay", "formula"]), default="auto",
              show_default=True,
              help="replay: MLX's graph of the training step, traced from the model class and replayed as "
                   "MLX evaluates it; formula: the closed-form terms; auto: the replay when the step can be "
                   "traced (dense models), else the formula.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(recipe, machine, model, method, quant_mode, rank, layers, batch_size, max_seq_len,
         grad_checkpointing, pack, objective, tokens, budget_gb, probe, probe_seq_len, overrides, list_models,
         nodes, link, memory_model, as_json):
    """Will the run fit this Mac's memory, how long will an epoch take, and what to change if not.

    A recipe whose data can be read here is planned at the widest batch its run makes (with the
    max_seq_len worst case on the line below the verdict); otherwise at max_seq_len.

    \b
    Exit status: 0 it fits, 3 it does not fit (the plan and the changes that would fit are
    printed), 2 bad input (unknown model or machine, impossible settings).

    \b
    Examples:
      mlxft plan recipes/demo.toml --machine m4-max-128
      mlxft plan --model Qwen/Qwen2.5-32B --method qlora --batch-size 2 --machine m4-max-64 --json
      mlxft plan --model openai/gpt-oss-120b --method qlora --machine m5-ultra-256
      mlxft plan recipes/qwen32b-qlora.toml --machine m3-ultra-256 --nodes 2 --link tb5
    """
    import json

    from .errors import PlanError
    from .planner import Settings, plan as plan_recipe, plan_model
    from .planner.configs import bundled_names

    if list_models:
        click.echo("\n".join(bundled_names()))
        return
    if recipe is None and model is None:
        raise PlanError("give a RECIPE, or --model ID with --method/--rank/--batch-size/--max-seq-len; "
                        "e.g. mlxft plan --model Qwen/Qwen2.5-7B --method qlora")
    if recipe is not None:
        from .recipe import load_recipe

        rec = load_recipe(recipe, list(overrides))
        p = plan_recipe(rec, machine=machine, tokens=tokens, budget_gb=budget_gb, memory_model=memory_model)
        if probe:
            from .probe import probe_plan

            p = probe_plan(p, rec, probe_seq_len)
    else:
        if probe:
            raise PlanError("--probe needs a RECIPE (it trains 2 real steps on the recipe's model)")
        if layers != "all" and not layers.isdigit():
            raise PlanError(f"--layers: expected a number of blocks or 'all', found {layers!r}")
        from .planner.settings import reference_kind
        from .recipe import QuantizeConfig

        q = QuantizeConfig(mode=quant_mode) if method.startswith("q") else None
        st = Settings(method=method.removeprefix("q"), quant_bits=q and q.bits,
                      quant_group=q.group_size if q else 64, quant_mode=q.mode if q else "affine", rank=rank,
                      layers=None if layers == "all" else int(layers), batch_size=batch_size,
                      seq_len=max_seq_len - 1, pack=pack, grad_checkpointing=grad_checkpointing,
                      objective=objective, reference=reference_kind(objective, method.removeprefix("q")))
        p = plan_model(model, st, machine=machine, tokens=tokens,
                       tokens_source="given with --tokens" if tokens else "no token count; pass --tokens N",
                       budget_gb=budget_gb, memory_model=memory_model)
    p = p.with_cluster(nodes, link)
    click.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.render())
    if not p.fits:
        sys.exit(EXIT_DOES_NOT_FIT)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@user_errors
def machines(as_json):
    """List the Apple Silicon machine profiles `mlxft plan --machine` knows, with their GPU budgets.

    \b
    Example:
      mlxft machines
      mlxft plan recipes/demo.toml --machine m3-ultra-256
    """
    import json
    from dataclasses import asdict

    from .planner import list_machines

    ms = list_machines()
    if as_json:
        click.echo(json.dumps([asdict(m) for m in ms], indent=2))
        return
    click.echo(f"{'name':<16} {'chip':<10} {'memory':>7} {'GPU budget':>11} {'GB/s':>6} {'TFLOPS':>7} "
               f"{'matmul':>8}")
    for m in ms:
        mm = f"{m.matmul_tflops[0]:.0f}-{m.matmul_tflops[1]:.0f}" if m.matmul_tflops else ""
        click.echo(f"{m.name:<16} {m.chip:<10} {m.memory_bytes / 2**30:>4.0f} GB "
                   f"{m.budget_bytes / 2**30:>7.1f} GiB {m.bandwidth_gbs:>6.0f} {m.fp32_tflops:>7.1f} "
                   f"{mm:>8}{'  projected' if m.projected else ''}")
    click.echo("\nBudget: the macOS 26 default GPU working set (82-84% of RAM); `--machine auto` on a Mac "
               "reads the real value. Raise it with `sudo sysctl iogpu.wired_limit_mb=N` (until reboot).\n"
               "TFLOPS: FP32 peak. matmul: 16-bit matmul TFLOP/s of the M5 family's Neural Accelerators, "
               "from a measured MLX GEMM to the architectural peak (the planner uses the first).\n"
               "projected: not announced; figures are 2 x M5 Max and press reports, each with its source in "
               "`mlxft machines --json` (`projected`).")
