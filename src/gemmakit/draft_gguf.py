"""Gemma 4 assistant drafters as GGUF files, in llama.cpp's `gemma4-assistant` layout, written and read.

llama.cpp's converter (`conversion/gemma.py` Gemma4AssistantModel; gguf-py MODEL_ARCH.GEMMA4_ASSISTANT, not yet in
the gguf-py 0.19 installed here) writes the drafter as a dense Gemma 4 decoder under the architecture name
"gemma4-assistant": the gemma4 tensor names (token_embd, output_norm, blk.N.attn_q / attn_q_norm / attn_output /
ffn_* / the sandwich norms / layer_output_scale, rope_freqs) with the gemma4 metadata keys under that prefix, plus
  mtp.pre_projection.weight   [D, 2 * backbone]     mtp.post_projection.weight  [backbone, D]
  mtp.centroids.weight        [centroids, D]        mtp.token_ordering.weight   I32 [V]
  gemma4-assistant.embedding_length_out = the target's width (backbone_hidden_size)
  gemma4-assistant.attention.shared_kv_layers = every layer (they all read the target's keys).
Readers of those files (ollama's converter, mlx ports) agree on these names; the number of centroids is the
centroid tensor's row count. Two facts llama.cpp's keys do not carry are written as gemmakit keys that llama.cpp
ignores: `gemma4-assistant.centroid_top_k` (default 32 when absent, as transformers' config) and
`gemma4-assistant.model_type` (gemma4_assistant, or gemma4_unified_assistant for the 12B's drafter). Norms are
stored as Gemma 4 stores them (w, not 1 + w), as the gemma4 layout does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from .config import GemmaConfig
from .draft import ASSISTANT_TYPES, Drafter, DrafterConfig, build_drafter, drafter_on_blocks
from .errors import GemmaError
from .quant.qlinear import NATIVE_TYPES, QWeight
from .tokenizer import Tokenizer
from .weights.gguf import GGUFFile, _gemma4_config
from .weights.names import ROPE_FREQS, gguf_to_hf, hf_to_gguf
from .weights.writers import (
    GGUF_TYPES,
    _add_tensor,
    _write_metadata,
    _write_tokenizer,
    atomic_write,
    finish_gguf,
    rope_freqs,
)

ARCH = "gemma4-assistant"
_MTP = {"pre_projection.weight": "mtp.pre_projection.weight", "post_projection.weight": "mtp.post_projection.weight",
        "masked_embedding.centroids.weight": "mtp.centroids.weight",
        "masked_embedding.token_ordering": "mtp.token_ordering.weight"}
_MTP_FROM_GGUF = {v: k for k, v in _MTP.items()}


def _text_for_gguf(cfg: DrafterConfig) -> GemmaConfig:
    """The decoder config the gemma4 keys are written from (the file states every layer KV-shared on top)."""
    return cfg.text.replace(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)


def write_drafter_gguf(path: str | Path, drafter: Drafter, tokenizer: Tokenizer | None = None, *,
                       qtype: str = "f16", on_tensor: Callable[[int, int], None] | None = None) -> Path:
    """Write `drafter` as a gemma4-assistant GGUF (matrices in `qtype`; norms, scalars and the centroid head's
    routing in F32; token_ordering I32). The tokenizer, when given, is written as for a model: llama.cpp reads the
    vocabulary from it; without one the file states its vocabulary size only."""
    if qtype not in GGUF_TYPES:
        raise GemmaError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    cfg, path = drafter.config, Path(path)
    if tokenizer is not None and tokenizer.vocab_size != cfg.text.vocab_size:
        raise GemmaError(f"the tokenizer has {tokenizer.vocab_size} tokens but the drafter {cfg.text.vocab_size} rows")
    text = _text_for_gguf(cfg)
    state = {k: v.detach() for k, v in drafter.state_dict().items()}

    def write(tmp: str) -> None:
        w = GGUFWriter(tmp, ARCH)
        _write_metadata(w, text, qtype, shared_kv_layers=text.num_hidden_layers)  # gemma4 keys, under this prefix
        w.add_uint32(f"{ARCH}.embedding_length_out", cfg.backbone_hidden_size)
        w.add_uint32(f"{ARCH}.vocab_size", cfg.text.vocab_size)
        w.add_uint32(f"{ARCH}.centroid_top_k", cfg.centroid_intermediate_top_k)
        w.add_string(f"{ARCH}.model_type", cfg.model_type)
        if cfg.text.attention_k_eq_v:
            w.add_bool(f"{ARCH}.attention.k_eq_v", True)
        if tokenizer is not None:
            _write_tokenizer(w, tokenizer)
        for i, (name, t) in enumerate(state.items()):
            if on_tensor is not None:
                on_tensor(i, len(state))
            if name == "masked_embedding.token_ordering":
                w.add_tensor(_MTP[name], t.to(torch.int32).cpu().numpy())
                continue
            data = t.float().cpu().numpy()
            gguf_name = _MTP.get(name) or hf_to_gguf(name, "gemma4")
            _add_tensor(w, gguf_name, data, "f32" if name == "masked_embedding.centroids.weight" else qtype)
        w.add_tensor(ROPE_FREQS, rope_freqs(text))
        finish_gguf(w)

    atomic_write(path, write)
    return path


def drafter_config_from_gguf(g: GGUFFile) -> DrafterConfig:
    """DrafterConfig from a gemma4-assistant file's metadata and tensor shapes."""
    if g.architecture != ARCH:
        raise GemmaError(f"{g.path} holds a {g.architecture!r} model, not a Gemma 4 assistant drafter ({ARCH})")
    backbone = g.arch_get("embedding_length_out")
    if backbone is None:
        raise GemmaError(f"{g.path} lacks {ARCH}.embedding_length_out (the target's width); re-convert it")
    text = _gemma4_config(g)
    k_eq_v = bool(g.arch_get("attention.k_eq_v", False))
    kv = g.arch_get("attention.head_count_kv")
    global_kv = None
    if k_eq_v and isinstance(kv, np.ndarray | list):
        global_kv = int(kv[list(text.layer_types).index("full_attention")])
    eps = float(f"{text.rms_norm_eps:.7g}")  # stored as float32: 1e-6 reads back as 9.99999997e-07
    text = text.replace(num_kv_shared_layers=0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                        attention_k_eq_v=k_eq_v, num_global_key_value_heads=global_kv, rms_norm_eps=eps)
    model_type = str(g.arch_get("model_type", ASSISTANT_TYPES[0]))
    if model_type not in ASSISTANT_TYPES:
        raise GemmaError(f"{g.path}: {ARCH}.model_type is {model_type!r}, not one of {', '.join(ASSISTANT_TYPES)}")
    if "unified" in model_type:
        text = text.replace(unified=True)
    ordered = "mtp.centroids.weight" in g.tensors
    centroids = g.tensors["mtp.centroids.weight"].shape[0] if ordered else 2048
    return DrafterConfig(text, int(backbone), ordered, int(centroids), int(g.arch_get("centroid_top_k", 32)),
                         model_type)


def load_drafter_gguf(g: GGUFFile, dtype: torch.dtype, *, blocks: bool = False) -> Drafter:
    """A Drafter from a gemma4-assistant GGUF, strictly (build_drafter checks every tensor and shape). With
    `blocks` (the CPU fast path), its projections then run on the file's own blocks (draft.drafter_on_blocks)."""
    cfg = drafter_config_from_gguf(g)
    state: dict[str, torch.Tensor] = {}
    own: dict[str, QWeight] = {}
    for name, t in g.tensors.items():
        if name == ROPE_FREQS:
            continue  # the proportional-RoPE mask: read into the config (partial_rotary_factor)
        if name == "mtp.token_ordering.weight":
            if t.qtype != GGMLQuantizationType.I32:
                raise GemmaError(f"{g.path}: {name} must be I32 token ids, not {t.qtype.name}")
            state[_MTP_FROM_GGUF[name]] = torch.from_numpy(g.raw(name).view(np.int32).astype(np.int64))
            continue
        hf = _MTP_FROM_GGUF.get(name) or gguf_to_hf(name, "gemma4")
        if hf is None:
            raise GemmaError(f"{g.path}: unexpected tensor {name!r} in a Gemma 4 assistant drafter")
        state[hf] = torch.from_numpy(g.dequantize(name).copy())
        if len(t.shape) == 2 and t.qtype in NATIVE_TYPES and t.shape[1] % 32 == 0:
            own[hf] = QWeight(torch.from_numpy(g.raw(name)).reshape(t.shape[0], -1), t.qtype, *t.shape)
    drafter = build_drafter(cfg, state, g.path, dtype)
    return drafter_on_blocks(drafter, own) if blocks else drafter


__all__ = ["ARCH", "drafter_config_from_gguf", "load_drafter_gguf", "write_drafter_gguf"]
