"""The one table of tensor names: GGUF and gemma_pytorch names mapped to Hugging Face names (spec §4.1-4.3)."""

from __future__ import annotations

import re

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


def gguf_to_hf(name: str, family: str) -> str | None:
    """HF name for a GGUF tensor name, or None if the name is not part of a Gemma text decoder."""
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
