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


# Gemma 3n: gguf-py's MODEL_TENSORS[MODEL_ARCH.GEMMA3N] named as llama.cpp's converter names them (convert_hf_to_gguf
# Gemma3NModel: "*_scale" gets ".weight"; the AltUp stream projections are stacked into one [S-1, D, D] tensor, which
# gemmakit reads under "model.altup_projections.weight" and splits, see split_stacked).
_G3N_LAYER: dict[MODEL_TENSOR, str] = {
    T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
    T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj", T.ATTN_Q_NORM: "self_attn.q_norm",
    T.ATTN_K_NORM: "self_attn.k_norm", T.ATTN_POST_NORM: "post_attention_layernorm",
    T.FFN_PRE_NORM: "pre_feedforward_layernorm", T.FFN_POST_NORM: "post_feedforward_layernorm",
    T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
    T.PER_LAYER_INP_GATE: "per_layer_input_gate", T.PER_LAYER_PROJ: "per_layer_projection",
    T.PER_LAYER_POST_NORM: "post_per_layer_input_norm", T.ALTUP_CORRECT_COEF: "altup.correction_coefs",
    T.ALTUP_CORRECT_SCALE: "altup.correct_output_scale", T.ALTUP_PREDICT_COEF: "altup.prediction_coefs",
    T.ALTUP_ROUTER: "altup.modality_router", T.ALTUP_ROUTER_NORM: "altup.router_norm",
    T.LAUREL_L: "laurel.linear_left", T.LAUREL_R: "laurel.linear_right", T.LAUREL_POST_NORM: "laurel.post_laurel_norm",
}
_G3N_TOP: dict[MODEL_TENSOR, str] = {
    T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head",
    T.PER_LAYER_TOKEN_EMBD: "model.embed_tokens_per_layer", T.PER_LAYER_MODEL_PROJ: "model.per_layer_model_projection",
    T.PER_LAYER_PROJ_NORM: "model.per_layer_projection_norm", T.ALTUP_PROJ: "model.altup_projections",
    T.ALTUP_UNEMBD_PROJ: "model.altup_unembed_projections",
}
assert set(_G3N_LAYER) | set(_G3N_TOP) == set(MODEL_TENSORS[MODEL_ARCH.GEMMA3N])


def _hf_leaf(hf: str) -> str:
    """correct_output_scale is a bare parameter in transformers; every other tensor is a module's .weight."""
    return hf if hf.endswith("correct_output_scale") else f"{hf}.weight"


_G3N_FROM_GGUF = {f"{TENSOR_NAMES[t].removeprefix('blk.{bid}.')}.weight": _hf_leaf(hf) for t, hf in _G3N_LAYER.items()}
_G3N_TOP_FROM_GGUF = {f"{TENSOR_NAMES[t]}.weight": f"{hf}.weight" for t, hf in _G3N_TOP.items()}
STACKED = ("model.altup_projections", "model.altup_unembed_projections")  # one GGUF tensor, S-1 HF matrices


def split_stacked(name: str, t):
    """[(HF name, tensor)] for a tensor read under its HF name: the stacked AltUp projections split into theirs."""
    stem = name.removesuffix(".weight")
    if stem not in STACKED:
        return [(name, t)]
    return [(f"{stem}.{i}.weight", t[i]) for i in range(t.shape[0])]


def stack_streams(state: dict) -> dict:
    """The inverse for writers: the AltUp projections stacked under "model.altup_projections.weight" etc."""
    import torch

    out = {k: v for k, v in state.items() if not k.startswith(tuple(f"{s}." for s in STACKED))}
    for stem in STACKED:
        parts = sorted((int(k[len(stem) + 1:].split(".")[0]), v) for k, v in state.items() if k.startswith(f"{stem}."))
        if parts:
            out[f"{stem}.weight"] = torch.stack([v for _, v in parts])
    return out


def _table_gguf_to_hf(name: str, top: dict[str, str], layer: dict[str, str]) -> str | None:
    if name in top:
        return top[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    hf = layer.get(m.group(2)) if m else None
    return None if hf is None else f"model.layers.{m.group(1)}.{hf}"


def _table_hf_to_gguf(name: str, top: dict[str, str], layer: dict[str, str]) -> str:
    for gguf_name, hf in top.items():
        if name == hf:
            return gguf_name
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        for gguf_suffix, hf in layer.items():
            if hf == m.group(2):
                return f"blk.{m.group(1)}.{gguf_suffix}"
    raise KeyError(name)


def gguf_to_hf(name: str, family: str) -> str | None:
    """HF name for a GGUF tensor name, or None if the name is not part of a Gemma text decoder."""
    if family == "gemma4":
        return _gemma4_gguf_to_hf(name)
    if family == "gemma3n":
        return _table_gguf_to_hf(name, _G3N_TOP_FROM_GGUF, _G3N_FROM_GGUF)
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
    """Inverse of gguf_to_hf, for writers (Gemma 3n's AltUp projections: stacked first, see stack_streams)."""
    if family == "gemma4":
        return _gemma4_hf_to_gguf(name)
    if family == "gemma3n":
        return _table_hf_to_gguf(name, _G3N_TOP_FROM_GGUF, _G3N_FROM_GGUF)
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


_KV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)(\.weight)?$")


def unused_shared_kv(name: str, first_shared: int) -> bool:
    """A key/value weight of a KV-shared layer (index >= first_shared). Gemma 3n checkpoints on the Hub and the GGUF
    files llama.cpp writes carry them, but those layers read their source layer's keys and values: transformers
    ignores them on load (Gemma3nTextModel._keys_to_ignore_on_load_unexpected) and so does gemmakit."""
    m = _KV.match(name)
    return m is not None and int(m.group(1)) >= first_shared


# keras-hub decoder-block variables (h5 path under the block, before `/vars/0`) -> HF name under model.layers.N.
# Keras's `pre_ffw_norm` is HF's `post_attention_layernorm` in Gemma 1 (the pre-MLP norm) but
# `pre_feedforward_layernorm` in Gemma 2/3, where `post_attention_norm` is HF's post_attention_layernorm.
KERAS_BLOCK = {
    "pre_attention_norm": "input_layernorm.weight",
    "attention/query_dense": "self_attn.q_proj.weight",
    "attention/key_dense": "self_attn.k_proj.weight",
    "attention/value_dense": "self_attn.v_proj.weight",
    "attention/output_dense": "self_attn.o_proj.weight",
    "attention/query_norm": "self_attn.q_norm.weight",
    "attention/key_norm": "self_attn.k_norm.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
    "gating_ffw": "mlp.gate_proj.weight",
    "gating_ffw_2": "mlp.up_proj.weight",
    "ffw_linear": "mlp.down_proj.weight",
}
# The layer names (the `name` attribute of each variable group) keras-hub gives these sublayers.
KERAS_LAYER_NAMES = {"attention/query_dense": "query", "attention/key_dense": "key", "attention/value_dense": "value",
                     "attention/output_dense": "attention_output", "gating_ffw": "ffw_gating",
                     "gating_ffw_2": "ffw_gating_2"}


def keras_block_to_hf(part: str, family: str) -> str | None:
    if part == "pre_ffw_norm":
        return "post_attention_layernorm.weight" if family == "gemma" else "pre_feedforward_layernorm.weight"
    return KERAS_BLOCK.get(part)


def hf_to_keras_block(hf: str, family: str) -> str:
    """Inverse of keras_block_to_hf for the part of an HF name after `model.layers.N.`."""
    if hf == ("post_attention_layernorm.weight" if family == "gemma" else "pre_feedforward_layernorm.weight"):
        return "pre_ffw_norm"
    for part, name in KERAS_BLOCK.items():
        if name == hf:
            return part
    raise KeyError(hf)


# gemma library (Flax) per-layer norms -> HF names (the einsums are reshaped in weights/orbax.py). As in Keras,
# `pre_ffw_norm` is HF's post_attention_layernorm in Gemma 1 and pre_feedforward_layernorm in Gemma 2/3.
ORBAX_LAYER = {
    "pre_attention_norm/scale": "input_layernorm.weight",
    "post_attention_norm/scale": "post_attention_layernorm.weight",
    "post_ffw_norm/scale": "post_feedforward_layernorm.weight",
    "attn/_query_norm/scale": "self_attn.q_norm.weight",
    "attn/_key_norm/scale": "self_attn.k_norm.weight",
}


def orbax_layer_to_hf(part: str, family: str) -> str | None:
    if part == "pre_ffw_norm/scale":
        return "post_attention_layernorm.weight" if family == "gemma" else "pre_feedforward_layernorm.weight"
    return ORBAX_LAYER.get(part)


def hf_to_orbax_layer(hf: str, family: str) -> str:
    if hf == ("post_attention_layernorm.weight" if family == "gemma" else "pre_feedforward_layernorm.weight"):
        return "pre_ffw_norm/scale"
    for part, name in ORBAX_LAYER.items():
        if name == hf:
            return part
    raise KeyError(hf)
