"""Gemma 4 through every format and tool: GGUF with llama.cpp's gemma4 names and keys (read back by gemmakit and by
llama-cpp-python with the same greedy tokens), `gemmakit convert`, quantized GGUFs on the reference path, LoRA
adapters that transformers + PEFT load with the same logits, and `gemmakit info`."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
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
from gemmakit.lora import LoRAConfig, inject, save_adapter
from gemmakit.quant import kernels
from gemmakit.quant.qlinear import QLinear
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


def test_quantized_gemma4_gguf_loads_on_the_fast_path(folder, tmp_path):
    """quant="auto" keeps a Gemma 4 GGUF's blocks (no note, no dequantized copy): its matrices are QLinears, decoded
    by the one-call native step when every product is a block product (the tiny kinds whose narrow matrices the
    writer keeps in F32 stay on the module path), close to the dequantized reference path."""
    from gemmakit.quant.fused_gemma4 import supported

    m = _load(folder)
    path = write_gguf(tmp_path / "m.q8_0.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype="q8_0")
    g = read_gguf(path)
    assert g.tensors["blk.0.attn_q.weight"].qtype == GGMLQuantizationType.Q8_0
    with warnings.catch_warnings():
        warnings.simplefilter("error", GemmaNote)
        q = gemmakit.load(path, progress=False)
    assert (q.module.fused_decode is not None) == (kernels.library() is not None and supported(q.module))
    assert isinstance(q.module.model.layers[0].self_attn.q_proj, QLinear)
    ref = _load(path)  # the same Q8_0 weights, dequantized
    if not m.config.enable_moe_block:  # int8 activations on these random weights (MoE: some routes flip)
        assert rel_err(q.logits(IDS), ref.logits(IDS)) < 0.1
    for other in (ref, m):  # ... and of the model whose weights went through Q8_0 (the MoE router stays F32; the
        # per-layer bound with the reference's routes is test_gemma4_fast's)
        cos = torch.nn.functional.cosine_similarity(q.logits(IDS), other.logits(IDS), dim=-1)
        assert cos.mean() > 0.98 and cos.min() > 0.9  # measured MoE: mean 0.99, min 0.94 (a flipped route)


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

    tok = tiny_tokenizer(512)
    pieces = tok.model_proto().pieces
    fields = {"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": [p.piece for p in pieces],
              "tokenizer.ggml.scores": [-1000.0] * len(pieces), "tokenizer.ggml.token_type": [p.type for p in pieces]}
    again = Tokenizer.from_gguf_metadata(fields)
    text = "the sea is here, and then the rain: 42 times!"
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text


# ---- fine-tuning -----------------------------------------------------------------------------------------------

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_peft_reads_our_gemma4_adapter_with_same_logits(folder, tmp_path):
    """LoRA on attention and the dense MLP (shared layers have no k/v_proj, k_eq_v layers no v_proj; experts are
    3-D parameters, not linears, and stay frozen): transformers + PEFT load the adapter with our logits."""
    import peft
    import transformers

    m = _load(folder)
    wrapped = inject(m.module, LoRAConfig(r=4, alpha=16, targets=ALL))
    cfg = m.config
    n_kv = sum(cfg.kv_source(i) == i for i in range(cfg.num_hidden_layers))
    n_v = sum(cfg.kv_source(i) == i and not cfg.k_eq_v(i) for i in range(cfg.num_hidden_layers))
    assert len(wrapped) == cfg.num_hidden_layers * 5 + n_kv + n_v
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(m.module, tmp_path)
    ours = m.logits(IDS)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        base = ref(IDS).logits
        theirs = peft.PeftModel.from_pretrained(ref, tmp_path).eval()(IDS).logits
    assert rel_err(theirs, base) > 1e-2  # the adapter does something
    assert rel_err(ours, theirs) <= 1e-4
    assert rel_err(_load(folder, adapter=tmp_path).logits(IDS), theirs) <= 1e-4


def test_gemma4_chat_data_renders_in_the_official_turn_format():
    """Training chats with a Gemma 4 tokenizer: the template's own pieces (native system turn), loss on the
    assistant's text and its <turn|>."""
    from gemmakit.chat_templates import gemma4 as chat_gemma4
    from gemmakit.train.data import chat_format

    tok = tiny_tokenizer(512, gemma4=True)
    messages = [{"role": "system", "content": "be short"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": "nothing else"}]
    ids, train = chat_format(tok, "gemma4").render(messages)
    expected = []
    for text, control in chat_gemma4.segments(messages, add_generation_prompt=False):
        expected += [tok.token_id(text)] if control else tok.encode(text, bos=False)
    assert ids == expected
    assert tok.decode([i for i, t in zip(ids, train, strict=True) if t], special=True) == \
        "hello<turn|>nothing else<turn|>"
    assert tok.decode(ids, special=True).startswith("<bos><|turn>system\nbe short<turn|>\n<|turn>user\nhi")


def test_qlora_finetune_trains_gemma4(folder, tmp_path):
    """gemmakit finetune's trainer on Gemma 4 with Gemma 4 chat data: int8 frozen base, gradient checkpointing
    (shared KV crosses the checkpointed blocks), loss goes down, the saved adapter reproduces the trained model."""
    from finetune_helpers import records, write_jsonl
    from gemmakit.lora import load_adapter
    from gemmakit.quant.weight_only import quantize_model
    from gemmakit.train.trainer import TrainConfig, finetune

    data = write_jsonl(tmp_path / "d.jsonl", records(4))
    m = _load(folder)
    tok = tiny_tokenizer(512, gemma4=True)
    cfg = TrainConfig(lr=2e-2, warmup_steps=1, max_steps=8, batch_size=4, grad_accum=1, seq_len=64, seed=3,
                      quant="int8", grad_checkpointing=True, lora=LoRAConfig(r=4, alpha=8, targets=ALL))
    r = finetune(m.module, tok, data, tmp_path / "out", cfg)
    assert r.losses[-1] < 0.7 * r.losses[0]
    assert "int8" in (tmp_path / "out" / "gemmakit_adapter.json").read_text()
    m.module.eval()
    base = quantize_model(_load(folder).module, "int8")  # the same int8 base + the saved adapter
    load_adapter(base, tmp_path / "out")
    with torch.no_grad():
        assert rel_err(base(IDS), m.module(IDS)) <= 1e-6


def test_info_shows_gemma4_structure(folder):
    out = subprocess.run([str(BIN / "gemmakit"), "info", "-m", str(folder)], check=True, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "160"}).stdout
    assert "4 / 2 x 16 (sliding)" in out and "x 32 (global" in out  # per-layer-type head dims
    cfg = _load(folder).config
    if cfg.hidden_size_per_layer_input:
        assert "8 per layer, table 512 x 64" in out and "layers 4-7 reuse the keys/values of layer(s) 2, 3" in out
    if cfg.enable_moe_block:
        assert "4 x 24, top 2 per token" in out and "active per token" in out
