"""Hugging Face model folders: config.json + safetensors (single file or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import GemmaConfig, from_hf
from ..errors import GemmaError
from .names import unused_shared_kv

# Multimodal Gemma 3/4 nest the text decoder; old and new transformers spell the prefix differently (spec §4.1).
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
# Image/audio towers and their projections into the text model (Gemma 3; Gemma 4 adds audio): never loaded.
_NOT_TEXT = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
             "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
             "model.vision_embedder.", "model.audio_embedder.")  # the last two: Gemma 4 Unified's encoder-free towers


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


def multimodal_note(folder: Path) -> str | None:
    """A one-line note when the folder is a multimodal checkpoint (Gemma4ForConditionalGeneration, Gemma 3 4B+):
    gemmakit loads its text decoder and ignores the other towers."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    towers = [k.removesuffix("_config") for k in ("vision_config", "audio_config") if raw.get(k)]
    if "text_config" not in raw or not towers:
        return None
    return (f"{folder.name} is a multimodal checkpoint: its text decoder is loaded and its {' and '.join(towers)} "
            "tower(s) are ignored (gemmakit runs text only)")


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


_ST_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ST_NAMES = {v: k for k, v in _ST_FLOATS.items()}


def _read_safetensors_as(path: Path, dtype: torch.dtype, *, buffer_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """The float tensors of one .safetensors file, converted to `dtype` as they are read, a slice at a time.

    load_file maps the file: converting from the mapping leaves every touched source page resident beside its
    converted copy, so an fp32 file loaded as bf16 peaks at 1.5x the fp32 size (the 270M: +1.07 GB) in RSS. Plain
    reads through one reused buffer peak at the converted size plus `buffer_bytes`. Format: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data (safetensors README).
    """
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        buf = bytearray(buffer_bytes)
        out: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            if name.startswith(_NOT_TEXT):
                continue
            src = _ST_FLOATS.get(info["dtype"])
            if src is None:
                raise GemmaError(f"{path}: tensor {name} is {info['dtype']}, not a float type a Gemma checkpoint has")
            flat = torch.empty(info["shape"], dtype=dtype).view(-1)
            per = buffer_bytes // src.itemsize
            f.seek(8 + n + info["data_offsets"][0])
            for i in range(0, flat.numel(), per):
                k = min(per, flat.numel() - i)
                view = memoryview(buf)[: k * src.itemsize]
                if f.readinto(view) != len(view):
                    raise GemmaError(f"{path} ends inside tensor {name}; the file is truncated: re-download it")
                flat[i : i + k] = torch.frombuffer(view, dtype=src, count=k)
            out[name] = flat.view(info["shape"])
    return out


def _read_weights(f: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if f.suffix != ".safetensors":
        return torch.load(f, map_location="cpu", weights_only=True)
    if dtype is not None and any(
        t.get("dtype") != _ST_NAMES.get(dtype) for k, t in _st_header(f).items() if k != "__metadata__"
    ):
        return _read_safetensors_as(f, dtype)
    return load_file(f)


def _st_header(f: Path) -> dict:
    with f.open("rb") as fh:
        return json.loads(fh.read(int.from_bytes(fh.read(8), "little")))


def read_hf_state_dict(folder: Path, cfg: GemmaConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All text-decoder tensors under HF CausalLM names (multimodal prefixes stripped, vision tensors dropped).

    dtype: convert while reading (bounded extra memory) where the file holds another dtype; None keeps the file's.
    """
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            part = _read_weights(f, dtype)
        except GemmaError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
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
    if cfg.family == "gemma3n":  # the Hub checkpoints keep k/v weights in the KV-shared layers, never used
        out = {k: v for k, v in out.items() if not unused_shared_kv(k, cfg.first_kv_shared_layer)}
    return out
