"""Shared test helpers: tiny random configs for every generation and their transformers twins."""

from __future__ import annotations

import os

import torch

from gemmakit.config import GemmaConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_config(family: str, **overrides) -> GemmaConfig:
    """Small shapes that still exercise GQA/MQA, soft-caps, sliding windows (W=8) and a Gemma 3 global layer."""
    base = dict(family=family, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256, name=family)
    if family == "gemma":
        base.update(num_key_value_heads=1, num_hidden_layers=3)
    if family == "gemma2":
        base.update(num_hidden_layers=4, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    query_pre_attn_scalar=24.0)
    if family == "gemma3":
        base.update(sliding_window=8, rope_theta=1e6, rope_scaling_factor=8.0, query_pre_attn_scalar=24.0)
    base.update(overrides)
    return GemmaConfig(**base)


TINY = {
    "gemma1": tiny_config("gemma"),
    "gemma2": tiny_config("gemma2"),
    "gemma3": tiny_config("gemma3"),
    "gemma3-mqa": tiny_config("gemma3", num_key_value_heads=1, rope_scaling_factor=1.0, query_pre_attn_scalar=256.0),
}


def hf_model(cfg: GemmaConfig, seed: int = 0):
    """A random transformers model of this config (eager attention: the reference with soft-capping), with
    non-trivial norm weights (HF initialises them to 0, which would hide norm bugs)."""
    import transformers

    torch.manual_seed(seed)
    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            elif "embed" in name:
                p.normal_(0.0, 0.5)
    return model
