"""The one table of tensor names: GGUF and gemma_pytorch names mapped to Hugging Face names (spec §4.1-4.3).

Gemma 4's GGUF names are gguf-py's own (`gguf.constants`: MODEL_TENSORS[MODEL_ARCH.GEMMA4], TENSOR_NAMES), mapped
to transformers' names as llama.cpp's converter maps them (`conversion/gemma.py` Gemma4Model, gguf-py
`tensor_mapping.py`): the router's scale and the per-expert scale ride on `ffn_gate_inp.scale` and
`ffn_down_exps.scale`, layer_scalar is `layer_output_scale.weight`.
"""

from __future__ import annotations

import re

from gguf.constants import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

# GGUF per-layer suffix -> HF per-layer suffix. `ffn_norm` is the pre-MLP norm in every generation, but its HF name
# differs: Gemma 1 calls the pre-MLP norm `post_attention_layernorm` (spec §4.3 trap).
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


T = MODEL_TENSOR
# gguf-py tensor kind -> (HF name under the layer or model, GGUF suffix): ".weight" on both sides unless stated.
_G4_LAYER: dict[tuple[MODEL_TENSOR, str], str] = {
    (T.ATTN_NORM, "weight"): "input_layernorm.weight",
    (T.ATTN_Q, "weight"): "self_attn.q_proj.weight",
    (T.ATTN_K, "weight"): "self_attn.k_proj.weight",
    (T.ATTN_V, "weight"): "self_attn.v_proj.weight",
    (T.ATTN_OUT, "weight"): "self_attn.o_proj.weight",
    (T.ATTN_Q_NORM, "weight"): "self_attn.q_norm.weight",
    (T.ATTN_K_NORM, "weight"): "self_attn.k_norm.weight",
    (T.ATTN_POST_NORM, "weight"): "post_attention_layernorm.weight",
    (T.FFN_PRE_NORM, "weight"): "pre_feedforward_layernorm.weight",
    (T.FFN_POST_NORM, "weight"): "post_feedforward_layernorm.weight",
    (T.FFN_GATE, "weight"): "mlp.gate_proj.weight",
    (T.FFN_UP, "weight"): "mlp.up_proj.weight",
    (T.FFN_DOWN, "weight"): "mlp.down_proj.weight",
    (T.FFN_PRE_NORM_2, "weight"): "pre_feedforward_layernorm_2.weight",
    (T.FFN_POST_NORM_1, "weight"): "post_feedforward_layernorm_1.weight",
    (T.FFN_POST_NORM_2, "weight"): "post_feedforward_layernorm_2.weight",
    (T.FFN_GATE_INP, "weight"): "router.proj.weight",
    (T.FFN_GATE_INP, "scale"): "router.scale",
    (T.FFN_DOWN_EXP, "scale"): "router.per_expert_scale",
    (T.FFN_GATE_UP_EXP, "weight"): "experts.gate_up_proj",
    (T.FFN_DOWN_EXP, "weight"): "experts.down_proj",
    (T.LAYER_OUT_SCALE, "weight"): "layer_scalar",
    (T.PER_LAYER_INP_GATE, "weight"): "per_layer_input_gate.weight",
    (T.PER_LAYER_PROJ, "weight"): "per_layer_projection.weight",
    (T.PER_LAYER_POST_NORM, "weight"): "post_per_layer_input_norm.weight",
}
_G4_TOP: dict[tuple[MODEL_TENSOR, str], str] = {
    (T.TOKEN_EMBD, "weight"): "model.embed_tokens.weight",
    (T.OUTPUT_NORM, "weight"): "model.norm.weight",
    (T.OUTPUT, "weight"): "lm_head.weight",
    (T.PER_LAYER_TOKEN_EMBD, "weight"): "model.embed_tokens_per_layer.weight",
    (T.PER_LAYER_MODEL_PROJ, "weight"): "model.per_layer_model_projection.weight",
    (T.PER_LAYER_PROJ_NORM, "weight"): "model.per_layer_projection_norm.weight",
}
assert {t for t, _ in (*_G4_LAYER, *_G4_TOP)} <= set(MODEL_TENSORS[MODEL_ARCH.GEMMA4])
# GGUF suffix after "blk.N." (or the whole top-level name) <-> HF name after "model.layers.N." (or whole).
_G4_FROM_GGUF = {f"{TENSOR_NAMES[t].removeprefix('blk.{bid}.')}.{kind}": hf for (t, kind), hf in _G4_LAYER.items()}
_G4_TOP_FROM_GGUF = {f"{TENSOR_NAMES[t]}.{kind}": hf for (t, kind), hf in _G4_TOP.items()}
ROPE_FREQS = f"{TENSOR_NAMES[T.ROPE_FREQS]}.weight"  # Gemma 4: frequency factors of the proportional RoPE


def _gemma4_gguf_to_hf(name: str) -> str | None:
    if name in _G4_TOP_FROM_GGUF:
        return _G4_TOP_FROM_GGUF[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    hf = _G4_FROM_GGUF.get(m.group(2)) if m else None
    return None if hf is None else f"model.layers.{m.group(1)}.{hf}"


def _gemma4_hf_to_gguf(name: str) -> str:
    for gguf_name, hf in _G4_TOP_FROM_GGUF.items():
        if name == hf:
            return gguf_name
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        for gguf_suffix, hf in _G4_FROM_GGUF.items():
            if hf == m.group(2):
                return f"blk.{m.group(1)}.{gguf_suffix}"
    raise KeyError(name)


def gguf_to_hf(name: str, family: str) -> str | None:
    """HF name for a GGUF tensor name, or None if the name is not part of a Gemma text decoder."""
    if family == "gemma4":
        return _gemma4_gguf_to_hf(name)
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}"
    m = _BLK.match(name)
    if not m:
        return None
    layer, part, kind = m.groups()
    if part == "ffn_norm":
        hf = "post_attention_layernorm" if family == "gemma" else "pre_feedforward_layernorm"
    else:
        hf = _GGUF_LAYER.get(part)
    return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"


def hf_to_gguf(name: str, family: str) -> str:
    """Inverse of gguf_to_hf, for writers."""
    if family == "gemma4":
        return _gemma4_hf_to_gguf(name)
    for stem, hf in _GGUF_TOP.items():
        if name == f"{hf}.weight":
            return f"{stem}.weight"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.weight$", name)
    if not m:
        raise KeyError(name)
    layer, hf = m.groups()
    if hf == ("post_attention_layernorm" if family == "gemma" else "pre_feedforward_layernorm"):
        return f"blk.{layer}.ffn_norm.weight"
    inverse = {v: k for k, v in _GGUF_LAYER.items()}
    return f"blk.{layer}.{inverse[hf]}.weight"


# gemma_pytorch (.ckpt) names that differ from HF; qkv_proj is split separately (spec §4.2).
_CKPT = {"embedder.weight": "model.embed_tokens.weight", "text_token_embedder.weight": "model.embed_tokens.weight"}
_CKPT_PARTS = {"self_attn.query_norm": "self_attn.q_norm", "self_attn.key_norm": "self_attn.k_norm"}


def ckpt_to_hf(name: str) -> str:
    if name in _CKPT:
        return _CKPT[name]
    for old, new in _CKPT_PARTS.items():
        name = name.replace(old, new)
    return name
