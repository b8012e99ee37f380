"""Shared test helpers: tiny random configs for every generation and their transformers twins."""

from __future__ import annotations

import os

import torch

from gemmakit.config import GLOBAL, SLIDING, GemmaConfig

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
    if family == "gemma4":  # 8 layers: sliding x3, global, sliding x3, global; global heads twice as wide, 1/4 rotated
        base.update(num_hidden_layers=8, head_dim=16, global_head_dim=32, intermediate_size=96, sliding_window=8,
                    layer_types=(SLIDING,) * 3 + (GLOBAL,) + (SLIDING,) * 3 + (GLOBAL,), rope_theta=1e6,
                    partial_rotary_factor=0.25, final_logit_softcapping=30.0)
    base.update(overrides)
    return GemmaConfig(**base)


TINY = {
    "gemma1": tiny_config("gemma"),
    "gemma2": tiny_config("gemma2"),
    "gemma3": tiny_config("gemma3"),
    "gemma3-mqa": tiny_config("gemma3", num_key_value_heads=1, rope_scaling_factor=1.0, query_pre_attn_scalar=256.0),
}


# Gemma 4 kinds: E-style (per-layer embeddings, KV sharing over the last 4 layers, double-wide MLP there), dense,
# MoE; with and without attention_k_eq_v (global layers: 1 KV head, values from k_proj).
K_EQ_V = dict(attention_k_eq_v=True, num_global_key_value_heads=1)
TINY4 = {
    "gemma4-e": tiny_config("gemma4", hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
                            num_kv_shared_layers=4, use_double_wide_mlp=True),
    "gemma4-e-keqv": tiny_config("gemma4", hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
                                 num_kv_shared_layers=4, **K_EQ_V),
    "gemma4-dense": tiny_config("gemma4"),
    "gemma4-dense-keqv": tiny_config("gemma4", **K_EQ_V),
    "gemma4-moe": tiny_config("gemma4", enable_moe_block=True, num_experts=4, top_k_experts=2,
                              moe_intermediate_size=24),
    "gemma4-moe-keqv": tiny_config("gemma4", enable_moe_block=True, num_experts=4, top_k_experts=2,
                                   moe_intermediate_size=24, **K_EQ_V),
}


def hf_model(cfg: GemmaConfig, seed: int = 0, attn: str = "eager"):
    """A random transformers model of this config (eager attention: the reference with soft-capping), with
    non-trivial norm weights (HF initialises them to 0, which would hide norm bugs). Gemma 4 norms scale by w
    itself: theirs get 1 + N(0, 0.3), as do the router scales and each layer's layer_scalar buffer."""
    import transformers

    torch.manual_seed(seed)
    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation=attn).eval()
    g4 = cfg.family == "gemma4"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if g4 and ("norm" in name or name.endswith("scale")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "norm" in name:
                p.normal_(0.0, 0.5)
            elif "embed" in name:
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model


def assert_close(got: torch.Tensor, expected: torch.Tensor, ulps: float = 32) -> None:
    """fp32 logits equal up to summation order: within `ulps` units in the last place of the largest |expected|.

    A bare absolute bound fails on other CPUs (an AVX2 build sums in another order: 1.14e-5 on logits of 28),
    while a bound relative to the largest logit keeps the same strictness at every scale.
    """
    scale = max(float(expected.abs().max()), 1.0)
    tol = ulps * torch.finfo(torch.float32).eps * scale
    err = float((got.float() - expected.float()).abs().max())
    assert err <= tol, f"max |diff| {err:.3g} exceeds {ulps:g} ulps of the largest logit ({tol:.3g})"
