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
# Gemma 4 12B Unified style (transformers' gemma4_unified_text): dense, no per-layer embeddings, no experts.
TINY4_UNIFIED = tiny_config("gemma4", unified=True, name="gemma4-unified")


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


# ---- shared checks of the parity tests (test_parity.py for Gemma 1-3, test_gemma4.py) ---------------------------

GREEDY_PROMPT = [2, 17, 99, 240, 3, 77, 401, 12, 9, 300, 45]
BATCH_PROMPTS = [[2, 5, 9, 100, 7, 8, 9, 10, 11, 12, 13], [2, 300], [2, 40, 41, 42, 43, 44]]


def greedy_tokens(ref, module, prompt=GREEDY_PROMPT, n: int = 24) -> tuple[list[int], list[int]]:
    """(transformers' greedy continuation, gemmakit's) of `prompt`, n tokens each, EOS ignored."""
    from gemmakit.generate import generate_step
    from gemmakit.sampling import SamplingParams

    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                           pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist(), [int(t) for t in generate_step(module, [prompt], SamplingParams(), n)]


def batched_and_single(module, prompts=BATCH_PROMPTS, n: int = 12) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of the prompts decoded as one left-padded batch, and one at a time."""
    from gemmakit.generate import generate_step
    from gemmakit.sampling import SamplingParams

    batched = torch.stack(list(generate_step(module, prompts, SamplingParams(), n)), 1).tolist()
    return batched, [[int(t) for t in generate_step(module, [p], SamplingParams(), n)] for p in prompts]


def cached_logits(module, cfg: GemmaConfig, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ids (B, 30) through the KV cache: a 5-token prefill then one token at a time, and a chunked
    prefill of 11 + 19 tokens (chunks longer than the tiny configs' window of 8)."""
    from gemmakit.model import KVCache

    B, T = ids.shape
    with torch.no_grad():
        cache = KVCache(cfg, B, T, dtype=torch.float32, device="cpu")
        steps = [module(ids[:, :5], cache=cache)]
        for t in range(5, T):
            steps.append(module(ids[:, t:t + 1], torch.full((B, 1), t), cache))
        cache2 = KVCache(cfg, B, T, dtype=torch.float32, device="cpu")
        chunks = [module(ids[:, :11], cache=cache2), module(ids[:, 11:], torch.arange(11, T).expand(B, -1), cache2)]
    return torch.cat(steps, 1), torch.cat(chunks, 1)
