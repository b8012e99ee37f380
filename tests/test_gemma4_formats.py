"""Gemma 4 through every format and tool: GGUF with llama.cpp's gemma4 names and keys (read back by gemmakit and by
llama-cpp-python with the same greedy tokens), `gemmakit convert`, quantized GGUFs on the reference path, LoRA
adapters that transformers + PEFT load with the same logits, and `gemmakit info`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

import gemmakit
from finetune_helpers import tiny_tokenizer
from gemmakit.errors import GemmaError
from gemmakit.generate import generate_step
from gemmakit.loader import GemmaNote
from gemmakit.sampling import SamplingParams
from gemmakit.weights.gguf import read_gguf
from gemmakit.weights.writers import write_gguf
from helpers import TINY4, hf_model, tiny_config

BIN = Path(sys.executable).parent
IDS = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
PROMPT = [2, 17, 99, 240, 3, 77, 401, 12, 9, 300, 45]
KINDS = ["gemma4-e", "gemma4-dense-keqv", "gemma4-moe"]  # PLE + sharing + double-wide; k_eq_v; experts


def _load(path, **kw):
    return gemmakit.load(path, dtype="float32", device="cpu", quant=None, progress=False, **kw)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=KINDS)
def folder(request, tmp_path_factory):
    """A random transformers Gemma 4 saved as an HF folder, with the tiny tokenizer beside it."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_model(TINY4[request.param]).save_pretrained(folder)
    tiny_tokenizer(512).save(folder / "tokenizer.model")
    return folder


def test_gguf_uses_llama_cpp_gemma4_names_and_reads_back_exactly(folder, tmp_path):
    m = _load(folder)
    path = write_gguf(tmp_path / "m.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype="f32")
    g = read_gguf(path)
    assert g.architecture == "gemma4"
    allowed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.GEMMA4]}
    for name in g.tensors:  # every name is gguf-py's, with .weight (or .scale for the two router scales)
        stem, _, kind = name.rpartition(".")
        assert kind in ("weight", "scale") and (stem in allowed or any(
            stem == a.format(bid=b) for a in allowed if "{bid}" in a for b in range(8))), name
    freqs = g.dequantize("rope_freqs.weight")  # proportional RoPE: 16 pairs of a 32-wide global head, 4 rotate
    assert freqs.tolist() == np.array([1.0] * 4 + [1e30] * 12, dtype=np.float32).tolist()
    norm = g.dequantize("blk.0.attn_norm.weight")  # Gemma 4 stores norm weights as they are (no 1 + w)
    assert np.array_equal(norm, m.module.state_dict()["model.layers.0.input_layernorm.weight"].numpy())
    back = _load(path)
    assert back.config.replace(name="", rms_norm_eps=1e-6) == m.config.replace(name="")
    assert torch.equal(back.logits(IDS), m.logits(IDS))


def test_llama_cpp_runs_our_gemma4_gguf_with_the_same_greedy_tokens(folder, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = _load(folder)
    path = write_gguf(tmp_path / "m.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype="f32")
    # f32 KV cache: llama.cpp's default f16 cache alone costs ~2e-3 relative on these logits
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    llm.eval(IDS[0].tolist())
    theirs = torch.tensor(np.array(llm.scores[: IDS.shape[1]]))
    assert rel_err(theirs, m.logits(IDS[0])) < 2e-3  # measured 2.4e-4 to 5.5e-4 (ggml's GELU uses an f16 table)
    ours = [int(t) for t in generate_step(m.module, [PROMPT], SamplingParams(), 24)]
    theirs_greedy = []
    for tok in llm.generate(PROMPT, temp=0.0, top_k=1, reset=True):
        theirs_greedy.append(tok)
        if len(theirs_greedy) == 24:
            break
    assert ours == theirs_greedy


def test_quantized_gemma4_gguf_loads_on_the_reference_path(folder, tmp_path):
    """quant="auto" keeps Gemma 1-3 GGUFs quantized; Gemma 4 ones are dequantized, with a one-line note."""
    m = _load(folder)
    path = write_gguf(tmp_path / "m.q8_0.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype="q8_0")
    g = read_gguf(path)
    assert g.tensors["blk.0.attn_q.weight"].qtype == GGMLQuantizationType.Q8_0
    with pytest.warns(GemmaNote, match="reference PyTorch path"):
        q = gemmakit.load(path, progress=False)
    assert q.module.fused_decode is None and q.module.dtype == torch.float32
    assert torch.equal(q.logits(IDS), _load(path).logits(IDS))  # exactly the dequantized reference path
    # ... of the model whose weights went through Q8_0 (the MoE router too: some routes flip)
    cos = torch.nn.functional.cosine_similarity(q.logits(IDS), m.logits(IDS), dim=-1)
    assert cos.min() > 0.95


def test_convert_command_writes_a_gemma4_gguf(folder, tmp_path):
    out = tmp_path / "c.gguf"
    subprocess.run([str(BIN / "gemmakit"), "convert", "-m", str(folder), "-o", str(out), "--type", "f32"],
                   check=True, capture_output=True)
    assert torch.equal(_load(out).logits(IDS), _load(folder).logits(IDS))


def test_sharing_llama_cpp_cannot_express_is_refused(tmp_path):
    """llama.cpp reuses the KV of the last unshared layer (global) and the one before (sliding); transformers
    the last of each type. Where they differ, the GGUF writer refuses rather than write a file llama.cpp misreads."""
    cfg = tiny_config("gemma4", num_kv_shared_layers=3)  # unshared S S S G S: the last unshared layer slides
    module = gemmakit.loader.build(cfg, {k: v for k, v in hf_model(cfg).state_dict().items() if k != "lm_head.weight"})
    with pytest.raises(GemmaError, match="llama.cpp shares KV"):
        write_gguf(tmp_path / "x.gguf", module.state_dict(), cfg, tiny_tokenizer(512))


def test_gemma4_gguf_tokenizer_fields_rebuild_the_tokenizer():
    """llama.cpp's gemma4 tokenizer fields carry placeholder scores (-1000) and merges; the rebuilt SentencePiece
    model ranks pieces by id, which reproduces a tokenizer whose merge order is its id order."""
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.weights.writers import _proto

    tok = tiny_tokenizer(512)
    pieces = _proto(tok).pieces
    fields = {"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": [p.piece for p in pieces],
              "tokenizer.ggml.scores": [-1000.0] * len(pieces), "tokenizer.ggml.token_type": [p.type for p in pieces]}
    again = Tokenizer.from_gguf_metadata(fields)
    text = "the sea is here, and then the rain: 42 times!"
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
