"""The fast CPU path for GGUF files: Q8_0 weight-only layers, converted once and cached, loaded by memory map.

Q8_0 tensors (the 270M's tied embedding/LM head) are used from the GGUF's own mapping. Other quantized types
(Q4_K, Q5_0, Q6_K, ...) are dequantized and re-quantized to Q8_0 on the first load, behind a progress bar, and
written atomically to the cache (~/.cache/gemmakit/q8/), so a warm load only maps files: no tensor is read
until it is used. Norms stay float (they are tiny and need the exact 1 + w of the reference path).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .config import GemmaConfig
from .embedded import cache_dir
from .model import Gemma
from .quant.q8 import quantize_q8, swap_in_q8
from .weights.gguf import GGUFFile, GGMLQuantizationType
from .weights.names import gguf_to_hf

CACHE_VERSION = "1"
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def is_quantized(g: GGUFFile) -> bool:
    return any(t.qtype not in _FLOAT_TYPES for t in g.tensors.values())


def _cache_path(g: GGUFFile) -> Path:
    st = g.path.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}|{g.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "q8" / f"{g.path.stem}-{key[:16]}"


def _convert(g: GGUFFile, names: list[str], target: Path, progress: bool) -> None:
    """Re-quantize `names` to Q8_0 into target.bin + target.json, atomically (temp files, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    index: dict[str, list[int]] = {}
    tmp_bin = target.with_suffix(f".bin.tmp{os.getpid()}")
    with Progress(TextColumn("converting weights for the fast path (once)"), BarColumn(), MofNCompleteColumn(),
                  disable=not progress, transient=True) as bar, tmp_bin.open("wb") as f:
        task = bar.add_task("convert", total=len(names))
        for name in names:
            blocks = quantize_q8(g.dequantize(name))
            index[name] = [f.tell(), *blocks.shape]
            f.write(blocks.tobytes())
            bar.advance(task)
    tmp_json = target.with_suffix(f".json.tmp{os.getpid()}")
    tmp_json.write_text(json.dumps(index))
    os.replace(tmp_bin, target.with_suffix(".bin"))
    os.replace(tmp_json, target.with_suffix(".json"))  # the index last: its presence means the cache is complete


def load_gguf_q8(g: GGUFFile, cfg: GemmaConfig, *, dtype: torch.dtype, progress: bool) -> Gemma:
    """A CPU Gemma whose linears and tied embedding are Q8Linear/Q8Embedding over mapped Q8_0 blocks."""
    quantized, floats = {}, {}
    for name, t in g.tensors.items():
        hf = gguf_to_hf(name, cfg.family)
        (floats if t.qtype in _FLOAT_TYPES or name.endswith("norm.weight") else quantized)[name] = hf
    to_convert = sorted(n for n in quantized if g.tensors[n].qtype != GGMLQuantizationType.Q8_0)
    target = _cache_path(g)
    if to_convert and not target.with_suffix(".json").exists():
        _convert(g, to_convert, target, progress)
    blocks: dict[str, torch.Tensor] = {}
    if to_convert:
        index = json.loads(target.with_suffix(".json").read_text())
        data = np.memmap(target.with_suffix(".bin"), dtype=np.uint8, mode="c")
        for name in to_convert:
            off, rows, width = index[name]
            blocks[quantized[name]] = torch.from_numpy(data[off:off + rows * width].reshape(rows, width))
    for name, hf in quantized.items():
        if name not in to_convert:
            t = g.tensors[name]
            blocks[hf] = torch.from_numpy(g.raw(name).reshape(t.shape[0], -1))
    with torch.device("meta"):
        module = Gemma(cfg)
    swap_in_q8(module, blocks)
    state = {}
    for name, hf in floats.items():
        w = torch.from_numpy(g.dequantize(name).copy())
        state[hf] = (w - 1.0 if name.endswith("norm.weight") else w).to(dtype)  # GGUF norms hold 1 + w
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{g.path}: no tensor for {sorted(missing)[0]}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()
