"""The real embedded Gemma 3 270M GGUF against transformers loading the same file in fp32."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.embedded import embedded_path
from gemmakit.generate import generate_step
from gemmakit.sampling import SamplingParams
from helpers import assert_close
from reference import gguf_reference, texts


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def ref():
    return gguf_reference(embedded_path(progress=False))


@pytest.mark.parametrize("label", list(texts()))
def test_tokenization_matches(model, ref, label):
    assert model.tokenizer.encode(texts()[label], bos=True) == ref[label]["ids"].tolist()


@pytest.mark.parametrize("label", list(texts()))
def test_logits_match(model, ref, label):
    r = ref[label]
    logits = model.logits(r["ids"].tolist())
    assert logits.shape == (len(r["ids"]), model.config.vocab_size)
    top = logits.gather(1, r["top_idx"])
    assert_close(top, r["top_val"], ulps=256)
    assert_close(logits[:, ref["columns"]], r["cols"], ulps=256)
    assert torch.equal(logits.argmax(-1), r["top_idx"][:, 0])


@pytest.mark.parametrize("label", list(texts()))
def test_greedy_continuation_identical(model, ref, label):
    r = ref[label]
    got = [int(t) for t in generate_step(model.module, [r["ids"].tolist()], SamplingParams(), 32)]
    assert got == r["greedy"].tolist()


def test_config_is_gemma3_270m(model):
    cfg = model.config
    expected = gemmakit.PRESETS["gemma-3-270m"]
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "sliding_window", "layer_types", "rope_theta",
                  "rope_local_base_freq", "query_pre_attn_scalar", "vocab_size", "max_position_embeddings"):
        assert getattr(cfg, field) == getattr(expected, field), field


def test_generate_text_api(model):
    res = model.generate("The capital of France is", max_new_tokens=8)
    assert res.finish_reason == "length" and len(res.token_ids) == 8 and res.text
    assert "".join(model.stream("The capital of France is", 8)) == res.text
