"""Gemma 4 12B Unified (transformers' gemma4_unified) text decoder against Gemma4UnifiedForCausalLM and the text
part of Gemma4UnifiedForConditionalGeneration, on a tiny random config, through the production load path."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.config import from_hf
from gemmakit.errors import GemmaError
from gemmakit.loader import GemmaNote
from helpers import TINY4_UNIFIED, greedy_tokens, hf_model, tiny_config

TOL = 1e-4  # fp32, relative to the largest |logit|


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hf_model(TINY4_UNIFIED)
    assert type(ref).__name__ == "Gemma4UnifiedForCausalLM"
    folder = tmp_path_factory.mktemp("unified")
    ref.save_pretrained(folder)
    return ref, gemmakit.load(folder, dtype="float32", quant=None, progress=False)


def test_causal_lm_logits_and_greedy_match_transformers(pair):
    ref, model = pair
    assert model.config.replace(name="") == TINY4_UNIFIED.replace(name="")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert rel_err(model.logits(ids), expected) <= TOL
    hf_tokens, ours = greedy_tokens(ref, model.module)
    assert ours == hf_tokens


def test_gguf_round_trip(pair, tmp_path):
    """Exported as llama.cpp's gemma4 arch (no per-layer tensors) and read back: the same logits."""
    _, model = pair
    from finetune_helpers import tiny_tokenizer
    from gemmakit.weights.writers import write_gguf

    path = write_gguf(tmp_path / "u.gguf", model.module.state_dict(), model.config, tiny_tokenizer(512), qtype="f32")
    back = gemmakit.load(path, dtype="float32", quant=None, progress=False)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    assert rel_err(back.logits(ids), model.logits(ids)) <= 1e-6


def test_conditional_generation_checkpoint_loads_its_text_decoder(tmp_path):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    text = {k: v for k, v in hf_model(TINY4_UNIFIED).config.to_dict().items() if k != "architectures"}
    torch.manual_seed(0)
    mm = Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(
        text_config=text, vision_config={"mm_embed_dim": 32, "output_proj_dims": 64, "mm_posemb_size": 16},
        audio_config={"audio_embed_dim": 16})).eval()
    with torch.no_grad():
        for name, p in mm.model.language_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    mm.save_pretrained(tmp_path)
    with pytest.warns(GemmaNote, match="text decoder is loaded"):
        model = gemmakit.load(tmp_path, dtype="float32", quant=None, progress=False)
    assert model.config.unified and not model.config.hidden_size_per_layer_input
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(model.logits(ids), mm(input_ids=ids).logits) <= TOL


def test_unified_defaults_and_errors():
    cfg = from_hf({"model_type": "gemma4_unified_text", "num_hidden_layers": 6, "hidden_size": 64,
                   "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})
    assert cfg.unified and cfg.sliding_window == 1024 and cfg.max_position_embeddings == 262144
    assert cfg.hidden_size_per_layer_input == 0 and not cfg.enable_moe_block
    with pytest.raises(GemmaError, match="Unified config has no per-layer"):
        tiny_config("gemma4", unified=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512)


def test_fast_path_runs_the_unified_decoder(tmp_path):
    """A Q8_0 GGUF of it loads on the native fast path (no reference-path note) and decodes like the reference."""
    from gemmakit.quant import kernels

    if not kernels.available():
        pytest.skip("no C compiler: native kernels not built")
    from test_gemma4_fast import load_both, write

    fast, ref = load_both(write(tmp_path / "u.q8_0.gguf", TINY4_UNIFIED))
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(2))
    assert rel_err(fast.logits(ids), ref.logits(ids)) <= 4e-2
    prompt = [2, 5, 9, 100, 7, 8]
    assert fast.generate(prompt, 8, ignore_eos=True).token_ids == ref.generate(prompt, 8, ignore_eos=True).token_ids
