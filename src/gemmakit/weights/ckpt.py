"""gemma_pytorch checkpoints (`.ckpt`, or a folder of shards): no config inside, so a variant must be named."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from ..config import GemmaConfig
from ..errors import GemmaError
from .names import ckpt_to_hf


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary code
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GemmaError(f"{path} is not a loadable PyTorch checkpoint ({first}); it may be truncated or not "
                         "a gemma_pytorch .ckpt") from None
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise GemmaError(f"{path} does not hold a state dict")
    return obj


def read_ckpt(path: Path, cfg: GemmaConfig) -> dict[str, torch.Tensor]:
    """HF-named float tensors from a gemma_pytorch checkpoint (spec §4.2): qkv_proj split, int8 weights rescaled."""
    if path.is_dir():
        index = path / "pytorch_model.bin.index.json"
        if not index.exists():
            raise GemmaError(f"{path} is a folder without config.json or pytorch_model.bin.index.json")
        raw: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            raw.update(_load(path / shard))
    else:
        raw = _load(path)
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith("freqs_cis") or name.endswith("weight_scaler"):
            continue  # RoPE tables are recomputed; scalers are folded in below
        scaler = raw.get(name.replace(".weight", ".weight_scaler"))
        if scaler is not None:  # int8 checkpoints: w = weight * scaler per output row
            t = t.float() * scaler.float().reshape(-1, *([1] * (t.dim() - 1)))
        if name.endswith("self_attn.qkv_proj.weight"):
            if t.shape[0] != (n + 2 * k) * h:
                raise GemmaError(f"{path}: {name} has {t.shape[0]} rows, expected {(n + 2 * k) * h} for "
                                 f"variant {cfg.name}; pass the right variant=")
            q, kk, v = t.split([n * h, k * h, k * h], dim=0)
            base = name.removesuffix("qkv_proj.weight")
            out[base + "q_proj.weight"], out[base + "k_proj.weight"], out[base + "v_proj.weight"] = q, kk, v
            continue
        out[ckpt_to_hf(name)] = t
    return out
