"""llama.cpp file types made in-process by llama.cpp's own quantizer (no llama-quantize binary),
every type accepted or refused by name (by `fuse` and by a recipe's [export]), a K-quant exported at
the end of `mlxft run`, LM Studio's layout, and MLX re-quantized fused models that generate what the
adapter generates. Tiny models, no network.

Bounds: 2.5x the worst NMSE of three seeds that benchmarks/gguf_quant_nmse.py measured on the
same model (docs/export.md quotes the table).
"""

import json

import gguf
import pytest
from click.testing import CliRunner

from conftest import chat_corpus
from test_export_gguf import run_llama_cpp
from test_export_helpers import build_base, make_adapter, mlx_logits, nmse

from mlx_ft.cli import main
from mlx_ft.errors import ExportError
from mlx_ft.export import fuse
from mlx_ft.export.gguf_meta import read_meta

TINY = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512)
PROMPT = "What colour is item 7? Item 7 is blue. What colour is item 12? Item 12 is red. Sure? Yes, green."
BOUNDS = {"q4_k_m": 0.11, "q6_k": 8.5e-3}
FILE_TYPES = {"q4_k_m": 15, "q6_k": 18}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quant")


@pytest.fixture(scope="module")
def k_adapter(root):
    """Rows of 256 and 512: K-quants are used as such, not llama.cpp's fallback for short rows."""
    base = build_base(root, "llama", "bpe", tag="-256", **TINY)
    return base, *make_adapter(root, base, rank=8, seed=0)


@pytest.mark.parametrize("gguf_type", list(BOUNDS))
def test_k_quant_made_in_process_without_llama_quantize(root, k_adapter, monkeypatch, gguf_type):
    from mlx_lm.utils import load

    base, adapter_dir, adapted = k_adapter
    monkeypatch.setenv("PATH", str(root / "no-bin"))  # no llama-quantize anywhere
    res = CliRunner().invoke(main, ["fuse", str(adapter_dir), "--to", "gguf", "--gguf-type", gguf_type])
    assert res.exit_code == 0, res.output
    assert f"quantizing model-{gguf_type}.gguf to {gguf_type.upper()} with llama.cpp" in res.output
    out = adapter_dir.parent / "export" / "gguf" / f"model-{gguf_type}.gguf"
    meta = read_meta(out)
    assert meta.fields["general.file_type"].value() == FILE_TYPES[gguf_type]
    assert any(gguf.GGMLQuantizationType(t.type).name.endswith("_K") for t in meta.tensors)
    ids = load(str(base))[1].encode(PROMPT, add_special_tokens=False)[:24]
    _, got = run_llama_cpp(out, ids)
    err = nmse(got, mlx_logits(adapted, ids))
    print(f"{gguf_type} NMSE {err:.2e}")
    assert err < BOUNDS[gguf_type]


def test_every_type_named_in_its_messages(root, k_adapter, monkeypatch):
    import sys

    adapter_dir = k_adapter[1]
    for t in ("iq2_xs", "q2_k_s", "iq3_xs"):
        with pytest.raises(ExportError, match=f"--gguf-type {t}: llama.cpp makes {t.upper()} only with an "
                                              "importance matrix"):
            fuse(adapter_dir, to="gguf", gguf_type=t)
    with pytest.raises(ExportError, match="--gguf-type q9_k: not a llama.cpp file type; expected one of f32.*q5_1"):
        fuse(adapter_dir, to="gguf", gguf_type="q9_k")
    monkeypatch.setenv("PATH", str(root / "no-bin"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama-cpp-python not installed
    with pytest.raises(ExportError, match=r"--gguf-type iq4_xs is made by llama.cpp's quantizer.*mlx-ft\[gguf\]"):
        fuse(adapter_dir, to="gguf", gguf_type="iq4_xs")
    help_text = CliRunner().invoke(main, ["fuse", "--help"]).output.replace("\n", " ")
    assert "q5_1," in help_text and "importance matrix:" in help_text


def test_recipe_accepts_every_type_fuse_accepts():
    """One list: a recipe's export.gguf_type takes what `--gguf-type` takes, and refuses at load time
    (before training) the types that need an importance matrix, saying why."""
    import typing

    from mlx_ft.errors import RecipeError
    from mlx_ft.export import GGUF_TYPES, LLAMA_QUANTIZE_TYPES
    from mlx_ft.recipe import ExportConfig, recipe_from_dict

    accepted = typing.get_args(typing.get_type_hints(ExportConfig)["gguf_type"])
    assert set(accepted) == set(GGUF_TYPES + LLAMA_QUANTIZE_TYPES) and "q4_k_m" in accepted
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    for t in ("q4_k_m", "q5_1", "iq4_xs", "q4_k", "f16"):
        assert recipe_from_dict({**base, "export": {"to": ["gguf"], "gguf_type": t}}).export.gguf_type == t
    with pytest.raises(RecipeError, match="export.gguf_type: iq2_xs: llama.cpp makes IQ2_XS only with an importance"):
        recipe_from_dict({**base, "export": {"to": ["gguf"], "gguf_type": "iq2_xs"}})


def _train(root, family: str, export: dict | None = None):
    """A tiny model of `family` trained briefly (30 steps); returns its run directory."""
    from test_train import make_recipe

    from mlx_ft.recipe import load_recipe
    from mlx_ft.runner import train

    recs = chat_corpus(48)
    files = root / "train.jsonl", root / "valid.jsonl"
    files[0].write_text("\n".join(json.dumps(r) for r in recs[:40]) + "\n")
    files[1].write_text("\n".join(json.dumps(r) for r in recs[40:]) + "\n")
    base = build_base(root, family, "bpe")
    recipe = make_recipe(root, base, files, name=f"{family}.toml",
                         training={"steps": 30, "learning_rate": 1e-2, "report_every": 10},
                         data={"max_seq_len": 64}, output={"dir": str(root / "demo" / family)},
                         **({"export": export} if export else {}))
    return train(load_recipe(recipe), progress=False).run_dir


@pytest.fixture(scope="module")
def trained_run(root):
    """The llama run; its recipe exports a Q4_K_M GGUF when training ends ([export])."""
    return _train(root, "llama", export={"to": ["gguf"], "gguf_type": "q4_k_m"})


def test_recipe_exports_k_quant_at_end_of_run(trained_run):
    out = trained_run / "export" / "gguf" / "model-q4_k_m.gguf"
    assert read_meta(out, tensors=False).fields["general.file_type"].value() == FILE_TYPES["q4_k_m"]
    assert json.loads((trained_run / "summary.json").read_text())["exports"] == [str(out)]
    assert (out.parent / "Modelfile").is_file()


def test_lmstudio_gguf_and_mlx_layout(root, trained_run, monkeypatch):
    lms = root / "lmstudio-models"
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(lms))
    res = CliRunner().invoke(main, ["fuse", str(trained_run), "--to", "lmstudio", "--gguf-type", "q8_0"])
    assert res.exit_code == 0, res.output
    gguf_file = lms / "mlx-ft" / "llama-GGUF" / "llama-Q8_0.gguf"
    assert gguf_file.is_file() and "lms load mlx-ft/llama-GGUF" in res.output
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["llama-Q8_0.gguf"]  # no Modelfile there
    res = CliRunner().invoke(main, ["fuse", str(trained_run), "--to", "lmstudio", "--quantize", "4"])
    assert res.exit_code == 0, res.output
    out = lms / "mlx-ft" / "llama-MLX-4bit"
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert "lms load mlx-ft/llama-MLX-4bit" in res.output


# Logit change that re-quantizing the fused model may cause at the median generated position (measured
# on these models: 8 bits <= 0.06, 4 bits <= 0.22; a rare ill-conditioned position moves more).
LOGIT_BOUND = {8: 0.15, 4: 0.5}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_requantized_fused_model_generates_the_adapters_tokens(root, trained_run, family):
    """Re-quantized to 8 and 4 bits, the fused model loads in mlx-lm (as mlx_lm.server and LM Studio's MLX
    engine load it) and greedy-generates the adapter's tokens wherever the adapter's choice is clear of
    the quantization error: a top-1 margin over the runner-up larger than twice the largest change of
    any logit at that position (a near-tie may flip, as quantizing any model may flip it)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_ft.models import load_with_adapter

    run = trained_run if family == "llama" else _train(root, family)
    adapted, tok, _ = load_with_adapter(run)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is item 7?"}],
                                     add_generation_prompt=True, tokenize=False)
    greedy = make_sampler(0.0)
    ref = [r.token for r in stream_generate(adapted, tok, prompt, max_tokens=8, sampler=greedy)]
    ids = tok.encode(prompt, add_special_tokens=False)
    positions = slice(len(ids) - 1, len(ids) + len(ref) - 1)  # the logits that chose each generated token
    want = mlx_logits(adapted, ids + ref)[positions]  # (n_generated, vocab)
    top2 = np.sort(want, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # (n_generated,)
    for bits in (8, 4):
        out = fuse(run, to="safetensors", dtype="bf16", quantize=bits, out=root / f"{family}-mlx-{bits}bit")
        model, tok2 = load(str(out))
        got = [r.token for r in stream_generate(model, tok2, prompt, max_tokens=8, sampler=greedy)]
        change = np.abs(mlx_logits(model, ids + ref)[positions] - want).max(axis=-1)  # (n_generated,)
        assert np.median(change) < LOGIT_BOUND[bits], (bits, change)
        clear = np.cumprod(margin > 2 * change + 0.05).astype(bool)  # up to the first unclear position
        assert clear[0], f"{family}: the adapter's first token is a near-tie; the test would prove nothing"
        n = int(clear.sum())
        print(f"{family} {bits}-bit: first {n} of {len(ref)} tokens clear; logit change median "
              f"{np.median(change):.3f}, max {change.max():.3f}")
        assert got[:n] == ref[:n], (bits, tok.decode(got), tok.decode(ref))
