"""Bad input gets one clear GemmaError naming the problem and the fix, never a deep traceback."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import gemmakit
from gemmakit import GemmaError
from gemmakit.embedded import embedded_path
from helpers import TINY, hf_model


def test_missing_path(tmp_path):
    with pytest.raises(GemmaError, match="does not exist"):
        gemmakit.load(tmp_path / "nope.gguf")


def test_unknown_file_type(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(GemmaError, match="not a model file"):
        gemmakit.load(f)


def test_folder_without_config(tmp_path):
    with pytest.raises(GemmaError, match="config.json"):
        gemmakit.load(tmp_path)


def test_single_safetensors_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GemmaError, match="pass the folder"):
        gemmakit.load(f)


@pytest.mark.parametrize("size", [100, 2_000_000, 50_000_000])
def test_truncated_gguf(tmp_path, size):
    f = tmp_path / "cut.gguf"
    with embedded_path(progress=False).open("rb") as src:
        f.write_bytes(src.read(size))
    with pytest.raises(GemmaError, match="truncated"):
        gemmakit.load(f)


def test_gguf_of_another_architecture(tmp_path):
    f = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GemmaError, match="'llama' model"):
        gemmakit.load(f)


def test_float16_refused():
    with pytest.raises(GemmaError, match="float16"):
        gemmakit.load(dtype="float16")


def test_ckpt_needs_variant_and_right_shapes(tmp_path):
    cfg = TINY["gemma1"]
    sd = hf_model(cfg).state_dict()
    torch.save({"model_state_dict": {"embedder.weight": sd["model.embed_tokens.weight"]}}, tmp_path / "m.ckpt")
    with pytest.raises(GemmaError, match="variant"):
        gemmakit.load(tmp_path / "m.ckpt")
    with pytest.raises(GemmaError, match="lacks"):
        gemmakit.load(tmp_path / "m.ckpt", variant=cfg)
    with pytest.raises(GemmaError, match="unknown variant"):
        gemmakit.load(tmp_path / "m.ckpt", variant="gemma-5b")


def test_corrupt_ckpt(tmp_path):
    f = tmp_path / "bad.ckpt"
    f.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(GemmaError, match="not a loadable PyTorch checkpoint"):
        gemmakit.load(f, variant="gemma-2b")


def test_empty_and_overlong_prompts(embedded_model):
    with pytest.raises(GemmaError, match="empty"):
        embedded_model.generate([], max_new_tokens=4)
    with pytest.raises(GemmaError, match="context is 32768"):
        embedded_model.generate([2] * 40_000, max_new_tokens=4)
    with pytest.raises(GemmaError, match="max_new_tokens"):
        embedded_model.generate("hi", max_new_tokens=0)
    with pytest.raises(GemmaError, match="temperature"):
        embedded_model.generate("hi", temperature=-1)


def test_empty_text_prompt(embedded_model):
    with pytest.raises(GemmaError, match="empty"):
        embedded_model.generate("", max_new_tokens=4)
    assert len(embedded_model.generate([2], max_new_tokens=2).token_ids) <= 2  # explicit <bos> start is fine


def test_cli_prints_one_line_error(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    r = subprocess.run([sys.executable, "-m", "gemmakit", "run", "hi", "-m", str(f)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "error:" in r.stderr and "not a model file" in r.stderr and "Traceback" not in r.stderr


def test_cli_threads_option():
    """`gemmakit --threads N CMD` sets the CPU threads for any command; a bad count is a one-line error."""
    cmd = [sys.executable, "-m", "gemmakit", "--threads", "1", "run", "Hello", "-n", "2"]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    r = subprocess.run([*cmd[:3], "--threads", "0", *cmd[5:]], capture_output=True, text=True)
    assert r.returncode == 1 and "--threads must be at least 1" in r.stderr and "Traceback" not in r.stderr
