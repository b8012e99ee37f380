"""load_embedding_model(source) -> EmbeddingModel: a sentence-transformers folder, an EmbeddingGemma 2 folder or a
llama.cpp `gemma-embedding` GGUF, read into the one Gemma model (bidirectional config) plus a pooling head."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..config import GemmaConfig
from ..errors import GemmaError
from ..loader import build, resolve_device, resolve_dtype, sniff
from ..tokenizer import Tokenizer
from ..weights.gguf import (
    EMBEDDING_ARCH,
    EMBEDDING_DENSE,
    config_from_gguf,
    hf_tensor,
    read_gguf,
    state_dict_from_gguf,
    tokenizer_from_gguf,
)
from ..weights.hf import read_hf_config, read_hf_state_dict
from .head import Head, HeadSpec, read_sentence_transformers
from .model import EmbeddingModel, Wrap

# Encoder checkpoints are saved from the bare text model (no CausalLM "model." prefix; EmbeddingGemma2Model nests it
# under language_model.) and EmbeddingGemma 2 groups its per-layer-input tensors (HF-EG2 `ple`, `ple_block`).
_ENCODER_PREFIXES = ("model.language_model.", "language_model.", "model.")
_EG2_RENAMES = ((re.compile(r"^ple\."), ""), (re.compile(r"^(layers\.\d+\.)ple_block\."), r"\1"))
PROJECTION = "embedding_projection.weight"  # HF-EG2: the text model's D -> embedding_dim projection


def encoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """HF encoder tensors under gemmakit's (CausalLM) names, and EmbeddingGemma 2's projection if present."""
    out: dict[str, torch.Tensor] = {}
    projection = None
    for name, t in state.items():
        for prefix in _ENCODER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name == PROJECTION:
            projection = t
            continue
        for pattern, repl in _EG2_RENAMES:
            name = pattern.sub(repl, name)
        out[f"model.{name}"] = t
    return out, projection


def is_embedding_model(source: str | Path) -> bool:
    """True for the sources load_embedding_model reads (so `serve` can route a --model to the right kind)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "modules.json").exists():
            return True
        if not (path / "config.json").exists():
            return False
        try:
            return read_hf_config(path).use_bidirectional_attention
        except GemmaError:
            return False
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return False
        return read_gguf(path).architecture == EMBEDDING_ARCH
    return False


def load_embedding_model(source: str | Path, *, dtype: str | torch.dtype | None = "auto",
                         device: str | torch.device = "auto") -> EmbeddingModel:
    """Load an embedding model: EmbeddingGemma as a sentence-transformers folder or a llama.cpp GGUF, or an
    EmbeddingGemma 2 folder (`embedding_gemma2` / `embedding_gemma2_text`, optionally inside a sentence-transformers
    folder). Call `.embed(texts)` on the result. dtype "auto" = float32 on CPU, bfloat16 on CUDA."""
    path = Path(source).expanduser()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    fmt = sniff(path)
    if fmt == "gguf":
        return _from_gguf(path, dt, dev)
    if fmt != "hf":
        raise GemmaError(f"{path} is not an embedding model: pass a sentence-transformers folder (modules.json), "
                         "an EmbeddingGemma 2 folder or a gemma-embedding GGUF")
    cfg = read_hf_config(path)
    if not cfg.use_bidirectional_attention:
        raise GemmaError(f"{path} holds a causal decoder ({cfg.family}), not an embedding model; load it with "
                         "gemmakit.load() / `gemmakit chat`, or pass an EmbeddingGemma folder")
    spec = read_sentence_transformers(path) if (path / "modules.json").exists() else HeadSpec()
    state, projection = encoder_state(read_hf_state_dict(path, cfg, dtype=torch.float32))
    head = Head(spec, _projection(projection, path))
    module = build(cfg, {k: v.to(dt) for k, v in state.items()}, path, dtype=dt, device=dev)
    tok = _hf_tokenizer(path)
    return EmbeddingModel(module, head.to(dev), tok, _hf_wrap(path), spec, _limit(cfg, spec), str(path), "hf")


def _projection(weight: torch.Tensor | None, path: Path) -> nn.Linear | None:
    if weight is None:
        return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
    return linear.eval()


def _limit(cfg: GemmaConfig, spec: HeadSpec) -> int:
    """Tokens per text: the reference's max_seq_length where the folder sets one, else the context."""
    return min(int(spec.max_seq_length or cfg.max_position_embeddings), cfg.max_position_embeddings)


def _hf_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.model").exists():
        return Tokenizer.from_file(folder / "tokenizer.model")
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_hf_json(folder / "tokenizer.json")
    raise GemmaError(f"{folder}: no tokenizer.json or tokenizer.model; an embedding model needs its tokenizer")


def _hf_wrap(folder: Path) -> Wrap:
    """Which special tokens the reference tokenizer puts around a text: tokenizer.json's post-processor template
    (EmbeddingGemma: <bos> $A <eos>), overridden by tokenizer_config.json's add_bos_token / add_eos_token, which
    transformers applies when it loads the tokenizer."""
    bos, eos = True, False
    if (p := folder / "tokenizer.json").exists():
        post = json.loads(p.read_text(encoding="utf-8")).get("post_processor") or {}
        steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for step in steps:
            if step.get("type") == "TemplateProcessing":
                single = step.get("single", [])
                seq = next((i for i, s in enumerate(single) if "Sequence" in s), 0)
                before = [s["SpecialToken"]["id"] for s in single[:seq] if "SpecialToken" in s]
                after = [s["SpecialToken"]["id"] for s in single[seq + 1:] if "SpecialToken" in s]
                bos, eos = "<bos>" in before, "<eos>" in after
    if (p := folder / "tokenizer_config.json").exists():
        conf = json.loads(p.read_text(encoding="utf-8"))
        bos = bool(conf.get("add_bos_token", bos))
        eos = bool(conf.get("add_eos_token", eos))
    return Wrap(bos=bos, eos=eos)


def _from_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> EmbeddingModel:
    """llama.cpp's gemma-embedding: the encoder, dense_2/dense_3 (the 2_Dense/3_Dense layers), mean pooling."""
    g = read_gguf(path)
    if g.architecture != EMBEDDING_ARCH:
        raise GemmaError(f"{path} is a {g.architecture!r} GGUF, not an embedding model ({EMBEDDING_ARCH}); load it "
                         "with gemmakit.load() / `gemmakit chat`")
    pooling = int(g.arch_get("pooling_type", 1))
    if pooling != 1:
        raise GemmaError(f"{path}: pooling_type {pooling} is not mean (1); gemmakit implements mean pooling")
    cfg = config_from_gguf(g)
    spec = HeadSpec(normalize=True)
    for name in EMBEDDING_DENSE:
        if name in g.tensors:
            w = hf_tensor(g, name, torch.float32)
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                linear.weight.copy_(w)
            spec.dense.append((linear.eval(), nn.Identity()))
    module = build(cfg, state_dict_from_gguf(g, cfg.family, dtype=dtype), path, dtype=dtype, device=device)
    wrap = Wrap(bos=bool(g.get("tokenizer.ggml.add_bos_token", True)), eos=bool(g.get("tokenizer.ggml.add_eos_token",
                                                                                           False)))
    return EmbeddingModel(module, Head(spec).to(device), tokenizer_from_gguf(g), wrap, spec, _limit(cfg, spec),
                          str(path), "gguf")
