"""keras-hub's Gemma4Backbone presets: the config both ways and the h5 variables <-> Hugging Face names.

Sources (keras_hub 0.32, cited KH-G4): `models/gemma4/gemma4_backbone.py` (layer types, KV-sharing sources, per-layer
inputs), `gemma4_decoder_block.py` (four norms, MoE beside the dense MLP, per-layer input gate, layer_scalar),
`gemma4_attention.py` (scaling 1.0, Q/K norms, scale-free V norm, k=v on global layers, partial RoPE over the first
rotary_dim // 2 of each half with the full head dim as denominator), `gemma4_moe.py`, and keras-hub's own importer
`utils/transformers/convert_gemma4.py`, which fixes the HF <-> Keras tensor pairs used here. Gemma 4's norms multiply
by the weight itself in both libraries (no +1), so norm tensors pass through unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import GLOBAL, SLIDING, GemmaConfig
from ..errors import GemmaError

BACKBONE = "Gemma4Backbone"
BLOCK_TOP = "gemma4_text_decoder_block"
_BLOCK = re.compile(rf"^{BLOCK_TOP}(?:_(\d+))?$")
MULTIMODAL = ("gemma4_vision_encoder", "gemma4_audio_encoder", "gemma4_interleave_embeddings")
# Top-level variables, by the `name` keras-hub gives the layer (their h5 groups are numbered by class: the per-layer
# projection norm and the final norm are both `rms_normalization{,_1}`, so the name decides).
TOP = {
    "token_embedding": "model.embed_tokens.weight",
    "final_normalization": "model.norm.weight",
    "per_layer_token_embedding": "model.embed_tokens_per_layer.weight",
    "per_layer_model_projection": "model.per_layer_model_projection.weight",
    "per_layer_projection_norm": "model.per_layer_projection_norm.weight",
}
# Decoder-block variables (h5 path under the block; `[k]` = the layer's k-th variable) -> HF name under model.layers.N.
BLOCK = {
    "": "layer_scalar",
    "pre_attention_norm": "input_layernorm.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "pre_ffw_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
    "attention/query_dense": "self_attn.q_proj.weight",
    "attention/key_dense": "self_attn.k_proj.weight",
    "attention/value_dense": "self_attn.v_proj.weight",
    "attention/output_dense": "self_attn.o_proj.weight",
    "attention/query_norm": "self_attn.q_norm.weight",
    "attention/key_norm": "self_attn.k_norm.weight",
    "gating_ffw": "mlp.gate_proj.weight",
    "gating_ffw_2": "mlp.up_proj.weight",
    "ffw_linear": "mlp.down_proj.weight",
    "per_layer_input_gate": "per_layer_input_gate.weight",
    "per_layer_up_proj": "per_layer_projection.weight",
    "post_per_layer_input_norm": "post_per_layer_input_norm.weight",
    "post_ffw_norm_dense": "post_feedforward_layernorm_1.weight",
    "pre_ffw_norm_moe": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_moe_path": "post_feedforward_layernorm_2.weight",
    "moe_router": "router.scale",
    "moe_router/proj": "router.proj.weight",
    "moe_expert_bank[3]": "router.per_expert_scale",
}
# The expert bank's gate [E, D, I] and up [E, D, I] are HF's experts.gate_up_proj [E, 2I, D]; its down [E, I, D] is
# experts.down_proj [E, D, I].
_EXPERTS = ("moe_expert_bank", "moe_expert_bank[1]", "moe_expert_bank[2]")
_HEADS = ("attention/query_dense", "attention/key_dense", "attention/value_dense")  # [heads, D, H]
_KERNELS = (
    "gating_ffw",
    "gating_ffw_2",
    "ffw_linear",
    "per_layer_input_gate",
    "per_layer_up_proj",
    "moe_router/proj",
)
# The `name` keras-hub gives each sublayer, written back into the h5 like its own saves.
LAYER_NAMES = {
    "attention/query_dense": "query",
    "attention/key_dense": "key",
    "attention/value_dense": "value",
    "attention/output_dense": "attention_output",
    "gating_ffw": "ffw_gating",
    "gating_ffw_2": "ffw_gating_2",
}


_REQUIRED = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "num_key_value_heads",
    "hidden_dim",
    "intermediate_dim",
    "head_dim",
)


def _rotary_pairs_match(fraction: float, head_dim: int) -> bool:
    """KH-G4 rotates max(2, even(int(f * H))) // 2 pairs, transformers int(f * H // 2): gemmakit needs them equal."""
    raw = int(fraction * head_dim)
    return max(2, raw - raw % 2) // 2 == int(fraction * head_dim // 2)


def _layer_types(c: dict[str, Any]) -> tuple[str, ...]:
    n, pattern = c["num_layers"], c.get("sliding_window_pattern", 6)
    types = c.get("layer_types") or [GLOBAL if i % pattern == pattern - 1 else SLIDING for i in range(n)]
    if len(types) != n or set(types) - {SLIDING, GLOBAL}:
        raise GemmaError(f"config.json's layer_types {types} is not {n} of {SLIDING!r} / {GLOBAL!r}")
    return tuple(types)


def config_from_keras_gemma4(c: dict[str, Any]) -> GemmaConfig:
    """A GemmaConfig from Gemma4Backbone's config. RoPE bases default to 1e6 (global) and 1e4 (local) as in KH-G4;
    `query_head_dim_normalize` is unused there (scaling 1.0, Q-norm), so it is ignored here too."""
    missing = [k for k in _REQUIRED if k not in c]
    if missing:
        raise GemmaError(
            f"config.json's Gemma4Backbone config lacks {', '.join(missing)}; re-save the preset"
        )
    odd = [
        k
        for k, bad in (
            ("use_bidirectional_attention", c.get("use_bidirectional_attention")),
            ("is_embedding_model", c.get("is_embedding_model")),
            ("local_rope_scaling_factor", c.get("local_rope_scaling_factor", 1.0) != 1.0),
        )
        if bad
    ]
    if odd:
        raise GemmaError(
            f"this Gemma4Backbone sets {odd[0]}, which Gemma 4's causal text decoder does not use; "
            "gemmakit cannot build it"
        )
    types = _layer_types(c)
    if SLIDING in types and not c.get("use_sliding_window_attention", True):
        raise GemmaError(
            "this Gemma4Backbone has local layers without a sliding window "
            "(use_sliding_window_attention=false); gemmakit's local layers always slide"
        )
    if types[-1] != GLOBAL:
        raise GemmaError(
            "this Gemma4Backbone's last layer is a sliding layer; Gemma 4 (and gemmakit, like "
            "transformers) ends on a full-attention layer: set layer_types so the last one is global"
        )
    head, global_head = c["head_dim"], c.get("global_head_dim") or c["head_dim"]
    fraction = c.get("global_rope_partial_rotary_factor")
    fraction = 1.0 if fraction is None else float(fraction)
    if not _rotary_pairs_match(fraction, global_head):
        raise GemmaError(
            f"global_rope_partial_rotary_factor={fraction} of head dim {global_head} rotates a "
            "different number of pairs in keras-hub than in transformers; gemmakit cannot match both"
        )
    global_kv = c.get("num_global_key_value_heads")
    ple = int(c.get("hidden_size_per_layer_input") or 0)
    moe = bool(c.get("enable_moe_block"))
    return GemmaConfig(
        family="gemma4",
        vocab_size=c["vocabulary_size"],
        hidden_size=c["hidden_dim"],
        intermediate_size=c["intermediate_dim"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=head,
        rms_norm_eps=c.get("layer_norm_epsilon", 1e-6),
        max_position_embeddings=131072,
        rope_theta=float(c.get("global_rope_wavelength") or 1e6),
        rope_local_base_freq=float(c.get("local_rope_wavelength") or 1e4),
        rope_scaling_factor=float(c.get("global_rope_scaling_factor", 1.0)),
        attn_logit_softcapping=c.get("attention_logit_soft_cap"),
        final_logit_softcapping=c.get("final_logit_soft_cap"),
        sliding_window=c.get("sliding_window_size", 512) if SLIDING in types else None,
        layer_types=types,
        global_head_dim=global_head,
        # KH-G4: num_global_key_value_heads switches on k=v for global layers, with that many KV heads
        attention_k_eq_v=global_kv is not None,
        num_global_key_value_heads=global_kv,
        partial_rotary_factor=fraction,
        hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=int(c.get("vocab_size_per_layer_input") or c["vocabulary_size"])
        if ple
        else 0,
        num_kv_shared_layers=int(c.get("num_kv_shared_layers", 0)),
        use_double_wide_mlp=bool(c.get("use_double_wide_mlp")),
        enable_moe_block=moe,
        num_experts=int(c.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(c.get("num_experts_per_token") or 0) if moe else 0,
        moe_intermediate_size=int(c.get("expert_intermediate_dim") or 0) if moe else 0,
    )


def keras_gemma4_config(cfg: GemmaConfig) -> dict[str, Any]:
    """Gemma4Backbone's config (text only); refuses what the class cannot express."""
    why = None
    if cfg.use_bidirectional_attention:
        why = "it attends bidirectionally (EmbeddingGemma 2)"
    elif not cfg.tie_word_embeddings:
        why = "its LM head is not tied to the embedding"
    elif not _rotary_pairs_match(cfg.partial_rotary_factor, cfg.global_head_dim or cfg.head_dim):
        why = f"keras-hub rounds partial_rotary_factor={cfg.partial_rotary_factor} to another number of pairs"
    if why:
        raise GemmaError(
            f"this Gemma 4 model cannot be a keras-hub Gemma4Backbone: {why}; write a Hugging Face "
            "folder instead"
        )
    moe = cfg.enable_moe_block
    global_kv = (cfg.num_global_key_value_heads or cfg.num_key_value_heads) if cfg.attention_k_eq_v else None
    return dict(
        name="gemma4_backbone",
        trainable=True,
        dtype={
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "float32"},
            "registered_name": None,
        },
        vocabulary_size=cfg.vocab_size,
        image_size=None,
        num_layers=cfg.num_hidden_layers,
        num_query_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_dim=cfg.hidden_size,
        intermediate_dim=cfg.intermediate_size,
        head_dim=cfg.head_dim,
        query_head_dim_normalize=True,
        attention_logit_soft_cap=cfg.attn_logit_softcapping,
        final_logit_soft_cap=cfg.final_logit_softcapping,
        use_sliding_window_attention=True,
        sliding_window_size=cfg.sliding_window or 512,
        sliding_window_pattern=6,
        layer_types=list(cfg.layer_types),
        global_head_dim=cfg.global_head_dim or cfg.head_dim,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=cfg.rope_scaling_factor,
        vision_encoder=None,
        audio_encoder=None,
        num_audio_tokens_per_clip=None,
        use_bidirectional_attention=False,
        use_vision_bidirectional_attention=False,
        layer_norm_epsilon=cfg.rms_norm_eps,
        dropout=0,
        is_embedding_model=False,
        pooling_intermediate_dim=None,
        embedding_dim=None,
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        num_global_key_value_heads=global_kv,
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        vocab_size_per_layer_input=cfg.vocab_size_per_layer_input or None,
        global_rope_wavelength=cfg.rope_theta,
        local_rope_wavelength=cfg.rope_local_base_freq,
        global_rope_partial_rotary_factor=cfg.partial_rotary_factor,
        use_double_wide_mlp=cfg.use_double_wide_mlp,
        enable_moe_block=moe,
        num_experts=cfg.num_experts if moe else None,
        expert_intermediate_dim=cfg.moe_intermediate_size if moe else None,
        num_experts_per_token=cfg.top_k_experts if moe else 8,
    )


def gemma4_from_keras(
    variables: dict[str, tuple[str, torch.Tensor]], cfg: GemmaConfig, folder: Path
) -> dict[str, torch.Tensor]:
    """HF-named tensors from the h5 variables ('<top>/<sub path>[k]' -> (layer name, tensor)) of a Gemma4Backbone."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for key, (name, t) in variables.items():
        top, _, part = key.partition("/")
        if top.startswith(MULTIMODAL):
            continue  # the image / audio towers and their merge into the text: the text decoder only
        if name in TOP and part == "":
            state[TOP[name]] = t.T.contiguous() if name == "per_layer_model_projection" else t
            continue
        m = _BLOCK.match(top)
        hf = BLOCK.get(part)
        if m is None or (hf is None and part not in _EXPERTS):
            raise GemmaError(
                f"{folder}: unexpected tensor {key!r}; not a Gemma 4 text decoder as keras-hub saves it"
            )
        layer = (
            int(name.rsplit("_", 1)[1]) if re.fullmatch(r"decoder_block_\d+", name) else int(m.group(1) or 0)
        )
        if part in _EXPERTS:
            experts.setdefault(layer, {})[part] = t
            continue
        if part in _HEADS:
            t = t.transpose(1, 2).reshape(-1, cfg.hidden_size)  # [heads, D, H] -> [heads*H, D]
        elif part == "attention/output_dense":
            t = t.reshape(-1, cfg.hidden_size).T  # [N, H, D] -> [D, N*H]
        elif part in _KERNELS:
            t = t.T  # Dense / EinsumDense kernels are [in, out]
        elif part == "":
            t = t.reshape(1)  # layer_scalar: a scalar in Keras, shape [1] in HF
        state[f"model.layers.{layer}.{hf}"] = t.contiguous()
    for layer, parts in experts.items():
        if len(parts) != 3:
            raise GemmaError(f"{folder}: decoder block {layer}'s expert bank lacks some of gate/up/down")
        gate, up, down = parts["moe_expert_bank"], parts["moe_expert_bank[1]"], parts["moe_expert_bank[2]"]
        state[f"model.layers.{layer}.experts.gate_up_proj"] = (
            torch.cat((gate, up), 2).transpose(1, 2).contiguous()
        )
        state[f"model.layers.{layer}.experts.down_proj"] = down.transpose(1, 2).contiguous()
    return state


def gemma4_to_keras(state: dict[str, torch.Tensor], cfg: GemmaConfig) -> dict[str, tuple[str, Any]]:
    """h5 group path under `layers/` -> (layer name, tensor | [tensors] | None) in Keras's layout and numbering."""
    tops = {
        "token_embedding": "reversible_embedding",
        "per_layer_token_embedding": "embedding",
        "per_layer_model_projection": "dense",
    }
    # rms_normalization groups are numbered in creation order: the per-layer projection norm comes first (KH-G4)
    norms = ["per_layer_projection_norm"] * bool(cfg.hidden_size_per_layer_input) + ["final_normalization"]
    tops.update({n: "rms_normalization" + (f"_{i}" if i else "") for i, n in enumerate(norms)})
    by_hf = {hf: name for name, hf in TOP.items()}
    out: dict[str, tuple[str, Any]] = {}
    for key, t in state.items():
        if key in by_hf:
            name = by_hf[key]
            out[tops[name]] = (name, t.T if name == "per_layer_model_projection" else t)
            continue
        layer, hf = re.match(r"^model\.layers\.(\d+)\.(.+)$", key).groups()
        top = BLOCK_TOP + (f"_{layer}" if layer != "0" else "")
        h, d = cfg.layer_head_dim(int(layer)), cfg.hidden_size
        if hf == "experts.gate_up_proj":
            gate, up = t.transpose(1, 2).chunk(2, dim=2)  # [E, 2I, D] -> [E, D, 2I] -> two [E, D, I]
            bank = out.setdefault(f"{top}/moe_expert_bank", ("moe_expert_bank", [None] * 4))[1]
            bank[0], bank[1] = gate, up
            continue
        if hf in ("experts.down_proj", "router.per_expert_scale"):
            bank = out.setdefault(f"{top}/moe_expert_bank", ("moe_expert_bank", [None] * 4))[1]
            bank[2 if hf == "experts.down_proj" else 3] = (
                t.transpose(1, 2) if hf == "experts.down_proj" else t
            )
            continue
        part = next(p for p, name in BLOCK.items() if name == hf)
        if part in _HEADS:
            t = t.reshape(-1, h, d).transpose(1, 2)  # [heads*H, D] -> [heads, D, H]
        elif part == "attention/output_dense":
            t = t.T.reshape(-1, h, d)
        elif part in _KERNELS:
            t = t.T
        elif part == "":
            out[top] = (f"decoder_block_{layer}", t.reshape(()))
            continue
        out[f"{top}/{part}"] = (LAYER_NAMES.get(part, part.rpartition("/")[2]), t)
        out.setdefault(top, (f"decoder_block_{layer}", None))
        if part.startswith(("attention/", "moe_router/")):
            out.setdefault(f"{top}/{part.partition('/')[0]}", (part.partition("/")[0], None))
    return out


# Gemma4CausalLMPreprocessor's settings as keras-hub 0.32 saves a text-only one (no image/audio/video converters).
GEMMA4_PREPROCESSOR: dict[str, Any] = dict(
    image_converter=None,
    audio_converter=None,
    video_converter=None,
    num_vision_tokens_per_image=280,
    max_images_per_prompt=2,
    num_audio_tokens_per_clip=750,
    max_audio_clips_per_prompt=1,
    audio_input_feat_size=128,
    num_frames_per_video=32,
    num_vision_tokens_per_frame=70,
    video_fps=24.0,
)


def gemma4_tokenizer_flags(tokenizer: Any) -> dict[str, bool]:
    """Gemma4Tokenizer insists on each group of special tokens it is told the vocabulary has: say so only if it does."""
    groups = {
        "has_vision_tokens": ("<|image>", "<|image|>", "<image|>"),
        "has_audio_tokens": ("<|audio>", "<|audio|>", "<audio|>"),
        "has_video_tokens": ("<|video>", "<|video|>", "<video|>"),
    }
    return {k: all(tokenizer.token_id(p) is not None for p in pieces) for k, pieces in groups.items()}
