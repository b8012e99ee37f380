"""Gemma 4's transformers config.json both ways (HF-G4: transformers `models/gemma4/configuration_gemma4.py`;
`gemma4_unified` and `embedding_gemma2` text configs share its spelling): global head dims and KV heads of their
own, per-layer inputs, experts, and the defaults of absent keys."""

from __future__ import annotations

from typing import Any

from .config import GLOBAL, SLIDING, GemmaConfig, _first, check_kv_sharing, default_layer_types
from .errors import GemmaError


def gemma4_to_hf(cfg: GemmaConfig) -> dict[str, Any]:
    """A transformers Gemma4TextConfig dict, in the Hub's spelling (global_head_dim, num_global_key_value_heads)."""
    if cfg.attn_logit_softcapping is not None:  # keras-hub's Gemma4Backbone can set one; transformers has none
        raise GemmaError("this Gemma 4 model soft-caps its attention logits, which transformers' Gemma 4 cannot "
                         "express; keep it as a keras-hub preset")
    full: dict[str, Any] = {"rope_type": "proportional", "partial_rotary_factor": cfg.partial_rotary_factor,
                            "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        full["factor"] = cfg.rope_scaling_factor
    d: dict[str, Any] = dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        global_head_dim=cfg.global_head_dim or cfg.head_dim, attention_k_eq_v=cfg.attention_k_eq_v,
        rms_norm_eps=cfg.rms_norm_eps, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
        final_logit_softcapping=cfg.final_logit_softcapping,
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq}},
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        vocab_size_per_layer_input=cfg.vocab_size_per_layer_input or cfg.vocab_size,
        num_kv_shared_layers=cfg.num_kv_shared_layers, use_double_wide_mlp=cfg.use_double_wide_mlp,
        enable_moe_block=cfg.enable_moe_block, num_experts=cfg.num_experts or None,
        top_k_experts=cfg.top_k_experts or None, moe_intermediate_size=cfg.moe_intermediate_size or None,
        torch_dtype="float32",
    )
    if cfg.num_global_key_value_heads:
        d["num_global_key_value_heads"] = cfg.num_global_key_value_heads
    if cfg.unified:  # Gemma4UnifiedTextConfig has no PLE/MoE fields at all
        for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                  "top_k_experts", "moe_intermediate_size"):
            del d[k]
        d.update(architectures=["Gemma4UnifiedForCausalLM"], model_type="gemma4_unified_text",
                 use_bidirectional_attention=None)
    return d


def _gemma4_global_overrides(cfg: dict[str, Any], types: list[str]) -> tuple[int, int | None]:
    """(global head dim, global KV heads) as transformers resolves them: a saved `per_layer_config` (transformers
    5.24 writes one) or the Hub's global_head_dim (default 512) and num_global_key_value_heads, the latter
    applied only with attention_k_eq_v (HF-G4 Gemma4TextConfig.__post_init__)."""
    per_layer = cfg.get("per_layer_config")
    if per_layer is None:
        heads = cfg.get("num_global_key_value_heads") if cfg.get("attention_k_eq_v", False) else None
        return int(cfg.get("global_head_dim", 512)), heads
    overrides = {int(k): v for k, v in per_layer.items()}
    want = [i for i, t in enumerate(types) if t == GLOBAL]
    uniform = {tuple(sorted(v.items())) for v in overrides.values()}
    if sorted(overrides) != want or len(uniform) != 1 or not set(next(iter(overrides.values()))) <= {
            "head_dim", "num_key_value_heads"}:
        raise GemmaError("config.json's per_layer_config overrides something other than one head_dim / "
                         "num_key_value_heads for all full-attention layers; gemmakit cannot build it")
    o = next(iter(overrides.values()))
    return int(o.get("head_dim", cfg.get("head_dim", 256))), o.get("num_key_value_heads")


def gemma4_from_hf(cfg: dict[str, Any]) -> GemmaConfig:
    """Read a Gemma4TextConfig dict, with transformers' defaults for absent keys (HF-G4)."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh" or cfg.get("attention_bias"):
        raise GemmaError("config.json's activation or attention_bias is not Gemma 4's (gelu_pytorch_tanh, no bias)")
    if cfg.get("use_bidirectional_attention") == "all":
        raise GemmaError("this Gemma 4 config attends bidirectionally (an encoder); gemmakit runs causal decoders")
    unified = cfg.get("model_type") == "gemma4_unified_text"  # Gemma4UnifiedTextConfig: other defaults, no PLE/MoE
    layers = cfg.get("num_hidden_layers", 30)
    types = list(cfg.get("layer_types") or default_layer_types("gemma4", layers))
    types[-1] = GLOBAL  # transformers forces the last layer to full attention
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                          "rope_theta": 1e6}
    local = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 1e4}
    if full.get("rope_type", "default") not in ("default", "proportional") or local.get("rope_type") != "default":
        raise GemmaError(f"config.json has RoPE types {full.get('rope_type')!r}/{local.get('rope_type')!r}; Gemma 4 "
                         "uses proportional (full attention) and default (sliding)")
    proportional = full.get("rope_type") == "proportional"
    global_dim, global_kv = _gemma4_global_overrides(cfg, types)
    moe = bool(cfg.get("enable_moe_block")) and not unified
    ple = 0 if unified else int(cfg.get("hidden_size_per_layer_input", 256) or 0)
    return GemmaConfig(
        family="gemma4", vocab_size=cfg.get("vocab_size", 262144), hidden_size=cfg.get("hidden_size", 2304),
        intermediate_size=cfg.get("intermediate_size", 9216), num_hidden_layers=layers,
        num_attention_heads=cfg.get("num_attention_heads", 8), num_key_value_heads=cfg.get("num_key_value_heads", 4),
        head_dim=cfg.get("head_dim", 256), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 262144 if unified else 131072),
        rope_theta=float(full.get("rope_theta", 1e6)), rope_local_base_freq=float(local.get("rope_theta", 1e4)),
        rope_scaling_factor=float(full.get("factor", 1.0)) if proportional else 1.0,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        sliding_window=cfg.get("sliding_window", 1024 if unified else 512),
        layer_types=tuple(types), tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=_first(cfg.get("bos_token_id"), 2), eos_token_id=_first(cfg.get("eos_token_id"), 1),
        pad_token_id=_first(cfg.get("pad_token_id"), 0), name=cfg.get("_name_or_path", "") or "",
        global_head_dim=global_dim, num_global_key_value_heads=global_kv,
        attention_k_eq_v=bool(cfg.get("attention_k_eq_v", False)),
        partial_rotary_factor=float(full.get("partial_rotary_factor", 1.0)) if proportional else 1.0,
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(cfg.get("vocab_size_per_layer_input", 262144)) if ple else 0,
        num_kv_shared_layers=int(cfg.get("num_kv_shared_layers", 0)),
        use_double_wide_mlp=bool(cfg.get("use_double_wide_mlp", False)), enable_moe_block=moe,
        num_experts=int(cfg.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(cfg.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0) if moe else 0, unified=unified,
    )


def embedding_gemma2_from_hf(cfg: dict[str, Any]) -> GemmaConfig:
    """EmbeddingGemma 2's text encoder (transformers 5.25 `models/embedding_gemma2`, EmbeddingGemma2TextConfig, cited
    as HF-EG2): Gemma 4 layers (scale-free attention, QK and V norms, w-scaled norms, layer_scalar) attending both
    ways, projection-only per-layer inputs (no table), wider full-attention heads with their own KV head count
    (per_layer_config, applied without k_eq_v), default RoPE on both layer kinds, and no LM head. Its
    `embedding_projection` (D -> embedding_dim) belongs to the pooling head (gemmakit/embed)."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh" or cfg.get("attention_bias"):
        raise GemmaError("config.json's activation or attention_bias is not EmbeddingGemma 2's")
    layers = cfg.get("num_hidden_layers", 24)
    types = list(cfg.get("layer_types") or [SLIDING if (i + 1) % 6 else GLOBAL for i in range(layers)])
    types[-1] = GLOBAL  # HF-EG2 forces the last layer to full attention
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention") or {"rope_type": "default", "rope_theta": 1e6}
    local = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 1e4}
    if full.get("rope_type", "default") != "default" or local.get("rope_type", "default") != "default":
        raise GemmaError("config.json has a RoPE type other than 'default'; EmbeddingGemma 2 uses default RoPE")
    if cfg.get("per_layer_config") is not None:
        global_dim, global_kv = _gemma4_global_overrides(cfg, types)
    else:  # HF-EG2 __post_init__ builder defaults
        global_dim, global_kv = int(cfg.get("global_head_dim", 512)), cfg.get("num_global_key_value_heads", 1)
    return GemmaConfig(
        family="gemma4", vocab_size=cfg.get("vocab_size", 262144), hidden_size=cfg.get("hidden_size", 512),
        intermediate_size=cfg.get("intermediate_size", 2048), num_hidden_layers=layers,
        num_attention_heads=cfg.get("num_attention_heads", 4), num_key_value_heads=cfg.get("num_key_value_heads", 2),
        head_dim=cfg.get("head_dim", 256), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 262144),
        rope_theta=float(full.get("rope_theta", 1e6)), rope_local_base_freq=float(local.get("rope_theta", 1e4)),
        sliding_window=int(cfg.get("sliding_window", 512)), use_bidirectional_attention=True,
        layer_types=tuple(types), bos_token_id=_first(cfg.get("bos_token_id"), 2),
        eos_token_id=_first(cfg.get("eos_token_id"), 1), pad_token_id=_first(cfg.get("pad_token_id"), 0),
        name=cfg.get("_name_or_path", "") or "", global_head_dim=global_dim,
        num_global_key_value_heads=int(global_kv) if global_kv else None,
        hidden_size_per_layer_input=int(cfg.get("hidden_size_per_layer_input", 512) or 0),
    )


def check_gemma4(cfg: GemmaConfig) -> None:
    """Refuse Gemma 4 configs that transformers would reject or silently change (HF-G4 Gemma4TextConfig)."""
    if cfg.layer_types[-1] != GLOBAL:
        raise GemmaError("a Gemma 4 config's last layer must be full_attention (transformers forces it)")
    check_kv_sharing(cfg)
    if cfg.num_global_key_value_heads and not (cfg.attention_k_eq_v or cfg.use_bidirectional_attention):
        # EmbeddingGemma 2 (bidirectional) applies it to every full-attention layer (its per_layer_config)
        raise GemmaError("num_global_key_value_heads applies only with attention_k_eq_v (as in transformers)")
    if not 0.0 < cfg.partial_rotary_factor <= 1.0:
        raise GemmaError(f"partial_rotary_factor={cfg.partial_rotary_factor} must lie in (0, 1]")
    if cfg.hidden_size_per_layer_input and not (cfg.vocab_size_per_layer_input or cfg.use_bidirectional_attention):
        # EmbeddingGemma 2 has projection-only per-layer inputs: no table (vocab_size_per_layer_input 0)
        raise GemmaError("per-layer embeddings need vocab_size_per_layer_input > 0")
    if cfg.unified and (cfg.hidden_size_per_layer_input or cfg.enable_moe_block):
        raise GemmaError("a Gemma 4 Unified config has no per-layer embeddings and no experts (transformers' "
                         "Gemma4UnifiedTextConfig removes both)")
    if cfg.enable_moe_block and not (0 < cfg.top_k_experts <= cfg.num_experts and cfg.moe_intermediate_size > 0):
        raise GemmaError("an MoE config needs 0 < top_k_experts <= num_experts and moe_intermediate_size > 0")
