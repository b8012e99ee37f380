"""gemmakit verify: passes on the embedded model, fails loudly on a GGUF whose norm weights lack Gemma's +1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemmakit.embedded import embedded_path
from gemmakit.evaluate.verify import verify


def norms_without_plus_one(src: Path, dst: Path) -> None:
    """A copy of a GGUF whose *norm.weight tensors store w instead of 1 + w: what a converter that forgot Gemma's
    offset writes. Metadata and every other tensor are copied byte for byte (gguf's reader and writer)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    data = {}
    for t in reader.tensors:
        data[t.name] = np.asarray(t.data) - 1.0 if t.name.endswith("norm.weight") else t.data
        writer.add_tensor_info(t.name, t.data.shape, data[t.name].dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data[t.name], tensor_endianess=reader.endianess)
    writer.close()


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "no-plus-one.gguf"
    norms_without_plus_one(embedded_path(progress=False), path)
    return path


def test_verify_passes_on_the_embedded_model():
    report = verify(transformers=False)
    assert report.ok, [c for c in report.checks if c.ok is False]
    names = [c.name for c in report.checks]
    assert "tokenizer round trip" in names and any(n.startswith("fast vs reference") for n in names)


def test_verify_fails_clearly_on_norms_without_plus_one(corrupted):
    p = subprocess.run([sys.executable, "-m", "gemmakit", "verify", "-m", str(corrupted), "--no-transformers",
                        "--no-fast"], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "verdict: FAILED" in p.stdout and "perplexity on plain English/code" in p.stdout
    assert "norms converted without the +1" in p.stdout and "Traceback" not in p.stderr


@pytest.mark.slow
def test_verify_with_transformers(corrupted):
    """The full check (transformers loads the GGUF: ~1 min): parity holds on the embedded model; on the
    corrupted copy transformers agrees with us (it reads the same wrong file) and the sanity check fails."""
    good = verify()
    assert good.ok and any(c.name.startswith("reference vs transformers") and c.ok for c in good.checks)
    bad = verify(corrupted)
    assert not bad.ok and [c.name for c in bad.failures] == ["perplexity on plain English/code"]
