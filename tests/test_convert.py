"""Writers: HF folders and GGUF files (f32/f16/q8_0) read back by gemmakit, transformers and llama.cpp; merge and
convert on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import gemmakit
from finetune_helpers import tiny_model_folder, tiny_tokenizer
from gemmakit.errors import GemmaError
from gemmakit.lora import LoRAConfig, inject, save_adapter
from gemmakit.weights.gguf import read_gguf
from gemmakit.weights.writers import write_gguf, write_hf
from helpers import assert_close

BIN = Path(sys.executable).parent
IDS = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
# GGUF cannot store query_pre_attn_scalar: readers infer head_dim, so these configs use it.
GGUF_CFGS = {
    "gemma": {},
    "gemma2": {"query_pre_attn_scalar": 32.0},
    "gemma3": {"query_pre_attn_scalar": 32.0},
}


def _load(path, **kw):
    return gemmakit.load(path, dtype="float32", device="cpu", quant=None, progress=False, **kw)


@pytest.fixture(scope="module", params=list(GGUF_CFGS))
def folder(request, tmp_path_factory):
    return tiny_model_folder(
        tmp_path_factory.mktemp(request.param), request.param, **GGUF_CFGS[request.param]
    )


def test_hf_round_trip_and_transformers_reads_it(folder, tmp_path):
    import transformers

    m = _load(folder)
    write_hf(tmp_path, m.module.state_dict(), m.config, m.tokenizer)
    again = _load(tmp_path)
    assert torch.equal(again.logits(IDS), m.logits(IDS))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(ref(IDS).logits, m.logits(IDS), ulps=512)


def test_gguf_round_trip_f32_exact_f16_close_q8_0_as_quantized(folder, tmp_path):
    m = _load(folder)
    state = m.module.state_dict()
    expected = m.logits(IDS)
    for qtype in ("f32", "f16", "q8_0"):
        path = write_gguf(tmp_path / f"m.{qtype}.gguf", state, m.config, m.tokenizer, qtype=qtype)
        got = _load(path)
        # GGUF stores eps as f32 (9.99999997e-07), as llama.cpp's converter does (spec §4.5)
        assert got.config.replace(name="", rms_norm_eps=1e-6) == m.config.replace(name="")
        assert got.tokenizer.encode("hello the sea\nis here") == m.tokenizer.encode("hello the sea\nis here")
        if qtype == "f32":  # the same weights; only eps's f32 rounding differs
            assert_close(got.logits(IDS), expected)
        elif qtype == "f16":
            assert (got.logits(IDS) - expected).abs().max() < 2e-2
        else:  # exactly the model whose matrices went through Q8_0
            q = {k: _q8(v) if v.ndim == 2 else v for k, v in state.items()}
            ref = gemmakit.loader.build(m.config, q)
            with torch.no_grad():
                assert_close(got.module(IDS), ref(IDS))
    g = read_gguf(tmp_path / "m.q8_0.gguf")
    assert g.tensors["blk.0.attn_q.weight"].qtype == GGMLQuantizationType.Q8_0
    assert g.tensors["blk.0.attn_norm.weight"].qtype == GGMLQuantizationType.F32
    norm = g.dequantize("blk.0.attn_norm.weight")  # stored as 1 + w (spec §4.4)
    assert np.array_equal(norm, state["model.layers.0.input_layernorm.weight"].numpy() + np.float32(1.0))


def _q8(w: torch.Tensor) -> torch.Tensor:
    q = quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(dequantize(q, GGMLQuantizationType.Q8_0).reshape(w.shape).copy())


def test_llama_cpp_loads_our_gguf(folder, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = _load(folder)
    path = write_gguf(tmp_path / "m.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    ours = m.logits(ids)
    assert (theirs - ours).abs().max() < 1e-2
    assert llm.tokenize(b"hello the sea", add_bos=True, special=False) == m.tokenizer.encode("hello the sea")


def test_unrepresentable_config_is_refused(tmp_path):
    folder = tiny_model_folder(
        tmp_path / "m", "gemma2"
    )  # tiny_config uses query_pre_attn_scalar 24 != head_dim
    m = _load(folder)
    with pytest.raises(GemmaError, match="query_pre_attn_scalar"):
        write_gguf(tmp_path / "x.gguf", m.module.state_dict(), m.config, m.tokenizer)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_merge_and_convert_commands(tmp_path):
    folder = tiny_model_folder(tmp_path / "m", "gemma3", query_pre_attn_scalar=32.0)
    m = _load(folder)
    inject(m.module, LoRAConfig(r=4, alpha=8, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for n, p in m.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter(m.module, tmp_path / "adapter")
    with_adapter = _load(folder, adapter=tmp_path / "adapter").logits(IDS)
    gk = str(BIN / "gemmakit")
    subprocess.run(
        [
            gk,
            "merge",
            "-m",
            str(folder),
            "--adapter",
            str(tmp_path / "adapter"),
            "-o",
            str(tmp_path / "merged"),
        ],
        check=True,
        capture_output=True,
    )
    assert_close(_load(tmp_path / "merged").logits(IDS), with_adapter, ulps=512)
    subprocess.run(
        [
            gk,
            "convert",
            "-m",
            str(folder),
            "--adapter",
            str(tmp_path / "adapter"),
            "-o",
            str(tmp_path / "m.gguf"),
            "--type",
            "f32",
        ],
        check=True,
        capture_output=True,
    )
    assert_close(_load(tmp_path / "m.gguf").logits(IDS), with_adapter, ulps=512)


def test_tiny_tokenizer_has_the_expected_layout():
    tok = tiny_tokenizer()
    assert (
        tok.vocab_size == 512 and tok.token_id("<start_of_turn>") == 5 and tok.token_id("<end_of_turn>") == 6
    )
