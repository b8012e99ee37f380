"""Hugging Face model folders: config.json + safetensors (single file or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import GemmaConfig, from_hf
from ..errors import GemmaError

# Multimodal Gemma 3 nests the text decoder; old and new transformers spell the prefix differently (spec §4.1).
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_NOT_TEXT = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def read_hf_config(folder: Path) -> GemmaConfig:
    path = folder / "config.json"
    if not path.exists():
        raise GemmaError(f"{folder} has no config.json; a Hugging Face model folder needs config.json and "
                         "*.safetensors files")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GemmaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it") from None
    cfg = from_hf(raw)
    return cfg.replace(name=cfg.name or folder.name)


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise GemmaError(f"{folder}: shard(s) {', '.join(missing)} listed in {index_name} are missing")
            return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise GemmaError(f"{folder} has no *.safetensors weights; save the model with save_pretrained()")
    return files


def read_hf_state_dict(folder: Path, cfg: GemmaConfig) -> dict[str, torch.Tensor]:
    """All text-decoder tensors under HF CausalLM names (multimodal prefixes stripped, vision tensors dropped)."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            part = load_file(f) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise GemmaError(f"{f} cannot be read ({e}); the file is truncated or corrupt: re-download it") from None
        for name, t in part.items():
            if name.startswith(_NOT_TEXT):
                continue
            for old, new in _PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old):]
            out[name] = t
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # tied: an explicit copy of the embedding, if saved
    return out
