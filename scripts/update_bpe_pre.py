"""Regenerate mlx_ft/export/bpe_pre.json from llama.cpp's converter: the test text, and the table
from the hash of a tokenizer's ids on it to llama.cpp's pre-tokenizer name.

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/sdist
    python scripts/update_bpe_pre.py /tmp/sdist/llama_cpp_python-0.3.36.tar.gz

The table is read from `get_vocab_base_pre` in the converter's conversion/base.py (generated there
by convert_hf_to_gguf_update.py): `if chkhsh == "<sha256>": res = "<name>"`, later entries winning
as in the converter, where every `if` runs.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mlx_ft" / "export" / "bpe_pre.json"
BASE_PY = "vendor/llama.cpp/conversion/base.py"


def read_base_py(path: Path) -> tuple[str, str]:
    """(source of conversion/base.py, where it came from)."""
    if path.suffix == ".gz":
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(BASE_PY))
            return tar.extractfile(member).read().decode(), f"{path.name}:{member.name}"
    return path.read_text(), str(path)


def parse(source: str) -> tuple[str, dict]:
    start = source.index("def get_vocab_base_pre")
    body = source[start:source.index("# Marker: End get_vocab_base_pre", start)]
    chktxt_line = next(line for line in body.splitlines() if line.strip().startswith("chktxt ="))
    chktxt = ast.literal_eval(chktxt_line.split("=", 1)[1].strip())
    table = {}
    entry = re.compile(r'if chkhsh == "([0-9a-f]{64})":\s*\n\s*# ref: (\S+)\s*\n\s*res = "([^"]+)"')
    for h, ref, name in entry.findall(body):
        table[h] = {"pre": name, "ref": ref}
    return chktxt, table


def main() -> None:
    source, where = read_base_py(Path(sys.argv[1]))
    chktxt, table = parse(source)
    doc = {
        "source": f"llama.cpp convert_hf_to_gguf get_vocab_base_pre, read from {where}",
        "hash": "sha256(str(transformers tokenizer.encode(chktxt)).encode()).hexdigest()",
        "chktxt": chktxt,
        "table": dict(sorted(table.items(), key=lambda kv: (kv[1]["pre"], kv[0]))),
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {len(table)} hashes, {len({v['pre'] for v in table.values()})} names")


if __name__ == "__main__":
    main()
