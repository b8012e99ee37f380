"""Gemma 3n through the formats: GGUF with llama.cpp's gemma3n names and keys (read back by gemmakit on the reference
and the fast path, and by llama-cpp-python with the same greedy tokens), `gemmakit convert`, Hub-style folders whose
KV-shared layers still carry k/v weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
from safetensors.torch import load_file, save_file

import gemmakit
from gemmakit.config import GLOBAL, SLIDING
from gemmakit.generate import generate_step
from gemmakit.loader import load_tokenizer
from gemmakit.quant.qlinear import QLinear
from gemmakit.sampling import SamplingParams
from gemmakit.weights.gguf import read_gguf
from gemmakit.weights.writers import write_gguf
from test_gemma3n import TINY3N, hf_gemma3n, rel_err, tiny3n

BIN = Path(sys.executable).parent
V = 262144  # the tokenizer's pieces: a GGUF's embedding has this many rows (llama.cpp's converter cuts the rest)
IDS = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(0))
PROMPT = [2, 17, 99, 240, 3, 77, 401, 12, 9, 300, 45]


def _load(path, **kw):
    return gemmakit.load(path, dtype="float32", device="cpu", quant=None, progress=False, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The full tiny Gemma 3n (262400 rows, PLE table of 262144) as an HF folder with the 262144-piece tokenizer."""
    folder = tmp_path_factory.mktemp("g3n")
    hf_gemma3n(TINY3N["full"]).save_pretrained(folder)
    load_tokenizer().save(folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def gguf_f32(folder, tmp_path_factory):
    m = _load(folder)
    path = tmp_path_factory.mktemp("g3n-gguf") / "m.gguf"
    return m, write_gguf(path, m.module.state_dict(), m.config, m.tokenizer, qtype="f32")


def test_gguf_uses_llama_cpp_gemma3n_layout_and_reads_back_exactly(gguf_f32):
    m, path = gguf_f32
    g = read_gguf(path)
    assert g.architecture == "gemma3n"
    allowed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.GEMMA3N]}
    for name in g.tensors:
        stem, _, kind = name.rpartition(".")
        assert kind == "weight" and (stem in allowed or any(
            stem == a.format(bid=b) for a in allowed if "{bid}" in a for b in range(7))), name
    sd = m.module.state_dict()
    assert g.tensors["altup_proj.weight"].shape == (3, 64, 64)  # the stream projections, stacked
    assert np.array_equal(g.dequantize("altup_proj.weight")[1], sd["model.altup_projections.1.weight"].numpy())
    assert g.tensors["token_embd.weight"].shape == (V, 64)  # cut to the tokenizer's pieces
    assert "blk.6.attn_k.weight" in g.tensors  # llama.cpp wants k/v in the KV-shared layers too (unused)
    assert np.array_equal(g.dequantize("blk.0.altup_router_norm.weight"),  # norms as they are (no 1 + w)
                          sd["model.layers.0.altup.router_norm.weight"].numpy())
    assert list(g.arch_get("feed_forward_length")) == [128, 96, 128, 64, 128, 128, 96]
    back = _load(path)
    assert back.config.replace(name="", rms_norm_eps=1e-6) == m.config.replace(name="", vocab_size=V)  # eps: f32
    assert torch.equal(back.logits(IDS), m.logits(IDS)[..., :V])


def test_gguf_runs_on_the_fast_path(gguf_f32):
    """quant="auto" runs the file's own F32 blocks (matrices whose rows are whole 32-value units) with the PyTorch
    layers around them; the AltUp projections are one slice of the stacked tensor each."""
    m, path = gguf_f32
    fast = gemmakit.load(path, progress=False)
    layer = fast.module.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QLinear) and isinstance(layer.laurel.linear_left, QLinear)
    assert isinstance(fast.module.model.altup_projections[2], QLinear) and fast.module.fused_decode is None
    assert rel_err(fast.logits(IDS), m.logits(IDS)[..., :V]) <= 1e-4
    assert [int(t) for t in generate_step(fast.module, [PROMPT], SamplingParams(), 12)] == [
        int(t) for t in generate_step(m.module, [PROMPT], SamplingParams(), 12)]


def test_convert_command_writes_a_gemma3n_gguf(folder, tmp_path):
    out = tmp_path / "c.gguf"
    subprocess.run([str(BIN / "gemmakit"), "convert", "-m", str(folder), "-o", str(out), "--type", "f32"],
                   check=True, capture_output=True)
    assert torch.equal(_load(out).logits(IDS), _load(folder).logits(IDS)[..., :V])


def test_hub_folder_with_kv_weights_in_shared_layers_loads(folder, tmp_path):
    """The Hub checkpoints keep k_proj/v_proj/k_norm in the KV-shared layers; transformers ignores them, so do we."""
    state = load_file(folder / "model.safetensors")
    for i in (5, 6):
        for part, shape in (("k_proj", (32, 64)), ("v_proj", (32, 64)), ("k_norm", (16,))):
            state[f"model.layers.{i}.self_attn.{part}.weight"] = torch.ones(shape)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert torch.equal(_load(tmp_path).logits(IDS), _load(folder).logits(IDS))


def _llama_cpp_config():
    """llama.cpp's gemma3n fixes what transformers configures: 20 layers compute keys/values, the first 10 layers
    are sparse at 0.95, LAuReL rank 64, per-layer inputs of 256, 4 streams. 25 layers (S S S S G) x 5, the last five
    shared; a 512-piece vocabulary keeps the 256-wide per-layer table small (llama.cpp wants both tables as tall as
    the tokenizer)."""
    types = tuple(GLOBAL if (i + 1) % 5 == 0 else SLIDING for i in range(25))
    return tiny3n(vocab_size=512, vocab_size_per_layer_input=512, num_hidden_layers=25, layer_types=types,
                  num_kv_shared_layers=5, laurel_rank=64, hidden_size_per_layer_input=256,
                  activation_sparsity_pattern=(0.95,) * 10 + (0.0,) * 15, intermediate_sizes=(),
                  intermediate_size=2048)


def test_llama_cpp_runs_our_gemma3n_gguf_with_the_same_greedy_tokens(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from finetune_helpers import tiny_tokenizer

    hf_gemma3n(_llama_cpp_config(), seed=5).save_pretrained(tmp_path)
    tiny_tokenizer(512).save(tmp_path / "tokenizer.model")
    m = _load(tmp_path)
    path = write_gguf(tmp_path / "m.gguf", m.module.state_dict(), m.config, m.tokenizer, qtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)  # f32 KV cache
    ids = IDS[0] % 512
    llm.eval(ids.tolist())
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    err = rel_err(theirs, m.logits(ids))
    ours = [int(t) for t in generate_step(m.module, [PROMPT], SamplingParams(), 24)]
    theirs_greedy = []
    for tok in llm.generate(PROMPT, temp=0.0, top_k=1, reset=True):
        theirs_greedy.append(tok)
        if len(theirs_greedy) == 24:
            break
    assert ours == theirs_greedy, f"logits differ by {err:.2e} relative"
    # llama.cpp's Gaussian top-k divides by F - 1 (transformers: by F) and its GELU reads an f16 table; 25 random
    # layers amplify both: measured 1.5e-2 here (7e-3 with our top-k switched to F - 1; 1.9e-3 at 10 layers). With
    # F = 256 instead of 2048 the F - 1 alone gives 0.21 and flips the 6th greedy token: a llama.cpp deviation.
    assert err < 3e-2


def test_config_json_of_the_llama_cpp_model_is_transformers(tmp_path):
    """The llama.cpp-shaped config is a valid transformers config too (20 layers compute keys/values; llama.cpp's
    rule, sliding layers reuse layer 18 and global ones layer 19, is transformers' here)."""
    cfg = _llama_cpp_config()
    assert cfg.first_kv_shared_layer == 20 and cfg.kv_source(24) == 19 and cfg.kv_source(20) == 18
    assert json.loads(json.dumps(cfg.to_hf()))["laurel_rank"] == 64


def test_info_shows_gemma3n_structure(folder):
    out = subprocess.run([str(BIN / "gemmakit"), "info", "-m", str(folder)], check=True, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "160"}).stdout
    assert "gemma3n" in out and "4 streams, stream 0 active" in out and "rank 8" in out
    assert "0.95 in layers 0-2" in out and "64 / 64, 96, 128 by layer" in out
    assert "8 per layer, table 262144 x 56" in out and "layers 5-6 reuse the keys/values of layer(s) 3, 4" in out


def test_peft_reads_our_gemma3n_adapter_with_same_logits(folder, tmp_path):
    """LoRA on attention and the MLP (the KV-shared layers have no k/v_proj): transformers + PEFT load the adapter
    with our logits, and gemmakit loads it back onto the base."""
    import peft
    import transformers

    from gemmakit.lora import LoRAConfig, inject, save_adapter

    m = _load(folder)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    wrapped = inject(m.module, LoRAConfig(r=4, alpha=16, targets=targets))
    cfg = m.config
    assert len(wrapped) == cfg.num_hidden_layers * 5 + 2 * cfg.first_kv_shared_layer
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


def test_server_chats_in_the_gemma3_turn_format_and_batches_exactly():
    """Gemma 3n's tokenizer is Gemma 3's (no Gemma 4 <|turn> marker): its chats use the <start_of_turn> format and
    stop at <end_of_turn> (106). The server's answers equal Model.chat / Model.generate, also for streams decoded
    together in one batch."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from gemmakit import Model
    from gemmakit.model import Gemma
    from test_serve import MESSAGES, running_server

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = Model(Gemma(tiny3n(vocab_size=V)).eval(), tok, "tiny-3n", "hf")
    assert model.chat_template == "gemma3" and model.config.end_of_turn_id == 106
    with running_server({"g3n": model}, max_batch=4, max_queue=16, context=128) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        res = client.chat.completions.create(model="g3n", messages=MESSAGES, max_tokens=10, temperature=0)
        assert res.choices[0].message.content == model.chat(MESSAGES, 10).text
        prompts = ["The cat", "A dog and", "Owls are", "Fox"]

        def run(p):
            stream = client.completions.create(model="g3n", prompt=p, max_tokens=12, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in stream)

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(run, prompts))
    assert texts == [model.generate(p, 12, ignore_eos=True).text for p in prompts]


def test_qlora_trains_adapters_on_an_int4_gemma3n_base(folder):
    """QLoRA: the frozen base quantized to int4 (AltUp, LAuReL and per-layer linears too), adapters on attention and
    the MLP get gradients through AltUp's training-time coefficient clip; the base gets none."""
    from gemmakit.lora import LoRAConfig, inject
    from gemmakit.quant.weight_only import quantize_model

    m = _load(folder)
    quantize_model(m.module, "int4")
    inject(m.module, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "up_proj", "down_proj")))
    with torch.no_grad():
        for n, p in m.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.module.train()
    loss = m.module(IDS[:, :12]).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in m.module.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    clip = m.config.altup_coef_clip
    assert all(b.altup.prediction_coefs.weight.abs().max() <= clip for b in m.module.model.layers)
