"""Gemma 3n's transformers config.json, both ways (HF-3N: transformers `models/gemma3n/configuration_gemma3n.py`,
Gemma3nTextConfig): its own field names, a per-layer intermediate_size list, defaults for absent keys."""

from __future__ import annotations

from typing import Any

from .config import GemmaConfig, _first, check_kv_sharing, default_layer_types
from .errors import GemmaError


def gemma3n_to_hf(cfg: GemmaConfig) -> dict[str, Any]:
    """A transformers Gemma3nTextConfig dict, as the Hub spells it."""
    return dict(
        architectures=["Gemma3nForCausalLM"], model_type="gemma3n_text", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=[cfg.layer_intermediate(i) for i in range(cfg.num_hidden_layers)],
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types), final_logit_softcapping=cfg.final_logit_softcapping,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq}},
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        vocab_size_per_layer_input=cfg.vocab_size_per_layer_input, num_kv_shared_layers=cfg.num_kv_shared_layers,
        altup_num_inputs=cfg.altup_num_inputs, altup_active_idx=cfg.altup_active_idx,
        altup_coef_clip=cfg.altup_coef_clip, altup_correct_scale=cfg.altup_correct_scale,
        laurel_rank=cfg.laurel_rank,
        activation_sparsity_pattern=[cfg.activation_sparsity(i) for i in range(cfg.num_hidden_layers)],
        torch_dtype="float32",
    )


def gemma3n_from_hf(cfg: dict[str, Any]) -> GemmaConfig:
    """Read a Gemma3nTextConfig dict (v4 rope_theta/rope_local_base_freq or v5 rope_parameters), with
    transformers' defaults for absent keys (HF-3N)."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh" or cfg.get("attention_bias"):
        raise GemmaError("config.json's activation or attention_bias is not Gemma 3n's (gelu_pytorch_tanh, no bias)")
    layers = int(cfg.get("num_hidden_layers", 35))
    types = tuple(cfg.get("layer_types") or default_layer_types("gemma3n", layers))
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention") or {}
    local = rope.get("sliding_attention") or {}
    legacy = cfg.get("rope_scaling") or {}
    if full.get("rope_type", legacy.get("rope_type", "default")) != "default" or local.get(
            "rope_type", "default") != "default":
        raise GemmaError(f"config.json has RoPE type {full.get('rope_type') or legacy.get('rope_type')!r}; "
                         "gemmakit runs Gemma 3n's default RoPE only")
    ff = cfg.get("intermediate_size", 16384)
    ff = tuple(int(f) for f in ff) if isinstance(ff, list | tuple) else (int(ff),) * layers
    sparsity = cfg.get("activation_sparsity_pattern")
    if sparsity is None:  # HF-3N default: the first 10 layers at 0.95 when there are more than 10
        sparse = 10 if layers > 10 else 0
        sparsity = [0.95] * sparse + [0.0] * (layers - sparse)
    elif not isinstance(sparsity, list | tuple):
        sparsity = [sparsity] * layers
    return GemmaConfig(
        family="gemma3n", vocab_size=int(cfg.get("vocab_size", 262400)), hidden_size=int(cfg.get("hidden_size", 2048)),
        intermediate_size=ff[0], intermediate_sizes=ff, num_hidden_layers=layers,
        num_attention_heads=int(cfg.get("num_attention_heads", 8)),
        num_key_value_heads=int(cfg.get("num_key_value_heads", 2)), head_dim=int(cfg.get("head_dim", 256)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        rope_theta=float(full.get("rope_theta", cfg.get("rope_theta", 1e6))),
        rope_local_base_freq=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 1e4))),
        final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0),
        sliding_window=int(cfg.get("sliding_window", 512)), layer_types=types,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=_first(cfg.get("bos_token_id"), 2), eos_token_id=_first(cfg.get("eos_token_id"), 1),
        pad_token_id=_first(cfg.get("pad_token_id"), 0), name=cfg.get("_name_or_path", "") or "",
        hidden_size_per_layer_input=int(cfg.get("hidden_size_per_layer_input", 256)),
        vocab_size_per_layer_input=int(cfg.get("vocab_size_per_layer_input", 262144)),
        num_kv_shared_layers=int(cfg.get("num_kv_shared_layers", 15)),
        altup_num_inputs=int(cfg.get("altup_num_inputs", 4)), altup_active_idx=int(cfg.get("altup_active_idx", 0)),
        altup_coef_clip=float(cfg.get("altup_coef_clip", 120.0)),
        altup_correct_scale=bool(cfg.get("altup_correct_scale", True)), laurel_rank=int(cfg.get("laurel_rank", 64)),
        activation_sparsity_pattern=tuple(float(s) for s in sparsity),
    )


def check_gemma3n(cfg: GemmaConfig) -> None:
    """Refuse Gemma 3n configs that transformers would reject or that the model cannot build (HF-3N)."""
    n = cfg.num_hidden_layers
    check_kv_sharing(cfg)
    if cfg.altup_num_inputs < 1 or not 0 <= cfg.altup_active_idx < cfg.altup_num_inputs:
        raise GemmaError(f"altup_num_inputs={cfg.altup_num_inputs} / altup_active_idx={cfg.altup_active_idx}: "
                         "Gemma 3n needs at least one AltUp stream and an active index among them")
    if cfg.altup_coef_clip is None:
        raise GemmaError("Gemma 3n needs altup_coef_clip (transformers' default: 120.0)")
    if not cfg.hidden_size_per_layer_input or not cfg.vocab_size_per_layer_input or cfg.laurel_rank < 1:
        raise GemmaError("Gemma 3n needs per-layer embeddings (hidden/vocab_size_per_layer_input) and laurel_rank")
    for name in ("activation_sparsity_pattern", "intermediate_sizes"):
        if getattr(cfg, name) and len(getattr(cfg, name)) != n:
            raise GemmaError(f"{name} has {len(getattr(cfg, name))} entries for {n} layers; give one per layer")
    if any(not 0.0 <= s < 1.0 for s in cfg.activation_sparsity_pattern):
        raise GemmaError("activation_sparsity_pattern values must lie in [0, 1)")
