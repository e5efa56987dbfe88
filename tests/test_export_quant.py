"""llama.cpp file types made in-process by llama.cpp's own quantizer (no llama-quantize binary),
every type accepted or refused by name, LM Studio's layout, and MLX re-quantized fused models that
generate what the adapter generates. Tiny models, no network.

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
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].parts[-1][0] == FILE_TYPES[gguf_type]
    assert any(t.tensor_type.name.endswith("_K") for t in r.tensors)
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


@pytest.fixture(scope="module")
def trained_run(root):
    """A tiny llama trained briefly (30 steps): confident enough that greedy decoding is stable."""
    from test_train import make_recipe

    from mlx_ft.recipe import load_recipe
    from mlx_ft.runner import train

    recs = chat_corpus(48)
    files = root / "train.jsonl", root / "valid.jsonl"
    files[0].write_text("\n".join(json.dumps(r) for r in recs[:40]) + "\n")
    files[1].write_text("\n".join(json.dumps(r) for r in recs[40:]) + "\n")
    base = build_base(root, "llama", "bpe")
    recipe = make_recipe(root, base, files, training={"steps": 30, "learning_rate": 1e-2, "report_every": 10},
                         data={"max_seq_len": 64}, output={"dir": str(root / "demo")})
    return train(load_recipe(recipe), progress=False).run_dir


def test_lmstudio_gguf_and_mlx_layout(root, trained_run, monkeypatch):
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    from mlx_ft.models import load_with_adapter

    lms = root / "lmstudio-models"
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(lms))
    res = CliRunner().invoke(main, ["fuse", str(trained_run), "--to", "lmstudio", "--gguf-type", "q8_0"])
    assert res.exit_code == 0, res.output
    gguf_file = lms / "mlx-ft" / "demo-GGUF" / "demo-Q8_0.gguf"
    assert gguf_file.is_file() and "lms load mlx-ft/demo-GGUF" in res.output
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["demo-Q8_0.gguf"]  # no Modelfile there

    adapted, tok, _ = load_with_adapter(trained_run)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is item 7?"}],
                                     add_generation_prompt=True, tokenize=False)
    greedy = make_sampler(0.0)
    ref = generate(adapted, tok, prompt, max_tokens=8, sampler=greedy)
    for bits in (8, 4):
        res = CliRunner().invoke(main, ["fuse", str(trained_run), "--to", "lmstudio", "--quantize", str(bits)])
        assert res.exit_code == 0, res.output
        out = lms / "mlx-ft" / f"demo-MLX-{bits}bit"
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == bits
        model, tok2 = load(str(out))  # mlx_lm, as mlx_lm.server and LM Studio's MLX engine load it
        assert generate(model, tok2, prompt, max_tokens=8, sampler=greedy) == ref
