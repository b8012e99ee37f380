"""A sentence-transformers EmbeddingGemma folder written as llama.cpp's `gemma-embedding` GGUF (the benchmark's
llama.cpp peer and the GGUF tests need one; nothing else in gemmakit writes embedding models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import GemmaError
from ..tokenizer import Tokenizer
from ..weights.gguf import EMBEDDING_ARCH, EMBEDDING_DENSE
from ..weights.hf import read_hf_config, read_hf_state_dict
from ..weights.names import hf_to_gguf
from ..weights.writers import _add_tensor, _write_metadata, _write_tokenizer, atomic_write, finish_gguf
from .head import read_sentence_transformers
from .loading import encoder_state


def write_gemma_embedding_gguf(folder: str | Path, path: str | Path, *, qtype: str = "f32") -> Path:
    """As llama.cpp's converter writes EmbeddingGemma (convert_hf_to_gguf.py EmbeddingGemma): arch gemma-embedding,
    the config.json's own sliding_window (llama.cpp halves it), norms stored as 1 + w, 2_Dense/3_Dense as
    dense_2/dense_3, mean pooling, and add_eos_token (the tokenizer appends <eos>). qtype: f32, f16 or q8_0."""
    import gguf

    folder, path = Path(folder), Path(path)
    cfg = read_hf_config(folder)
    if cfg.family != "gemma3" or not cfg.use_bidirectional_attention:
        raise GemmaError(f"{folder} is not an EmbeddingGemma (bidirectional Gemma 3) folder")
    spec = read_sentence_transformers(folder)
    if len(spec.dense) != 2 or any(linear.bias is not None for linear, _ in spec.dense):
        raise GemmaError(f"{folder}: llama.cpp's gemma-embedding holds exactly two bias-free Dense layers")
    window = json.loads((folder / "config.json").read_text())["sliding_window"]
    state, _ = encoder_state(read_hf_state_dict(folder, cfg))

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, EMBEDDING_ARCH)
        _write_metadata(w, cfg.replace(sliding_window=window), qtype)
        w.add_pooling_type(gguf.PoolingType.MEAN)
        for name, (linear, _) in zip(EMBEDDING_DENSE, spec.dense, strict=True):  # llama.cpp checks shapes by these
            w.add_dense_features_dims(name.removesuffix(".weight"), linear.in_features, linear.out_features)
        _write_tokenizer(w, Tokenizer.from_file(folder / "tokenizer.model") if (folder / "tokenizer.model").exists()
                         else Tokenizer.from_hf_json(folder / "tokenizer.json"))
        w.kv_data[0].pop("tokenizer.ggml.add_eos_token")
        w.add_add_eos_token(True)
        for name, t in state.items():
            data = t.float().numpy()
            if name.endswith("norm.weight"):
                data = data + np.float32(1.0)  # llama.cpp stores Gemma 3's 1 + w
            _add_tensor(w, hf_to_gguf(name, "gemma3"), data, qtype)
        for name, (linear, _) in zip(EMBEDDING_DENSE, spec.dense, strict=True):
            _add_tensor(w, name, linear.weight.detach().float().numpy(), qtype)
        finish_gguf(w)

    atomic_write(path, write)
    return path
